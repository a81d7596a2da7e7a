"""gsp evaluate of several SAEs: one pass over the store, one clean forward per batch, one report with the frontier."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import one_line_error
from safetensors.numpy import load_file, save_file

from pipeline.store import ActivationStore


@pytest.fixture(scope="module")
def saes(tiny_fit, tmp_path_factory):
    """Three SAEs of the tiny store's hook point: the fitted JumpReLU, the same with thresholds raised
    (fewer latents fire), and a hand-set TopK (k=5) made from its weights."""
    root = tmp_path_factory.mktemp("saes") / "sweep"
    p = load_file(tiny_fit / "sae" / "params.safetensors")
    config = json.loads((tiny_fit / "sae" / "config.json").read_text())
    for name, params, cfg in [
        ("a_jumprelu", p, config),
        ("b_jumprelu_sparser", {**p, "threshold": np.maximum(p["threshold"], 0) + 0.5}, config),
        ("c_topk", {k: v for k, v in p.items() if k != "threshold"}, {**config, "architecture": "topk", "k": 5}),
    ]:
        (root / name).mkdir(parents=True)
        save_file(params, root / name / "params.safetensors")
        (root / name / "config.json").write_text(json.dumps(cfg))
    return root


def _report(folder):
    (path,) = folder.glob("report_*.json")
    return json.loads(path.read_text())


def test_each_sae_compared_is_measured_as_it_is_alone(gsp, tiny_fit, saes, tmp_path, monkeypatch):
    import pipeline.lm_loss as lm_loss

    calls = []
    real = lm_loss._log_probs
    monkeypatch.setattr(lm_loss, "_log_probs", lambda model, ids: calls.append(len(ids)) or real(model, ids))
    common = ["--store", tiny_fit / "store", "--delta-tokens", "256", "--lm-batch-tokens", "128"]
    r = gsp("evaluate", "--sae", saes, *common, "--reports", tmp_path / "all")  # a folder of SAE folders
    assert r.exit_code == 0, r.output
    assert len(calls) == 2 * (2 + 3)  # 8 contexts of 32 in batches of 4: clean + zero-ablated + one per SAE
    doc = _report(tmp_path / "all")
    assert doc["format"] == "gsp-evaluation-set" and [e["label"] for e in doc["evaluations"]] == [
        "b_jumprelu_sparser", "a_jumprelu", "c_topk"]  # by architecture, then L0  # fmt: skip
    for e in doc["evaluations"]:
        r = gsp("evaluate", "--sae", saes / e["label"], *common, "--reports", tmp_path / e["label"])
        assert r.exit_code == 0, r.output
        alone = _report(tmp_path / e["label"])
        for key in ("tokens", "l0", "fvu", "mse", "cosine", "dead_features", "dense_features"):
            assert e["reconstruction"][key] == pytest.approx(alone["reconstruction"][key], rel=1e-6), key
        for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "delta_loss", "kl_clean_spliced"):
            assert e["delta_loss"][key] == pytest.approx(alone["delta_loss"][key], rel=1e-6), key
    l0s = [e["reconstruction"]["l0"] for e in doc["evaluations"]]
    assert l0s[0] < l0s[1] and l0s[2] == pytest.approx(5.0)
    md = (tmp_path / "all" / doc["files"]["markdown"]).read_text()
    assert md.count("| a_jumprelu | JumpReLU |") == 1 and "| c_topk | TopK k=5 |" in md
    plots = doc["files"]["plots"]
    assert any(p.endswith("_l0_fvu.png") for p in plots) and any(p.endswith("_l0_delta_loss.png") for p in plots)
    for png in plots:
        assert (tmp_path / "all" / png).read_bytes()[:4] == b"\x89PNG"


def test_the_spliced_loss_of_a_compared_sae_is_a_direct_forward_with_its_reconstruction(
    gsp, tiny_fit, tiny_model, saes, tmp_path
):
    r = gsp("evaluate", "--sae", saes / "b_jumprelu_sparser", "--sae", saes / "c_topk", "--store", tiny_fit / "store",
            "--delta-tokens", "128", "--reports", tmp_path)  # fmt: skip
    assert r.exit_code == 0, r.output
    e = _report(tmp_path)["evaluations"][1]  # the TopK, written out here in torch
    from transformers import AutoModelForCausalLM

    p = {k: torch.from_numpy(v).double() for k, v in load_file(saes / "c_topk" / "params.safetensors").items()}
    s = ActivationStore.open(tiny_fit / "store")
    ids = torch.from_numpy(s.read_tokens(0, 128).astype(np.int64)).view(4, 32)
    special = torch.isin(ids, torch.tensor(s.special_ids))
    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def replace(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        pre = h.double() @ p["w_enc"] + p["b_enc"]
        top = pre.topk(5, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
        x_hat = torch.where(special[..., None], h, (f @ p["w_dec"] + p["b_dec"]).float())
        return (x_hat, *out[1:]) if isinstance(out, tuple) else x_hat

    handle = lm.model.layers[1].register_forward_hook(replace)
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[:, :-1]
    handle.remove()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    keep = ~special[:, :-1] & ~special[:, 1:]
    assert e["delta_loss"]["ce_spliced"] == pytest.approx(ce[keep].double().mean().item(), rel=1e-4)


def test_saes_of_different_hook_points_and_an_empty_folder_are_one_line_errors(gsp, tiny_fit, saes, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(saes / "a_jumprelu", other)
    config = json.loads((other / "config.json").read_text())
    config["hf_hook_point_in"] = config["hf_hook_point_out"] = "model.layers.0.output"
    (other / "config.json").write_text(json.dumps(config))
    r = gsp("evaluate", "--sae", saes / "a_jumprelu", "--sae", other, "--store", tiny_fit / "store",
            "--reports", tmp_path / "r", "--no-delta-loss")  # fmt: skip
    one_line_error(r, "different hook points")
    assert not (tmp_path / "r").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = gsp("evaluate", "--sae", empty, "--store", tiny_fit / "store", "--no-delta-loss")
    one_line_error(r, "holds no SAE")
