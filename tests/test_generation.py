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


# --- issue 21: device-side greedy picks, attention kernels, reused static decoders ------------------------------
class _PerStepDynamicDecoder:
    """The DynamicCache decoder as it was before issue 21: a 2-D mask grown every step (transformers reads it)."""

    def __init__(self, decoder):
        from transformers import DynamicCache

        self.decoder, self.cache, self.mask = decoder, DynamicCache(config=decoder.config), None

    def _forward(self, embeds, positions):
        out = self.decoder(
            inputs_embeds=embeds, attention_mask=self.mask, position_ids=positions, cache=self.cache, use_cache=True
        )
        return out.last_hidden_state[:, -1]

    def prefill(self, embeds, mask, positions):
        self.mask = mask
        return self._forward(embeds, positions)

    def step(self, embeds, positions):
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        return self._forward(embeds, positions)


@torch.no_grad()
def _generate_per_token_reference(model, ids, mask, decoding):
    """generate_grounded's cached loop as it was before issue 21: one device->host read per token, the [SEG]
    state cloned on the spot, a fresh decoder per call, torch's own attention kernels."""
    from legion.model.static_decoding import StaticDecoder

    clip, sam = images(len(PROMPTS), SEED)
    bsz = ids.shape[0]
    tokens, seg_states, finished = [[] for _ in range(bsz)], [[] for _ in range(bsz)], [False] * bsz
    mm = model.prepare_multimodal_inputs(ids, mask, clip, padding_side="left")
    if decoding == "dynamic":
        decoder = _PerStepDynamicDecoder(model.model)
    else:
        decoder = StaticDecoder(model.model, bsz, mm.attention_mask.shape[1] + MAX_NEW, use_graph=False)
    states = decoder.prefill(mm.inputs_embeds, mm.attention_mask, mm.position_ids)
    positions = mm.position_ids[:, -1:]
    for step in range(MAX_NEW):
        next_tokens = model.lm_head(states).argmax(-1)
        for b, tok in enumerate(next_tokens.tolist()):
            if finished[b]:
                continue
            if tok == EOS_ID:
                finished[b] = True
                continue
            tokens[b].append(tok)
            if tok == SEG_ID:
                seg_states[b].append(states[b].clone())
        if all(finished) or step == MAX_NEW - 1:
            break
        positions = positions + 1
        states = decoder.step(model.model.embed_tokens(next_tokens[:, None]), positions)
    hidden = model.config.hidden_size
    states = [torch.stack(s) if s else torch.zeros(0, hidden) for s in seg_states]
    return tokens, finished, states, model._masks_for(states, sam, RESIZED, ORIGINAL)


def _assert_same_as_reference(gens, reference):
    tokens, finished, states, masks = reference
    for b, g in enumerate(gens):
        assert g.token_ids == tokens[b] and g.finished == finished[b]
        assert torch.equal(g.seg_embeddings, states[b])
        assert torch.equal(g.mask_logits, masks[b])


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
@pytest.mark.parametrize("sync_every", [1, 3, 5, 16, 100])
def test_device_side_greedy_gives_the_per_token_result_bit_for_bit(setup, decoding, sync_every):
    """Tokens, finished flags, [SEG] states and masks equal (exactly) the per-token host loop of before, whatever
    the read-back interval: 3 and 5 stop mid-chunk after the batch finished, 100 > max_new_tokens."""
    model, ids, mask, _ = setup
    reference = _generate_per_token_reference(model, ids, mask, decoding)
    clip, sam = images(len(PROMPTS), SEED)
    gens = model.generate_grounded(
        ids, mask, clip, sam, RESIZED, ORIGINAL, max_new_tokens=MAX_NEW, decoding=decoding, sync_every=sync_every
    )
    _assert_same_as_reference(gens, reference)


def test_device_side_greedy_stops_early_when_every_sample_finished(setup):
    """A batch whose samples all stop on eos: the loop ends at the first read-back after the last eos."""
    model, _, _, _ = setup
    ids, mask = right_pad([PROMPTS[2]])  # sample 2 stops at once
    clip, sam = images(len(PROMPTS), SEED)
    steps = []
    hook = model.lm_head.register_forward_hook(lambda *_: steps.append(1))
    try:
        for sync_every, expected_steps in [(1, 1), (4, 4)]:
            steps.clear()
            (gen,) = model.generate_grounded(
                ids, mask, clip[2:], sam[2:], RESIZED[2:], ORIGINAL[2:], max_new_tokens=MAX_NEW, sync_every=sync_every
            )
            assert gen.token_ids == [] and gen.finished and len(steps) == expected_steps
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="sync_every"):
        model.generate_grounded(ids, mask, clip[2:], sam[2:], RESIZED[2:], ORIGINAL[2:], sync_every=0)


@pytest.mark.parametrize("backend", ["auto", "torch", "math", "flash", "math,flash"])
@pytest.mark.parametrize("decoding", ["dynamic", "static"])
def test_attention_backend_setting_keeps_the_tokens(setup, backend, decoding):
    """Every attention-kernel choice the CPU has gives the per-token reference's tokens, [SEG] states within fp32
    rounding (the math kernel sums in another order than the CPU flash kernel)."""
    model, ids, mask, _ = setup
    tokens, finished, states, masks = _generate_per_token_reference(model, ids, mask, decoding)
    clip, sam = images(len(PROMPTS), SEED)
    gens = model.generate_grounded(
        ids, mask, clip, sam, RESIZED, ORIGINAL, max_new_tokens=MAX_NEW, decoding=decoding, attention_backend=backend
    )
    for b, g in enumerate(gens):
        assert g.token_ids == tokens[b] and g.finished == finished[b]
        torch.testing.assert_close(g.seg_embeddings, states[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g.mask_logits, masks[b], atol=1e-4, rtol=1e-4)


def test_attention_backend_names_are_checked():
    from legion.model.static_decoding import attention_kernels

    assert attention_kernels("auto") == ["flash", "efficient", "math"] and attention_kernels("torch") is None
    assert attention_kernels("efficient, math") == ["efficient", "math"]
    for bad in ("", "fast", "auto,math", "cudnn,xformers"):
        with pytest.raises(ValueError, match="attention_backend"):
            attention_kernels(bad)


def test_static_decoder_is_reused_for_the_same_shape_and_gives_the_same_result(setup):
    """The static decoder (the cache a CUDA graph is captured on) is kept per (batch, length) and reset between
    generations: a second call reuses it and gives exactly the first call's (and a fresh decoder's) result."""
    import legion.model.legion as legion_model

    model, ids, mask, _ = setup
    model.clear_decoder_cache()
    clip, sam = images(len(PROMPTS), SEED)

    def run(n=3, **kw):
        return model.generate_grounded(
            ids[:n], mask[:n], clip[:n], sam[:n], RESIZED[:n], ORIGINAL[:n], max_new_tokens=MAX_NEW, **kw
        )

    fresh = run(decoding="static", reuse_decoder=False)
    assert "_legion_static_decoders" not in vars(model)
    first = run(decoding="static")
    decoders = vars(model)["_legion_static_decoders"][1]
    ((key, decoder),) = decoders.items()
    second = run(decoding="static")
    assert list(decoders.items()) == [(key, decoder)]  # the same object, reset and reused
    for a, b, c in zip(fresh, first, second):
        assert a.token_ids == b.token_ids == c.token_ids
        assert torch.equal(a.seg_embeddings, b.seg_embeddings) and torch.equal(b.seg_embeddings, c.seg_embeddings)
        assert torch.equal(a.mask_logits, c.mask_logits)
    # another attention setting is another entry (a captured graph keeps the kernels it was captured with)
    run(decoding="static", attention_backend="math")
    assert len(decoders) == 2 and key in decoders
    # another batch size is another entry; the cache is bounded (least recently used goes first)
    run(n=2, decoding="static")
    run(n=1, decoding="static")
    assert len(decoders) == legion_model.DECODER_CACHE_ENTRIES and key not in decoders
    # re-allocated weights (e.g. model.to(...)) invalidate every entry
    with torch.no_grad():
        layer = model.model.layers[0].mlp.down_proj
        layer.weight = torch.nn.Parameter(layer.weight.clone())
    run(n=1, decoding="static")
    assert len(vars(model)["_legion_static_decoders"][1]) == 1
    model.clear_decoder_cache()
    assert "_legion_static_decoders" not in vars(model)
