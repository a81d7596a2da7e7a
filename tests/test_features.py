"""gsp features against independent computations (numpy over the whole store, the model's own
unembedding), the HTML page in a real headless browser, and the per-prompt view."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import headless_chromium, one_line_error
from safetensors.torch import load_file

from pipeline.features import HIST_BINS, HIST_LOW, HIST_STEP, TopActivations
from pipeline.store import ActivationStore


def test_top_activations_stream_equals_numpy():
    g = np.random.default_rng(0)
    f = np.maximum(g.standard_normal((700, 12)) * 50 - 40, 0).astype(np.float32)
    f[:, 5] = 0  # a dead latent
    rows = g.permutation(10_000)[:700]
    top = TopActivations(12, 4)
    for part in np.array_split(np.arange(700), 9):
        top.update(torch.from_numpy(f[part]), torch.from_numpy(rows[part]))
    other = TopActivations(12, 4)  # merging an empty share changes nothing
    top.merge(other)
    assert top.n == 700
    np.testing.assert_array_equal(top.count_F.numpy(), (f > 0).sum(0))
    np.testing.assert_allclose(top.max_F.numpy(), f.max(0))
    np.testing.assert_allclose(top.mean().numpy(), f.sum(0) / np.maximum((f > 0).sum(0), 1), rtol=1e-5)
    for j in range(12):
        want = sorted(((f[i, j], rows[i]) for i in range(700) if f[i, j] > 0), reverse=True)[:4]
        got = top.top(j)
        assert [r for _, r in got] == [r for _, r in want], j
        vals = f[:, j][f[:, j] > 0]
        bins = np.clip(((np.log10(vals) - HIST_LOW) / HIST_STEP).astype(int), 0, HIST_BINS - 1)
        np.testing.assert_array_equal(top.hist_FH[j].numpy(), np.bincount(bins, minlength=HIST_BINS))
    assert top.top(5) == []


def _reference(store_path, sae_dir):
    """All latents of every ordinary store row, in numpy (JumpReLU written out)."""
    s = ActivationStore.open(store_path)
    p = {k: v.numpy().astype(np.float64) for k, v in load_file(sae_dir / "params.safetensors").items()}
    x = s.read(0, s.rows_written).astype(np.float64)
    ids = s.read_tokens(0, s.rows_written)
    pre = x @ p["w_enc"] + p["b_enc"]
    f = np.maximum(pre, 0) * (pre > p["threshold"])  # Gemma Scope 2's JumpReLU: ReLU(pre)·1[pre > θ]
    f[np.isin(ids, s.special_ids)] = 0  # special rows are not SAE data
    return s, ids, f, p


@pytest.fixture(scope="module")
def browser_json(tiny_fit, tmp_path_factory):
    from typer.testing import CliRunner

    from stages.cli import app

    out = tmp_path_factory.mktemp("features")
    r = CliRunner().invoke(app, ["features", "--sae", str(tiny_fit / "sae"), "--store", str(tiny_fit / "store"),
                                 "--top-k", "5", "--before", "6", "--after", "2", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    (page,) = out.glob("features_*.html")
    return page, json.loads(page.with_suffix(".json").read_text())


def test_features_json_matches_numpy_and_the_models_unembedding(browser_json, tiny_fit, tiny_model):
    _, data = browser_json
    s, ids, f, p = _reference(tiny_fit / "store", tiny_fit / "sae")
    C = s.context_size
    fired = (f > 0).sum(0)
    assert data["meta"]["tokens"] == int((~np.isin(ids, s.special_ids)).sum())
    assert data["meta"]["dead"] == int((fired == 0).sum())
    assert [x["id"] for x in data["features"]] == list(np.argsort(-fired, kind="stable")[: int((fired > 0).sum())])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for feat in data["features"][:: max(1, len(data["features"]) // 7)]:
        j = feat["id"]
        assert feat["frequency"] == pytest.approx(fired[j] / data["meta"]["tokens"])
        assert feat["max"] == pytest.approx(f[:, j].max(), rel=1e-4)
        order = np.argsort(-f[:, j], kind="stable")[:5]
        assert [c["act"] for c in feat["contexts"]] == pytest.approx(f[order, j], rel=1e-4)
        for c, row in zip(feat["contexts"], order, strict=False):
            start = max(row - 6, row - row % C)
            stop = min(row + 3, row - row % C + C)
            assert c["tokens"] == ids[start:stop].tolist() and c["at"] == row - start
            assert c["acts"] == pytest.approx(f[start:stop, j], rel=1e-4, abs=1e-4)
            assert "".join(data["vocab"][str(t)] for t in c["tokens"]).replace(" ", "") == tok.decode(
                c["tokens"]
            ).replace(" ", "")
        # logit lens: the decoder row through the final norm and the LM head, computed here directly
        with torch.no_grad():
            d = torch.from_numpy(p["w_dec"][j]).float()
            logits = lm.lm_head(lm.model.norm(d[None, None]))[0, 0]
        assert [i for i, _ in feat["logits"]] == logits.topk(10).indices.tolist()


def test_features_page_in_a_headless_browser(browser_json, tmp_path):
    args = headless_chromium()
    page, data = browser_json
    feat = data["features"][1]
    url = f"file://{page}#f={feat['id']}"
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    shot = tmp_path / "features.png"
    subprocess.run([*args, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert 'data-ready="1"' in dom  # the script ran to its end
    dom = dom.split("<script")[0]  # what the script rendered, not the script's own source
    assert '<div id="errors"></div>' in dom  # and window.onerror caught nothing
    items = re.findall(r'class="item(?: sel)?" data-id="(\d+)"', dom)
    assert sorted(map(int, items)) == sorted(x["id"] for x in data["features"])  # the list shows every feature
    assert f'<h1 id="feature-title">Feature {feat["id"]}</h1>' in dom  # #f=<id> opened the feature
    assert dom.count('<div class="ctx">') == len(feat["contexts"])
    first = feat["contexts"][0]
    text = data["vocab"][str(first["tokens"][first["at"]])]
    assert 'class="tok at"' in dom and text.replace("<", "&lt;") in dom
    assert shot.read_bytes()[:4] == b"\x89PNG"


def test_one_feature_in_the_terminal(gsp, browser_json, tiny_fit):
    _, data = browser_json
    feat = data["features"][0]
    r = gsp("features", "--sae", tiny_fit / "sae", "--store", tiny_fit / "store", "--feature", feat["id"],
            "--top-k", 5, "--before", 6, "--after", 2)  # fmt: skip
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert f"feature {feat['id']}" in out and f"{feat['contexts'][0]['act']:.3g}" in out
    word = data["vocab"][str(feat["contexts"][0]["tokens"][feat["contexts"][0]["at"]])].strip()
    assert word in out
    r = gsp("features", "--sae", tiny_fit / "sae", "--store", tiny_fit / "store", "--feature", 96)
    assert r.exit_code == 1 and "out of range" in r.output and "Traceback" not in r.output


def test_features_on_a_prompt(gsp, tiny_fit, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "alpha beta gamma delta"
    r = gsp("features", "--sae", tiny_fit / "sae", "--prompt", prompt)
    assert r.exit_code == 0, r.output
    tok = AutoTokenizer.from_pretrained(tiny_model)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        h = lm(input_ids=ids, output_hidden_states=True).hidden_states[2][0].double().numpy()  # layers[1] output
    p = {k: v.numpy().astype(np.float64) for k, v in load_file(tiny_fit / "sae" / "params.safetensors").items()}
    pre = h @ p["w_enc"] + p["b_enc"]
    f = np.maximum(pre, 0) * (pre > p["threshold"])  # Gemma Scope 2's JumpReLU: ReLU(pre)·1[pre > θ]
    lines = r.output.splitlines()
    last = ids.shape[1] - 1
    row = next(line for line in lines if line.strip("│ ").startswith(f"{last} "))
    assert f"#{int(np.argmax(f[last]))} " in row and f" {int((f[last] > 0).sum())} " in row


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_window_activations_equal_a_full_encode(tiny_fit, arch):
    """Per-(row, feature) activations read chunk by chunk equal the SAE's full encode of every row."""
    from pipeline.sae import SAE
    from stages.features import window_activations

    s = ActivationStore.open(tiny_fit / "store")
    sae = SAE(s.d_in, 40, arch=arch, k=5).init_gemma_scope(torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.threshold.fill_(0.5)
    g = np.random.default_rng(0)
    rows = g.integers(0, s.rows_written, 300)
    feats = g.integers(0, 40, 300)
    got = window_activations(sae, s, rows, feats)
    with torch.no_grad():
        full = sae.encode(torch.from_numpy(s.read(0, s.rows_written)))[0].numpy()
    np.testing.assert_allclose(got, full[rows, feats], rtol=1e-5, atol=1e-6)
    assert (got > 0).any() and (got == 0).any()


def _gemma_scope_2(folder, d, n, hook="model.layers.1.output"):
    """A Gemma Scope 2 folder of d_in d and width n (small random weights) reading `hook`."""
    from safetensors.numpy import save_file

    g = np.random.default_rng(0)
    folder.mkdir(parents=True)
    params = {
        "w_enc": g.standard_normal((d, n)),
        "w_dec": g.standard_normal((n, d)),
        "b_enc": np.zeros(n),
        "b_dec": np.zeros(d),
        "threshold": np.ones(n),
    }
    save_file({k: v.astype(np.float32) for k, v in params.items()}, folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "jump_relu", "hf_hook_point_in": hook,
                                                    "hf_hook_point_out": hook, "width": n}))  # fmt: skip
    return folder


@pytest.mark.parametrize("prompt", ["", "  \n"])
def test_an_empty_prompt_is_one_line(gsp, tiny_fit, tmp_path, prompt):
    r = gsp("features", "--sae", tiny_fit / "sae", "--prompt", prompt, "--out", tmp_path / "out")
    one_line_error(r, "--prompt is empty")
    assert not (tmp_path / "out").exists()


def test_an_sae_of_width_zero_is_one_line(gsp, tiny_fit, tmp_path):
    folder = _gemma_scope_2(tmp_path / "resid_post" / "layer_1_width_0", 64, 0)
    r = gsp("features", "--sae", folder, "--store", tiny_fit / "store", "--out", tmp_path / "out")
    one_line_error(r, "width 0", "empty", "params.safetensors")
    r = gsp("features", "--sae", folder, "--prompt", "alpha beta")
    one_line_error(r, "width 0", "empty")
    assert not (tmp_path / "out").exists()


def test_a_prompt_through_an_sae_of_another_width_is_one_line(gsp, tiny_model, tmp_path):
    """d_in 48 at layer 1's residual stream, whose width is 64: said before any matrix product fails."""
    folder = _gemma_scope_2(tmp_path / "sae", 48, 8)
    r = gsp("features", "--sae", folder, "--prompt", "alpha beta", "--model", tiny_model, "--out", tmp_path / "out")
    one_line_error(r, "d_in 48", "width 64", "layer 1 resid_post")
    assert not (tmp_path / "out").exists()


def test_a_transcoders_features_are_read_from_the_mlps_input(gsp, transcoder, tmp_path):
    """Top activations of a transcoder's latents come from its input hook point (picked from a store of
    both), against numpy on those rows; its decoder rows go through the logit lens as an SAE's do."""
    r = gsp("features", "--sae", transcoder / "t", "--store", transcoder / "store", "--top-k", 3,
            "--out", tmp_path)  # fmt: skip
    assert r.exit_code == 0, r.output
    (page,) = tmp_path.glob("features_*.html")
    data = json.loads(page.with_suffix(".json").read_text())
    s = ActivationStore.open(transcoder / "store" / "L1.mlp_in")
    p = {k: v.numpy().astype(np.float64) for k, v in load_file(transcoder / "t" / "params.safetensors").items()}
    x = s.read(0, s.rows_written).astype(np.float64)
    pre = x @ p["w_enc"] + p["b_enc"]
    f = np.maximum(pre, 0) * (pre > p["threshold"])
    f[np.isin(s.read_tokens(0, s.rows_written), s.special_ids)] = 0
    assert data["meta"]["site"] == "mlp_in" and data["features"]
    for feat in data["features"][:5]:
        j = feat["id"]
        assert feat["max"] == pytest.approx(f[:, j].max(), rel=1e-4)
        assert [c["act"] for c in feat["contexts"]] == pytest.approx(np.sort(f[:, j])[::-1][:3], rel=1e-4)
        assert len(feat["logits"]) == 10


def test_a_prompt_through_an_sae_whose_training_store_is_gone_needs_model(gsp, tiny_fit, tiny_model, tmp_path):
    """The model is chosen as evaluate and steer choose it: from the SAE's training store, which must be
    readable (features used to fall back, silently, to the model name in the SAE's files)."""
    sae = tmp_path / "sae"
    shutil.copytree(tiny_fit / "sae", sae)
    config = json.loads((sae / "config.json").read_text())
    config["store"] = str(tmp_path / "moved-store")
    (sae / "config.json").write_text(json.dumps(config))
    one_line_error(gsp("features", "--sae", sae, "--prompt", "alpha beta"), "cannot read", "moved-store", "--model")
    r = gsp("features", "--sae", sae, "--prompt", "alpha beta", "--model", tiny_model)
    assert r.exit_code == 0, r.output


def test_a_missing_model_fails_before_the_pass_over_the_store(gsp, tiny_fit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ev").mkdir()
    reads = []
    rows = ActivationStore.ordinary_rows
    monkeypatch.setattr(ActivationStore, "ordinary_rows", lambda self, *a, **k: reads.append(1) or rows(self, *a, **k))
    r = gsp("features", "--sae", tiny_fit / "sae", "--store", tiny_fit / "store", "--model", "ev/nosuch_model",
            "--out", tmp_path / "out")  # fmt: skip
    one_line_error(r, "ev/nosuch_model", "ev/ is a folder here")
    assert reads == [] and not (tmp_path / "out").exists()
