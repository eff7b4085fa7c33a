"""legion merge: DeepSpeed checkpoints (ZeRO 0-3) -> fp32 safetensors -> LoRA merged model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from legion import merge
from legion.merge import MergeError, merge_lora_state_dict

REPO = Path(__file__).resolve().parents[1]

# (The DeepSpeed tests share one ~40 s subprocess fixture, hence `slow`.)
# Trains a tiny LLaMA with LoRA injected in place (the reference's quirk: DeepSpeed wraps the
# original model, so keys carry no `base_model.model.` prefix) for one step under each ZeRO stage,
# saves a DeepSpeed checkpoint and, next to it, the engine's module weights for comparison.
_TRAIN_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    out = sys.argv[1]
    for stage, bf16 in [(0, False), (2, False), (3, True)]:
        torch.manual_seed(stage)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4))
        get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                p.requires_grad = True
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
            "bf16": {"enabled": bf16}})
        ids = torch.randint(0, 64, (1, 8))
        for step in (1, 2):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            engine.save_checkpoint(f"{out}/zero{stage}", tag=f"global_step{step}")
        if stage == 3:
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                weights = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        else:
            weights = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        save_file(weights, f"{out}/zero{stage}_module.safetensors")
""")


@pytest.fixture(scope="module")
def deepspeed_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    env = dict(
        os.environ,
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(29600 + os.getpid() % 300),
        DS_ACCELERATOR="cpu",
    )
    proc = subprocess.run(
        [sys.executable, "-c", _TRAIN_SCRIPT, str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_step1_recovers_module_weights_for_every_zero_stage(deepspeed_checkpoints, stage, tmp_path):
    ckpt = deepspeed_checkpoints / f"zero{stage}"
    files, info = merge.step1(ckpt, tmp_path / "w.safetensors")
    assert info["tag"] == "global_step2" and info["zero_stage"] == stage  # read from `latest`
    got = load_file(str(files[0]))
    want = load_file(str(deepspeed_checkpoints / f"zero{stage}_module.safetensors"))
    assert set(got) == set(want)
    assert any(k.endswith("q_proj.lora_A.default.weight") for k in got)
    assert not any(k.startswith("base_model.") for k in got)
    for key, tensor in want.items():
        assert got[key].dtype == torch.float32
        # bf16 training: the module holds bf16 copies of the fp32 master weights step1 returns
        tol = 1e-2 if stage == 3 else 0.0
        torch.testing.assert_close(got[key], tensor, atol=tol, rtol=tol, msg=key)


@pytest.mark.slow
def test_step1_tag_choice_and_errors(deepspeed_checkpoints, tmp_path):
    ckpt = deepspeed_checkpoints / "zero2"
    _, info = merge.step1(ckpt, tmp_path / "a.safetensors", tag="global_step1")
    assert info["tag"] == "global_step1"
    a, b = load_file(str(tmp_path / "a.safetensors")), merge.step1(ckpt, tmp_path / "b")[0]
    b = merge.load_safetensors(tmp_path / "b")  # directory output, read back
    assert (tmp_path / "b" / "model.safetensors").is_file()
    assert any(not torch.equal(a[k], b[k]) for k in a), "two different steps must differ"
    with pytest.raises(MergeError, match="tag 'global_step9' not found"):
        merge.step1(ckpt, tmp_path / "c.safetensors", tag="global_step9")
    with pytest.raises(MergeError, match="no 'latest'"):
        merge.step1(tmp_path, tmp_path / "d.safetensors")


@pytest.mark.slow
def test_step1_cli_and_sharding(deepspeed_checkpoints, tmp_path, capsys):
    from legion.cli import main

    assert (
        main(
            [
                "merge",
                "step1",
                str(deepspeed_checkpoints / "zero0"),
                "--output-dir",
                str(tmp_path / "o"),
                "--max-shard-gb",
                str(20_000 / 1024**3),
            ]
        )
        == 0
    )
    assert "ZeRO stage 0, tag global_step2" in capsys.readouterr().out
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    whole = load_file(str(deepspeed_checkpoints / "zero0_module.safetensors"))
    sharded = merge.load_safetensors(tmp_path / "o")
    assert set(sharded) == set(whole) and all(torch.equal(sharded[k], whole[k]) for k in whole)


def test_step1_refuses_pickled_code(tmp_path):
    ckpt = tmp_path / "evil"
    (ckpt / "global_step1").mkdir(parents=True)
    (ckpt / "latest").write_text("global_step1")
    torch.save({"module": {"w": torch.ones(1)}, "hook": print}, ckpt / "global_step1" / "mp_rank_00_model_states.pt")
    with pytest.raises(MergeError, match="weights_only=True"):
        merge.step1(ckpt, tmp_path / "x.safetensors")


# --- LoRA merge on a plain LLaMA (no LEGION parts needed) -----------------------------------
def _lora_llama(seed=0):
    torch.manual_seed(seed)
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    ).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # peft starts B at zero, which would make any merge look right
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.normal_(0, 0.2)
    return peft_model.eval(), base_state


def _style(state: dict, prefix: bool, old_peft: bool, adapter_name: bool) -> dict:
    out = {}
    for key, value in state.items():
        if old_peft:
            key = key.replace(".base_layer.", ".")
        if not adapter_name:
            key = key.replace(".default.weight", ".weight")
        out[("base_model.model." if prefix else "") + key] = value
    return out


@pytest.mark.parametrize(
    "prefix,old_peft,adapter_name",
    [(False, False, True), (True, True, True), (True, False, False), (False, True, True)],
)
def test_merged_logits_equal_unmerged_lora(prefix, old_peft, adapter_name):
    peft_model, base_state = _lora_llama()
    inner = peft_model.base_model.model
    trained = _style({k: v.clone() for k, v in inner.state_dict().items()}, prefix, old_peft, adapter_name)
    merged_state, report = merge_lora_state_dict(trained, lora_alpha=16)
    assert report.rank == 4 and report.scale == 4.0 and len(report.merged_modules) == 4
    assert set(merged_state) == set(base_state)
    plain = LlamaForCausalLM(peft_model.config).eval()
    plain.load_state_dict(merged_state, strict=True)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = plain(input_ids=ids).logits
        base_logits = LlamaForCausalLM(peft_model.config).eval()
        base_logits.load_state_dict(base_state)
        unchanged = base_logits(input_ids=ids).logits
    assert (want - unchanged).abs().max() > 1e-2  # the LoRA really changes the output
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_merge_errors():
    peft_model, _ = _lora_llama()
    state = {k: v for k, v in peft_model.base_model.model.state_dict().items()}
    with pytest.raises(MergeError, match="expected --lora-r 8"):
        merge_lora_state_dict(state, 16, lora_r=8)
    broken = {k: v for k, v in state.items() if "layers.0.self_attn.q_proj.lora_B" not in k}
    with pytest.raises(MergeError, match="has only lora_A"):
        merge_lora_state_dict(broken, 16)
    both = dict(state)
    both["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.base_layer.weight"]
    with pytest.raises(MergeError, match="two keys map"):
        merge_lora_state_dict(both, 16)
    dropped = dict(state)
    dropped["model.vision_tower.vision_tower.vision_model.x.weight"] = torch.ones(1)
    dropped["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(1)
    merged, report = merge_lora_state_dict(dropped, 16)
    assert len(report.dropped_keys) == 2 and not any("vision_tower" in k or "inv_freq" in k for k in merged)


def test_load_safetensors_errors(tmp_path):
    with pytest.raises(MergeError, match="not found"):
        merge.load_safetensors(tmp_path / "nope.safetensors")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(MergeError, match="expected a .safetensors"):
        merge.load_safetensors(tmp_path / "w.bin")
    save_file({"a": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    assert torch.equal(merge.load_safetensors(tmp_path / "x.safetensors")["a"], torch.ones(2))


# --- step 2 on the tiny LEGION model ----------------------------------------------------------
def _lora_trained_legion(model, seed=1):
    """LoRA injected in place on the reference's targets (no `base_model.model.` prefix), with
    random A/B and a changed lm_head, as a finished training run would leave it."""
    from legion.model.legion import lora_target_module_names

    targets = lora_target_module_names(model)
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, 0.3)
        model.lm_head.weight.add_(0.01 * torch.randn_like(model.lm_head.weight))
    return model.eval(), targets


def _multimodal_logits(model, tokenizer):
    from legion.model import conversation as conv

    torch.manual_seed(0)
    ids = conv.encode_prompt(tokenizer)[None]
    size = model.config.vision_config["image_size"]
    with torch.no_grad():
        return model(
            input_ids=ids, attention_mask=torch.ones_like(ids), clip_pixel_values=torch.randn(1, 3, size, size)
        ).logits


def test_step2_merged_legion_matches_unmerged_lora(tiny_model, tiny_model_dir, tmp_path):
    from legion.model.builders import load_model

    model, tokenizer = tiny_model
    before = _multimodal_logits(model, tokenizer)
    model, targets = _lora_trained_legion(model)
    want = _multimodal_logits(model, tokenizer)
    assert (want - before).abs().max() > 1e-2
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert not any(k.startswith("base_model.") for k in trained)
    assert any(k.endswith("q_proj.base_layer.weight") for k in trained)
    save_file(trained, str(tmp_path / "w.safetensors"))

    from legion.cli import main

    assert (
        main(
            [
                "merge",
                "step2",
                "--base",
                str(tiny_model_dir),
                "--weights",
                str(tmp_path / "w.safetensors"),
                "--output-dir",
                str(tmp_path / "merged"),
                "--lora-r",
                "8",
                "--lora-alpha",
                "16",
                "--dtype",
                "float32",  # the merge arithmetic, checked exactly; the default bf16 export is checked below
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["merged_modules"] == len(targets) and report["lora_scale"] == 2.0
    assert report["missing_keys_kept_from_base"] == []
    merged, tok2, load_report = load_model(tmp_path / "merged", verbose=False)
    assert load_report.ok and (tmp_path / "merged" / "vision_tower" / "config.json").is_file()
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    torch.testing.assert_close(_multimodal_logits(merged.eval(), tok2), want, atol=1e-4, rtol=0)
    # the default export: bf16 (SAM and text_hidden_fcs fp32), a model card, a generation config
    merge.step2(tiny_model_dir, tmp_path / "w.safetensors", tmp_path / "merged_bf16", lora_r=8, lora_alpha=16)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged_bf16" / "model.safetensors"), "pt") as fh:
        dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}
    assert dtypes["lm_head.weight"] == "BF16" and dtypes["model.layers.0.self_attn.q_proj.weight"] == "BF16"
    assert {v for k, v in dtypes.items() if k.startswith("model.grounding_encoder.")} == {"F32"}
    assert json.loads((tmp_path / "merged_bf16" / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "LoRA (rank 8, scale 2) merged" in (tmp_path / "merged_bf16" / "README.md").read_text()


def test_step2_rejects_foreign_weights(tiny_model_dir, tmp_path):
    save_file(
        {"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3), "not.a.key": torch.zeros(1)},
        str(tmp_path / "w.safetensors"),
    )
    with pytest.raises(MergeError, match="do not belong to the base model"):
        merge.step2(tiny_model_dir, tmp_path / "w.safetensors", tmp_path / "out")


def test_save_safetensors_file_is_never_sharded_directory_is(tmp_path):
    state = {f"w{i}": torch.full((10,), float(i)) for i in range(4)}
    files = merge.save_safetensors(state, tmp_path / "one.safetensors", max_shard_bytes=50)
    assert files == [tmp_path / "one.safetensors"]
    files = merge.save_safetensors(state, tmp_path / "dir", max_shard_bytes=50)
    assert len(files) == 4 and (tmp_path / "dir" / "model.safetensors.index.json").is_file()
    for path in (tmp_path / "one.safetensors", tmp_path / "dir"):
        back = merge.load_safetensors(path)
        assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
