"""pipeline.models: which model a stage runs (`model_to_run`, shared by evaluate, features and steer)
and what a --model spec points to, decided before any work and without contacting the Hub."""

import pytest

from pipeline.errors import GspError
from pipeline.models import check_model_spec, load_model, looks_local, model_to_run
from pipeline.store import ModelRef

HUB_STORE = ModelRef("google/gemma-3-270m", "google/gemma-3-270m", "abc123", "Gemma3ForCausalLM")


def test_the_model_is_the_flag_else_the_stores_at_its_revision_else_the_saes():
    assert model_to_run("google/gemma-3-1b-pt", "v2", harvested=HUB_STORE) == ("google/gemma-3-1b-pt", "v2")
    assert model_to_run(None, None, harvested=HUB_STORE) == ("google/gemma-3-270m", "abc123")
    assert model_to_run(None, "v2", harvested=HUB_STORE) == ("google/gemma-3-270m", "v2")  # --revision wins
    assert model_to_run(None, None, named="google/gemma-2-2b") == ("google/gemma-2-2b", None)
    with pytest.raises(GspError, match="--model is required"):
        model_to_run(None, None)


def test_the_store_an_sae_was_trained_on_gives_its_model_and_revision(tiny_fit):
    from pipeline.store import ActivationStore

    ref = ActivationStore.open(tiny_fit / "store").meta.model
    assert model_to_run(None, None, store_path=str(tiny_fit / "store"), named="other/model") == (ref.spec, ref.revision)


def test_a_store_that_cannot_be_read_is_an_error_not_a_guess(tmp_path):
    """steer used to fall back silently to the model the SAE's files name."""
    with pytest.raises(GspError) as e:
        model_to_run(None, None, store_path=str(tmp_path / "moved-store"), named="google/gemma-3-270m")
    message = str(e.value)
    assert "moved-store" in message and "pass --model" in message and "google/gemma-3-270m" in message
    assert "\n" not in message
    assert model_to_run("google/gemma-3-270m", None, store_path=str(tmp_path / "moved-store")) == (
        "google/gemma-3-270m",
        None,
    )  # --model given: the store is never read


@pytest.mark.parametrize("spec", ["ev/nosuch_model", "./nosuch_model", "../nosuch_model", "/no/such/model", "~/nosuch"])
def test_a_missing_local_path_fails_at_once_without_the_hub(tmp_path, monkeypatch, spec):
    """`ev/nosuch_model` beside an `ev/` folder used to be looked up on the Hub (10 retries, ~51 s)."""
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked for a local path")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ev").mkdir()
    assert looks_local(spec)
    for call in (check_model_spec, load_model, lambda s: model_to_run(s, None)):
        with pytest.raises(GspError, match="is not a local folder nor a Hugging Face id") as e:
            call(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(GspError, match="ev/ is a folder here"):
        check_model_spec("ev/nosuch_model")


def test_hub_ids_and_local_folders_are_told_apart(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_model_spec("google/gemma-3-270m") == "hub" and not looks_local("google/gemma-3-270m")
    assert check_model_spec(str(tiny_model)) == "local"
    (tmp_path / "empty").mkdir()
    with pytest.raises(GspError, match="has no config.json"):
        check_model_spec("empty")
    with pytest.raises(GspError, match="unknown offline model"):
        check_model_spec("offline:gemma-9")
