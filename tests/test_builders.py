"""Presets (tiny, legion_7b), make_tiny, save -> load round trip, dtype policy, the make-tiny CLI."""

from __future__ import annotations

import json
import time

import pytest
import torch

from legion.model import conversation as conv
from legion.model.builders import FP32_MODULES, build_config, build_model, load_model, save_model, tiny_tokenizer


# --- the GLaMM key table, written from docs/model.md §0, §5, §8.1, §12, §13.2 --------------
def glamm_key_table() -> dict[str, list[int]]:
    """Every state-dict key of the 7B LegionForCausalLM / GLaMMForCausalLM with its shape."""
    t: dict[str, list[int]] = {}
    d, ff, vocab, c, sam, e = 4096, 11008, 32007, 1024, 1280, 256

    def linear(name, out_f, in_f, bias=True):
        t[f"{name}.weight"] = [out_f, in_f]
        if bias:
            t[f"{name}.bias"] = [out_f]

    def norm(name, dim):  # LayerNorm / LayerNorm2d / GroupNorm
        t[f"{name}.weight"], t[f"{name}.bias"] = [dim], [dim]

    # LLM (LLaMA-2 7B, vocab 32007)
    t["model.embed_tokens.weight"] = [vocab, d]
    for i in range(32):
        for p in "qkvo":
            linear(f"model.layers.{i}.self_attn.{p}_proj", d, d, bias=False)
        linear(f"model.layers.{i}.mlp.gate_proj", ff, d, bias=False)
        linear(f"model.layers.{i}.mlp.up_proj", ff, d, bias=False)
        linear(f"model.layers.{i}.mlp.down_proj", d, ff, bias=False)
        t[f"model.layers.{i}.input_layernorm.weight"] = [d]
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = [d]
    t["model.norm.weight"] = [d]
    t["lm_head.weight"] = [vocab, d]
    # projector mlp2x_gelu
    linear("model.mm_projector.0", d, c)
    linear("model.mm_projector.2", d, d)
    # region encoder (§12)
    r = "model.region_encoder"
    for i in range(4):
        t[f"{r}.mlvl_fuse.input_conv.{i}.weight"], t[f"{r}.mlvl_fuse.input_conv.{i}.bias"] = [c, c + 2, 1, 1], [c]
    for i in range(5):
        t[f"{r}.mlvl_fuse.fuse_convs.{i}.conv.weight"] = [c, c, 3, 3]
        norm(f"{r}.mlvl_fuse.fuse_convs.{i}.gn", c)
    for i in range(4):
        t[f"{r}.roi_align.pconvs.{i}.weight"], t[f"{r}.roi_align.pconvs.{i}.bias"] = [c, c, 3, 3], [c]
    linear(f"{r}.roi_align.pos_embedd.0", 256, 4)
    norm(f"{r}.roi_align.pos_embedd.2", 256)
    linear(f"{r}.roi_align.pos_embedd.3", c, 256)
    norm(f"{r}.roi_align.pos_embedd.5", c)
    linear(f"{r}.roi_align.updims", d, c)
    linear(f"{r}.roi_align.flatten_linear", c, c * 14 * 14)
    # SAM ViT-H image encoder
    g = "model.grounding_encoder"
    t[f"{g}.image_encoder.pos_embed"] = [1, 64, 64, sam]
    t[f"{g}.image_encoder.patch_embed.proj.weight"] = [sam, 3, 16, 16]
    t[f"{g}.image_encoder.patch_embed.proj.bias"] = [sam]
    for i in range(32):
        b = f"{g}.image_encoder.blocks.{i}"
        norm(f"{b}.norm1", sam)
        linear(f"{b}.attn.qkv", 3 * sam, sam)
        linear(f"{b}.attn.proj", sam, sam)
        rel = 127 if i in (7, 15, 23, 31) else 27  # 2*64-1 global, 2*14-1 windowed
        t[f"{b}.attn.rel_pos_h"], t[f"{b}.attn.rel_pos_w"] = [rel, 80], [rel, 80]
        norm(f"{b}.norm2", sam)
        linear(f"{b}.mlp.lin1", 4 * sam, sam)
        linear(f"{b}.mlp.lin2", sam, 4 * sam)
    t[f"{g}.image_encoder.neck.0.weight"] = [e, sam, 1, 1]
    norm(f"{g}.image_encoder.neck.1", e)
    t[f"{g}.image_encoder.neck.2.weight"] = [e, e, 3, 3]
    norm(f"{g}.image_encoder.neck.3", e)
    # SAM prompt encoder
    p = f"{g}.prompt_encoder"
    t[f"{p}.pe_layer.positional_encoding_gaussian_matrix"] = [2, 128]
    for i in range(4):
        t[f"{p}.point_embeddings.{i}.weight"] = [1, e]
    t[f"{p}.not_a_point_embed.weight"] = [1, e]
    t[f"{p}.mask_downscaling.0.weight"], t[f"{p}.mask_downscaling.0.bias"] = [4, 1, 2, 2], [4]
    norm(f"{p}.mask_downscaling.1", 4)
    t[f"{p}.mask_downscaling.3.weight"], t[f"{p}.mask_downscaling.3.bias"] = [16, 4, 2, 2], [16]
    norm(f"{p}.mask_downscaling.4", 16)
    t[f"{p}.mask_downscaling.6.weight"], t[f"{p}.mask_downscaling.6.bias"] = [e, 16, 1, 1], [e]
    t[f"{p}.no_mask_embed.weight"] = [1, e]
    # SAM mask decoder
    m = f"{g}.mask_decoder"

    def attention(name, internal):
        for q in "qkv":
            linear(f"{name}.{q}_proj", internal, e)
        linear(f"{name}.out_proj", e, internal)

    for i in range(2):
        lay = f"{m}.transformer.layers.{i}"
        attention(f"{lay}.self_attn", e)
        attention(f"{lay}.cross_attn_token_to_image", e // 2)
        attention(f"{lay}.cross_attn_image_to_token", e // 2)
        for n in range(1, 5):
            norm(f"{lay}.norm{n}", e)
        linear(f"{lay}.mlp.lin1", 2048, e)
        linear(f"{lay}.mlp.lin2", e, 2048)
    attention(f"{m}.transformer.final_attn_token_to_image", e // 2)
    norm(f"{m}.transformer.norm_final_attn", e)
    t[f"{m}.iou_token.weight"], t[f"{m}.mask_tokens.weight"] = [1, e], [4, e]
    t[f"{m}.output_upscaling.0.weight"], t[f"{m}.output_upscaling.0.bias"] = [e, 64, 2, 2], [64]
    norm(f"{m}.output_upscaling.1", 64)
    t[f"{m}.output_upscaling.3.weight"], t[f"{m}.output_upscaling.3.bias"] = [64, 32, 2, 2], [32]
    for i in range(4):
        linear(f"{m}.output_hypernetworks_mlps.{i}.layers.0", e, e)
        linear(f"{m}.output_hypernetworks_mlps.{i}.layers.1", e, e)
        linear(f"{m}.output_hypernetworks_mlps.{i}.layers.2", 32, e)
    linear(f"{m}.iou_prediction_head.layers.0", e, e)
    linear(f"{m}.iou_prediction_head.layers.1", e, e)
    linear(f"{m}.iou_prediction_head.layers.2", 4, e)
    # [SEG] projection
    linear("model.text_hidden_fcs.0.0", d, d)
    linear("model.text_hidden_fcs.0.2", 256, d)
    return t


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _count(model, prefix):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


@pytest.fixture(scope="module")
def model_7b_meta():
    start = time.time()
    model = build_model("legion_7b", device="meta")
    return model, time.time() - start


def test_legion_7b_on_meta_equals_glamm_key_table(model_7b_meta):
    model, seconds = model_7b_meta
    assert seconds < 60, f"building legion_7b on meta took {seconds:.1f}s"
    assert all(p.is_meta for p in model.parameters())
    actual = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = glamm_key_table()
    assert sorted(set(actual) - set(expected)) == [] and sorted(set(expected) - set(actual)) == []
    wrong = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
    assert wrong == {}
    assert not any("vision_tower" in k for k in actual)  # CLIP is never part of a checkpoint


def test_legion_7b_parameter_counts_match_spec(model_7b_meta):
    model, _ = model_7b_meta
    # docs/model.md §0 (derived counts)
    llm = sum(_count(model, p) for p in ("model.embed_tokens", "model.layers", "model.norm", "lm_head"))
    assert llm == 6_738_472_960
    assert _count(model, "model.vision_tower") == 303_507_456
    assert _count(model, "model.mm_projector") == 20_979_712
    assert _count(model, "model.region_encoder") == 299_142_912
    assert _count(model, "model.grounding_encoder") == 641_090_608
    assert _count(model, "model.grounding_encoder.image_encoder") == 637_026_048
    assert _count(model, "model.grounding_encoder.prompt_encoder") == 6_220
    assert _count(model, "model.grounding_encoder.mask_decoder") == 4_058_340
    assert _count(model, "model.text_hidden_fcs") == 17_830_144
    total = sum(p.numel() for p in model.parameters())
    assert total == 6_738_472_960 + 303_507_456 + 20_979_712 + 299_142_912 + 641_090_608 + 17_830_144
    # the key table's tensors = all parameters but CLIP, plus SAM's Gaussian PE buffer [2, 128]
    assert sum(_numel(s) for s in glamm_key_table().values()) == total - 303_507_456 + 256


def test_legion_7b_config_fields():
    cfg = build_config("legion_7b")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (32007, 4096, 32, 11008)
    assert cfg.num_image_tokens == 576 and cfg.seg_token_idx == 32004 and not cfg.tie_word_embeddings
    assert cfg.mm_vision_tower == "openai/clip-vit-large-patch14-336" and cfg.rms_norm_eps == 1e-5


def test_tiny_preset_is_small():
    tok = tiny_tokenizer()
    cfg = build_config("tiny")
    assert cfg.vocab_size == len(tok)
    assert cfg.hidden_size <= 128
    assert 64 <= cfg.vision_config["image_size"] <= 128 and 64 <= cfg.sam_config["image_size"] <= 128
    assert cfg.out_dim == cfg.sam_config["prompt_embed_dim"]
    assert build_config("tiny", vocab_size=32007).vocab_size == 32007
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("legion_13b")


def test_build_model_is_seeded():
    cfg = build_config("tiny", vocab_size=300)
    a, b, c = build_model(cfg, seed=3), build_model(cfg, seed=3), build_model(cfg, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.text_hidden_fcs.0.0.weight"], sc["model.text_hidden_fcs.0.0.weight"])


# --- make_tiny / save / load -------------------------------------------------------------------
def test_make_tiny_writes_a_complete_checkpoint_dir(tiny_model_dir):
    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "added_tokens.json",
        "tokenizer_config.json",
        "vision_tower",
    } <= files
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["mm_vision_tower"] == "vision_tower" and config["architectures"] == ["LegionForCausalLM"]
    assert (tiny_model_dir / "vision_tower" / "config.json").is_file()
    assert (tiny_model_dir / "vision_tower" / "model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as fh:
        assert not any("vision_tower" in k for k in fh.keys())
        sam_in_model = {
            k.removeprefix("model.grounding_encoder."): fh.get_tensor(k)
            for k in fh.keys()
            if k.startswith("model.grounding_encoder.")
        }
    sam_pth = torch.load(tiny_model_dir / "sam_vit_tiny.pth", weights_only=True)
    assert sam_pth.keys() == sam_in_model.keys() and "image_encoder.patch_embed.proj.weight" in sam_pth
    assert all(torch.equal(sam_pth[k], sam_in_model[k]) for k in sam_pth)


def test_tiny_model_fixture_loads_like_a_real_checkpoint(tiny_model):
    model, tokenizer = tiny_model
    assert not model.training
    assert model.config.seg_token_idx == tokenizer.convert_tokens_to_ids(conv.SEG)
    assert model.config.vocab_size == len(tokenizer)
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    # loading keeps the model's own frozen/trainable flags
    assert not any(p.requires_grad for p in model.model.mm_projector.parameters())
    assert not any(p.requires_grad for p in model.model.grounding_encoder.image_encoder.parameters())
    assert model.lm_head.weight.requires_grad and model.model.text_hidden_fcs[0][0].weight.requires_grad
    clip = torch.randn(2, 3, 64, 64)
    assert model.encode_images(clip).shape == (2, model.config.num_image_tokens, model.config.hidden_size)
    emb = model.sam_image_embeddings(torch.randn(1, 3, 128, 128))
    grid = 128 // model.config.sam_config["patch_size"]
    assert emb.shape == (1, model.config.out_dim, grid, grid)


def test_sam_embeddings_in_chunks_equal_one_image_at_a_time(tiny_model):
    from legion.model.grounding import SAM_ENCODER_CHUNK

    model, _ = tiny_model
    images = torch.randn(SAM_ENCODER_CHUNK + 2, 3, 128, 128)  # one full chunk and a partial one
    with torch.no_grad():
        batched = model.sam_image_embeddings(images)
        single = torch.cat([model.sam_image_embeddings(img[None]) for img in images])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def as_exported(name: str, tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """What a `dtype` export stores: bf16 values, except SAM and text_hidden_fcs (fp32, as released)."""
    if dtype == "float32" or not tensor.is_floating_point() or any(name.startswith(m + ".") for m in FP32_MODULES):
        return tensor
    return tensor.to(torch.bfloat16).float()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_save_load_round_trip_is_exact_in_the_stored_dtype(tiny_model_dir, tmp_path, dtype):
    model, tokenizer, report = load_model(tiny_model_dir, verbose=False)
    assert report.ok and report.benign_missing == []
    with torch.no_grad():  # make it differ from the seed-0 weights, like a trained model
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_model(model, tokenizer, tmp_path / "trained", dtype=dtype)
    again, tok2, _ = load_model(tmp_path / "trained", verbose=False)  # loaded in fp32
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(as_exported(k, before[k], dtype), after[k]) for k in before)
    exact = [k for k in before if torch.equal(before[k], after[k])]
    assert (len(exact) == len(before)) == (dtype == "float32")  # bf16 rounds the LLM, not SAM / fcs
    assert all(
        k.startswith(("model.grounding_encoder.", "model.text_hidden_fcs."))
        or not before[k].is_floating_point()
        or dtype == "float32"
        for k in exact
    )
    t1 = model.model.vision_tower.vision_tower.state_dict()
    t2 = again.model.vision_tower.vision_tower.state_dict()
    assert all(torch.equal(as_exported("clip", t1[k], dtype), t2[k]) for k in t1)
    assert tok2.get_vocab() == tokenizer.get_vocab()


def test_make_tiny_seed_and_reload_match_build_model(tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir, verbose=False)
    rebuilt = build_model(model.config, seed=0)
    loaded, fresh = model.state_dict(), rebuilt.state_dict()
    assert all(torch.equal(loaded[k], as_exported(k, fresh[k], "bfloat16")) for k in fresh)


def test_dtype_policy_keeps_sam_and_fcs_fp32(tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir, dtype=torch.bfloat16, verbose=False)
    for name, p in model.named_parameters():
        fp32 = any(name.startswith(m + ".") for m in FP32_MODULES)
        assert p.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    cast_all, _, _ = load_model(tiny_model_dir, dtype=torch.bfloat16, keep_fp32_modules=False, verbose=False)
    assert {p.dtype for p in cast_all.parameters()} == {torch.bfloat16}


def test_make_tiny_cli(tmp_path, capsys):
    from legion.cli import main

    assert main(["make-tiny", "--output-dir", str(tmp_path / "ck"), "--seed", "1"]) == 0
    assert "wrote tiny LEGION checkpoint" in capsys.readouterr().out
    model, tok, report = load_model(tmp_path / "ck", verbose=False)
    assert report.ok
    seed0 = build_model(model.config, seed=0).state_dict()
    assert not torch.equal(model.state_dict()["lm_head.weight"], seed0["lm_head.weight"])
    with pytest.raises(SystemExit):
        main(["make-tiny"])  # --output-dir is required
