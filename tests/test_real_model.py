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
    assert s.attrs["model"]["name"] == "google/gemma-3-270m" and s.attrs["tokenizer"]["bos_id"] == 2
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
