"""gsp export: the layouts SAELens, sparsify, Gemma Scope 2 and circuit-tracer read, checked against each
library's own encoding written out here in numpy (from their documented code), and read back through gsp's loader."""

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import one_line_error
from safetensors.numpy import load_file
from typer.testing import CliRunner

from pipeline.hooks import hook_point
from pipeline.sae import SAE, SAEConfig
from pipeline.sae_formats import load_sae
from pipeline.transcoder_set import TranscoderSet

D, F, LAYER = 24, 4096, 12


def _sae(arch: str, skip: bool = False, d_out: int | None = None) -> SAE:
    g = torch.Generator().manual_seed(1 if arch == "topk" else 2)
    sae = SAE(D, F, arch=arch, k=16 if arch == "topk" else None, d_out=d_out, skip=skip).init_gemma_scope(g)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(F, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(sae.d_out, generator=g) * 2)
        sae.threshold.copy_(torch.rand(F, generator=g) * 0.5 if arch == "jumprelu" else torch.zeros(F))
        if skip:
            sae.w_skip.copy_(torch.randn(D, sae.d_out, generator=g) * 0.1)
    return sae


def _saved(tmp_path, sae: SAE, l0: float) -> str:
    folder = tmp_path / "gsp_sae"
    site_out = "mlp_out" if sae.is_transcoder else "resid_post"
    config = SAEConfig(architecture="jump_relu" if sae.arch == "jumprelu" else "topk", model_name="google/gemma-3-270m",
                       hf_hook_point_in=hook_point(LAYER, "mlp_in" if sae.is_transcoder else "resid_post"),
                       hf_hook_point_out=hook_point(LAYER, site_out), width=F, l0=l0, k=sae.k,
                       affine_connection=sae.skip, type="transcoder" if sae.is_transcoder else "sae",
                       gsp_version="test")  # fmt: skip
    sae.save(folder, config)
    return str(folder)


def _x(n: int = 200) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, D)).astype(np.float32) * 2


def _reference(sae: SAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(latents, reconstruction) of the original SAE, computed here in float64 from its parameters."""
    p = {k: getattr(sae, k).detach().double().numpy() for k in sae.params}
    pre = x @ p["w_enc"] + p["b_enc"]
    if sae.arch == "jumprelu":
        f = np.maximum(pre, 0) * (pre > p["threshold"])
    else:
        f = np.zeros_like(pre)
        top = np.argsort(-pre, axis=1)[:, : sae.k]
        np.put_along_axis(f, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    return f, f @ p["w_dec"] + p["b_dec"]


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_saelens_layout_computes_what_the_sae_computes(gsp, tmp_path, arch):
    sae = _sae(arch)
    r = gsp("export", _saved(tmp_path, sae, 60), "--to", "saelens", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    t = {k: v.astype(np.float64) for k, v in load_file(tmp_path / "out" / "sae_weights.safetensors").items()}
    assert cfg["architecture"] == arch and (cfg["d_in"], cfg["d_sae"]) == (D, F)
    assert cfg["metadata"]["sae_lens_version"] >= "6" and cfg["metadata"]["hook_name"] == hook_point(
        LAYER, "resid_post"
    )
    assert sorted(t) == sorted(["W_enc", "W_dec", "b_enc", "b_dec"] + ["threshold"] * (arch == "jumprelu"))
    # SAELens' encode (saes/sae.py process_sae_in, jumprelu_sae.py, topk_sae.py), written out here
    x = _x().astype(np.float64)
    sae_in = x - t["b_dec"] * cfg["apply_b_dec_to_input"]
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if arch == "jumprelu":
        f = np.maximum(pre, 0) * (pre > t["threshold"])
    else:
        top = np.argsort(-pre, axis=1)[:, : cfg["k"]]
        f = np.zeros_like(pre)
        np.put_along_axis(f, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    want_f, want_y = _reference(sae, x)
    np.testing.assert_allclose(f, want_f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f @ t["W_dec"] + t["b_dec"], want_y, rtol=1e-5, atol=1e-5)
    _reads_back_the_same(sae, tmp_path / "out", "saelens")


def test_sparsify_layout_computes_what_the_topk_sae_computes(gsp, tmp_path):
    sae = _sae("topk")
    r = gsp("export", _saved(tmp_path, sae, 16), "--to", "sparsify", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    folder = tmp_path / "out" / f"layers.{LAYER}"  # sparsify's hookpoint folder of the residual stream
    cfg = json.loads((folder / "cfg.json").read_text())
    t = {k: v.astype(np.float64) for k, v in load_file(folder / "sae.safetensors").items()}
    assert cfg["d_in"] == D and cfg["num_latents"] == F and cfg["k"] == 16 and cfg["activation"] == "topk"
    assert sorted(t) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"]  # no threshold
    # sparsify's encode (sparse_coder.py, fused_encoder.py): relu((x − b_dec) @ Wᵀ + b), then the top k
    x = _x().astype(np.float64)
    pre = np.maximum((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"], 0)
    top = np.argsort(-pre, axis=1)[:, : cfg["k"]]
    f = np.zeros_like(pre)
    np.put_along_axis(f, top, np.take_along_axis(pre, top, 1), 1)
    want_f, want_y = _reference(sae, x)
    np.testing.assert_allclose(f, want_f, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f @ t["W_dec"] + t["b_dec"], want_y, rtol=1e-4, atol=1e-4)
    _reads_back_the_same(sae, folder, "sparsify")


@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip transcoder"])
def test_gemma_scope_2_layout_and_folder_names(gsp, tmp_path, kind):
    sae = _sae("jumprelu", skip=kind == "skip transcoder", d_out=None if kind == "sae" else 20)
    r = gsp("export", _saved(tmp_path, sae, 60), "--to", "gemma-scope-2", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    name = {"sae": "resid_post/layer_12_width_4k_l0_medium", "transcoder": "transcoder/layer_12_width_4k_l0_medium",
            "skip transcoder": "transcoder/layer_12_width_4k_l0_medium_affine"}[kind]  # fmt: skip
    folder = tmp_path / "out" / name
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "jump_relu" and cfg["width"] == F and cfg["l0"] == 60
    assert cfg["affine_connection"] == (kind == "skip transcoder") and "gsp_version" not in cfg
    t = load_file(folder / "params.safetensors")
    assert ("affine_skip_connection" in t) == (kind == "skip transcoder")
    np.testing.assert_array_equal(t["w_enc"], sae.w_enc.detach().numpy())
    _reads_back_the_same(sae, folder, "gemma-scope-2")
    assert gsp("export", folder, "--to", "gemma-scope-2", "--out", tmp_path / "again", "--l0", 130).exit_code == 0
    assert (tmp_path / "again" / name.replace("medium", "big")).is_dir()


def _reads_back_the_same(sae: SAE, folder, fmt: str) -> None:
    loaded = load_sae(str(folder))
    assert loaded.format == fmt and (loaded.layer, loaded.site) == (
        LAYER,
        "mlp_in" if sae.is_transcoder else "resid_post",
    )
    x = torch.from_numpy(_x())
    with torch.no_grad():
        a, b = sae(x), loaded.sae(x)
    torch.testing.assert_close(b.pre_BF, a.pre_BF, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.x_hat_BD, a.x_hat_BD, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "arch, to, words",
    [
        ("topk", "gemma-scope-2", "JumpReLU only"),
        ("jumprelu", "sparsify", "TopK SAEs only"),
        ("transcoder", "saelens", "export them --to gemma-scope-2"),
        ("jumprelu", "onnx", "unknown export format"),
    ],
)
def test_what_a_layout_cannot_hold_is_one_clear_line(gsp, tmp_path, arch, to, words):
    sae = _sae("jumprelu", d_out=20) if arch == "transcoder" else _sae(arch)
    r = gsp("export", _saved(tmp_path, sae, 60), "--to", to, "--out", tmp_path / "out")
    assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_export_never_writes_over_a_folder(gsp, tmp_path):
    src = _saved(tmp_path, _sae("jumprelu"), 60)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cfg.json").write_text("mine")
    r = gsp("export", src, "--to", "saelens", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "already exists" in r.output
    assert (tmp_path / "out" / "cfg.json").read_text() == "mine" and len(list((tmp_path / "out").iterdir())) == 1


def test_a_topk_sae_folder_carries_no_threshold(tmp_path):
    """gsp's own files of a TopK SAE have no threshold a JumpReLU reader could misuse, and load as TopK."""
    sae = _sae("topk")
    folder = _saved(tmp_path, sae, 16)
    assert "threshold" not in load_file(f"{folder}/params.safetensors")
    again = load_sae(folder).sae
    assert again.arch == "topk" and again.k == 16
    x = torch.from_numpy(_x())
    torch.testing.assert_close(again(x).x_hat_BD, sae(x).x_hat_BD)


@pytest.mark.parametrize("lib, arch", [("sae_lens", "jumprelu"), ("sae_lens", "topk"), ("sparsify", "topk")])
def test_the_peer_library_itself_loads_the_export(gsp, tmp_path, lib, arch):
    """Where the peer library is installed (it is not in the test extra), it loads the files and computes
    the SAE's reconstruction."""
    pytest.importorskip(lib)
    sae = _sae(arch)
    r = gsp("export", _saved(tmp_path, sae, 16), "--to", "saelens" if lib == "sae_lens" else "sparsify",
            "--out", tmp_path / "out")  # fmt: skip
    assert r.exit_code == 0, r.output
    x = torch.from_numpy(_x())
    if lib == "sae_lens":
        from sae_lens import SAE as LensSAE

        peer = LensSAE.load_from_disk(str(tmp_path / "out"), device="cpu")
        y = peer.decode(peer.encode(x))
    else:
        from sparsify import SparseCoder

        peer = SparseCoder.load_from_disk(tmp_path / "out" / f"layers.{LAYER}", device="cpu")
        y = peer(x).sae_out
    torch.testing.assert_close(y.float(), sae(x).x_hat_BD, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def fitted_sets(every_mlp, tmp_path_factory) -> dict:
    """JumpReLU transcoder sets fitted on the tiny Gemma 3's every MLP, without and with skip connections."""
    from stages.cli import app

    sets = {}
    for name, skip in (("plain", []), ("skip", ["--skip"])):
        sets[name] = tmp_path_factory.mktemp("set") / name
        r = CliRunner().invoke(app, ["fit", "--store", str(every_mlp / "store"), "--transcoders", "mlp_in:mlp_out",
                                     "--out", str(sets[name]), "--width", "48", "--steps", "20", "--batch-size", "128",
                                     "--target-l0", "6", *skip])  # fmt: skip
        assert r.exit_code == 0, r.output
    return sets


@pytest.mark.parametrize("kind", ["plain", "skip"])
def test_circuit_tracer_layout_computes_what_the_set_computes(gsp, fitted_sets, tmp_path, kind):
    folder, out = fitted_sets[kind], tmp_path / "ct"
    r = gsp("export", folder, "--to", "circuit-tracer", "--out", out)
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg == {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
                   "feature_output_hook": "hook_mlp_out", "scan": str(folder.resolve()),
                   "model_name": json.loads((folder / "transcoder_set.json").read_text())["model"]}  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", *(f"layer_{i}.safetensors" for i in range(4))]
    # circuit-tracer's encode and decode (transcoder/single_layer_transcoder.py, activation_functions.py), written
    # out here: pre = x @ W_encᵀ + b_enc, f = pre·1[pre > θ], ŷ = f @ W_dec + b_dec + x @ W_skipᵀ
    for layer, sae in TranscoderSet.load(folder).saes.items():
        assert sae.skip == (kind == "skip")
        t = {k: v.astype(np.float64) for k, v in load_file(out / f"layer_{layer}.safetensors").items()}
        F_, D_ = sae.width, sae.d_in
        want = {"W_enc": (F_, D_), "W_dec": (F_, D_), "b_enc": (F_,), "b_dec": (D_,),
                "activation_function.threshold": (F_,)} | ({"W_skip": (D_, D_)} if sae.skip else {})  # fmt: skip
        assert {k: v.shape for k, v in t.items()} == want
        x = np.random.default_rng(int(layer)).standard_normal((200, D_)) * 3
        pre = x @ t["W_enc"].T + t["b_enc"]
        f = pre * (pre > t["activation_function.threshold"])
        y = f @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if sae.skip else 0)
        with torch.no_grad():
            ours = sae(torch.from_numpy(x).float())
        assert ours.f_BF.count_nonzero() > 0
        np.testing.assert_allclose(pre, ours.pre_BF.double().numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(f, ours.f_BF.double().numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(y, ours.x_hat_BD.double().numpy(), rtol=1e-4, atol=1e-4)


def test_what_circuit_tracer_cannot_hold_is_one_clear_line(gsp, fitted_sets, every_mlp, tmp_path):
    """A TopK set, a single SAE, another format for a set, and an existing folder are one line each; nothing
    is written."""
    fitted_set = fitted_sets["plain"]
    topk = tmp_path / "topk"
    r = gsp("fit", "--store", every_mlp / "store", "--transcoders", "mlp_in:mlp_out", "--out", topk, "--width", 48,
            "--steps", 5, "--batch-size", 64, "--arch", "topk", "--k", 4)  # fmt: skip
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    one_line_error(gsp("export", topk, "--to", "circuit-tracer", "--out", out), "TopK set has no circuit-tracer")
    one_line_error(gsp("export", fitted_set / "layer_0", "--to", "circuit-tracer", "--out", out), "is not one")
    one_line_error(gsp("export", fitted_set, "--to", "saelens", "--out", out), "--to gemma-scope-2")
    assert not out.exists()
    out.mkdir()
    (out / "config.yaml").write_text("mine")
    one_line_error(gsp("export", fitted_set, "--to", "circuit-tracer", "--out", out), "already exists")
    assert [p.name for p in out.iterdir()] == ["config.yaml"] and (out / "config.yaml").read_text() == "mine"
