"""gsp steer on a tiny random Gemma 3: the edit is exactly S × the decoder row where it should be,
strength 0 changes nothing, clamping swaps the feature's contribution, and the CLI's side-by-side."""

import contextlib

import pytest
import torch
from conftest import one_line_error
from transformers import AutoModelForCausalLM

from pipeline.hooks import splice_from
from pipeline.saes import load_sae
from pipeline.steering import steer_fn


@pytest.fixture(scope="module")
def lm(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def sae(tiny_fit):
    return load_sae(str(tiny_fit / "sae")).sae


def _layer_out(lm, ids, edit=None) -> torch.Tensor:
    """Output of block 1 as block 2 receives it (an independent hook on the next block's input)."""
    seen = {}
    handle = lm.model.layers[2].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))
    try:
        with torch.no_grad():
            if edit is None:
                lm(input_ids=ids)
            else:
                with splice_from(lm, (1, "resid_post"), (1, "resid_post"), edit):
                    lm(input_ids=ids)
    finally:
        handle.remove()
    return seen["x"]


IDS = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46]])


@pytest.mark.parametrize("positions, first", [("all", 1), ("generated", 4)])
def test_the_edit_adds_exactly_s_times_the_decoder_rows(lm, sae, positions, first):
    clean = _layer_out(lm, IDS)
    fn = steer_fn(sae, [3, 7], [2.5, -1.0], positions=positions, prompt_len=5)
    steered = _layer_out(lm, IDS, fn)
    want = 2.5 * sae.w_dec[3] - 1.0 * sae.w_dec[7]
    diff = (steered - clean)[0]
    torch.testing.assert_close(diff[first:], want.detach().expand(8 - first, -1), rtol=1e-4, atol=1e-5)
    assert diff[:first].abs().max() == 0  # BOS (and, for "generated", the prompt before its last token)


def test_strength_zero_changes_nothing(lm, sae):
    clean = _layer_out(lm, IDS)
    assert torch.equal(_layer_out(lm, IDS, steer_fn(sae, [3], [0.0])), clean)


def test_clamping_replaces_the_features_contribution(lm, sae):
    """x' = x + (v − f(x))·d: the SAE's reconstruction with feature f set to v, plus the same error."""
    f, v = 5, 9.0
    clean = _layer_out(lm, IDS)[0]
    steered = _layer_out(lm, IDS, steer_fn(sae, [f], [v], clamp=True))[0]
    with torch.no_grad():
        pre = clean @ sae.w_enc[:, f] + sae.b_enc[f]  # JumpReLU written out for the one feature
        act = pre.relu() * (pre > sae.threshold[f])  # Gemma Scope 2's ReLU(pre)·1[pre > θ]
        want = (v - act)[:, None] * sae.w_dec[f]
    torch.testing.assert_close(steered[1:] - clean[1:], want[1:], rtol=1e-4, atol=1e-4)
    assert torch.equal(steered[0], clean[0])  # BOS untouched
    assert (act[1:] != v).all()  # the clamp did something at every position


def test_steer_cli_side_by_side(gsp, tiny_fit):
    args = ["steer", "--sae", tiny_fit / "sae", "--prompt", "alpha beta", "--max-new-tokens", 12, "--seed", 3]
    r0 = gsp(*args, "--feature", 3, "--strength", 0)
    assert r0.exit_code == 0, r0.output
    cells = [c.strip() for line in r0.output.splitlines() if line.startswith("│") for c in line.strip("│").split("│")]
    left, right = " ".join(cells[0::2]), " ".join(cells[1::2])
    assert left and left == right  # strength 0, same seed: the same sampled text
    r = gsp(*args, "--feature", 3, "--feature", 7, "--strength", 40, "--strength", 40)
    assert r.exit_code == 0 and "#3 + 40, #7 + 40" in " ".join(r.output.split())
    cells = [c.strip() for line in r.output.splitlines() if line.startswith("│") for c in line.strip("│").split("│")]
    assert " ".join(cells[0::2]) == left  # the unsteered column does not depend on the edit
    assert " ".join(cells[1::2]) != left  # a strong push changes the sampled text


def test_steer_errors_are_one_line(gsp, tiny_fit):
    for extra, words in (
        (["--feature", 999, "--strength", 1], "out of range"),
        (["--strength", 1], "--feature is required"),
        (["--feature", 1, "--feature", 2, "--strength", 1, "--strength", 2, "--strength", 3], "one --strength"),
        (["--feature", 1], "--strength is required"),
    ):
        r = gsp("steer", "--sae", tiny_fit / "sae", *extra)
        assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output


def test_an_sae_of_another_width_than_the_models_site_is_one_line(gsp, tiny_model, tmp_path, monkeypatch):
    """A Gemma Scope 2 folder reading layer 1's residual stream with d_in 48; the tiny model's is 64."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "sae"
    folder.mkdir()
    g = np.random.default_rng(0)
    params = {
        "w_enc": g.standard_normal((48, 16)),
        "w_dec": g.standard_normal((16, 48)),
        "b_enc": np.zeros(16),
        "b_dec": np.zeros(48),
        "threshold": np.full(16, 0.1),
    }
    save_file({k: v.astype(np.float32) for k, v in params.items()}, folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "model_name": "tiny", "architecture": "jump_relu", "hf_hook_point_in": "model.layers.1.output",
        "hf_hook_point_out": "model.layers.1.output", "width": 16, "l0": 4, "affine_connection": False,
        "type": "sae"}))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    r = gsp("steer", "--sae", folder, "--model", tiny_model, "--feature", 3, "--strength", 5, "--prompt", "alpha",
            "--max-new-tokens", 4)  # fmt: skip
    one_line_error(r, "d_in 48", "layer 1 resid_post has width 64", "--model")
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--feature", 3, "--strength", 2, "--prompt", ""], ["--prompt is empty"]),
        (["--feature", 3, "--strength", 2, "--prompt", " \n "], ["--prompt is empty"]),
        (["--feature", 3, "--strength", "nan", "--prompt", "alpha"], ["--strength", "finite", "[nan]"]),
        (["--feature", 3, "--strength", "inf", "--prompt", "alpha"], ["--strength", "finite", "[inf]"]),
        (["--feature", 3, "--feature", 4, "--strength", 1, "--strength", "nan"], ["--strength", "finite", "nan"]),
    ],
)
def test_an_empty_prompt_and_a_strength_that_is_no_number_are_one_line(gsp, tiny_fit, tmp_path, monkeypatch,
                                                                         args, words):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    r = gsp("steer", "--sae", tiny_fit / "sae", "--max-new-tokens", 4, *args)
    one_line_error(r, *words)
    assert list(tmp_path.iterdir()) == []  # nothing written


# ------------------------------------------------------------------------------ transcoders
def _mlp_out(lm, ids, edit=None):
    """Layer 1's MLP output (post-MLP norm) as the residual add receives it: read by a hook registered
    after the edit's, so it sees the edited value."""
    seen = {}
    with torch.no_grad(), splice_from(lm, (1, "mlp_in"), (1, "mlp_out"), edit) if edit else contextlib.nullcontext():
        handle = lm.model.layers[1].post_feedforward_layernorm.register_forward_hook(
            lambda m, a, out: seen.setdefault("y", out.clone())
        )
        try:
            lm(input_ids=ids)
        finally:
            handle.remove()
    return seen["y"][0]


def test_a_transcoders_features_are_added_at_the_mlps_output(lm, transcoder):
    t = load_sae(str(transcoder / "t"))
    assert t.is_transcoder and (t.site, t.site_out) == ("mlp_in", "mlp_out")
    diff = _mlp_out(lm, IDS, steer_fn(t.sae, [4], [3.0])) - _mlp_out(lm, IDS)
    torch.testing.assert_close(diff[1:], (3.0 * t.sae.w_dec[4]).expand(7, -1), rtol=1e-4, atol=1e-5)
    assert diff[0].abs().max() == 0  # BOS untouched


def test_clamping_a_transcoder_feature_encodes_the_mlps_input(lm, transcoder):
    """x' = y + (v − f(x_in))·d: the feature is read from the MLP's input, not from the output it edits."""
    t = load_sae(str(transcoder / "t")).sae
    f, v = 7, 5.0
    seen = {}
    with torch.no_grad():
        handle = lm.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
        lm(input_ids=IDS)
        handle.remove()
        pre = seen["x"][0] @ t.w_enc[:, f] + t.b_enc[f]  # JumpReLU of the MLP's input, written out
        want = (v - pre.relu() * (pre > t.threshold[f]))[:, None] * t.w_dec[f]
    diff = _mlp_out(lm, IDS, steer_fn(t, [f], [v], clamp=True)) - _mlp_out(lm, IDS)
    torch.testing.assert_close(diff[1:], want[1:], rtol=1e-4, atol=1e-4)
    assert diff[0].abs().max() == 0


def test_steer_cli_runs_a_transcoder(gsp, transcoder, tiny_model):
    args = ["steer", "--sae", transcoder / "t", "--prompt", "alpha beta", "--max-new-tokens", 8, "--seed", 1]
    r = gsp(*args, "--feature", 2, "--strength", 0)
    assert r.exit_code == 0, r.output
    cells = [c.strip() for line in r.output.splitlines() if line.startswith("│") for c in line.strip("│").split("│")]
    assert " ".join(cells[0::2]) == " ".join(cells[1::2])  # strength 0: the same text
    assert "layer 1 mlp_in" in " ".join(r.output.split())
