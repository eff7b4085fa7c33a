"""Grounding encoder: SAM, prompted by projected `[SEG]` embeddings (docs/model.md §7-§8).

Built from segment_anything's modules (unmodified). GLaMM's SAM took the `[SEG]` embeddings as
an extra `text_embeds` argument of the prompt encoder; with no point/box/mask prompt that amounts
to: sparse prompt = the projected `[SEG]` embedding alone, dense prompt = `no_mask_embed`. We
build those two tensors here instead of patching the package.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from legion.model.preprocessing import SAM_MEAN, SAM_STD


def build_sam(sam_config: dict) -> Sam:
    """A randomly initialized `Sam` with the sizes of `LegionConfig.sam_config`.

    Keys: `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*` (those of `sam_vit_h_4b8939.pth`
    for the default ViT-H sizes).
    """
    c = sam_config
    image_size, patch_size, embed = c["image_size"], c["patch_size"], c["prompt_embed_dim"]
    grid = image_size // patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=c["encoder_embed_dim"],
            depth=c["encoder_depth"],
            num_heads=c["encoder_num_heads"],
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(c["encoder_global_attn_indexes"]),
            window_size=c["window_size"],
            out_chans=embed,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=embed,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=c["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=c["decoder_depth"],
                embedding_dim=embed,
                mlp_dim=c["decoder_mlp_dim"],
                num_heads=c["decoder_num_heads"],
            ),
            transformer_dim=embed,
            iou_head_depth=3,
            iou_head_hidden_dim=c.get("iou_head_hidden_dim", embed),
        ),
        pixel_mean=list(SAM_MEAN),
        pixel_std=list(SAM_STD),
    )


# Images per SAM encoder call. Batched calls are faster (tiny preset, batch 8: 0.43 s per training step
# in chunks of 4, 0.54 s one image at a time); the cap bounds ViT-H's global-attention maps
# (16 heads x 4096^2 per image, ~0.5 GB bf16).
SAM_ENCODER_CHUNK = 4


def sam_image_embeddings(sam: Sam, pixel_values: torch.Tensor) -> torch.Tensor:
    """SAM image encoder, SAM_ENCODER_CHUNK images per call.

    Frozen in LEGION (docs/model.md §10.1), and then run without autograd. Only a config that makes
    it trainable (the tiny preset, whose encoder starts random) gets gradients through it.

    pixel_values [B, 3, P, P] (SAM-normalized, zero-padded; P = encoder image size)
    -> embeddings [B, C, P/patch, P/patch].
    """
    enc = sam.image_encoder
    if pixel_values.shape[-2:] != (enc.img_size, enc.img_size):
        raise ValueError(
            f"SAM input must be padded to {enc.img_size}x{enc.img_size}, got {tuple(pixel_values.shape[-2:])}"
        )
    dtype = enc.patch_embed.proj.weight.dtype
    trainable = torch.is_grad_enabled() and any(p.requires_grad for p in enc.parameters())
    with torch.set_grad_enabled(trainable):
        return torch.cat([enc(chunk.to(dtype)) for chunk in pixel_values.split(SAM_ENCODER_CHUNK)], dim=0)


def dense_positional_encoding(prompt_encoder: PromptEncoder) -> torch.Tensor:
    """`prompt_encoder.get_dense_pe()` computed in fp32 whatever the module dtype -> [1, C, h, w].

    (The package multiplies an fp32 grid by the Gaussian matrix, which fails once SAM is in bf16.)
    """
    gaussian = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.float()  # [2, C/2]
    h, w = prompt_encoder.image_embedding_size
    ys = (torch.arange(h, device=gaussian.device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=gaussian.device, dtype=torch.float32) + 0.5) / w
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([grid_x, grid_y], dim=-1)  # [h, w, 2], x first, in [0, 1]
    angles = 2 * math.pi * ((2 * coords - 1) @ gaussian)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).permute(2, 0, 1)[None]


def decode_masks(sam: Sam, image_embedding: torch.Tensor, seg_prompts: torch.Tensor) -> torch.Tensor:
    """Low-resolution mask logits for the `[SEG]` prompts of one image.

    image_embedding [1, C, h, w]; seg_prompts [N, C] (projected `[SEG]` embeddings)
    -> logits [N, 1, 4h, 4w] (mask token 0, `multimask_output=False`).
    """
    n = seg_prompts.shape[0]
    dtype = sam.mask_decoder.iou_token.weight.dtype
    sparse = seg_prompts.to(dtype)[:, None, :]  # [N, 1, C]: the [SEG] embedding is the only sparse token
    h, w = sam.prompt_encoder.image_embedding_size
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w).to(dtype)
    image_pe = dense_positional_encoding(sam.prompt_encoder).to(dtype)
    low_res, _iou = sam.mask_decoder(
        image_embeddings=image_embedding.to(dtype),
        image_pe=image_pe,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return low_res


def postprocess_masks(
    low_res: torch.Tensor, encoder_size: int, resized_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """low_res [N, 1, h, w] -> logits [N, H, W] at the original image size (fp32).

    Upsample to the padded encoder input, crop the resized (un-padded) region, resize to (H, W).
    """
    masks = F.interpolate(low_res.float(), (encoder_size, encoder_size), mode="bilinear", align_corners=False)
    masks = masks[..., : int(resized_size[0]), : int(resized_size[1])]
    masks = F.interpolate(masks, (int(original_size[0]), int(original_size[1])), mode="bilinear", align_corners=False)
    return masks[:, 0]


def predict_masks(
    sam: Sam,
    image_embedding: torch.Tensor,
    seg_prompts: torch.Tensor,
    resized_size: tuple[int, int],
    original_size: tuple[int, int],
) -> torch.Tensor:
    """[SEG] prompts [N, C] of one image -> mask logits [N, H, W] at the original size (N may be 0)."""
    if seg_prompts.shape[0] == 0:
        return torch.zeros(0, int(original_size[0]), int(original_size[1]), device=image_embedding.device)
    low_res = decode_masks(sam, image_embedding, seg_prompts)
    return postprocess_masks(low_res, sam.image_encoder.img_size, resized_size, original_size)
