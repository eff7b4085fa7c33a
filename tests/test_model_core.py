"""LegionForCausalLM on a tiny in-process config: sequence construction, [SEG] selection, keys,
frozen parts, LoRA + gradient checkpointing, overfitting, bf16 (docs/model.md §4-§10)."""

import pytest
import torch
from safetensors import safe_open

from legion.model.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from legion.model.legion import LegionOutput, build_multimodal_inputs, lora_target_module_names, seg_state_positions
from tests.model_core_tiny import (
    EOS_ID,
    SEG_ID,
    images,
    prompt,
    right_pad,
    single_thread,  # noqa: F401 (fixture)
    tiny_config,
    tiny_model,
)

S = SEG_ID
# several [SEG] / none / one at the end; different lengths -> right padding
SEQS = [prompt([5, 6, S, 7, 8, S, 9]) + [EOS_ID], prompt([5, 6, 7]) + [EOS_ID], prompt([10, 11, 12, 13, S, EOS_ID])]
ORIGINAL = [(40, 30), (24, 36), (32, 32)]
RESIZED = [(128, 96), (85, 128), (128, 128)]
FROZEN = (
    "vision_tower",
    "mm_projector",
    "grounding_encoder.image_encoder",
    "grounding_encoder.prompt_encoder",
    "region_encoder",
)

pytestmark = pytest.mark.usefixtures("single_thread")


def brute_force_seg_positions(seq: list[int], n_img: int) -> list[int]:
    expanded = []
    for tok in seq:
        expanded += ["IMG"] * n_img if tok == IMAGE_TOKEN_INDEX else [tok]
    return [i - 1 for i, tok in enumerate(expanded) if tok == S]


def make_batch(seqs=SEQS, seed=0):
    ids, mask = right_pad(seqs)
    labels = ids.clone()
    for b, seq in enumerate(seqs):
        labels[b, :5] = IGNORE_INDEX  # prompt part
        labels[b, len(seq) :] = IGNORE_INDEX
    clip, sam = images(len(seqs), seed)
    gt = []
    for b, seq in enumerate(seqs):
        h, w = ORIGINAL[b]
        m = torch.zeros(seq.count(S), h, w)
        for i in range(m.shape[0]):  # a different large rectangle per [SEG] (~70% of the image)
            m[i, 2 * i : h - 4 + 2 * i, 2 : w - 3 - 3 * i] = 1
        gt.append(m)
    return dict(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        clip_pixel_values=clip,
        sam_pixel_values=sam,
        sam_resized_sizes=RESIZED[: len(seqs)],
        original_sizes=ORIGINAL[: len(seqs)],
        gt_masks=gt,
    )


# --- sequence construction ---------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_expansion_map_matches_brute_force(padding_side):
    n_img, dim = 7, 5
    ids, mask = right_pad(SEQS)
    text_embeds = torch.randn(*ids.shape, dim)
    feats = torch.randn(len(SEQS), n_img, dim)
    labels = ids.clone()
    mm = build_multimodal_inputs(text_embeds, ids, mask, feats, labels, padding_side=padding_side)
    total = max(len(s) for s in SEQS) + n_img - 1
    assert mm.inputs_embeds.shape == (len(SEQS), total, dim)
    positions = seg_state_positions(ids, mm.position_map, S)
    for b, seq in enumerate(SEQS):
        n = len(seq) + n_img - 1
        start = 0 if padding_side == "right" else total - n
        assert mm.attention_mask[b].tolist() == [0] * start + [1] * n + [0] * (total - n - start)
        assert positions[b].tolist() == [start + q for q in brute_force_seg_positions(seq, n_img)]
        p = seq.index(IMAGE_TOKEN_INDEX)
        expected = torch.cat([text_embeds[b, :p], feats[b], text_embeds[b, p + 1 : len(seq)]])
        assert torch.equal(mm.inputs_embeds[b, start : start + n], expected)
        assert bool((mm.inputs_embeds[b, :start] == 0).all()) and bool((mm.inputs_embeds[b, start + n :] == 0).all())
        assert mm.labels[b, start + p : start + p + n_img].eq(IGNORE_INDEX).all()
        assert mm.labels[b, start + p + n_img : start + n].tolist() == seq[p + 1 :]
        assert mm.position_ids[b, start : start + n].tolist() == list(range(n))
    assert [len(p) for p in positions] == [2, 0, 1]


def test_seg_states_equal_unpadded_single_sample_forward():
    model = tiny_model().eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(**batch)
        n_img = model.config.num_image_tokens
        for b, seq in enumerate(SEQS):
            ids = torch.tensor(seq)
            p = seq.index(IMAGE_TOKEN_INDEX)
            embed = model.model.embed_tokens
            feats = model.encode_images(batch["clip_pixel_values"][b : b + 1])[0]
            seq_embeds = torch.cat([embed(ids[:p]), feats, embed(ids[p + 1 :])])[None]
            hidden = model.model(inputs_embeds=seq_embeds).last_hidden_state[0]
            expected = hidden[brute_force_seg_positions(seq, n_img)]
            assert out.seg_embeddings[b].shape == (seq.count(S), model.config.hidden_size)
            torch.testing.assert_close(out.seg_embeddings[b], expected, atol=1e-5, rtol=1e-5)
    assert [tuple(m.shape) for m in out.pred_masks] == [(2, 40, 30), (0, 24, 36), (1, 32, 32)]


def test_encode_images_is_penultimate_clip_patches_projected():
    model = tiny_model().eval()
    clip, _ = images(2)
    with torch.no_grad():
        states = model.model.vision_tower.vision_tower(clip, output_hidden_states=True).hidden_states
        expected = model.model.mm_projector(states[-2][:, 1:])
        got = model.encode_images(clip)
    cfg = model.config
    assert got.shape == (2, cfg.num_image_tokens, cfg.hidden_size) == (2, 16, 64)
    torch.testing.assert_close(got, expected)


def test_mask_count_mismatch_is_an_error():
    model = tiny_model().eval()
    batch = make_batch()
    batch["gt_masks"][0] = batch["gt_masks"][0][:1]
    with pytest.raises(ValueError, match=r"sample 0: 2 \[SEG\] tokens but 1 ground-truth"):
        model(**batch)


# --- keys ------------------------------------------------------------------------------------
def test_state_dict_keys_and_round_trip(tmp_path):
    model = tiny_model().eval()
    keys = set(model.state_dict())
    assert not any("vision_tower" in k for k in keys)
    assert any(k.startswith("model.vision_tower.vision_tower.") for k, _ in model.named_parameters())
    for key in [
        "model.mm_projector.0.weight",
        "model.mm_projector.2.bias",
        "model.text_hidden_fcs.0.0.weight",
        "model.text_hidden_fcs.0.2.weight",
        "model.region_encoder.mlvl_fuse.fuse_convs.4.gn.weight",
        "model.region_encoder.roi_align.flatten_linear.weight",
        "model.grounding_encoder.image_encoder.pos_embed",
        "model.grounding_encoder.prompt_encoder.no_mask_embed.weight",
        "model.grounding_encoder.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "model.grounding_encoder.mask_decoder.mask_tokens.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.norm.weight",
    ]:
        assert key in keys, key
    assert tuple(model.state_dict()["model.text_hidden_fcs.0.2.weight"].shape) == (32, 64)
    assert not any("pixel_mean" in k or "pixel_std" in k for k in keys)

    other = tiny_model(seed=1).eval()
    result = other.load_state_dict(model.state_dict(), strict=True)  # CLIP keys absent and not reported missing
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k

    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as fh:
        saved = set(fh.keys())
    assert saved == keys


def test_lora_target_module_names_are_llm_q_and_v_only():
    model = tiny_model()
    assert lora_target_module_names(model) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]


# --- gradients -------------------------------------------------------------------------------
def _assert_no_grad_in_frozen(model):
    for name, p in model.named_parameters():
        if any(f in name for f in FROZEN):
            assert p.grad is None, name


def test_frozen_parts_get_no_gradient_full_finetune():
    model = tiny_model().train()
    out = model(**make_batch())
    assert isinstance(out, LegionOutput)
    out.loss.backward()
    _assert_no_grad_in_frozen(model)
    named = dict(model.named_parameters())
    for name in [
        "model.text_hidden_fcs.0.0.weight",
        "model.grounding_encoder.mask_decoder.mask_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
        "model.embed_tokens.weight",
    ]:
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name


def test_lora_with_gradient_checkpointing_reaches_the_right_modules():
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    batch = make_batch()
    model.eval()
    with torch.no_grad():
        reference_loss = model(**batch).loss
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=lora_target_module_names(model),
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, lora)
    for name, p in peft_model.named_parameters():
        if any(k in name for k in ("lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs")):
            p.requires_grad_(True)
    peft_model.train()
    out = peft_model(**batch)
    assert isinstance(out, LegionOutput) and torch.isfinite(out.loss)
    assert all(m.gradient_checkpointing for m in model.model.layers)
    out.loss.backward()

    grads = {n: p.grad for n, p in peft_model.named_parameters()}
    lora_names = [n for n in grads if "lora_" in n]
    assert len(lora_names) == 2 * 2 * 2  # layers x (q, v) x (A, B)
    assert all(("q_proj" in n or "v_proj" in n) and "grounding_encoder" not in n for n in lora_names)
    for n in lora_names:
        assert grads[n] is not None and grads[n].abs().sum() > 0, n
    dec = "base_model.model.model.grounding_encoder.mask_decoder."
    for name in [
        dec + "transformer.layers.0.self_attn.q_proj.weight",
        dec + "output_upscaling.0.weight",
        dec + "output_hypernetworks_mlps.0.layers.0.weight",
        dec + "mask_tokens.weight",
        "base_model.model.model.text_hidden_fcs.0.0.weight",
        "base_model.model.model.text_hidden_fcs.0.2.bias",
        "base_model.model.lm_head.weight",
        "base_model.model.model.embed_tokens.weight",
    ]:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    for n, g in grads.items():
        llm_base = n.startswith("base_model.model.model.layers.") and "lora_" not in n
        if any(f in n for f in FROZEN) or llm_base:
            assert g is None, n
    # LoRA B != 0 here, so the loss differs from the base model's; with B = 0 it must match
    merged_zero = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=lora_target_module_names(tiny_model()),
        task_type="CAUSAL_LM",
    )
    fresh = get_peft_model(tiny_model(), merged_zero).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).loss, reference_loss)


def test_overfitting_one_batch_lowers_every_loss_term():
    model = tiny_model(seed=3).train()
    batch = make_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    history = []
    for _ in range(8):
        out = model(**batch)
        history.append((out.ce_loss.item(), out.bce_loss.item(), out.dice_loss.item()))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    first, last = history[0], history[-1]
    for name, a, b, factor in zip(("ce", "bce", "dice"), first, last, (0.6, 0.95, 0.9)):
        assert b < factor * a, f"{name}: {a:.4f} -> {b:.4f}"


def test_bf16_forward_backward():
    model = tiny_model().to(torch.bfloat16).train()
    batch = make_batch()
    batch["clip_pixel_values"] = batch["clip_pixel_values"].bfloat16()
    batch["sam_pixel_values"] = batch["sam_pixel_values"].bfloat16()
    out = model(**batch)
    assert out.logits.dtype == torch.bfloat16
    assert all(m.dtype == torch.float32 for m in out.pred_masks)  # postprocessing and losses in fp32
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.text_hidden_fcs[0][0].weight.grad is not None
    _assert_no_grad_in_frozen(model)


def test_loss_weights_scale_the_mask_terms():
    model = tiny_model().eval()
    batch = make_batch()
    with torch.no_grad():
        base = model(**batch)
        model.set_loss_weights(ce=1.0, bce=2.0, dice=0.5)
        scaled = model(**batch)
    torch.testing.assert_close(scaled.bce_loss, base.bce_loss / 0.4 * 2.0)
    torch.testing.assert_close(scaled.dice_loss, base.dice_loss / 0.2 * 0.5)
    torch.testing.assert_close(scaled.loss, scaled.ce_loss + scaled.bce_loss + scaled.dice_loss)
    torch.testing.assert_close(scaled.mask_loss, scaled.bce_loss + scaled.dice_loss)


def test_plain_text_forward_is_the_llama_forward():
    model = tiny_model().eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        logits = model.lm_head(model.model(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(out.logits, logits)
    assert torch.isfinite(out.loss)


def test_dense_positional_encoding_matches_sam_in_fp32():
    from legion.model.grounding import dense_positional_encoding

    model = tiny_model()
    pe = model.model.grounding_encoder.prompt_encoder
    torch.testing.assert_close(dense_positional_encoding(pe), pe.get_dense_pe(), atol=1e-5, rtol=1e-5)


def test_from_pretrained_round_trip_then_clip_from_its_own_directory(tiny_model_dir, tmp_path):
    from transformers import CLIPVisionModel

    from legion.model.builders import load_model
    from legion.model.legion import LegionForCausalLM

    model, tokenizer, _ = load_model(tiny_model_dir, verbose=False)
    model.save_pretrained(tmp_path / "legion", tokenizer=tokenizer, dtype="float32")
    model.model.vision_tower.vision_tower.save_pretrained(tmp_path / "clip")
    loaded = LegionForCausalLM.from_pretrained(tmp_path / "legion").eval()  # dtype "auto": as stored, fp32
    for key, value in model.state_dict().items():  # CLIP included: from_pretrained leaves nothing on meta
        assert torch.equal(loaded.state_dict()[key], value), key
    sam = loaded.model.grounding_encoder
    assert sam.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])
    assert sam.pixel_std.flatten().tolist() == pytest.approx([58.395, 57.12, 57.375])

    loaded.load_vision_tower(tmp_path / "clip")
    clip, _ = images(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(clip), model.encode_images(clip))
    other = tiny_config().vision_config | {"image_size": 32}
    from transformers import CLIPVisionConfig

    with pytest.raises(ValueError, match="image_size"):
        loaded.load_vision_tower(CLIPVisionModel(CLIPVisionConfig(**other)))


@pytest.mark.parametrize("vocab, bias", [(203, False), (203, True), (192, False)])
def test_vocab_aligned_logits_equal_the_plain_linear(vocab, bias):
    from legion.model.legion import LOGITS_VOCAB_MULTIPLE, lm_logits

    torch.manual_seed(0)
    head = torch.nn.Linear(16, vocab, bias=bias)
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    target = torch.randn(2, 5, vocab)
    results = []
    for fn in (head, lambda h: lm_logits(h, head)):
        head.zero_grad()
        hidden.grad = None
        logits = fn(hidden)
        (logits * target).sum().backward()
        results.append((logits.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    assert results[1][0].shape == (2, 5, vocab)
    if vocab % LOGITS_VOCAB_MULTIPLE:  # the padded product is sliced: the row stride shows the padding
        assert lm_logits(hidden, head).stride(-2) % LOGITS_VOCAB_MULTIPLE == 0
    for plain, aligned in zip(*results):
        torch.testing.assert_close(aligned, plain)
