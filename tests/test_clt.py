"""Cross-layer transcoders (pipeline/clt.py): a folder laid out as Gemma Scope 2's `clt/…/params_layer_{l}`
is read, run and evaluated against independent computations (numpy, a forward pass with hooks written here)."""

import json

import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import ce_with_mlps_replaced, one_line_error

from pipeline.clt import CrossLayerTranscoder
from pipeline.store import ActivationStore

L, D, F = 4, 64, 24  # the tiny Gemma 3's layers and width; latents per layer


def write_clt(folder, *, skip=False, seed=0, layers=L):
    """Per-layer files with causal decoders: layer l's latents write to layers ≥ l only."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    params = []
    for layer in range(layers):
        w_dec = rng.standard_normal((F, layers, D)).astype(np.float32) * 0.05
        w_dec[:, :layer] = 0
        p = {"w_enc": rng.standard_normal((D, F)).astype(np.float32) * 0.2, "b_enc": rng.standard_normal(F).astype(
            np.float32) * 0.1, "threshold": np.abs(rng.standard_normal(F)).astype(np.float32) * 0.3, "w_dec": w_dec,
             "b_dec": rng.standard_normal(D).astype(np.float32) * 0.05}  # fmt: skip
        if skip:
            p["affine_skip_connection"] = rng.standard_normal((D, D)).astype(np.float32) * 0.05
        safetensors.numpy.save_file(p, str(folder / f"params_layer_{layer}.safetensors"))
        params.append(p)
    return params


def numpy_clt(params, xs):
    """ŷ_m = Σ_l f_l · W_dec[l][:, m] + b_dec[m] (+ x_m · skip[m]), f_l = ReLU(pre)·1[pre > θ]."""
    fs = []
    for p, x in zip(params, xs, strict=True):
        pre = x @ p["w_enc"].astype(np.float64) + p["b_enc"]
        fs.append(np.maximum(pre, 0) * (pre > p["threshold"]))
    ys = []
    for m, x in enumerate(xs):
        y = sum(f @ p["w_dec"][:, m].astype(np.float64) for f, p in zip(fs, params, strict=True)) + params[m]["b_dec"]
        ys.append(y + x @ params[m]["affine_skip_connection"] if "affine_skip_connection" in params[m] else y)
    return ys, fs


@pytest.mark.parametrize("skip", [False, True])
def test_a_clt_runs_as_its_files_define(tmp_path, skip):
    params = write_clt(tmp_path / "clt", skip=skip)
    clt = CrossLayerTranscoder.load(tmp_path / "clt")
    assert (clt.n_layers, clt.d_model, clt.width, clt.skip) == (L, D, L * F, skip)
    xs = [np.random.default_rng(layer).standard_normal((10, D)) for layer in range(L)]
    want_y, want_f = numpy_clt(params, xs)
    got_y, got_f = clt([torch.from_numpy(x).float() for x in xs])
    for layer in range(L):
        np.testing.assert_allclose(got_f[layer].numpy(), want_f[layer], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_y[layer].numpy(), want_y[layer], rtol=1e-4, atol=1e-5)
    assert any((f > 0).any() for f in want_f)


def test_a_clt_is_evaluated_on_every_layer_at_once(gsp, every_mlp, tiny_model, tmp_path):
    params = write_clt(tmp_path / "gemma-scope-2-270m-pt" / "clt" / "width_96_l0_small", skip=True)
    folder = tmp_path / "gemma-scope-2-270m-pt" / "clt" / "width_96_l0_small"
    r = gsp("evaluate", "--sae", folder, "--store", every_mlp / "store", "--delta-tokens", 128,
            "--reports", tmp_path / "r")  # fmt: skip
    assert r.exit_code == 0, r.output
    (report,) = (tmp_path / "r").glob("report_*.json")
    result = json.loads(report.read_text())
    # the figures, in numpy over the store's ordinary rows
    ins = [ActivationStore.open(every_mlp / "store" / f"L{layer}.mlp_in") for layer in range(L)]
    outs = [ActivationStore.open(every_mlp / "store" / f"L{layer}.mlp_out") for layer in range(L)]
    keep = ~np.isin(ins[0].read_tokens(0, ins[0].rows_written), ins[0].special_ids)
    xs = [s.read(0, s.rows_written).astype(np.float64)[keep] for s in ins]
    ys = [s.read(0, s.rows_written).astype(np.float64)[keep] for s in outs]
    y_hat, fs = numpy_clt(params, xs)
    y, y_hat = np.hstack(ys), np.hstack(y_hat)
    rec = result["reconstruction"]
    assert rec["tokens"] == keep.sum()
    assert rec["fvu"] == pytest.approx(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum(), rel=1e-4)
    assert rec["l0"] == pytest.approx(sum((f > 0).sum(1) for f in fs).mean(), rel=1e-6)
    for layer in range(L):
        a, b = y[:, layer * D : (layer + 1) * D], y_hat[:, layer * D : (layer + 1) * D]
        assert rec["layer_fvu"][layer] == pytest.approx(((a - b) ** 2).sum() / ((a - a.mean(0)) ** 2).sum(), rel=1e-4)
    assert result["sae"]["format"] == "gemma-scope-2-clt" and result["sae"]["clt_layers"] == L

    # the delta loss: every MLP output replaced in one forward pass, from hooks written here
    from transformers import AutoModelForCausalLM

    ids = torch.from_numpy(ins[0].read_tokens(0, 128).astype(np.int64)).view(4, 32)
    special = torch.isin(ids, torch.tensor(ins[0].special_ids))[..., None]
    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    w = [{k: torch.from_numpy(v) for k, v in p.items()} for p in params]

    def predict(m, seen):
        fs = {}
        for i in range(m + 1):
            pre = seen[i] @ w[i]["w_enc"] + w[i]["b_enc"]
            fs[i] = pre.relu() * (pre > w[i]["threshold"])
        return sum(fs[i] @ w[i]["w_dec"][:, m] for i in fs) + w[m]["b_dec"] + seen[m] @ w[m]["affine_skip_connection"]

    spliced = ce_with_mlps_replaced(lm, ids, special, range(L), predict)
    d = result["delta_loss"]
    assert d["ce_spliced"] == pytest.approx(spliced, rel=1e-4)
    assert d["contexts"] == 4 and "Cross-layer transcoder" in (tmp_path / "r" / result["files"]["markdown"]).read_text()


def test_clt_inputs_that_cannot_work_are_one_line(gsp, every_mlp, tiny_fit, tmp_path):
    write_clt(tmp_path / "clt")
    one_line_error(gsp("evaluate", "--sae", tmp_path / "clt", "--reports", tmp_path / "r"), "--store is required")
    one_line_error(gsp("evaluate", "--sae", tmp_path / "clt", "--store", tiny_fit / "store", "--reports",
                       tmp_path / "r"), "lacks L0.mlp_in", "--layer all --site mlp_in,mlp_out")  # fmt: skip
    one_line_error(gsp("features", "--sae", tmp_path / "clt", "--store", every_mlp / "store"),
                   "cross-layer transcoder")  # fmt: skip
    write_clt(tmp_path / "three", layers=3)
    (tmp_path / "three" / "params_layer_1.safetensors").unlink()
    one_line_error(gsp("evaluate", "--sae", tmp_path / "three", "--store", every_mlp / "store", "--reports",
                       tmp_path / "r"), "not params_layer_0")  # fmt: skip
    assert not (tmp_path / "r").exists()
