"""End to end on the real offline Gemma 3 270M and the real Wikipedia corpus (tens of seconds)."""

import numpy as np
import pytest
import torch

from pipeline.corpus import documents
from pipeline.models import OFFLINE_DEFAULT, load_model
from pipeline.store import ActivationStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return load_model(OFFLINE_DEFAULT, device="cpu")


def test_offline_default_is_real_gemma(gemma):
    cfg = gemma.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (18, 640, 262144)
    ids = gemma.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = gemma.model.generate(ids, max_new_tokens=4, do_sample=False)
    continuation = gemma.tokenizer.decode(out[0, ids.shape[1] :])
    assert any(w in continuation for w in ("Paris", "France", "capital")), continuation  # random weights would not


def test_harvest_real_model_and_corpus(gsp, gemma, tmp_path):
    store = tmp_path / "wiki"
    r = gsp(
        "harvest",
        "--layer",
        5,
        "--tokens",
        384,
        "--context-size",
        64,
        "--batch-size",
        3,
        "--store",
        store,
        "--store-dtype",
        "float32",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    s = ActivationStore.open(store)
    assert s.complete and s.rows_written == 384 and s.d_in == 640
    assert s.meta.model.name == "google/gemma-3-270m" and s.meta.tokenizer.bos_id == 2
    ids = s.read_tokens(0, 384).reshape(6, 64)
    # independent reference: the full model's hidden_states[6] is the output of layers[5]
    with torch.no_grad():
        hs = gemma.model(input_ids=torch.from_numpy(ids), output_hidden_states=True).hidden_states[6]
    got = s.read(0, 384)
    np.testing.assert_allclose(got, hs.reshape(384, 640).numpy(), rtol=1e-4, atol=1e-2)
    # the stored ids are real Wikipedia prose: the first context decodes to text of one article
    first = gemma.tokenizer.decode(ids[0, 1:32])
    articles = [t for _, t in documents("wiki")]
    assert any(first in a for a in articles), first
    # magnitudes beyond float16 are stored faithfully (NOTES.md: the residual exceeds 65504 mid-network)
    assert np.isfinite(got).all()


def test_delta_loss_on_the_real_model(gsp, gemma, tmp_path):
    """Zero SAE = zero ablation (which must hurt a real model); exact SAE = no loss change."""
    import json

    from safetensors.numpy import save_file

    from pipeline.lm_loss import DeltaLoss
    from pipeline.sae import SAE

    store = tmp_path / "wiki"
    r = gsp("harvest", "--layer", 5, "--tokens", 256, "--context-size", 64, "--batch-size", 4, "--store", store,
            "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    zero = tmp_path / "zero"
    zero.mkdir()
    save_file({"w_enc": np.zeros((640, 16), np.float32), "w_dec": np.zeros((16, 640), np.float32),
               "b_enc": np.zeros(16, np.float32), "b_dec": np.zeros(640, np.float32),
               "threshold": np.zeros(16, np.float32)}, zero / "params.safetensors")  # fmt: skip
    hook = "model.layers.5.output"
    (zero / "config.json").write_text(json.dumps({"model_name": "google/gemma-3-270m", "architecture": "jump_relu",
        "hf_hook_point_in": hook, "hf_hook_point_out": hook, "width": 16, "type": "sae"}))  # fmt: skip
    r = gsp("evaluate", "--sae", zero, "--store", store, "--delta-tokens", 256, "--reports", tmp_path / "reports",
            "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    (report,) = (tmp_path / "reports").glob("*.json")
    d = json.loads(report.read_text())["delta_loss"]
    assert d["ce_spliced"] == pytest.approx(d["ce_zero_ablated"], rel=1e-6) and d["loss_recovered"] == pytest.approx(0)
    assert 1.0 < d["ce_clean"] < 6.0 < d["ce_zero_ablated"]  # real text, real model; ablating layer 5 breaks it
    assert d["store_activation_mismatch"] < 0.01  # bf16 store vs the live float32 rerun

    exact = SAE(640, 640)
    with torch.no_grad():
        exact.w_enc.copy_(torch.eye(640))
        exact.w_dec.copy_(torch.eye(640))
        exact.b_enc.fill_(1e5)  # above every |activation| at layer 5 (NOTES.md: ~2e4 at most)
        exact.b_dec.fill_(-1e5)
    ids = torch.from_numpy(ActivationStore.open(store).read_tokens(0, 256).astype(np.int64)).view(4, 64)
    acc = DeltaLoss()
    acc.run(gemma.model, exact, ids, 5, "resid_post", [0, 1, 2])
    res = acc.result()
    assert abs(res["delta_loss"]) < 2e-3 and res["kl_clean_spliced"] < 1e-3
    assert res["ce_clean"] == pytest.approx(d["ce_clean"], rel=1e-5)  # the CLI's clean pass, recomputed
