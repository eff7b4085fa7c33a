"""generate_grounded: KV-cached greedy decoding + [SEG] capture (docs/model.md §6, §11)."""

import pytest
import torch

from legion.model.conversation import IMAGE_TOKEN_INDEX
from tests.model_core_tiny import (
    EOS_ID,
    SEG_ID,
    images,
    prompt,
    right_pad,
    single_thread,  # noqa: F401 (fixture)
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# Seed 28 (lm_head x 8 for decisive argmaxes) gives: sample 0 without [SEG], sample 1 with several
# [SEG], sample 2 stopping at once on eos. The fixture asserts this so a changed RNG cannot make
# the tests vacuous.
SEED = 28
PROMPTS = [prompt([5, 6, 7]), prompt([8, 9, 10, 11, 12, 13]), prompt([20])]
RESIZED = [(128, 96), (100, 128), (128, 128)]
ORIGINAL = [(40, 30), (50, 64), (20, 20)]
MAX_NEW = 12


def _model():
    model = tiny_model(SEED).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


def _generate(model, ids, mask, use_cache=True, idx=slice(None), decoding="auto"):
    clip, sam = images(len(PROMPTS), SEED)
    return model.generate_grounded(
        ids,
        mask,
        clip[idx],
        sam[idx],
        RESIZED[idx],
        ORIGINAL[idx],
        max_new_tokens=MAX_NEW,
        use_cache=use_cache,
        decoding=decoding,
    )


@pytest.fixture(scope="module")
def setup():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = _model()
    ids, mask = right_pad(PROMPTS)
    gens = _generate(model, ids, mask)
    seg_counts = [g.token_ids.count(SEG_ID) for g in gens]
    assert seg_counts[0] == 0 and seg_counts[1] >= 2, f"test setup changed: {[g.token_ids for g in gens]}"
    assert gens[2].finished and gens[2].token_ids == [], "test setup changed: sample 2 should stop at once"
    assert not gens[1].finished and len(gens[1].token_ids) == MAX_NEW
    yield model, ids, mask, gens
    torch.set_num_threads(before)


def test_cached_seg_embeddings_equal_teacher_forced_forward(setup):
    model, _, _, gens = setup
    finals = [p + g.token_ids + ([EOS_ID] if g.finished else []) for p, g in zip(PROMPTS, gens)]
    ids, mask = right_pad(finals)
    clip, sam = images(len(PROMPTS), SEED)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            clip_pixel_values=clip,
            sam_pixel_values=sam,
            sam_resized_sizes=RESIZED,
            original_sizes=ORIGINAL,
        )
    for b, g in enumerate(gens):
        n = g.token_ids.count(SEG_ID)
        assert g.seg_embeddings.shape == (n, model.config.hidden_size)
        assert g.mask_logits.shape == (n, *ORIGINAL[b])
        torch.testing.assert_close(g.seg_embeddings, out.seg_embeddings[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g.mask_logits, out.pred_masks[b], atol=1e-4, rtol=1e-4)
    # the states differ per [SEG] (they are not one state copied)
    assert not torch.allclose(gens[1].seg_embeddings[0], gens[1].seg_embeddings[1])


def test_slow_uncached_generation_gives_the_same_result(setup):
    model, ids, mask, gens = setup
    slow = _generate(model, ids, mask, use_cache=False)
    for fast, ref in zip(gens, slow):
        assert fast.token_ids == ref.token_ids and fast.finished == ref.finished
        torch.testing.assert_close(fast.seg_embeddings, ref.seg_embeddings, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoding", ["static", "cuda_graph"])  # cuda_graph runs the static path eagerly on the CPU
def test_static_cache_decoding_gives_the_same_result(setup, decoding):
    """The StaticCache path (the one a CUDA graph replays) against the DynamicCache one, with the
    padded batch (right-padded prompts are re-padded on the left: padding rows in the static mask)."""
    model, ids, mask, gens = setup
    static = _generate(model, ids, mask, decoding=decoding)
    for fast, ref in zip(static, gens):
        assert fast.token_ids == ref.token_ids and fast.finished == ref.finished
        torch.testing.assert_close(fast.seg_embeddings, ref.seg_embeddings, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.mask_logits, ref.mask_logits, atol=1e-4, rtol=1e-4)


def test_unknown_decoding_mode_is_rejected(setup):
    model, ids, mask, _ = setup
    with pytest.raises(ValueError, match="decoding must be one of"):
        _generate(model, ids, mask, decoding="graph")


def test_batched_generation_equals_one_sample_at_a_time_and_accepts_left_padding(setup):
    model, _, _, gens = setup
    for b, p in enumerate(PROMPTS):
        single = _generate(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), idx=slice(b, b + 1))[0]
        assert single.token_ids == gens[b].token_ids
        torch.testing.assert_close(single.seg_embeddings, gens[b].seg_embeddings, atol=1e-5, rtol=1e-5)
    total = max(len(p) for p in PROMPTS)
    left_ids = torch.tensor([[0] * (total - len(p)) + p for p in PROMPTS])
    left_mask = torch.tensor([[0] * (total - len(p)) + [1] * len(p) for p in PROMPTS])
    left = _generate(model, left_ids, left_mask)
    assert [g.token_ids for g in left] == [g.token_ids for g in gens]


def test_generation_under_peft_wrapper_and_bf16():
    from peft import LoraConfig, get_peft_model

    from legion.model.legion import lora_target_module_names

    model = _model()
    ids, mask = right_pad(PROMPTS)
    reference = _generate(model, ids, mask)
    wrapped = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_module_names(model), task_type="CAUSAL_LM")
    ).eval()
    clip, sam = images(len(PROMPTS), SEED)
    via_peft = wrapped.generate_grounded(ids, mask, clip, sam, RESIZED, ORIGINAL, max_new_tokens=MAX_NEW)
    assert [g.token_ids for g in via_peft] == [g.token_ids for g in reference]  # LoRA B = 0: same model

    bf16 = _model().to(torch.bfloat16)
    out = bf16.generate_grounded(ids, mask, clip.bfloat16(), sam.bfloat16(), RESIZED, ORIGINAL, max_new_tokens=4)
    for b, g in enumerate(out):
        assert len(g.token_ids) <= 4
        assert g.mask_logits.shape == (g.token_ids.count(SEG_ID), *ORIGINAL[b])
        assert g.mask_logits.dtype == torch.float32 and torch.isfinite(g.mask_logits).all()


def test_two_image_placeholders_are_rejected():
    model = _model()
    bad = prompt([5]) + [IMAGE_TOKEN_INDEX]
    ids, mask = right_pad([bad])
    clip, sam = images(1)
    with pytest.raises(ValueError, match="2 image placeholders"):
        model.generate_grounded(ids, mask, clip, sam, RESIZED[:1], ORIGINAL[:1], max_new_tokens=2)
