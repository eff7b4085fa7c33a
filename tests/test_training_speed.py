"""Issue 21, training side, on the tiny model in fp32: the host-planned sequence expansion equals the per-sample
device code it replaced, the chunked linear + cross-entropy equals lm_head + causal_lm_loss (values and
gradients within 1e-5), and length buckets keep the losses."""

from __future__ import annotations

import pytest
import torch

from legion.model.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from legion.model.legion import MultimodalInputs, build_multimodal_inputs, lm_logits
from legion.model.losses import causal_lm_loss, chunked_causal_lm_loss, supervised_rows
from tests.model_core_tiny import (
    single_thread,  # noqa: F401 (fixture)
    tiny_model,
)
from tests.test_model_core import SEQS, make_batch, right_pad

pytestmark = pytest.mark.usefixtures("single_thread")


def _build_per_sample_reference(
    text_embeds, input_ids, attention_mask, image_features, labels=None, padding_side="right"
):
    """build_multimodal_inputs as it was before issue 21 (per-sample device reads), verbatim but for names."""
    bsz, text_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.bool()
    n_img = image_features.shape[1]
    device = text_embeds.device
    rows, row_labels, row_maps = [], [], []
    for b in range(bsz):
        keep = attention_mask[b].nonzero(as_tuple=True)[0]
        ids = input_ids[b, keep]
        image_at = (ids == IMAGE_TOKEN_INDEX).nonzero(as_tuple=True)[0]
        emb = text_embeds[b, keep]
        expanded_index = torch.arange(len(keep), device=device)
        if len(image_at) == 1:
            p = int(image_at[0])
            feats = image_features[b].to(emb.dtype)
            emb = torch.cat([emb[:p], feats, emb[p + 1 :]], 0)
            expanded_index = torch.where(expanded_index > p, expanded_index + n_img - 1, expanded_index)
            if labels is not None:
                lab = labels[b, keep]
                lab = torch.cat([lab[:p], lab.new_full((n_img,), IGNORE_INDEX), lab[p + 1 :]], 0)
        else:
            emb = emb + 0.0 * image_features[b].sum().to(emb.dtype)
            if labels is not None:
                lab = labels[b, keep]
        rows.append(emb)
        row_maps.append((keep, expanded_index))
        if labels is not None:
            row_labels.append(lab)
    total = max(r.shape[0] for r in rows)
    embeds = text_embeds.new_zeros(bsz, total, text_embeds.shape[-1])
    mask = torch.zeros(bsz, total, dtype=torch.long, device=device)
    out_labels = torch.full((bsz, total), IGNORE_INDEX, dtype=torch.long) if labels is not None else None
    position_map = torch.full((bsz, text_len), -1, dtype=torch.long, device=device)
    for b, emb in enumerate(rows):
        n = emb.shape[0]
        start = 0 if padding_side == "right" else total - n
        embeds[b, start : start + n] = emb
        mask[b, start : start + n] = 1
        if out_labels is not None:
            out_labels[b, start : start + n] = row_labels[b]
        keep, expanded_index = row_maps[b]
        position_map[b, keep] = expanded_index + start
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return MultimodalInputs(embeds, mask, position_ids, out_labels, position_map)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_host_planned_expansion_equals_the_per_sample_code_with_gradients(padding_side):
    """Values (exactly) and gradients of text embeddings and image features, two samples without an image included."""
    seqs = [*SEQS, [1, 5, 6, 7, 8], [1, 9, 10]]  # the last two have no image placeholder
    ids, mask = right_pad(seqs)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    g = torch.Generator().manual_seed(0)
    text = torch.randn(*ids.shape, 6, generator=g, requires_grad=True)
    feats = torch.randn(len(seqs), 7, 6, generator=g, requires_grad=True)
    weights = torch.randn(len(seqs), max(len(s) for s in seqs) + 6, 6, generator=g)
    results = []
    for build in (build_multimodal_inputs, _build_per_sample_reference):
        mm = build(text, ids, mask, feats, labels, padding_side=padding_side)
        (grad_text, grad_feats) = torch.autograd.grad((mm.inputs_embeds * weights).sum(), (text, feats))
        results.append((mm, grad_text, grad_feats))
    (new, gt_new, gf_new), (old, gt_old, gf_old) = results
    for field in ("inputs_embeds", "attention_mask", "position_ids", "labels", "position_map"):
        assert torch.equal(getattr(new, field), getattr(old, field)), field
    assert torch.equal(new.position_map_host, old.position_map) and torch.equal(new.labels_host, old.labels)
    assert torch.equal(gt_new, gt_old) and torch.equal(gf_new, gf_old)


def test_expansion_pads_to_a_multiple_on_the_right():
    ids, mask = right_pad(SEQS)
    text, feats = torch.randn(*ids.shape, 4), torch.randn(len(SEQS), 7, 4)
    plain = build_multimodal_inputs(text, ids, mask, feats, ids.clone())
    padded = build_multimodal_inputs(text, ids, mask, feats, ids.clone(), pad_to_multiple=16)
    total = plain.inputs_embeds.shape[1]
    assert padded.inputs_embeds.shape[1] == -(-total // 16) * 16 > total
    assert torch.equal(padded.inputs_embeds[:, :total], plain.inputs_embeds)
    assert bool((padded.inputs_embeds[:, total:] == 0).all()) and bool((padded.attention_mask[:, total:] == 0).all())
    assert bool((padded.labels[:, total:] == IGNORE_INDEX).all()) and torch.equal(
        padded.labels[:, :total], plain.labels
    )
    assert torch.equal(padded.position_map, plain.position_map)


# --- chunked linear + cross-entropy ---------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("vocab_multiple", [1, 64])
def test_chunked_linear_cross_entropy_equals_logits_then_ce(chunk, bias, vocab_multiple):
    """Loss and gradients (hidden, weight, bias) of the plain path: the full [B, T, V] logits then the shifted CE."""
    g = torch.Generator().manual_seed(1)
    batch, length, width, vocab = 3, 11, 16, 37
    hidden = torch.randn(batch, length, width, generator=g, requires_grad=True)
    head = torch.nn.Linear(width, vocab, bias=bias)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :4] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX
    labels[2, ::3] = IGNORE_INDEX

    plain = causal_lm_loss(lm_logits(hidden, head), labels)
    plain_grads = torch.autograd.grad(plain * 1.7, [hidden, *head.parameters()])
    fused = chunked_causal_lm_loss(hidden, head.weight, labels, head.bias, chunk=chunk, vocab_multiple=vocab_multiple)
    fused_grads = torch.autograd.grad(fused * 1.7, [hidden, *head.parameters()])
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    rows, targets = supervised_rows(labels)
    assert len(rows) == int((labels[:, 1:] != IGNORE_INDEX).sum()) and len(targets) == len(rows)


def test_chunked_cross_entropy_without_gradients_and_without_supervised_rows():
    hidden, head = torch.randn(2, 5, 8), torch.nn.Linear(8, 11, bias=False)
    labels = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(
            chunked_causal_lm_loss(hidden, head.weight, labels, chunk=3),
            causal_lm_loss(head(hidden), labels),
        )
        assert torch.isnan(chunked_causal_lm_loss(hidden, head.weight, torch.full_like(labels, IGNORE_INDEX)))


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize(
    "settings", [{"ce_chunk_size": 5}, {"sequence_bucket": 32}, {"ce_chunk_size": 64, "sequence_bucket": 16}]
)
def test_model_loss_and_gradients_with_chunked_ce_and_length_buckets(settings):
    """The whole multimodal forward (CE + BCE + Dice) and every parameter's gradient: the same as the plain path
    within 1e-5 in fp32; with the chunked CE the output carries no logits."""
    model = tiny_model(seed=3).train()
    batch = make_batch()
    plain, plain_grads = _loss_and_grads(model, batch)
    for name, value in settings.items():
        setattr(model, name, value)
    fast, fast_grads = _loss_and_grads(model, batch)
    assert (fast.logits is None) == ("ce_chunk_size" in settings)
    for term in ("loss", "ce_loss", "bce_loss", "dice_loss"):
        torch.testing.assert_close(getattr(fast, term), getattr(plain, term), atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == plain_grads.keys() and any("lm_head" in n for n in fast_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    for a, b in zip(fast.seg_embeddings, plain.seg_embeddings):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # ~20 s: inductor compiles the tiny decoder layer on the CPU
def test_two_lengths_in_one_bucket_compile_once_and_give_the_eager_losses():
    """model.compile_layers with model.sequence_bucket: batches of different lengths in one bucket share one static
    compilation (no recompile, no dynamic shapes), a longer batch in the next bucket gets a second one, and the
    losses and LoRA gradients equal eager's."""
    from torch._dynamo.utils import counters

    from legion.train.loc_exp import TrainConfig, setup_for_training
    from tests.test_model_core import EOS_ID, S, prompt

    same_bucket = [SEQS, [prompt([5, 6, S, 7]) + [EOS_ID], prompt([5, 6, 7, 8, 9]) + [EOS_ID], prompt([10, S, EOS_ID])]]
    next_bucket = [prompt(list(range(5, 25)) + [S]) + [EOS_ID]] * 3

    def run(compiled: bool):
        torch.manual_seed(0)  # LoRA A
        model = tiny_model(seed=3)
        cfg = TrainConfig()
        cfg.model.gradient_checkpointing, cfg.model.compile_layers, cfg.model.sequence_bucket = False, compiled, 32
        cfg.lora.dropout = 0.0
        setup_for_training(model, cfg)
        model.train()
        results, compilations = [], []
        for seqs in [*same_bucket, next_bucket]:
            out, grads = _loss_and_grads(model, make_batch(seqs))
            results.append((out.loss.detach(), {n: g for n, g in grads.items() if "lora_" in n}))
            compilations.append(counters["stats"]["unique_graphs"])
        return results, compilations

    counters.clear()
    eager, _ = run(False)
    counters.clear()
    compiled, compilations = run(True)
    assert compilations == [1, 1, 2]
    assert counters["frames"]["ok"] == 2  # no recompilation with dynamic shapes
    for (a_loss, a_grads), (b_loss, b_grads) in zip(compiled, eager):
        torch.testing.assert_close(a_loss, b_loss, atol=1e-5, rtol=1e-5)
        assert a_grads.keys() == b_grads.keys() and a_grads
        for name in a_grads:
            torch.testing.assert_close(a_grads[name], b_grads[name], atol=1e-5, rtol=1e-3, msg=name)


# --- the 7B recipe's auto settings ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "per_device, gib, compiled, expected",
    [
        (2, 79.6, True, (False, 2)),  # 8 x 80 GB (the paper's 8 GPUs): mb 2 is bounded by the measured mb 4
        (16, 79.6, True, (False, 4)),  # 1 x 80 GB: 72.0 GiB (mb 8) > 85 % of 79.6
        (16, 80.0, True, (False, 4)),  # an A100 80 GB reports 80.0 GiB: still mb 4
        (16, 140.4, True, (False, 8)),  # 1 x H200: mb 8, the largest measured without checkpointing
        (16, 140.4, False, (False, 8)),  # eager: 86.5 GiB
        (16, 79.6, False, (False, 4)),  # eager mb 4: 55.8 GiB
        (16, 40.0, True, (True, 8)),  # 40 GB: checkpointed mb 16 (38.0 GiB) > 34.0: mb 8 (30.5)
        (2, 40.0, True, (True, 2)),
        (16, 24.0, False, (True, 1)),  # 24 GB: nothing measured fits 20.4 GiB: checkpointing, micro-batch 1
        (16, None, True, (False, 16)),  # no CUDA
    ],
)
def test_memory_plan_rule(per_device, gib, compiled, expected):
    from legion.train.speed import divisors, resolve_memory_plan

    plan = resolve_memory_plan(divisors(per_device), gib, compiled)
    assert (plan.gradient_checkpointing, plan.micro_batch_size) == expected, plan.reason
    assert plan.reason


def test_memory_plan_for_a_fixed_micro_batch(monkeypatch):
    """Checkpointing alone is auto: it is decided for the given micro-batch, never for a smaller one that fits
    without checkpointing (eager micro-batch 4's 55.8 GiB fits 85 % of 79.6, micro-batch 8's 86.5 does not)."""
    from legion.config import load_config
    from legion.train import loc_exp, speed

    overrides = ["schedule.micro_batch_size=8", "model.compile_layers=false"]
    cfg = load_config(loc_exp.TrainConfig, loc_exp.REPO_ROOT / "configs/legion_7b/train_loc_exp.yaml", overrides)
    monkeypatch.setattr(speed, "cuda_memory_gib", lambda device: 79.6)
    reason = loc_exp.resolve_auto_settings(cfg, world_size=1, device=torch.device("cuda", 0))
    assert (cfg.model.gradient_checkpointing, cfg.schedule.micro_batch_size) == (True, 8), reason
    assert "micro-batch 8 with gradient checkpointing" in reason
    # nothing measured fits: checkpointing, the given micro-batch; no CUDA: no checkpointing, the given micro-batch
    assert speed.resolve_memory_plan([16], 24.0, False).micro_batch_size == 16
    assert speed.resolve_memory_plan([8], None, True).micro_batch_size == 8


def test_auto_settings_are_resolved_into_the_config(monkeypatch):
    from legion.config import ConfigError, load_config
    from legion.train import loc_exp, speed

    cfg = load_config(loc_exp.TrainConfig, loc_exp.REPO_ROOT / "configs/legion_7b/train_loc_exp.yaml")
    monkeypatch.setattr(speed, "cuda_memory_gib", lambda device: 79.6)
    reason = loc_exp.resolve_auto_settings(cfg, world_size=8, device=torch.device("cuda", 0))
    assert (cfg.model.gradient_checkpointing, cfg.schedule.micro_batch_size) == (False, 2) and "79.6 GiB" in reason
    assert loc_exp.plan_batches(16, 8, cfg.schedule.micro_batch_size).grad_accum == 1
    assert loc_exp.resolve_auto_settings(cfg, 8, torch.device("cuda", 0)) is None  # nothing auto left
    cfg = load_config(loc_exp.TrainConfig, None, ["model.gradient_checkpointing=auto", "schedule.micro_batch_size=4"])
    monkeypatch.setattr(speed, "cuda_memory_gib", lambda device: 40.0)
    loc_exp.resolve_auto_settings(cfg, 1, torch.device("cuda", 0))
    assert (cfg.model.gradient_checkpointing, cfg.schedule.micro_batch_size) == (True, 4)
    cfg = load_config(loc_exp.TrainConfig, None, ["schedule.micro_batch_size=big"])
    with pytest.raises(ConfigError, match="micro_batch_size must be auto"):
        loc_exp.resolve_auto_settings(cfg, 1, torch.device("cpu"))
    cfg = load_config(loc_exp.TrainConfig, None, ["model.gradient_checkpointing=auto"])
    with pytest.raises(ConfigError, match="resolved by the recipe"):
        loc_exp.setup_for_training(tiny_model(), cfg)
