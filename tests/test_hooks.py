"""pipeline.hooks: each site's activation equals an independent hook on a full forward pass, and the
forward pass stops at the site (no later layer, no LM head), for Gemma 3, multimodal Gemma 3 and Llama."""

import copy

import pytest
import torch
from conftest import direct_site
from transformers import AutoModelForCausalLM

from pipeline.errors import GspError
from pipeline.hooks import activations, site_width


@pytest.fixture(scope="module")
def model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.mark.parametrize("site, width", [("resid_post", 64), ("mlp_out", 64), ("attn_out", 48), ("mlp_in", 64)])
@pytest.mark.parametrize("layer", [0, 3])
def test_each_site_equals_a_direct_forward(model, site, width, layer):
    ids = torch.randint(4, 300, (3, 20), generator=torch.Generator().manual_seed(layer))
    got = activations(model, ids, layer, site)
    assert got.shape == (3, 20, width) == (3, 20, site_width(model, layer, site))
    torch.testing.assert_close(got, direct_site(model, ids, layer, site))


def test_many_points_in_one_pass_equal_one_at_a_time(model):
    """One forward pass captures every requested point, each equal to a direct forward of its own."""
    from pipeline.hooks import SITES, activations_at

    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(7))
    points = [(layer, site) for layer in (0, 2, 3) for site in SITES]
    got = activations_at(model, ids, points)
    assert sorted(got) == sorted(points)
    for layer, site in points:
        torch.testing.assert_close(got[(layer, site)], direct_site(model, ids, layer, site))


def test_the_pass_stops_after_the_last_point(model):
    """Points in any order: nothing after the deepest one runs (here layer 2's mlp_in: its MLP and
    post-MLP norm, block 3 and the head stay idle)."""
    from pipeline.hooks import activations_at

    block = model.model.layers[2]
    later = [block.mlp, block.post_feedforward_layernorm, model.model.layers[3], model.model.norm, model.lm_head]
    fired = []
    handles = [m.register_forward_hook(lambda m, a, o, i=i: fired.append(i)) for i, m in enumerate(later)]
    try:
        activations_at(model, torch.full((1, 6), 9), [(2, "mlp_in"), (0, "resid_post"), (1, "mlp_out")])
    finally:
        for h in handles:
            h.remove()
    assert fired == []


def test_early_stop_skips_later_layers_and_head(model):
    fired = []
    later = [*model.model.layers[2:], model.model.norm, model.lm_head]
    handles = [m.register_forward_hook(lambda m, a, o, i=i: fired.append(i)) for i, m in enumerate(later)]
    ran = []
    handles.append(model.model.layers[1].register_forward_hook(lambda m, a, o: ran.append(1)))
    try:
        for site in ("resid_post", "mlp_out", "attn_out"):
            activations(model, torch.full((2, 8), 5), 1, site)
    finally:
        for h in handles:
            h.remove()
    assert fired == [] and len(ran) == 1  # block 1 completes only for resid_post (its own output)


def test_bad_layer_and_site_are_gsp_errors(model):
    with pytest.raises(GspError, match="layer 4 is out of range: this model has 4 layers"):
        activations(model, torch.full((1, 4), 5), 4, "resid_post")
    with pytest.raises(GspError, match="unknown site 'resid_pre'"):
        activations(model, torch.full((1, 4), 5), 1, "resid_pre")


def test_multimodal_gemma3_blocks_are_found():
    """Gemma 3 4B and larger load as Gemma3ForConditionalGeneration; the same hooks must find the blocks."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision)).eval()
    ids = torch.full((1, 6), 7)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states[2]  # layer 1's output (not the last)
    torch.testing.assert_close(activations(model, ids, 1, "resid_post"), ref)


def test_llama_blocks_serve_resid_post_and_mlp_out():
    """The same hook code serves Llama; Llama has no post_feedforward_layernorm, so its mlp_out is the
    MLP's own output (what the block adds to the residual stream)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = {}
    hooks = [model.model.layers[1].mlp.register_forward_hook(lambda m, a, out: seen.setdefault("mlp", out)),
             model.model.layers[1].register_forward_hook(lambda m, a, out: seen.setdefault("block", out))]  # fmt: skip
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    block = seen["block"][0] if isinstance(seen["block"], tuple) else seen["block"]
    torch.testing.assert_close(activations(model, ids, 1, "mlp_out"), seen["mlp"])
    torch.testing.assert_close(activations(model, ids, 1, "resid_post"), block)


def test_read_gains_are_the_rms_of_the_later_norms_gains(model):
    """By hand from the weights: Gemma 3's RMSNorm multiplies by (1 + γ); the readers after layer L are every
    later block's input and pre-MLP norms and the final norm. Llama's norms multiply by γ itself, and its
    pre-MLP norm is post_attention_layernorm."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.hooks import read_gains

    model, g = copy.deepcopy(model), torch.Generator().manual_seed(3)  # the module's model stays as it is
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g))
    blocks, final = model.model.layers, model.model.norm.weight
    for layer in (1, 3):
        norms = [n for b in blocks[layer + 1 :] for n in (b.input_layernorm, b.pre_feedforward_layernorm)]
        readers = [final] + [n.weight for n in norms]
        expected = torch.stack([1 + w for w in readers]).square().mean(0).sqrt()
        for site in ("resid_post", "mlp_out"):
            torch.testing.assert_close(torch.tensor(read_gains(model, layer, site)), expected, rtol=1e-5, atol=1e-6)
    assert read_gains(model, 1, "attn_out") is None and read_gains(model, 1, "mlp_in") is None
    with pytest.raises(GspError, match="out of range"):
        read_gains(model, 9, "resid_post")

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()  # fmt: skip
    with torch.no_grad():
        for p in llama.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g))
    b = llama.model.layers[2]
    readers = [llama.model.norm.weight, b.input_layernorm.weight, b.post_attention_layernorm.weight]
    expected = torch.stack(readers).square().mean(0).sqrt()
    torch.testing.assert_close(torch.tensor(read_gains(llama, 1, "resid_post")), expected, rtol=1e-5, atol=1e-6)
