"""Tiny LegionConfig / batch builders for the model-core tests (built in-process, no files)."""

from __future__ import annotations

import pytest
import torch

from legion.model.configuration import LegionConfig
from legion.model.conversation import IMAGE_TOKEN_INDEX

VOCAB = 48
SEG_ID = 40
EOS_ID = 2
CLIP_SIZE, SAM_SIZE = 64, 128


def tiny_config(**overrides) -> LegionConfig:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        seg_token_idx=SEG_ID,
        mm_hidden_size=32,
        out_dim=32,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=CLIP_SIZE,
            patch_size=16,
            num_channels=3,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=32,
        ),
        sam_config=dict(
            image_size=SAM_SIZE,
            patch_size=16,
            encoder_embed_dim=32,
            encoder_depth=2,
            encoder_num_heads=2,
            encoder_global_attn_indexes=[1],
            window_size=4,
            prompt_embed_dim=32,
            mask_in_chans=4,
            decoder_depth=2,
            decoder_mlp_dim=64,
            decoder_num_heads=2,
        ),
        region_encoder_config=dict(
            feature_layers=[1, 1, 2, 2], gn_groups=4, roi_output_size=4, pos_embed_dim=16, box_scale=float(CLIP_SIZE)
        ),
    )
    cfg.update(overrides)
    return LegionConfig(**cfg)


def tiny_model(seed: int = 0, **overrides):
    from legion.model.legion import LegionForCausalLM

    torch.manual_seed(seed)
    return LegionForCausalLM(tiny_config(**overrides))


def right_pad(seqs: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L], attention_mask [B, L]) from lists, right padded with `pad`."""
    total = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), total), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), total, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    return ids, mask


def prompt(body: list[int]) -> list[int]:
    """BOS, <im_start>-like token, the image placeholder, <im_end>-like token, then `body`."""
    return [1, 3, IMAGE_TOKEN_INDEX, 4] + body


def images(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, CLIP_SIZE, CLIP_SIZE, generator=g), torch.randn(
        batch, 3, SAM_SIZE, SAM_SIZE, generator=g
    )


@pytest.fixture
def single_thread():
    """Tiny models run far faster on one intra-op thread, and the shared CI cores are oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
