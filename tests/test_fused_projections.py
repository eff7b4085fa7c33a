"""Fused q/k/v and gate/up projections (legion/model/fused_projections.py): same numbers within fp32 rounding."""

import pytest
import torch

from legion.model.fused_projections import FusedProjection, fuse_projections, projections_fused, unfuse_projections
from tests.model_core_tiny import (
    images,
    prompt,
    right_pad,
    single_thread,  # noqa: F401 (fixture)
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("single_thread")

SEED = 28  # the generation tests' seed: decisive argmaxes with lm_head x 8, several [SEG] in sample 1
PROMPTS = [prompt([5, 6, 7]), prompt([8, 9, 10, 11, 12, 13]), prompt([20])]
RESIZED = [(128, 96), (100, 128), (128, 128)]
ORIGINAL = [(40, 30), (50, 64), (20, 20)]


def _model():
    model = tiny_model(SEED).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


def _generate(model, decoding):
    ids, mask = right_pad(PROMPTS)
    clip, sam = images(len(PROMPTS), SEED)
    return model.generate_grounded(ids, mask, clip, sam, RESIZED, ORIGINAL, max_new_tokens=12, decoding=decoding)


def test_fused_forward_and_state_dict_equal_the_separate_projections():
    model = _model()
    ids, mask = right_pad(PROMPTS)
    clip, _ = images(len(PROMPTS), SEED)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, clip_pixel_values=clip).logits
    assert fuse_projections(model.model) == 2 * model.config.num_hidden_layers
    assert projections_fused(model.model) and fuse_projections(model.model) == 0  # idempotent
    attn = model.model.layers[0].self_attn
    assert (
        isinstance(attn.q_proj, FusedProjection)
        and attn.k_proj.weight.shape == before["model.layers.0.self_attn.k_proj.weight"].shape
    )
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=mask, clip_pixel_values=clip).logits
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    # a projection called on its own (another input) computes just its part
    x = torch.randn(2, 64)
    torch.testing.assert_close(attn.k_proj(x), x @ before["model.layers.0.self_attn.k_proj.weight"].T)

    assert unfuse_projections(model.model) == 5 * model.config.num_hidden_layers and not projections_fused(model.model)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    restored = model.state_dict()
    assert all(torch.equal(restored[k], before[k]) for k in before)
    assert model.model.layers[0].self_attn.q_proj.weight.requires_grad  # as before fusing


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
def test_fused_generation_gives_the_same_tokens_states_and_masks(decoding):
    model = _model()
    reference = _generate(model, decoding)
    fuse_projections(model.model)
    fused = _generate(model, decoding)
    assert any(g.seg_embeddings.shape[0] >= 2 for g in reference)  # not vacuous: several [SEG] states compared
    for a, b in zip(fused, reference):
        assert a.token_ids == b.token_ids and a.finished == b.finished
        torch.testing.assert_close(a.seg_embeddings, b.seg_embeddings, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.mask_logits, b.mask_logits, atol=1e-4, rtol=1e-4)


def test_lora_wrapped_projections_are_left_alone():
    from peft import LoraConfig, inject_adapter_in_model

    from legion.model.legion import lora_target_module_names

    model = _model()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=lora_target_module_names(model)), model)
    assert fuse_projections(model.model) == model.config.num_hidden_layers  # gate/up only: q/v carry LoRA
    assert not isinstance(model.model.layers[0].self_attn.k_proj, FusedProjection)
    assert isinstance(model.model.layers[0].mlp.gate_proj, FusedProjection)
