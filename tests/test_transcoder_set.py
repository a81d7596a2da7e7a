"""Transcoder sets (pipeline/transcoder_set.py, `gsp fit --transcoders`): every layer's transcoder from
one read of a store, each the one fitted alone, resumable, with an index naming what it holds."""

import json

import numpy as np
import pytest
import torch
from conftest import ce_with_mlps_replaced, gsp_subprocess, one_line_error
from safetensors.torch import load_file

from pipeline.store import ActivationStore
from pipeline.transcoder_set import read_index

L = 4  # the tiny Gemma 3's layers


def _small(*extra) -> list:
    """Small fits whose shuffle windows hold 2 chunks of one layer's (input, target) rows, one lane:
    a stream sized by the whole set's width instead (8 hook points) would hold 1 and differ."""
    return ["--width", 48, "--steps", 40, "--batch-size", 128, "--target-l0", 8, "--lanes", 1, *extra]


def _window_mib(store) -> float:
    s = ActivationStore.open(store / "L0.mlp_in")
    return 2 * (2 * s.chunk_rows * (2 * s.d_in) * 4) / 2**20  # half the budget holds 2 chunks of a pair


def _params(folder):
    return load_file(folder / "params.safetensors")


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_a_set_fits_every_layer_in_one_run_each_as_it_is_fitted_alone(gsp, every_mlp, tmp_path, skip):
    store = every_mlp / "store"
    opts = _small("--buffer-mib", _window_mib(store), *(["--skip"] if skip else []))
    r = gsp("fit", "--store", store, "--transcoders", "mlp_in:mlp_out", "--out", tmp_path / "set", *opts)
    assert r.exit_code == 0, r.output
    members = read_index(tmp_path / "set")
    assert members == {layer: tmp_path / "set" / f"layer_{layer}" for layer in range(L)}
    index = json.loads((tmp_path / "set" / "transcoder_set.json").read_text())
    for layer in range(L):
        hook_in = ActivationStore.open(store / f"L{layer}.mlp_in").hook.hook_point
        hook_out = ActivationStore.open(store / f"L{layer}.mlp_out").hook.hook_point
        entry = index["layers"][str(layer)]
        assert (entry["hook_point_in"], entry["hook_point_out"]) == (hook_in, hook_out)
        config = json.loads((members[layer] / "config.json").read_text())
        assert (config["hf_hook_point_in"], config["hf_hook_point_out"]) == (hook_in, hook_out)
        assert config["affine_connection"] is skip
    # layers 0 and 2, each fitted alone from its own pair of hook points: the same bytes
    for layer in (0, 2):
        alone = tmp_path / f"alone_{layer}"
        r = gsp("fit", "--store", store / f"L{layer}.mlp_in", "--target-store", store / f"L{layer}.mlp_out",
                "--out", alone, *opts)  # fmt: skip
        assert r.exit_code == 0, r.output
        _same(_params(alone), _params(members[layer]))
    # and the layers differ from each other (each read its own columns of the batch)
    assert not torch.equal(_params(members[0])["w_dec"], _params(members[1])["w_dec"])


def test_some_layers_and_a_killed_set_resumes_to_the_same_weights(every_mlp, tmp_path):
    store = every_mlp / "store"
    args = ["fit", "--store", store, "--transcoders", "mlp_in:mlp_out", "--layers", "1,3", *_small(),
            "--checkpoint-every", 10]  # fmt: skip
    assert gsp_subprocess(*args, "--out", tmp_path / "ref").returncode == 0
    killed = gsp_subprocess(*args, "--out", tmp_path / "run", env={"GSP_FAULT": "fit-checkpoint-saved:2"})
    assert killed.returncode == -9
    assert not (tmp_path / "run" / "transcoder_set.json").exists()  # no index until every layer is saved
    r = gsp_subprocess(*args, "--out", tmp_path / "run", "--resume")
    assert r.returncode == 0, r.stderr
    assert sorted(read_index(tmp_path / "run")) == [1, 3]
    for layer in (1, 3):
        _same(_params(tmp_path / "ref" / f"layer_{layer}"), _params(tmp_path / "run" / f"layer_{layer}"))


def test_bad_sets_are_one_line_errors(gsp, every_mlp, tiny_fit, tmp_path):
    store = every_mlp / "store"

    def fit(*args):
        return gsp("fit", "--out", tmp_path / "set", "--steps", 5, *args)

    one_line_error(fit("--store", store, "--transcoders", "mlp_in"), "--transcoders takes IN:OUT")
    one_line_error(fit("--store", store, "--transcoders", "mlp_in:attn_out"), "no layer holding both", "--site")
    one_line_error(fit("--store", store, "--transcoders", "mlp_in:mlp_out", "--layers", "2,7"),
                   "layers 0–3", "layer 7 is not one of them")  # fmt: skip
    one_line_error(fit("--store", store, "--transcoders", "mlp_in:mlp_out", "--layers", "two"), "--layers takes")
    one_line_error(fit("--store", store, "--transcoders", "mlp_in:mlp_out", "--target-l0", "8,16"),
                   "one value per option", "--target-l0")  # fmt: skip
    one_line_error(fit("--store", store, "--transcoders", "mlp_in:mlp_out", "--target-store", store / "L1.mlp_out"),
                   "leave out --target-store")  # fmt: skip
    one_line_error(fit("--store", tiny_fit / "store", "--transcoders", "mlp_in:mlp_out"), "no layer holding both")
    one_line_error(fit("--store", tmp_path / "nowhere", "--transcoders", "mlp_in:mlp_out"), "nowhere")
    assert not (tmp_path / "set").exists()
    # a file of that name that gsp did not write is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "transcoder_set.json").write_text("my notes")
    r = gsp("fit", "--store", store, "--transcoders", "mlp_in:mlp_out", "--layers", "0", "--out", tmp_path / "mine",
            *_small())  # fmt: skip
    one_line_error(r, "is not a transcoder set's index")
    assert (tmp_path / "mine" / "transcoder_set.json").read_text() == "my notes"


def test_an_incomplete_set_is_not_read_as_one(every_mlp, tmp_path):
    from pipeline.errors import GspError

    with pytest.raises(GspError, match="is not a transcoder set"):
        read_index(tmp_path)
    (tmp_path / "transcoder_set.json").write_text(json.dumps({"format": "gsp transcoder set", "version": 1,
                                                              "layers": {"0": {"folder": "layer_0"}}}))  # fmt: skip
    with pytest.raises(GspError, match="holds no transcoder"):
        read_index(tmp_path)


def _numpy_transcoder(p: dict, x: np.ndarray) -> np.ndarray:
    """ŷ = f·W_dec + b_dec + x·W_skip, f = ReLU(pre)·1[pre > θ], in float64."""
    p = {k: v.double().numpy() for k, v in p.items()}
    pre = x @ p["w_enc"] + p["b_enc"]
    f = np.maximum(pre, 0) * (pre > p["threshold"])
    return f @ p["w_dec"] + p["b_dec"] + (x @ p["affine_skip_connection"] if "affine_skip_connection" in p else 0)


def test_a_set_is_evaluated_at_once_and_layer_by_layer(gsp, every_mlp, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    store = every_mlp / "store"
    r = gsp("fit", "--store", store, "--transcoders", "mlp_in:mlp_out", "--layers", "1,2,3", "--skip",
            "--out", tmp_path / "set", *_small())  # fmt: skip
    assert r.exit_code == 0, r.output
    r = gsp("evaluate", "--sae", tmp_path / "set", "--store", store, "--delta-tokens", 128, "--reports", tmp_path / "r")
    assert r.exit_code == 0, r.output
    (report,) = (tmp_path / "r").glob("report_*.json")
    result = json.loads(report.read_text())
    rec, layers = result["reconstruction"], [1, 2, 3]
    assert result["sae"]["set_layers"] == layers and rec["layers"] == layers
    params = {layer: _params(tmp_path / "set" / f"layer_{layer}") for layer in layers}
    # each layer's FVU, in numpy over the store's ordinary rows
    first = ActivationStore.open(store / "L1.mlp_in")
    keep = ~np.isin(first.read_tokens(0, first.rows_written), first.special_ids)
    for i, layer in enumerate(layers):
        x = ActivationStore.open(store / f"L{layer}.mlp_in").read(0, first.rows_written).astype(np.float64)[keep]
        y = ActivationStore.open(store / f"L{layer}.mlp_out").read(0, first.rows_written).astype(np.float64)[keep]
        fvu = ((y - _numpy_transcoder(params[layer], x)) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        assert rec["layer_fvu"][i] == pytest.approx(fvu, rel=1e-4)
    # the delta losses: the model run here with hooks that replace the MLP outputs of some layers
    ids = torch.from_numpy(first.read_tokens(0, 128).astype(np.int64)).view(4, 32)
    special = torch.isin(ids, torch.tensor(first.special_ids))[..., None]
    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def ce_with(replaced: list[int]) -> float:
        def predict(i, seen):
            x = seen[i].double().numpy().reshape(-1, seen[i].shape[-1])
            return torch.from_numpy(_numpy_transcoder(params[i], x))

        return ce_with_mlps_replaced(lm, ids, special, replaced, predict)

    d = result["delta_loss"]
    clean = ce_with([])
    assert d["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert d["delta_loss"] == pytest.approx(ce_with(layers) - clean, abs=1e-4)
    for layer in layers:
        assert d["layers"][str(layer)]["delta_loss"] == pytest.approx(ce_with([layer]) - clean, abs=1e-4)
    markdown = (tmp_path / "r" / result["files"]["markdown"]).read_text()
    assert "Transcoder set** of 3 layers (1–3)" in markdown and "## By layer" in markdown
    # a command that takes one hook point says which folder to give it
    one_line_error(gsp("features", "--sae", tmp_path / "set", "--store", store), "is a transcoder set", "layer_1")
