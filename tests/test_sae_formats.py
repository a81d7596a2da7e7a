"""pipeline.sae_formats: every supported SAE format loads into gsp's SAE with the format's own inference, on raw inputs.

Each format is written here exactly as its publisher lays it out (file names, keys, shapes, dtypes) with
random weights, and gsp's forward pass is compared with an independent numpy version of the format's
published inference. The Hub is never contacted: its download is either recorded or served from a
Hub cache laid out on disk as huggingface_hub writes it.
"""

import json
import types

import huggingface_hub
import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors.torch import save_file

from pipeline.errors import GspError
from pipeline.sae_formats import SAE_FILES, hub_sae_path, load_sae

D, F = 16, 48
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ------------------------------------------------------------------------------ reference inference (numpy)
def gemma_scope_reference(x, p):
    """Gemma Scope 1/2, as published: f = ReLU(pre)·1[pre > θ] with pre = x W_enc + b_enc, x̂ = f W_dec + b_dec,
    on raw activations. Returns (x̂, which latents are non-zero)."""
    f = gemma_scope_latents(x, p)
    return f @ p["w_dec"] + p["b_dec"], f != 0


def gemma_scope_latents(x, p):
    """Gemma Scope 2's JumpReLU: ReLU(pre)·1[pre > θ] (the ReLU matters where θ < 0)."""
    pre = x @ p["w_enc"] + p["b_enc"]
    return np.maximum(pre, 0) * (pre > p["threshold"])


def topk_reference(x, p, k):
    pre = x @ p["w_enc"] + p["b_enc"]
    top = np.argsort(-pre, axis=1)[:, :k]
    f = np.zeros_like(pre)
    np.put_along_axis(f, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    return f @ p["w_dec"] + p["b_dec"], f > 0


def lm_saes_reference(x, hp, t):
    """OpenMOSS lm-saes SparseAutoEncoder.encode/decode with dataset-wise norms, in float64."""
    d = hp["d_model"]
    s_in = np.sqrt(d) / hp["dataset_average_activation_norm"]["in"]
    s_out = np.sqrt(d) / hp["dataset_average_activation_norm"]["out"]
    enc, b_e, dec, b_d = (t[k] for k in ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"))
    pre = (x * s_in) @ enc.T + b_e
    m = np.linalg.norm(dec, axis=0) if hp.get("sparsity_include_decoder_norm", True) else np.ones(enc.shape[0])
    g = pre * m
    if hp["act_fn"] == "jumprelu":
        mask = g > hp["jump_relu_threshold"]
    else:
        mask = np.zeros_like(g, dtype=bool)
        np.put_along_axis(mask, np.argsort(-g, axis=1)[:, : hp["top_k"]], True, 1)
        mask &= g > 0
    f = pre * mask
    return (f @ dec.T + b_d) / s_out, mask, g


def run_gsp(loaded, x):
    out = loaded.sae(torch.from_numpy(x.astype(np.float32)))
    return out.x_hat_BD.numpy().astype(np.float64), out.f_BF.numpy() != 0


# ------------------------------------------------------------------------------ writers of each format
def gs_weights(seed=0, d=D, n=F):
    rng = np.random.default_rng(seed)
    return {
        "w_enc": rng.standard_normal((d, n)).astype(np.float32) * 0.3,
        "w_dec": rng.standard_normal((n, d)).astype(np.float32) * 0.3,
        "b_enc": rng.standard_normal(n).astype(np.float32) * 0.1,
        "b_dec": rng.standard_normal(d).astype(np.float32),
        "threshold": np.abs(rng.standard_normal(n)).astype(np.float32),
    }


def write_gemma_scope_2(folder, params=None, **config):
    """A Gemma Scope 2 SAE folder: config.json as the release writes it + float32 params.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    params = gs_weights() if params is None else params
    safetensors.numpy.save_file(params, str(folder / "params.safetensors"))
    cfg = {
        "model_name": "google/gemma-3-270m-pt",
        "architecture": "jump_relu",
        "hf_hook_point_in": "model.layers.12.output",
        "hf_hook_point_out": "model.layers.12.output",
        "width": F,
        "l0": 20,
        "affine_connection": False,
        "type": "sae",
        **config,
    }
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return params


def write_gemma_scope_1(folder, params=None):
    folder.mkdir(parents=True, exist_ok=True)
    params = gs_weights(1) if params is None else params
    np.savez(folder / "params.npz", **{("W" + k[1:] if k.startswith("w_") else k): v for k, v in params.items()})
    return params


def write_llama_scope(folder, *, act_fn="jumprelu", include_norm=True, dtype=torch.bfloat16, **hp_over):
    """An lm-saes folder as fnlp/Llama3_1-8B-Base-L*R-8x ships it, with non-unit decoder columns."""
    rng = np.random.default_rng(2)
    dec = rng.standard_normal((D, F)) * rng.uniform(0.3, 3.0, F) / np.sqrt(D)  # column norms 0.3..3
    tensors = {
        "encoder.weight": torch.from_numpy(rng.standard_normal((F, D)) / np.sqrt(D)),
        "encoder.bias": torch.from_numpy(rng.standard_normal(F) * 0.2),
        "decoder.weight": torch.from_numpy(dec),
        "decoder.bias": torch.from_numpy(rng.standard_normal(D) * 0.5),
    }
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    (folder / "checkpoints").mkdir(parents=True)
    save_file(tensors, folder / "checkpoints" / "final.safetensors")
    hp = {
        "d_model": D,
        "d_sae": F,
        "hook_point_in": "blocks.15.hook_resid_post",
        "hook_point_out": "blocks.15.hook_resid_post",
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
        "act_fn": act_fn,
        "jump_relu_threshold": 0.4,
        "top_k": 5,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": 12.5, "out": 30.0},
        "sparsity_include_decoder_norm": include_norm,
        "init_decoder_norm": 0.5,
        **hp_over,
    }
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    (folder / "lm_config.json").write_text(json.dumps({"model_name": "meta-llama/Llama-3.1-8B", "d_model": D}))
    return hp, {k: v.double().numpy() for k, v in tensors.items()}


def inputs(seed=3, n=64, scale=1.0):
    return np.random.default_rng(seed).standard_normal((n, D)) * scale


def assert_some_fire_some_dont(active):
    assert 0.05 < active.mean() < 0.95, active.mean()


# ------------------------------------------------------------------------------ Gemma Scope 2 and gsp
def test_gemma_scope_2_matches_its_published_inference(tmp_path):
    folder = tmp_path / "gemma-scope-2-270m-pt" / "resid_post" / "layer_12_width_16k_l0_medium"
    p = write_gemma_scope_2(folder)
    loaded = load_sae(str(folder))
    assert (loaded.format, loaded.layer, loaded.site) == ("gemma-scope-2", 12, "resid_post")
    assert loaded.model_name == "google/gemma-3-270m-pt" and loaded.path == folder and loaded.source == str(folder)
    assert loaded.config["l0"] == 20
    sae = loaded.sae
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in sae.parameters())
    assert not sae.training and sae.arch == "jumprelu" and (sae.d_in, sae.width) == (D, F)
    x = inputs()
    want, active = gemma_scope_reference(x, p)
    got, got_active = run_gsp(loaded, x)
    assert_some_fire_some_dont(active)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (got_active == active).all()


def test_negative_thresholds_follow_gemma_scope_2s_relu(tmp_path):
    """A loaded file may hold θ < 0: then pre in (θ, 0] gives 0 (ReLU), not the negative pre·1[pre > θ]."""
    p = gs_weights(5)
    p["threshold"][::2] = -np.abs(p["threshold"][::2]) - 0.2  # half the latents with θ in about (-2.5, -0.2)
    folder = tmp_path / "gemma-scope-2-270m-pt" / "resid_post" / "layer_12_width_16k_l0_medium"
    write_gemma_scope_2(folder, p)
    loaded = load_sae(str(folder))
    assert loaded.format == "gemma-scope-2" and (loaded.sae.threshold < 0).sum() == F // 2
    x = inputs(seed=6).astype(np.float32).astype(np.float64)
    pre = x @ p["w_enc"] + p["b_enc"]
    below_zero = (pre > p["threshold"]) & (pre < 0)
    assert below_zero.sum() > 50  # the case where the two formulas part: θ < pre < 0
    want_f = gemma_scope_latents(x, p)
    want, _ = gemma_scope_reference(x, p)
    old_f = pre * (pre > p["threshold"])  # the formula gsp used before: it would fail the checks below
    assert np.abs(old_f - want_f).max() > 0.1
    assert np.abs((old_f @ p["w_dec"] + p["b_dec"]) - want).max() > 0.1

    with torch.no_grad():
        out = loaded.sae(torch.from_numpy(x.astype(np.float32)))
    np.testing.assert_allclose(out.f_BF.numpy(), want_f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.x_hat_BD.numpy(), want, rtol=1e-5, atol=1e-5)
    assert (out.f_BF >= 0).all() and (out.f_BF[torch.from_numpy(below_zero)] == 0).all()
    # one feature at one row (what gsp features reads for its context windows) follows the same rule
    rows, feats = (torch.from_numpy(i) for i in np.nonzero(below_zero | (want_f > 0)))
    with torch.no_grad():
        at = loaded.sae.activation_at(torch.from_numpy(x.astype(np.float32)), rows, feats)
    np.testing.assert_allclose(at.numpy(), want_f[rows.numpy(), feats.numpy()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("hook", "site"),
    [  # the strings Gemma Scope 2's configs use (SAELens tests/loading/test_pretrained_sae_loaders.py)
        ("model.layers.7.output", "resid_post"),
        ("model.layers.7.post_feedforward_layernorm.output", "mlp_out"),
        ("model.layers.7.self_attn.o_proj.input", "attn_out"),
    ],
)
def test_gemma_scope_2_hook_points_name_gsp_sites(tmp_path, hook, site):
    write_gemma_scope_2(tmp_path / "sae", hf_hook_point_in=hook, hf_hook_point_out=hook)
    loaded = load_sae(str(tmp_path / "sae"))
    assert (loaded.layer, loaded.site) == (7, site)


def test_without_a_hook_point_layer_and_site_come_from_the_path(tmp_path):
    folder = tmp_path / "attn_out_all" / "layer_9_width_16k_l0_small"
    write_gemma_scope_2(folder, hf_hook_point_in=None, hf_hook_point_out=None)
    loaded = load_sae(str(folder / "params.safetensors"))  # a file in the folder works too
    assert (loaded.layer, loaded.site, loaded.path) == (9, "attn_out", folder)


def test_gemma_scope_2_layout_topk(tmp_path):
    p = gs_weights(4)
    p.pop("threshold")  # optional for topk
    write_gemma_scope_2(tmp_path / "sae", p, architecture="topk", k=6)
    loaded = load_sae(str(tmp_path / "sae"))
    x = inputs()
    want, active = topk_reference(x, p, 6)
    got, got_active = run_gsp(loaded, x)
    assert loaded.sae.arch == "topk" and loaded.sae.k == 6
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (got_active == active).all() and (active.sum(1) <= 6).all()


def test_an_sae_from_gsp_fit_loads_with_its_layer_site_and_model(tmp_path):
    from safetensors.numpy import load_file

    from pipeline.tiny import write_synthetic_store
    from stages.fit import FitConfig, run_fit

    x = np.random.default_rng(0).standard_normal((2048, D)).astype(np.float32) * 5
    write_synthetic_store(tmp_path / "store", x)
    out = tmp_path / "sae"
    run_fit(FitConfig(store=str(tmp_path / "store"), out=str(out), arch="jumprelu", width=32, steps=20, batch_size=64))
    loaded = load_sae(str(out))
    assert (loaded.format, loaded.layer, loaded.site, loaded.model_name) == ("gsp", 0, "resid_post", "synthetic")
    assert loaded.config["gsp_version"]
    p = {k: v.astype(np.float64) for k, v in load_file(str(out / "params.safetensors")).items()}
    want, _ = gemma_scope_reference(x[:64].astype(np.float64), p)
    np.testing.assert_allclose(run_gsp(loaded, x[:64])[0], want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ Gemma Scope 1
@pytest.mark.parametrize(
    ("repo", "site", "model"),
    [
        ("models--google--gemma-scope-2b-pt-res", "resid_post", "google/gemma-2-2b"),
        ("models--google--gemma-scope-9b-it-mlp", "mlp_out", "google/gemma-2-9b-it"),
        ("gemma-scope-27b-pt-att", "attn_out", "google/gemma-2-27b"),
        ("my-saes", None, None),
    ],
)
def test_gemma_scope_1_npz_matches_its_published_inference(tmp_path, repo, site, model):
    folder = tmp_path / repo / "snapshots" / COMMIT / "layer_20" / "width_16k" / "average_l0_71"
    p = write_gemma_scope_1(folder)
    loaded = load_sae(str(folder))
    assert (loaded.format, loaded.layer, loaded.site, loaded.model_name) == ("gemma-scope", 20, site, model)
    assert loaded.config == {}
    x = inputs(scale=2.0)
    want, active = gemma_scope_reference(x, p)
    got, got_active = run_gsp(loaded, x)
    assert_some_fire_some_dont(active)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (got_active == active).all()


# ------------------------------------------------------------------------------ Llama Scope
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("include_norm", [True, False])
@pytest.mark.parametrize("act_fn", ["jumprelu", "topk"])
def test_llama_scope_matches_lm_saes_inference(tmp_path, act_fn, include_norm, dtype):
    hp, t = write_llama_scope(tmp_path / "L15R", act_fn=act_fn, include_norm=include_norm, dtype=dtype)
    loaded = load_sae(str(tmp_path / "L15R"))
    assert (loaded.format, loaded.layer, loaded.site) == ("llama-scope", 15, "resid_post")
    assert loaded.model_name == "meta-llama/Llama-3.1-8B" and loaded.config == hp
    x = inputs(scale=4.0)  # raw activations, norm ≈ 16 against the dataset's 12.5
    want, active, g = lm_saes_reference(x, hp, t)
    got, got_active = run_gsp(loaded, x)
    assert_some_fire_some_dont(active)
    # float32 vs float64: compare the tokens where no feature sits within rounding of the cut-off
    cut = hp["jump_relu_threshold"] if act_fn == "jumprelu" else -np.sort(-g, axis=1)[:, [hp["top_k"] - 1, hp["top_k"]]]
    if act_fn == "jumprelu":
        clear = (np.abs(g - cut) > 1e-4).all(1)
    else:
        clear = cut[:, 0] - cut[:, 1] > 1e-4
    assert clear.mean() > 0.8
    np.testing.assert_allclose(got[clear], want[clear], rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert (got_active[clear] == active[clear]).all()
    rows = loaded.sae.w_dec.norm(dim=1).numpy()
    if include_norm:  # features in raw units: unit-norm decoder rows
        np.testing.assert_allclose(rows, 1.0, rtol=1e-5)
    else:
        np.testing.assert_allclose(rows, np.linalg.norm(t["decoder.weight"], axis=0), rtol=1e-5)


def test_llama_scope_mlp_out_and_model_name_from_lm_config(tmp_path):
    write_llama_scope(tmp_path / "L3M", hook_point_in="blocks.3.hook_mlp_out", hook_point_out="blocks.3.hook_mlp_out")
    (tmp_path / "L3M" / "lm_config.json").write_text(json.dumps({"model_name": "meta-llama/Llama-3.1-8B-Instruct"}))
    loaded = load_sae(str(tmp_path / "L3M"))
    assert (loaded.layer, loaded.site, loaded.model_name) == (3, "mlp_out", "meta-llama/Llama-3.1-8B-Instruct")


# ------------------------------------------------------------------------------ the Hub
def test_hub_path_fetches_only_that_saes_files_and_keeps_the_token_out(tmp_path, monkeypatch):
    secret = "hf_SECRETsecretSECRET"
    sub = "resid_post/layer_5_width_16k_l0_small"
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        write_gemma_scope_2(tmp_path / "snap" / sub, hf_hook_point_in="model.layers.5.output", hf_hook_point_out=None)
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.chdir(tmp_path)  # so the spec is no local path
    assert hub_sae_path(f"google/gemma-scope-2-270m-pt/{sub}") == ("google/gemma-scope-2-270m-pt", sub)
    loaded = load_sae(f"google/gemma-scope-2-270m-pt/{sub}", revision="v1")
    ((repo_id, kwargs),) = calls
    assert repo_id == "google/gemma-scope-2-270m-pt" and kwargs["revision"] == "v1" and kwargs["token"] == secret
    assert sorted(kwargs["allow_patterns"]) == sorted(f"{sub}/{name}" for name in SAE_FILES)
    assert (loaded.path, loaded.layer, loaded.site) == (tmp_path / "snap" / sub, 5, "resid_post")
    assert loaded.source == f"google/gemma-scope-2-270m-pt/{sub}"
    assert secret not in repr(loaded) + json.dumps(loaded.config)
    load_sae(f"google/gemma-scope-2-270m-pt/{sub}", token="hf_flag")  # --token wins over HF_TOKEN
    assert calls[-1][1]["token"] == "hf_flag"


def test_hub_path_is_served_offline_from_the_hub_cache(tmp_path, monkeypatch):
    """The real snapshot_download, reading a Hub cache laid out as huggingface_hub writes it."""
    repo = tmp_path / "hub" / "models--gsp-test--gemma-scope-2-tiny-pt"
    sub = "mlp_out/layer_2_width_16k_l0_small"
    hook = "model.layers.2.post_feedforward_layernorm.output"
    p = write_gemma_scope_2(repo / "snapshots" / COMMIT / sub, hf_hook_point_in=hook, hf_hook_point_out=hook)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so the spec is no local path
    loaded = load_sae(f"gsp-test/gemma-scope-2-tiny-pt/{sub}")
    assert loaded.path.resolve() == (repo / "snapshots" / COMMIT / sub).resolve()
    assert (loaded.format, loaded.layer, loaded.site) == ("gemma-scope-2", 2, "mlp_out")
    x = inputs()
    np.testing.assert_allclose(run_gsp(loaded, x)[0], gemma_scope_reference(x, p)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(GspError, match="has no SAE under 'mlp_out/layer_3_width_16k_l0_small'"):
        load_sae("gsp-test/gemma-scope-2-tiny-pt/mlp_out/layer_3_width_16k_l0_small")
    with pytest.raises(GspError, match="not in the Hub cache"):
        load_sae("gsp-test/no-such-repo/resid_post/layer_1")


def _response(status):
    return types.SimpleNamespace(status_code=status, headers={}, request=None)


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (lambda s: huggingface_hub.errors.GatedRepoError(f"403 gated {s}", response=_response(403)), "accept the"),
        (lambda s: huggingface_hub.errors.HfHubHTTPError(f"401 {s}", response=_response(401)), "set HF_TOKEN"),
        (lambda s: huggingface_hub.errors.RepositoryNotFoundError(s, response=_response(404)), "no Hub repository"),
        (lambda s: huggingface_hub.errors.HfHubHTTPError(f"500 {s}\nmore", response=_response(500)), "from the Hub"),
        (lambda s: huggingface_hub.errors.LocalEntryNotFoundError(s), "not in the Hub cache"),
        (lambda s: OSError(f"disk full {s}"), "could not fetch"),
    ],
)
def test_hub_errors_become_one_line_gsp_errors_without_the_token(monkeypatch, tmp_path, error, words):
    secret = "hf_SECRETsecretSECRET"

    def failing(repo_id, **kwargs):
        raise error(kwargs["token"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GspError) as e:
        load_sae("google/gemma-scope-2-1b-pt/resid_post/layer_7_width_16k_l0_small", token=secret)
    message = str(e.value)
    assert words in message and "google/gemma-scope-2-1b-pt" in message
    assert "\n" not in message and secret not in message


# ------------------------------------------------------------------------------ bad input
def _gs2_with(tmp_path, **change):
    p = gs_weights()
    p.update({k: v for k, v in change.items() if v is not None})
    for k in [k for k, v in change.items() if v is None]:
        p.pop(k)
    write_gemma_scope_2(tmp_path / "sae", p)
    return tmp_path / "sae"


def _npz_with_object_array(folder):
    folder.mkdir()
    np.savez(folder / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    return folder


def _truncated(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda t: t / "does-not-exist", "no SAE at"),
        (lambda t: (t / "empty").mkdir() or t / "empty", "expected config.json + params.safetensors"),
        (lambda t: _gs2_with(t, b_dec=None), "lacks b_dec"),
        (lambda t: _gs2_with(t, w_dec=gs_weights()["w_dec"].T.copy()), "w_dec has shape (16, 48)"),
        (lambda t: _gs2_with(t, b_enc=np.full(F, np.nan, np.float32)), "NaN"),
        (lambda t: _gs2_with(t, w_enc=np.zeros(D, np.float32)), "2-D w_enc"),
        (lambda t: _npz_with_object_array(t / "gs1"), "allow_pickle=False"),
    ],
)
def test_bad_sae_folders_raise_gsp_errors(tmp_path, make, words):
    with pytest.raises(GspError) as e:
        load_sae(str(make(tmp_path)))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_folder_with_part_of_a_format_says_what_it_has(tmp_path):
    write_gemma_scope_2(tmp_path / "sae")
    (tmp_path / "sae" / "params.safetensors").unlink()
    with pytest.raises(GspError, match="it has only config.json"):
        load_sae(str(tmp_path / "sae"))


@pytest.mark.parametrize("name", ["params.safetensors", "params.npz"])
def test_truncated_weight_files_raise_gsp_errors(tmp_path, name):
    folder = tmp_path / "sae"
    write_gemma_scope_2(folder) if name == "params.safetensors" else write_gemma_scope_1(folder)
    _truncated(folder / name)
    with pytest.raises(GspError, match="not a readable"):
        load_sae(str(folder))
    _truncated(folder / name)
    (folder / name).write_bytes(b"")  # empty: a download that never started
    with pytest.raises(GspError, match="not a readable"):
        load_sae(str(folder))


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"type": "clt"}, "'clt', which gsp cannot read"),
        ({"affine_connection": True}, "affine_connection=True but the weights lack affine_skip_connection"),
        ({"architecture": "gated"}, "unknown architecture 'gated'"),
        ({"architecture": "topk"}, "integer k"),
        ({"architecture": "topk", "k": 500}, "k <= width"),
        ({"d_in": 17}, "d_in=17"),
        (
            {"hf_hook_point_in": "model.layers.1.input_layernorm.output", "hf_hook_point_out": None},
            "not a gsp site",
        ),
    ],
)
def test_configs_gsp_cannot_use_are_refused(tmp_path, config, words):
    write_gemma_scope_2(tmp_path / "sae", **config)
    with pytest.raises(GspError, match=words):
        load_sae(str(tmp_path / "sae"))


def test_a_config_that_is_not_json_is_refused(tmp_path):
    write_gemma_scope_2(tmp_path / "sae")
    (tmp_path / "sae" / "config.json").write_text("{not json")
    with pytest.raises(GspError, match="not valid JSON"):
        load_sae(str(tmp_path / "sae"))


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"hook_point_in": "blocks.4.hook_attn_out", "hook_point_out": "blocks.4.hook_attn_out"}, "o_proj's output"),
        ({"hook_point_in": "blocks.4.ln2.hook_normalized", "hook_point_out": "blocks.4.hook_mlp_out"}, "transcoder"),
        ({"norm_activation": "token-wise"}, "rescales each token"),
        ({"dataset_average_activation_norm": {"in": 12.5}}, "dataset_average_activation_norm"),
        ({"act_fn": "gelu"}, "unknown act_fn"),
        ({"d_sae": F + 1}, "encoder.weight has shape"),
    ],
)
def test_llama_scope_folders_gsp_cannot_use_are_refused(tmp_path, over, words):
    write_llama_scope(tmp_path / "L4", **over)
    with pytest.raises(GspError, match=words):
        load_sae(str(tmp_path / "L4"))


def test_hub_paths_are_told_from_local_ones(tmp_path):
    assert hub_sae_path("owner/repo") is None  # a repo alone names no SAE
    assert hub_sae_path("/abs/path/to/sae") is None and hub_sae_path("./a/b/c") is None
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    assert hub_sae_path(str(tmp_path / "a" / "b" / "c")) is None
    assert hub_sae_path("fnlp/Llama3_1-8B-Base-LXR-8x/Llama3_1-8B-Base-L15R-8x") == (
        "fnlp/Llama3_1-8B-Base-LXR-8x",
        "Llama3_1-8B-Base-L15R-8x",
    )


# ------------------------------------------------------------------------------ Gemma Scope 2 transcoders
MLP_IN, MLP_OUT = "pre_feedforward_layernorm.output", "post_feedforward_layernorm.output"


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("root", ["transcoder", "transcoder_all"])
def test_gemma_scope_2_transcoders_match_their_published_inference(tmp_path, affine, root):
    """A transcoder folder as Gemma Scope 2 ships it (`transcoder/layer_L_width_…[_affine]`): it reads
    the MLP's input at layer L and predicts the MLP's output there; a skip transcoder adds
    x · affine_skip_connection."""
    p = gs_weights(7)
    if affine:
        p["affine_skip_connection"] = np.random.default_rng(8).standard_normal((D, D)).astype(np.float32) * 0.1
    name = "layer_9_width_16k_l0_small" + ("_affine" if affine else "")
    folder = tmp_path / "gemma-scope-2-270m-pt" / root / name
    hooks = {"hf_hook_point_in": f"model.layers.9.{MLP_IN}", "hf_hook_point_out": f"model.layers.9.{MLP_OUT}"}
    write_gemma_scope_2(folder, p, **hooks, affine_connection=affine, type="transcoder")
    loaded = load_sae(str(folder))
    assert loaded.is_transcoder and loaded.sae.skip == affine
    assert (loaded.layer, loaded.site, loaded.layer_out, loaded.site_out) == (9, "mlp_in", 9, "mlp_out")
    x = inputs(seed=9)
    want, active = gemma_scope_reference(x, p)
    if affine:
        want = want + x @ p["affine_skip_connection"].astype(np.float64)
    got, got_active = run_gsp(loaded, x)
    assert_some_fire_some_dont(active)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert (got_active == active).all()


def test_a_transcoder_folder_without_hook_points_names_them_from_its_path(tmp_path):
    folder = tmp_path / "gemma-scope-2-1b-pt" / "transcoder" / "layer_13_width_16k_l0_big"
    write_gemma_scope_2(folder, hf_hook_point_in=None, hf_hook_point_out=None, type="transcoder")
    loaded = load_sae(str(folder))
    assert (loaded.layer, loaded.site, loaded.layer_out, loaded.site_out) == (13, "mlp_in", 13, "mlp_out")


def test_an_sae_is_not_a_transcoder(tmp_path):
    folder = tmp_path / "resid_post" / "layer_12_width_16k_l0_medium"
    write_gemma_scope_2(folder)
    loaded = load_sae(str(folder))
    assert not loaded.is_transcoder and (loaded.layer_out, loaded.site_out) == (12, "resid_post")


# ------------------------------------------------------------------------------ the table of formats
def test_a_fetch_gets_every_file_each_format_reads(tmp_path):
    """FORMATS is the one list of each format's files: a folder cut down to the files SAE_FILES names
    (all that a Hub fetch downloads) is told apart by its own row and loads the same SAE."""
    import shutil

    from pipeline.export import export
    from pipeline.sae import SAE
    from pipeline.sae_formats import FORMATS, SAE_FILES

    full = tmp_path / "full"
    folders = [full / "resid_post" / "layer_12_width_16k_l0_medium", full / "gemma-scope-2b-pt-res" / "layer_20" /
               "width_16k" / "average_l0_71", full / "Llama3_1-8B-Base-L15R-8x"]  # fmt: skip
    write_gemma_scope_2(folders[0])
    write_gemma_scope_1(folders[1])
    write_llama_scope(folders[2])
    p = {k: torch.from_numpy(v) for k, v in gs_weights(5).items()}
    jumprelu = SAE.from_params(p, "jumprelu", None, "test")
    topk = SAE.from_params({k: v for k, v in p.items() if k != "threshold"}, "topk", 6, "test")
    hook = "model.layers.3.output"
    for sae, fmt in ((jumprelu, "saelens"), (topk, "sparsify")):
        folders.append(export(sae, fmt, full / fmt, layer=3, site="resid_post", model_name="m", hook_in=hook,
                              hook_out=hook, l0=9))  # fmt: skip
    told = []
    for folder in folders:
        (folder / "notes.txt").write_text("not an SAE file")
        cut = tmp_path / "cut" / folder.relative_to(full)
        for name in SAE_FILES:
            for file in folder.glob(name):
                (cut / file.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, cut / file.relative_to(folder))
        assert not (cut / "notes.txt").exists()
        told.append(next(f.name for f in FORMATS if f.found_in(cut)))
        x = inputs()
        np.testing.assert_array_equal(run_gsp(load_sae(str(cut)), x)[0], run_gsp(load_sae(str(folder)), x)[0])
    assert told == ["gsp, Gemma Scope 2", "Gemma Scope", "Llama Scope", "SAELens", "sparsify"]


def test_a_gemma_scope_sae_of_the_embeddings_is_refused(tmp_path):
    """Gemma Scope's `embedding/` SAEs read the token embeddings, before any block: gsp has no site
    there, and used to load one as a resid_post SAE with no layer."""
    folder = tmp_path / "gemma-scope-2b-pt-res" / "embedding" / "width_4k" / "average_l0_6"
    write_gemma_scope_1(folder)
    with pytest.raises(GspError, match="token embeddings") as e:
        load_sae(str(folder))
    assert "resid_post" in str(e.value) and "\n" not in str(e.value)


def test_a_missing_sae_path_under_an_existing_folder_is_local(tmp_path, monkeypatch):
    """`runs/nosuch/sae` beside a `runs/` folder is a local path: never looked up on the Hub."""

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked for a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert hub_sae_path("runs/nosuch/sae") is None
    with pytest.raises(GspError, match="no SAE at 'runs/nosuch/sae'.*runs/ is a folder here"):
        load_sae("runs/nosuch/sae")
