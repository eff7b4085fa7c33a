"""Loading GLaMM/LEGION-style checkpoints: llava config.json, .bin shards + index, SentencePiece
tokenizer, CLIP from a separate local dir, SAM .pth, LISA/peft key names, and the key report."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from legion.model.builders import (
    TINY_CLIP,
    TINY_REGION,
    TINY_SAM,
    CheckpointError,
    build_config,
    build_model,
    load_model,
)
from tests.fixtures_model import write_glamm_sentencepiece_tokenizer

CLIP_HUB_NAME = "openai/clip-vit-large-patch14-336"
BF16_PREFIXES = (
    "model.embed_tokens",
    "model.layers",
    "model.norm",
    "lm_head",
    "model.mm_projector",
    "model.region_encoder",
)


def glamm_config_json(config) -> dict:
    """config.json as GLaMM-GranD-Pretrained wrote it (docs/model.md §13.3), with tiny sizes; the SAM and region
    sizes, which GLaMM never wrote (ViT-H implied), are extra fields for the tiny model."""
    return {
        "_name_or_path": "./trained_checkpoints/exp1_pretrain_v1.5_spi_module_gs_4488/",
        "architectures": ["LISAForCausalLM"],
        "bbox_token_idx": 32002,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "freeze_mm_mlp_adapter": True,
        "freeze_mm_vision_resampler": False,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "image_aspect_ratio": "square",
        "image_grid_pinpoints": None,
        "initializer_range": 0.02,
        "max_length": 4096,
        "max_position_embeddings": 4096,
        "mm_hidden_size": config.mm_hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": True,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": CLIP_HUB_NAME,
        "model_type": "llava",
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "num_level_reg_features": 4,
        "out_dim": config.out_dim,
        "pretrain_mm_mlp_adapter": None,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "train_mask_decoder": True,
        "transformers_version": "4.28.0.dev0",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_cache": False,
        "use_mm_proj": True,
        "vision_tower": CLIP_HUB_NAME,
        "vocab_size": 32007,
        "sam_config": TINY_SAM,
        "region_encoder_config": TINY_REGION,
    }


def write_clip_dir(path, tower) -> None:
    """A CLIPModel-style directory (config type `clip`, vision keys under `vision_model.`, a text tower too)."""
    from transformers import CLIPConfig

    path.mkdir(parents=True)
    CLIPConfig(
        vision_config=TINY_CLIP,
        projection_dim=64,
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    ).save_pretrained(path)
    state = {f"vision_model.{k}": v.clone() for k, v in tower.state_dict().items()}
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 32)
    state["visual_projection.weight"] = torch.zeros(64, 64)
    save_file(state, str(path / "model.safetensors"))


def write_bin_shards(path, state: dict[str, torch.Tensor], n_shards: int = 2) -> None:
    keys = list(state)
    weight_map = {}
    per = (len(keys) + n_shards - 1) // n_shards
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        shard = {k: state[k] for k in keys[i * per : (i + 1) * per]}
        torch.save(shard, path / name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )


def released_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict as a GLaMM release stores it: LLM side bf16, SAM + fcs fp32, rotary buffers."""
    state = {}
    for k, v in model.state_dict().items():
        state[k] = v.to(torch.bfloat16) if k.startswith(BF16_PREFIXES) else v.clone()
    for i in range(model.config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    return state


@pytest.fixture(scope="module")
def glamm_checkpoint(tmp_path_factory):
    """(checkpoint dir, CLIP dir, source model) of a tiny GLaMM-style release."""
    root = tmp_path_factory.mktemp("glamm")
    ckpt = write_glamm_sentencepiece_tokenizer(root / "GLaMM-GranD-Pretrained-tiny")
    config = build_config("tiny", vocab_size=32007)
    model = build_model(config, seed=5)
    (ckpt / "config.json").write_text(json.dumps(glamm_config_json(config), indent=2))
    write_bin_shards(ckpt, released_state(model))
    clip_dir = root / "clip-vit-tiny"
    write_clip_dir(clip_dir, model.model.vision_tower.vision_tower)
    return ckpt, clip_dir, model


def test_glamm_style_dir_loads_with_tiny_sizes(glamm_checkpoint, capsys):
    ckpt, clip_dir, source = glamm_checkpoint
    model, tokenizer, report = load_model(ckpt, vision_tower=clip_dir)
    printed = capsys.readouterr().out
    assert "all keys matched" in printed and "inv_freq" not in printed  # rotary buffers ignored quietly
    assert report.ok and len(report.ignored) == source.config.num_hidden_layers
    assert len(report.weight_files) == 2
    assert report.seg_token_idx == model.config.seg_token_idx == 32004 and len(tokenizer) == 32007
    assert model.config.num_image_tokens == 64 and model.config.hidden_size == 64
    expected = released_state(source)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key].float()), key
    src_tower = source.model.vision_tower.vision_tower.state_dict()
    for key, value in model.model.vision_tower.vision_tower.state_dict().items():
        assert torch.equal(value, src_tower[key]), key


def test_glamm_dir_in_bf16_keeps_sam_and_fcs_fp32(glamm_checkpoint):
    ckpt, clip_dir, _ = glamm_checkpoint
    model, _, _ = load_model(ckpt, vision_tower=clip_dir, dtype=torch.bfloat16, verbose=False)
    assert model.model.grounding_encoder.mask_decoder.iou_token.weight.dtype == torch.float32
    assert model.model.text_hidden_fcs[0][0].weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_clip_named_by_hub_id_needs_a_local_copy(glamm_checkpoint):
    ckpt, _, _ = glamm_checkpoint
    with pytest.raises(FileNotFoundError, match="not a local directory.*vision_tower"):
        load_model(ckpt, verbose=False)


def _copy_with_state(src, dst, transform):
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    save_file(transform(state), str(dst / "model.safetensors"))
    return dst


def test_lisa_and_peft_key_names_are_remapped(tiny_model_dir, tmp_path):
    def rename(state):
        out = {}
        for k, v in state.items():
            k = k.replace("model.grounding_encoder.", "model.visual_model.")  # LISA's name for SAM
            k = k.replace("self_attn.q_proj.weight", "self_attn.q_proj.base_layer.weight")  # peft >= 0.7
            out["base_model.model." + k] = v
        return out

    ckpt = _copy_with_state(tiny_model_dir, tmp_path / "lisa", rename)
    model, _, report = load_model(ckpt, verbose=False)
    reference, _, _ = load_model(tiny_model_dir, verbose=False)
    assert report.ok and len(report.renamed) == len(reference.state_dict())
    assert "base_model.model.model.visual_model.mask_decoder.iou_token.weight" in report.renamed
    a, b = model.state_dict(), reference.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_sam_pth_fills_the_grounding_encoder(tiny_model_dir, tmp_path):
    ckpt = _copy_with_state(
        tiny_model_dir,
        tmp_path / "nosam",
        lambda s: {k: v for k, v in s.items() if not k.startswith("model.grounding_encoder.")},
    )
    reference, _, _ = load_model(tiny_model_dir, verbose=False)
    sam_state = {
        k.removeprefix("model.grounding_encoder."): v
        for k, v in reference.state_dict().items()
        if k.startswith("model.grounding_encoder.")
    }
    assert "image_encoder.pos_embed" in sam_state and "mask_decoder.iou_token.weight" in sam_state  # .pth names
    torch.save(sam_state, tmp_path / "sam_vit_tiny.pth")

    with pytest.raises(CheckpointError, match="missing"):
        load_model(ckpt, verbose=False)  # SAM keys absent and no .pth: strict loading refuses
    model, _, report = load_model(ckpt, sam_checkpoint=tmp_path / "sam_vit_tiny.pth", verbose=False)
    assert report.ok and report.from_sam_checkpoint == len(sam_state)
    a, b = model.state_dict(), reference.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)

    # the checkpoint's own SAM weights take precedence over the .pth
    torch.save({k: v + 1 for k, v in sam_state.items()}, tmp_path / "other_sam.pth")
    model, _, report = load_model(tiny_model_dir, sam_checkpoint=tmp_path / "other_sam.pth", verbose=False)
    assert report.from_sam_checkpoint == 0
    assert torch.equal(
        model.state_dict()["model.grounding_encoder.mask_decoder.iou_token.weight"],
        b["model.grounding_encoder.mask_decoder.iou_token.weight"],
    )


def test_shape_mismatch_names_the_key_and_both_shapes(tiny_model_dir, tmp_path):
    def shrink(state):
        state["model.text_hidden_fcs.0.2.weight"] = state["model.text_hidden_fcs.0.2.weight"][:16].clone()
        return state

    ckpt = _copy_with_state(tiny_model_dir, tmp_path / "bad", shrink)
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt, verbose=False)
    message = str(err.value)
    assert "model.text_hidden_fcs.0.2.weight" in message and "[16, 64]" in message and "[32, 64]" in message


def test_missing_and_unexpected_keys_are_reported(tiny_model_dir, tmp_path, capsys):
    def edit(state):
        del state["model.layers.0.mlp.up_proj.weight"]
        del state["model.layers.1.input_layernorm.weight"]
        state["model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(8, 64)  # unmerged LoRA
        return state

    ckpt = _copy_with_state(tiny_model_dir, tmp_path / "edited", edit)
    with pytest.raises(CheckpointError, match="2 missing and 1 unexpected.*unmerged LoRA"):
        load_model(ckpt)
    printed = capsys.readouterr().out
    assert "model.layers.0.mlp.up_proj.weight" in printed and "lora_A" in printed
    model, _, report = load_model(ckpt, strict=False, verbose=False)
    assert report.missing == ["model.layers.0.mlp.up_proj.weight", "model.layers.1.input_layernorm.weight"]
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.model.layers[1].input_layernorm.weight, torch.ones(64))  # fresh init, not zeros
    assert model.model.layers[0].mlp.up_proj.weight.abs().sum() > 0


def test_missing_region_encoder_is_benign(tiny_model_dir, tmp_path, capsys):
    def grand_like(state):  # region encoder absent, a (hypothetical) spi_module present instead
        out = {k: v for k, v in state.items() if not k.startswith("model.region_encoder.")}
        out["model.spi_module.proj.weight"] = torch.zeros(4, 4)
        return out

    ckpt = _copy_with_state(tiny_model_dir, tmp_path / "noregion", grand_like)
    model, _, report = load_model(ckpt)
    assert "model.spi_module.proj.weight" in capsys.readouterr().out  # reported, not silently dropped
    assert report.ok and report.benign_missing and all("region_encoder" in k for k in report.benign_missing)
    assert report.unused == ["model.spi_module.proj.weight"]
    assert not any(p.is_meta for p in model.parameters())
    assert torch.isfinite(model.model.region_encoder.roi_align.updims.weight).all()


def test_missing_weights_and_dirs_fail_clearly(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_model(tmp_path / "nope", verbose=False)
    ckpt = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir, ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model(ckpt, verbose=False)


def test_config_without_vocab_size_takes_it_from_the_weights(glamm_checkpoint, tmp_path):
    ckpt, clip_dir, _ = glamm_checkpoint
    copy = tmp_path / "novocab"
    shutil.copytree(ckpt, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["vocab_size"]  # not visible on the GranD-Pretrained model page (docs/model.md §13.3)
    (copy / "config.json").write_text(json.dumps(config))
    model, _, report = load_model(copy, vision_tower=clip_dir, verbose=False)
    assert report.ok and model.config.vocab_size == 32007 and model.lm_head.weight.shape[0] == 32007


def test_sharded_safetensors_with_index(tiny_model_dir, tmp_path):
    ckpt = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(ckpt / name))
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}})
    )
    model, _, report = load_model(ckpt, verbose=False)
    assert report.ok and len(report.weight_files) == 2
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in keys)


GCG_EXTRA_FIELDS = {  # written by GLaMM's classes (GLaMM-GCG / -RefSeg, docs/model.md §13.3)
    "architectures": ["GLaMMForCausalLM"],
    "freeze_mlp_adapter": True,
    "image_aspect": "square",
    "image_grid_points": None,
    "mm_use_image_start_end": True,
    "mm_vision_module": CLIP_HUB_NAME,
    "num_reg_features": 4,
    "select_feature_type": "patch",
    "with_region": True,
    "vision_module": CLIP_HUB_NAME,
    "use_image_patch_token": False,
    "tune_mlp_adapter": False,
    "_name_or_path": "./trained_checkpoints/exp1_grand_pretrain_v15_gs4488_ckpt_25000_hf",
}
LEGION_LE_EXTRA_FIELDS = {**GCG_EXTRA_FIELDS, "architectures": ["LegionForCausalLM"], "use_cache": False}


@pytest.mark.parametrize("extra", [GCG_EXTRA_FIELDS, LEGION_LE_EXTRA_FIELDS], ids=["glamm_gcg", "legion_le"])
def test_other_config_flavours_load(glamm_checkpoint, tmp_path, extra):
    ckpt, clip_dir, source = glamm_checkpoint
    flavour = tmp_path / "flavour"
    flavour.mkdir()
    for f in ckpt.iterdir():  # share the weights and tokenizer, rewrite only config.json
        if f.name != "config.json":
            (flavour / f.name).symlink_to(f)
    config = {**json.loads((ckpt / "config.json").read_text()), **extra}
    (flavour / "config.json").write_text(json.dumps(config))
    model, _, report = load_model(flavour, vision_tower=clip_dir, verbose=False)
    assert report.ok and model.config.seg_token_idx == 32004 and model.config.mm_use_im_start_end
    assert torch.equal(model.lm_head.weight, source.lm_head.weight.to(torch.bfloat16).float())


def test_inspect_stored_keys_of_bin_shards(glamm_checkpoint):
    from legion.model.inspect import stored_key_lines

    ckpt, _, source = glamm_checkpoint
    stored = dict(line.split("\t") for line in stored_key_lines(ckpt))
    expected = {k: str(list(v.shape)) for k, v in source.state_dict().items()}
    assert {k: v for k, v in stored.items() if "inv_freq" not in k} == expected
