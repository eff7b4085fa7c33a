"""LegionForCausalLM: LLaMA + CLIP tower + projector + SAM + the `[SEG]` head (docs/model.md §4-§9).

Data flow of one training batch:

    input_ids [B, L] (one -200 image placeholder each) ──embed──┐
    clip_pixel_values ─► CLIP (frozen) ─► mm_projector (frozen) ─┴► expanded sequence [B, T, D]
        ─► LLaMA ─► final-layer states [B, T, D] ─► lm_head ─► CE
                                         └─► state at q-1 of each [SEG] at q ─► text_hidden_fcs [N, 256]
    sam_pixel_values ─► SAM image encoder (frozen) ─► mask decoder(+[SEG] prompt) ─► masks at (H, W)
        ─► BCE + Dice against gt_masks

The expansion keeps an explicit map text index -> expanded index, so `[SEG]` states are found
from the real number of image embeddings (no hard-coded 575), with any padding, several `[SEG]`
per sample or none. Generation uses a KV cache and records, at the step that samples `[SEG]`,
the last position's final-layer state: the same state a teacher-forced forward puts at q-1.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything.modeling import Sam
from torch import nn
from torch.nn import functional as F
from transformers import LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel
from transformers.utils import ModelOutput

from legion.model.configuration import LegionConfig
from legion.model.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from legion.model.grounding import build_sam, predict_masks, sam_image_embeddings
from legion.model.losses import causal_lm_loss, chunked_causal_lm_loss, mask_losses
from legion.model.preprocessing import SAM_MEAN, SAM_STD
from legion.model.region import RegionEncoder
from legion.model.static_decoding import DynamicDecoder, StaticDecoder, generation_attention
from legion.model.vision import CLIPVisionTower, build_mm_projector

# Modules that never receive LoRA (reference rule; they also hold q_proj/v_proj Linears).
LORA_EXCLUDED_MODULES = ("grounding_encoder", "vision_tower", "mm_projector", "text_hidden_fcs")
VISION_TOWER_PREFIX = "vision_tower."
DECODING_MODES = ("auto", "dynamic", "static", "cuda_graph")
# generate_grounded reads the greedy tokens back to the host once every SYNC_EVERY steps (not once per token),
# so the host can queue the next steps while the device runs; a batch that finished early costs at most
# SYNC_EVERY - 1 more steps.
SYNC_EVERY = 16
# Static decoders (StaticCache + captured CUDA graph) kept per model for reuse by later generations of the same
# shape (batch, cache length): a `legion infer` run alternates at most between full batches and its last one.
DECODER_CACHE_ENTRIES = 2
# LEGION's vocabulary (32,007) is odd: logits rows of that length push cuBLAS onto unaligned GEMM
# kernels, ~6 % of a 7B LoRA training step on an H200 (benchmarks/results). `lm_logits` pads the
# weight with zero rows to a multiple of this and slices the logits back: same values, aligned GEMMs.
LOGITS_VOCAB_MULTIPLE = 64


# --- outputs ---------------------------------------------------------------------------------
@dataclass
class LegionOutput(ModelOutput):
    """Training/teacher-forced forward output.

    loss: w_ce*CE + w_bce*BCE + w_dice*Dice; bce_loss / dice_loss are the weighted terms and
    mask_loss their sum; ce_loss is unweighted (its weight is 1 in every LEGION recipe).
    pred_masks: per sample mask logits [N_i, H_i, W_i] at the original image size.
    seg_embeddings: per sample final-layer states [N_i, hidden] selected for the `[SEG]` tokens.
    """

    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    bce_loss: torch.Tensor | None = None
    dice_loss: torch.Tensor | None = None
    mask_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    pred_masks: list[torch.Tensor] | None = None
    seg_embeddings: list[torch.Tensor] | None = None


@dataclass
class GroundedGeneration:
    """One sample of `generate_grounded`.

    token_ids: the new tokens, without the final eos; finished: True when eos was sampled
    (False: stopped at max_new_tokens); text: decoded token_ids when a tokenizer was passed;
    seg_embeddings [N, hidden]: final-layer state that predicted each `[SEG]`;
    mask_logits [N, H, W]: one mask per `[SEG]` at the original image size (N may be 0).
    """

    token_ids: list[int]
    text: str | None
    seg_embeddings: torch.Tensor
    mask_logits: torch.Tensor
    finished: bool = True


@dataclass
class MultimodalInputs:
    """The expanded, padded sequence.

    inputs_embeds [B, T, D]; attention_mask [B, T] (long, 1 = token); position_ids [B, T];
    labels [B, T] or None; position_map [B, L]: expanded index of every text token (-1 where the
    text attention mask is 0; the image placeholder maps to its first image embedding).
    position_map_host / labels_host: the same on the CPU, for index planning without reading the device.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    position_map: torch.Tensor
    position_map_host: torch.Tensor | None = None
    labels_host: torch.Tensor | None = None


# --- sequence construction --------------------------------------------------------------------
def build_multimodal_inputs(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_features: torch.Tensor,
    labels: torch.Tensor | None = None,
    padding_side: str = "right",
    pad_to_multiple: int | None = None,
) -> MultimodalInputs:
    """Replace each sample's IMAGE_TOKEN_INDEX by its image embeddings and re-pad the batch.

    text_embeds [B, L, D] (embeddings of input_ids, any vector where the id is -200);
    input_ids / attention_mask / labels [B, L]: tokens where attention_mask is 1 are kept in order
    (any padding side); image_features [B, N_img, D]; padding_side of the result: "right" for
    training, "left" for batched generation. Padded positions get zero embeddings and label -100.
    pad_to_multiple: pad the length T up to a multiple of it (static shapes for compiled layers).

    Where every token goes is planned on the CPU from input_ids / attention_mask / labels (CPU tensors are
    used as they are; device ones are copied back once), then the device only gathers and scatters:
    no per-sample reads of device values.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    bsz, text_len = input_ids.shape
    n_img = image_features.shape[1]
    device = text_embeds.device
    ids_host = input_ids.detach().cpu()
    keep_host = torch.ones_like(ids_host, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    labels_in = None if labels is None else labels.detach().cpu()

    plans = []  # per sample: (text indices kept, their expanded indices, image position or None, expanded length)
    for b in range(bsz):
        keep = keep_host[b].nonzero(as_tuple=True)[0]
        image_at = (ids_host[b, keep] == IMAGE_TOKEN_INDEX).nonzero(as_tuple=True)[0]
        if len(image_at) > 1:
            raise ValueError(f"sample {b} has {len(image_at)} image placeholders; LEGION uses exactly one")
        expanded_index = torch.arange(len(keep))
        if len(image_at) == 1:
            p = int(image_at[0])
            expanded_index = torch.where(expanded_index > p, expanded_index + n_img - 1, expanded_index)
            plans.append((keep, expanded_index, p, len(keep) + n_img - 1))
        else:
            plans.append((keep, expanded_index, None, len(keep)))

    total = max(plan[3] for plan in plans)
    if pad_to_multiple and pad_to_multiple > 1:
        total = -(-total // pad_to_multiple) * pad_to_multiple
    mask = torch.zeros(bsz, total, dtype=torch.long)
    out_labels = torch.full((bsz, total), IGNORE_INDEX, dtype=torch.long) if labels is not None else None
    position_map = torch.full((bsz, text_len), -1, dtype=torch.long)
    text_rows, text_slots, text_sources, image_rows, image_slots, no_image = [], [], [], [], [], []
    for b, (keep, expanded_index, p, n) in enumerate(plans):
        start = 0 if padding_side == "right" else total - n
        mask[b, start : start + n] = 1
        position_map[b, keep] = expanded_index + start
        is_text = torch.ones(len(keep), dtype=torch.bool)
        if p is not None:
            is_text[p] = False
            image_rows.append(torch.full((n_img,), b))
            image_slots.append(torch.arange(n_img) + start + p)
        else:
            no_image.append((b, start, n))
        text_rows.append(torch.full((int(is_text.sum()),), b))
        text_slots.append(expanded_index[is_text] + start)
        text_sources.append(keep[is_text])
        if out_labels is not None:
            out_labels[b, start + expanded_index[is_text]] = labels_in[b, keep[is_text]]
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)

    def to_device(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    rows, slots = to_device(torch.cat(text_rows)), to_device(torch.cat(text_slots))
    embeds = text_embeds.new_zeros(bsz, total, text_embeds.shape[-1])
    embeds = embeds.index_put((rows, slots), text_embeds[rows, to_device(torch.cat(text_sources))])
    if image_rows:
        rows, slots = to_device(torch.cat(image_rows)), to_device(torch.cat(image_slots))
        columns = to_device(torch.arange(n_img).repeat(len(image_rows)))
        embeds = embeds.index_put((rows, slots), image_features[rows, columns].to(embeds.dtype))
    if no_image:  # keeps the projector in the graph for samples without an image (reference behaviour)
        embeds = embeds.clone()  # once, then written in place for each such sample
        for b, start, n in no_image:
            embeds[b, start : start + n] = embeds[b, start : start + n] + 0.0 * image_features[b].sum().to(embeds.dtype)
    return MultimodalInputs(
        embeds,
        to_device(mask),
        to_device(position_ids),
        None if out_labels is None else to_device(out_labels),
        to_device(position_map),
        position_map_host=position_map,
        labels_host=out_labels,
    )


def lm_logits(hidden: torch.Tensor, lm_head: nn.Linear) -> torch.Tensor:
    """lm_head(hidden) [..., D] -> [..., V], computed with V padded to LOGITS_VOCAB_MULTIPLE.

    The returned logits are a slice (row stride = the padded V) of the padded product; the padding
    rows are zeros, so values and gradients equal the plain Linear's.
    """
    vocab = lm_head.out_features
    pad = -vocab % LOGITS_VOCAB_MULTIPLE
    if pad == 0 or type(lm_head) is not nn.Linear:  # a wrapped head (e.g. LoRA on lm_head) keeps its own forward
        return lm_head(hidden)
    weight = F.pad(lm_head.weight, (0, 0, 0, pad))
    bias = None if lm_head.bias is None else F.pad(lm_head.bias, (0, pad))
    return F.linear(hidden, weight, bias)[..., :vocab]


def seg_state_positions(input_ids: torch.Tensor, position_map: torch.Tensor, seg_token_id: int) -> list[torch.Tensor]:
    """Per sample, the expanded positions q-1 whose states stand for the `[SEG]` tokens at q, in order.
    Computed on the device of the arguments (pass CPU tensors, e.g. `MultimodalInputs.position_map_host`, to
    plan without reading the device)."""
    positions = []
    for b in range(input_ids.shape[0]):
        is_seg = (input_ids[b] == seg_token_id) & (position_map[b] >= 0)
        q = position_map[b, is_seg.nonzero(as_tuple=True)[0]]
        first = position_map[b][position_map[b] >= 0].min() if bool((position_map[b] >= 0).any()) else 0
        if bool((q - 1 < first).any()):
            raise ValueError(f"sample {b}: a [SEG] token is the first token, no state precedes it")
        positions.append(q - 1)
    return positions


def select_seg_states(hidden: torch.Tensor, positions: list[torch.Tensor]) -> list[torch.Tensor]:
    """hidden [B, T, D] -> per sample [N_i, D] at the given positions."""
    return [hidden[b, pos.to(hidden.device, non_blocking=True)] for b, pos in enumerate(positions)]


def lora_target_module_names(model: nn.Module) -> list[str]:
    """Full names of the q_proj / v_proj Linears that get LoRA (the reference rule, docs/model.md §10.2)."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not any(t in name for t in ("q_proj", "v_proj")):
            continue
        if any(excluded in name for excluded in LORA_EXCLUDED_MODULES):
            continue
        names.append(name)
    return names


# --- the model ---------------------------------------------------------------------------------
class LegionModel(LlamaModel):
    """LLaMA decoder plus LEGION's vision, grounding and region modules (GLaMM key layout)."""

    config_class = LegionConfig

    def __init__(self, config: LegionConfig):
        super().__init__(config)
        self.vision_tower = CLIPVisionTower(
            config.vision_config, config.mm_vision_select_layer, config.mm_vision_select_feature
        )
        self.mm_projector = build_mm_projector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)
        self.region_encoder = RegionEncoder.from_config(config)
        self.grounding_encoder = build_sam(config.sam_config)
        self.text_hidden_fcs = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Linear(config.hidden_size, config.hidden_size),
                    nn.ReLU(inplace=True),
                    nn.Linear(config.hidden_size, config.out_dim),
                    nn.Dropout(0.0),
                )
            ]
        )
        # SAM and the region encoder keep their own (PyTorch default) initialization, not LLaMA's N(0, 0.02).
        for module in [*self.grounding_encoder.modules(), *self.region_encoder.modules()]:
            module._legion_default_init = True
        # Frozen in every LEGION stage (docs/model.md §10.1); the trainable set is the recipe's business.
        self.mm_projector.requires_grad_(False)
        self.grounding_encoder.image_encoder.requires_grad_(False)
        self.grounding_encoder.prompt_encoder.requires_grad_(False)
        # CLIP weights live in their own directory, never in our checkpoints.
        self._register_state_dict_hook(_drop_vision_tower_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_vision_tower_keys)

    def _init_weights(self, module):
        _init_weights(self, module, LlamaModel)

    def encode_images(self, clip_pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> projected CLIP patch features [B, N_img, hidden]."""
        feats = self.vision_tower(clip_pixel_values)
        proj_dtype = next(self.mm_projector.parameters()).dtype
        needs_grad = any(p.requires_grad for p in self.mm_projector.parameters())
        with torch.set_grad_enabled(needs_grad and torch.is_grad_enabled()):
            return self.mm_projector(feats.to(proj_dtype))

    def sam_image_embeddings(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, P, P] -> SAM image embeddings [B, C, P/16, P/16] (no grad unless the encoder is trainable)."""
        return sam_image_embeddings(self.grounding_encoder, sam_pixel_values)

    def project_seg_states(self, states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, out_dim] SAM prompts."""
        fcs = self.text_hidden_fcs[0]
        return fcs(states.to(fcs[0].weight.dtype))


def _init_weights(model, module, base_cls):
    """HF init for the LLM parts; SAM / region encoder modules get their own default init."""
    if isinstance(module, Sam):  # non-persistent buffers, absent from every checkpoint
        module.pixel_mean.copy_(torch.tensor(SAM_MEAN).view(-1, 1, 1))
        module.pixel_std.copy_(torch.tensor(SAM_STD).view(-1, 1, 1))
        return
    if getattr(module, "_legion_default_init", False):
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        return
    base_cls._init_weights(model, module)


def _drop_vision_tower_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + VISION_TOWER_PREFIX)]:
        del state_dict[key]


def _ignore_missing_vision_tower_keys(module, incompatible_keys):
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if VISION_TOWER_PREFIX not in k]


# Keyword arguments of transformers' from_pretrained that change nothing here (our loader reads the directory's
# own config.json and safetensors); anything else (e.g. quantization_config) is refused rather than ignored.
HF_LOADING_ARGS_IGNORED = frozenset(
    {
        "config",
        "cache_dir",
        "force_download",
        "local_files_only",
        "token",
        "revision",
        "use_safetensors",
        "weights_only",
        "low_cpu_mem_usage",
        "adapter_kwargs",
        "adapter_name",
        "subfolder",
        "_from_auto",
        "_commit_hash",
        "trust_remote_code",
        "attn_implementation",
        "key_mapping",
    }
)


class LegionForCausalLM(LlamaForCausalLM):
    """LEGION's loc/exp model. State-dict keys follow GLaMM's table (docs/model.md §13.2)."""

    config_class = LegionConfig
    _keys_to_ignore_on_save = [r"vision_tower\."]

    def __init__(self, config: LegionConfig):
        # Skip LlamaForCausalLM.__init__: it would build (and initialize) a plain LlamaModel first.
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LegionModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.ce_loss_weight, self.bce_loss_weight, self.dice_loss_weight = 1.0, 0.4, 0.2
        # Training speed settings (the recipe sets them; None = the plain path):
        # ce_chunk_size: the CE is computed from the final states of the supervised positions only, this many rows
        #   at a time (losses.chunked_causal_lm_loss); the output's `logits` is then None.
        # sequence_bucket: the expanded sequence is right-padded to a multiple of this (static shapes for compiled
        #   layers) and attends causally without a padding mask (real tokens are a prefix of every row).
        self.ce_chunk_size: int | None = None
        self.sequence_bucket: int | None = None
        self.post_init()

    def _init_weights(self, module):
        _init_weights(self, module, LlamaForCausalLM)

    # --- Hugging Face loading and saving ------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        dtype=None,
        torch_dtype=None,
        device_map=None,
        vision_tower=None,
        sam_checkpoint=None,
        **kwargs,
    ) -> LegionForCausalLM:
        """A complete model from a model directory or a Hub id (`org/name`): ours, or GLaMM/LEGION's
        (`model_type: llava`), CLIP included, in eval mode, ready for `generate`/`generate_grounded`.

        dtype (or torch_dtype): a torch dtype, its name, or "auto"/None = the dtype the directory was
        exported in (SAM and text_hidden_fcs stay fp32). device_map: a device ("cpu", "cuda", "cuda:1")
        or "auto" (the first GPU when there is one). vision_tower: a local CLIP folder when the
        directory has none (GLaMM/LEGION releases name CLIP by Hub id). Hub downloads follow the usual
        HF environment (`HF_HUB_OFFLINE=1`: local folders only, with a clear error otherwise)."""
        from legion.model.builders import load_model
        from legion.model.export import resolve_model_source
        from legion.utils.devices import resolve_device, resolve_dtype

        unknown = sorted(set(kwargs) - HF_LOADING_ARGS_IGNORED)
        if model_args or unknown:
            raise TypeError(f"LegionForCausalLM.from_pretrained: unsupported arguments {list(model_args) + unknown}")
        if kwargs.get("trust_remote_code"):
            raise ValueError("LEGION never runs remote code: trust_remote_code must be False")
        path = resolve_model_source(pretrained_model_name_or_path)
        wanted = dtype if dtype is not None else torch_dtype
        if wanted is None or wanted == "auto":
            stored = LegionConfig.from_dir(path).dtype
            wanted = stored if isinstance(stored, torch.dtype) else getattr(torch, str(stored or "float32"))
        elif isinstance(wanted, str):
            wanted = resolve_dtype(wanted, device=torch.device("cpu"))
        device = resolve_device("auto" if device_map in (None, "auto") else str(device_map))
        model, _, _ = load_model(
            path, dtype=wanted, device=device, vision_tower=vision_tower, sam_checkpoint=sam_checkpoint, verbose=False
        )
        return model

    def save_pretrained(
        self,
        save_directory,
        tokenizer=None,
        dtype: str = "bfloat16",
        max_shard_size: int | str = "5GB",
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """Write a model directory `from_pretrained` reads back (legion.model.export: sharded safetensors,
        config, generation config, CLIP in `vision_tower/`, model card); the tokenizer when given.
        push_to_hub=True then uploads the folder (legion.model.export.push_to_hub) to `repo_id` (default:
        the folder's name; a Hub id is `user/name`), created `private` when asked. Hugging Face's other
        saving keyword arguments are accepted and ignored."""
        from legion.model import export

        max_shard_bytes = export.parse_size(max_shard_size)
        export.export_model(self, tokenizer, save_directory, dtype=dtype, max_shard_bytes=max_shard_bytes)
        if push_to_hub:
            repo_id = kwargs.get("repo_id", Path(save_directory).name)
            export.push_to_hub(save_directory, repo_id, private=kwargs.get("private", False))

    # --- helpers ----------------------------------------------------------------------------
    @property
    def seg_token_idx(self) -> int:
        idx = self.config.seg_token_idx
        if idx is None:
            raise ValueError("config.seg_token_idx is not set; look it up with convert_tokens_to_ids('[SEG]')")
        return int(idx)

    def set_loss_weights(self, ce: float = 1.0, bce: float = 0.4, dice: float = 0.2) -> None:
        self.ce_loss_weight, self.bce_loss_weight, self.dice_loss_weight = float(ce), float(bce), float(dice)

    def encode_images(self, clip_pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(clip_pixel_values)

    def load_vision_tower(self, source, dtype: torch.dtype | None = None, device=None) -> None:
        """Install CLIP weights (a local dir or a CLIPVisionModel); see CLIPVisionTower.load_pretrained."""
        self.model.vision_tower.load_pretrained(source, dtype=dtype, device=device)

    def sam_image_embeddings(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.sam_image_embeddings(sam_pixel_values)

    def prepare_multimodal_inputs(
        self,
        input_ids,
        attention_mask,
        clip_pixel_values,
        labels=None,
        padding_side: str = "right",
        pad_to_multiple: int | None = None,
    ) -> MultimodalInputs:
        """input_ids / attention_mask / labels may be CPU tensors (then nothing is read back from the device)."""
        image_features = self.encode_images(clip_pixel_values)
        device = self.model.embed_tokens.weight.device
        text_embeds = self.model.embed_tokens(input_ids.to(device, non_blocking=True).clamp(min=0))
        return build_multimodal_inputs(
            text_embeds, input_ids, attention_mask, image_features, labels, padding_side, pad_to_multiple
        )

    def _masks_for(
        self, seg_states: list[torch.Tensor], sam_pixel_values, sam_resized_sizes, original_sizes
    ) -> list[torch.Tensor]:
        if all(len(s) == 0 for s in seg_states):  # nothing to decode: skip the SAM image encoder
            return [torch.zeros(0, int(h), int(w), device=sam_pixel_values.device) for h, w in original_sizes]
        image_embeddings = self.sam_image_embeddings(sam_pixel_values)
        masks = []
        for b, states in enumerate(seg_states):
            prompts = self.model.project_seg_states(states)
            masks.append(
                predict_masks(
                    self.model.grounding_encoder,
                    image_embeddings[b : b + 1],
                    prompts,
                    tuple(sam_resized_sizes[b]),
                    tuple(original_sizes[b]),
                )
            )
        return masks

    # --- training / teacher-forced forward -----------------------------------------------------
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        labels=None,
        clip_pixel_values=None,
        sam_pixel_values=None,
        sam_resized_sizes=None,
        original_sizes=None,
        gt_masks=None,
        **kwargs,
    ):
        """Multimodal forward; without `clip_pixel_values` it is the plain LLaMA causal-LM forward.

        input_ids / attention_mask / labels [B, L] (one -200 per sample); clip_pixel_values
        [B, 3, S, S]; sam_pixel_values [B, 3, P, P]; sam_resized_sizes / original_sizes: per
        sample (h, w); gt_masks: per sample {0,1} [N_i, H_i, W_i], one per `[SEG]` in order.
        input_ids / attention_mask / labels on the CPU (the training recipe passes them so) let the forward plan
        every index without waiting for the device; device tensors are copied back once.
        """
        if clip_pixel_values is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

        ids_host = input_ids.cpu()
        bucket = self.sequence_bucket
        mm = self.prepare_multimodal_inputs(ids_host, attention_mask, clip_pixel_values, labels, pad_to_multiple=bucket)
        out = self.model(
            inputs_embeds=mm.inputs_embeds,
            attention_mask=None if bucket else mm.attention_mask,  # right padding: causal is enough for real tokens
            position_ids=mm.position_ids,
            use_cache=False,
        )
        hidden = out.last_hidden_state  # final layer, after the RMSNorm
        fused_ce = labels is not None and bool(self.ce_chunk_size) and type(self.lm_head) is nn.Linear
        logits = None if fused_ce else lm_logits(hidden, self.lm_head)
        positions = seg_state_positions(ids_host, mm.position_map_host, self.seg_token_idx)
        seg_states = select_seg_states(hidden, positions)

        if fused_ce:
            ce = chunked_causal_lm_loss(
                hidden,
                self.lm_head.weight,
                mm.labels_host,
                self.lm_head.bias,
                chunk=self.ce_chunk_size,
                vocab_multiple=LOGITS_VOCAB_MULTIPLE,
            )
        else:
            ce = causal_lm_loss(logits, mm.labels) if labels is not None else None
        pred_masks = None
        if sam_pixel_values is not None:
            if gt_masks is not None:
                original_sizes = [tuple(g.shape[-2:]) for g in gt_masks]  # masks live at the GT resolution
            if original_sizes is None or sam_resized_sizes is None:
                raise ValueError("sam_pixel_values needs sam_resized_sizes and original_sizes (or gt_masks)")
            pred_masks = self._masks_for(seg_states, sam_pixel_values, sam_resized_sizes, original_sizes)

        bce = dice = None
        if gt_masks is not None:
            if pred_masks is None:
                raise ValueError("gt_masks given without sam_pixel_values")
            for b, (pred, gt) in enumerate(zip(pred_masks, gt_masks)):
                if pred.shape[0] != gt.shape[0]:
                    raise ValueError(
                        f"sample {b}: {pred.shape[0]} [SEG] tokens but {gt.shape[0]} ground-truth "
                        "masks (truncated sequence?)"
                    )
            bce, dice = mask_losses(pred_masks, gt_masks)
            bce, dice = self.bce_loss_weight * bce, self.dice_loss_weight * dice

        terms = []
        if ce is not None:
            terms.append(self.ce_loss_weight * ce)
        if bce is not None:
            terms += [bce, dice]
        loss = sum(terms) if terms else None
        return LegionOutput(
            loss=loss,
            ce_loss=ce,
            bce_loss=bce,
            dice_loss=dice,
            mask_loss=None if bce is None else bce + dice,
            logits=logits,
            pred_masks=pred_masks,
            seg_embeddings=seg_states,
        )

    # --- generation -------------------------------------------------------------------------------
    def clear_decoder_cache(self) -> None:
        """Drop the static decoders (caches, captured graphs) kept for reuse by `generate_grounded`."""
        self.__dict__.pop("_legion_static_decoders", None)

    def _static_decoder(
        self, batch: int, max_length: int, use_graph: bool, reuse: bool, attention_backend: str = "auto"
    ) -> StaticDecoder:
        """A StaticDecoder for (batch, max_length): with `reuse`, the one an earlier generation of that shape built
        (reset; its CUDA graph kept), from a small LRU kept on the model (DECODER_CACHE_ENTRIES). The attention
        setting is part of the key: a captured graph replays the kernels chosen when it was captured."""
        if not reuse:
            return StaticDecoder(self.model, batch, max_length, use_graph=use_graph)
        weight = self.model.embed_tokens.weight
        # the weights a captured graph reads: another dtype, device or re-allocated parameters invalidate every entry
        fingerprint = (weight.dtype, weight.device, tuple(p.data_ptr() for p in self.model.layers.parameters()))
        entries = self.__dict__.get("_legion_static_decoders")
        if entries is None or entries[0] != fingerprint:
            entries = self.__dict__["_legion_static_decoders"] = (fingerprint, OrderedDict())
        decoders = entries[1]
        key = (batch, max_length, use_graph, attention_backend)
        decoder = decoders.pop(key, None)
        if decoder is None:
            while len(decoders) >= max(DECODER_CACHE_ENTRIES, 1):  # free before allocating the new cache
                decoders.popitem(last=False)
            decoder = StaticDecoder(self.model, batch, max_length, use_graph=use_graph)
        else:
            decoder.reset()
        decoders[key] = decoder
        return decoder

    @torch.no_grad()
    def generate_grounded(
        self,
        input_ids,
        attention_mask,
        clip_pixel_values,
        sam_pixel_values,
        sam_resized_sizes,
        original_sizes,
        max_new_tokens: int = 512,
        use_cache: bool = True,
        eos_token_id: int | None = None,
        tokenizer=None,
        decoding: str = "auto",
        attention_backend: str = "auto",
        sync_every: int | None = None,
        reuse_decoder: bool = True,
    ) -> list[GroundedGeneration]:
        """Batched greedy decoding, then one mask per generated `[SEG]`.

        Prompts may be padded on either side (attention_mask says which tokens are real); they are
        re-padded on the left. use_cache=True: KV cache, the `[SEG]` state is the last position's
        final-layer state at the step that samples `[SEG]`. use_cache=False: the reference's slow
        method, re-running CLIP and the whole sequence at every step (for benchmarks).

        decoding (with the cache): "dynamic" grows a DynamicCache; "static" preallocates a
        StaticCache; "cuda_graph" replays each step of the static one from a CUDA graph
        (legion/model/static_decoding.py); "auto" = "cuda_graph" on CUDA, "dynamic" elsewhere.
        attention_backend: the attention kernels generation may use (static_decoding.ATTENTION_BACKENDS;
        "auto" never uses cuDNN's, "torch" lets torch choose). sync_every: greedy tokens and the
        finished flags are computed on the device and read back once every `sync_every` steps (default
        SYNC_EVERY; 1 = every step); the tokens are the same for every value. reuse_decoder: keep the
        static decoder (cache + CUDA graph) for the next generation of the same shape.
        """
        if decoding not in DECODING_MODES:
            raise ValueError(f"decoding must be one of {DECODING_MODES}, got {decoding!r}")
        if decoding == "auto":
            decoding = "cuda_graph" if input_ids.device.type == "cuda" else "dynamic"
        sync_every = SYNC_EVERY if sync_every is None else int(sync_every)
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        seg = self.seg_token_idx
        bsz = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokens: list[list[int]] = [[] for _ in range(bsz)]
        seg_states: list[list[torch.Tensor]] = [[] for _ in range(bsz)]
        finished = [False] * bsz

        def record(step_tokens: list[list[int]], step_states: torch.Tensor) -> None:
            """Host bookkeeping of consecutive steps: step_tokens [S][B] greedy picks, step_states [S, B, D] the
            last states that predicted them. Tokens after a sample's eos are ignored."""
            for step, row in enumerate(step_tokens):
                for b, tok in enumerate(row):
                    if finished[b]:
                        continue
                    if tok == eos:
                        finished[b] = True
                        continue
                    tokens[b].append(tok)
                    if tok == seg:
                        seg_states[b].append(step_states[step, b].clone())

        with generation_attention(attention_backend):
            if use_cache:
                mm = self.prepare_multimodal_inputs(input_ids, attention_mask, clip_pixel_values, padding_side="left")
                if decoding == "dynamic":
                    decoder = DynamicDecoder(self.model)
                else:
                    length = mm.attention_mask.shape[1] + max_new_tokens
                    decoder = self._static_decoder(
                        bsz, length, decoding == "cuda_graph", reuse_decoder, attention_backend
                    )
                states = decoder.prefill(mm.inputs_embeds, mm.attention_mask, mm.position_ids)
                positions = mm.position_ids[:, -1:]
                # The last `chunk` steps' greedy tokens [S, B] and states [S, B, D], on the device until read back.
                chunk = min(sync_every, max_new_tokens)
                chunk_tokens = torch.empty(chunk, bsz, dtype=torch.long, device=states.device)
                chunk_states = states.new_empty(chunk, *states.shape)
                filled = 0
                for step in range(max_new_tokens):
                    next_tokens = self.lm_head(states).argmax(-1)
                    chunk_tokens[filled].copy_(next_tokens)
                    chunk_states[filled].copy_(states)
                    filled += 1
                    last = step == max_new_tokens - 1
                    if filled == chunk or last:
                        record(chunk_tokens[:filled].tolist(), chunk_states)  # the one device->host read
                        filled = 0
                        if all(finished) or last:
                            break
                    positions = positions + 1
                    states = decoder.step(self.model.embed_tokens(next_tokens[:, None]), positions)
            else:
                prompts = [input_ids[b, attention_mask[b].bool()] for b in range(bsz)]
                for _ in range(max_new_tokens):
                    ids, mask = _left_pad([torch.cat([p, p.new_tensor(t)]) for p, t in zip(prompts, tokens)])
                    mm = self.prepare_multimodal_inputs(ids, mask, clip_pixel_values, padding_side="left")
                    out = self.model(
                        inputs_embeds=mm.inputs_embeds,
                        attention_mask=mm.attention_mask,
                        position_ids=mm.position_ids,
                        use_cache=False,
                    )
                    last_states = out.last_hidden_state[:, -1]
                    record([self.lm_head(last_states).argmax(-1).tolist()], last_states[None])
                    if all(finished):
                        break

        hidden = self.config.hidden_size
        states = [torch.stack(s) if s else self.lm_head.weight.new_zeros(0, hidden) for s in seg_states]
        masks = self._masks_for(states, sam_pixel_values, sam_resized_sizes, original_sizes)
        return [
            GroundedGeneration(
                token_ids=tokens[b],
                text=tokenizer.decode(tokens[b], skip_special_tokens=False) if tokenizer is not None else None,
                seg_embeddings=states[b],
                mask_logits=masks[b],
                finished=finished[b],
            )
            for b in range(bsz)
        ]


def _left_pad(seqs: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors -> (ids [B, T], attention_mask [B, T])."""
    total = max(len(s) for s in seqs)
    ids = seqs[0].new_full((len(seqs), total), pad_id)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, total - len(s) :] = s
        mask[b, total - len(s) :] = 1
    return ids, mask
