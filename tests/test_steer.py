"""gsp steer on a tiny random Gemma 3: the edit is exactly S × the decoder row where it should be,
strength 0 changes nothing, clamping swaps the feature's contribution, and the CLI's side-by-side;
the model is the training store's at its revision, and strengths that break it are one-line errors."""

import contextlib

import pytest
import torch
from conftest import one_line_error
from transformers import AutoModelForCausalLM

from pipeline.errors import GspError
from pipeline.hooks import splice_from
from pipeline.sae_formats import load_sae
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


# ------------------------------------------------------------------------------ the model, and strengths that break it
def test_steer_runs_the_stores_model_at_its_revision(gsp, tiny_fit, monkeypatch):
    """The model comes from the SAE's training store, at the revision recorded there (steer used to drop it)."""
    import pipeline.models
    from pipeline.store import ActivationStore

    asked = []

    def load_model(spec, **kw):
        asked.append((spec, kw["revision"]))
        raise GspError("stopped after choosing the model")

    monkeypatch.setattr(pipeline.models, "load_model", load_model)
    r = gsp("steer", "--sae", tiny_fit / "sae", "--feature", 3, "--strength", 1, "--max-new-tokens", 2)
    one_line_error(r, "stopped after choosing the model")
    ref = ActivationStore.open(tiny_fit / "store").meta.model
    assert asked == [(ref.spec, ref.revision)] and ref.revision == "local"
    r = gsp("steer", "--sae", tiny_fit / "sae", "--feature", 3, "--strength", 1, "--revision", "v2")
    one_line_error(r, "stopped after choosing the model")
    assert asked[-1] == (ref.spec, "v2")  # --revision wins


def test_an_sae_whose_training_store_is_gone_needs_model(gsp, tiny_fit, tiny_model, tmp_path):
    """steer used to fall back, silently, to the model name in the SAE's files."""
    import json
    import shutil

    sae = tmp_path / "sae"
    shutil.copytree(tiny_fit / "sae", sae)
    config = json.loads((sae / "config.json").read_text())
    config["store"] = str(tmp_path / "moved-store")
    (sae / "config.json").write_text(json.dumps(config))
    args = ["steer", "--sae", sae, "--feature", 3, "--strength", 1, "--max-new-tokens", 2, "--prompt", "alpha"]
    one_line_error(gsp(*args), "cannot read", "moved-store", "pass --model")
    r = gsp(*args, "--model", tiny_model)
    assert r.exit_code == 0, r.output


def test_a_missing_model_path_under_an_existing_folder_fails_at_once(gsp, tiny_fit, tmp_path, monkeypatch):
    """`--model ev/nosuch_model` beside an `ev/` folder is a local path: no Hub lookup (which took ~51 s)."""
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked for a local path")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ev").mkdir()
    r = gsp("steer", "--sae", tiny_fit / "sae", "--model", "ev/nosuch_model", "--feature", 3, "--strength", 1)
    one_line_error(r, "ev/nosuch_model", "ev/ is a folder here")


@pytest.mark.parametrize(
    "args",
    [
        ["--strength", "1e30", "--temperature", 0],  # greedy: used to decode <pad> from flat logits, exit 0
        ["--strength", "-1e30"],
        ["--clamp", "--strength", "1e30", "--temperature", 0],
    ],
)
def test_a_strength_that_breaks_the_model_is_one_line(gsp, tiny_fit, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    r = gsp("steer", "--sae", tiny_fit / "sae", "--feature", 3, "--prompt", "alpha", "--max-new-tokens", 4, *args)
    one_line_error(r, "too large for the model", "smaller --strength")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["1e39", "-1e39"])
def test_a_strength_beyond_float32_is_refused_before_loading_anything(gsp, tiny_fit, value):
    """1e39 is finite in Python but infinite in float32."""
    r = gsp("steer", "--sae", tiny_fit / "sae", "--feature", 3, "--strength", value)
    one_line_error(r, "--strength", "float32", value.replace("1e39", "1e+39"))


def test_the_edit_refuses_an_activation_too_large_for_float32(lm, sae):
    ids = IDS[:, :4]
    assert _layer_out(lm, ids, steer_fn(sae, [3], [1e15])).isfinite().all()  # large, but the model copes
    for value in (1e20, -1e30):  # the mean square overflows float32: every norm after it gives zeros
        with pytest.raises(GspError, match="too large for the model"):
            _layer_out(lm, ids, steer_fn(sae, [3], [value]))


def test_non_finite_logits_stop_the_generation(lm):
    """However an edit breaks the forward pass, NaN logits are an error, not a continuation."""
    from pipeline.steering import finite_logits

    with finite_logits(lm), torch.no_grad():
        lm.generate(IDS[:, :3], max_new_tokens=2, do_sample=False)  # a sound model passes
    handle = lm.lm_head.register_forward_hook(lambda m, a, out: torch.full_like(out, float("nan")))
    try:
        with finite_logits(lm), torch.no_grad(), pytest.raises(GspError, match="NaN or infinite"):
            lm.generate(IDS[:, :3], max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
