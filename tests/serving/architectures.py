"""Tiny random models of several architectures and real PEFT adapters for them (mixed ranks and
targets, rsLoRA, rank/alpha patterns, ``layers_to_transform``), for ``test_architectures.py``.

Every model is float32, 2 layers, hidden 256, heads of 64 (the CPU attention backend's sizes),
with the tiny byte-level tokenizer of ``vllm_jd.tiny_model``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 256, 2, 4, 2, 64, 512, 2048
LLAMA_LIKE = dict(all=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  attn=["q_proj", "k_proj", "v_proj", "o_proj"], qv=["q_proj", "v_proj"],
                  pattern={"down_proj": 16, "o_proj": 8})
GQA = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)

ARCHS: dict[str, dict] = {
    "Llama": dict(config="LlamaConfig", kwargs=dict(GQA, tie_word_embeddings=False), **LLAMA_LIKE),
    "Qwen2": dict(config="Qwen2Config", kwargs=dict(GQA, tie_word_embeddings=False, use_sliding_window=False),
                  **LLAMA_LIKE),
    "Qwen3": dict(config="Qwen3Config", kwargs=dict(GQA, head_dim=HEAD_DIM, tie_word_embeddings=False,
                                                    use_sliding_window=False), **LLAMA_LIKE),
    "Gemma2": dict(config="Gemma2Config", kwargs=dict(GQA, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
                                                      sliding_window=512), **LLAMA_LIKE),
    "Phi3": dict(config="Phi3Config", kwargs=dict(GQA, tie_word_embeddings=False, original_max_position_embeddings=1024),
                 all=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], attn=["qkv_proj", "o_proj"],
                 qv=["qkv_proj"], pattern={"down_proj": 16, "o_proj": 8}),
    "GPTNeoX": dict(config="GPTNeoXConfig", kwargs=dict(hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                                                        num_attention_heads=HEADS, tie_word_embeddings=False),
                    all=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                    attn=["query_key_value", "dense"], qv=["query_key_value"],
                    pattern={"dense_4h_to_h": 16, "attention.dense": 8}),
}


def build_model(arch: str, out: Path, tokenizer: Path, seed: int = 0) -> Path:
    """A tiny random float32 model of ``arch`` with the tokenizer files of ``tokenizer`` in ``out``."""
    import transformers

    spec = ARCHS[arch]
    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer.iterdir():
        shutil.copy(f, out / f.name)
    cfg = getattr(transformers, spec["config"])(**spec["kwargs"], vocab_size=VOCAB, num_hidden_layers=LAYERS,
                                                max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=2)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float32).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32", "dtype": "float32"}, indent=2))
    return out


def adapter_configs(arch: str) -> dict[str, dict]:
    """Name → LoraConfig arguments of the six adapters made for ``arch``."""
    s = ARCHS[arch]
    return {"all_r8": dict(r=8, lora_alpha=16, target_modules=s["all"]),
            "attn_r16": dict(r=16, lora_alpha=32, target_modules=s["attn"]),
            "qv_r4": dict(r=4, lora_alpha=8, target_modules=s["qv"]),
            "rslora_r8": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=s["all"]),
            "pattern_r4": dict(r=4, lora_alpha=4, target_modules=s["all"], rank_pattern=dict(s["pattern"]),
                               alpha_pattern={k: 2 * v for k, v in s["pattern"].items()}),
            "layer0_r16": dict(r=16, lora_alpha=16, target_modules=s["all"], layers_to_transform=[0])}


def make_peft_adapters(arch: str, model: Path, out: Path) -> list[str]:
    """The six adapters, made and saved by PEFT itself, lora_B drawn non-zero so each changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (name, kw) in enumerate(adapter_configs(arch).items()):
            torch.manual_seed(i + 1)
            peft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32),
                                  LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **kw))
            for pname, p in peft.named_parameters():
                if "lora_B" in pname:
                    torch.nn.init.normal_(p, std=0.1)
            peft.save_pretrained(str(out / name))
            names.append(name)
    return names


def greedy_reference(model: Path, adapters: Path | None, names: list[str], prompts: list[list[int]],
                     max_tokens: int) -> tuple[dict[str, list[list[int]]], dict[str, list[str]]]:
    """transformers + PEFT greedy tokens ("<base>" and each adapter folder under ``adapters``), and
    the warnings each adapter's loading raised."""
    import copy

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32, attn_implementation="eager")
    tokens, seen = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: one thread is fastest, and the other core stays free
    try:
        for name in [None, *names]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                m = copy.deepcopy(base) if name is None else PeftModel.from_pretrained(copy.deepcopy(base),
                                                                                      str(adapters / name))
            seen[name or "<base>"] = [str(w.message) for w in caught]
            tokens[name or "<base>"] = [_greedy(m.eval(), ids, max_tokens) for ids in prompts]
    finally:
        torch.set_num_threads(threads)
    return tokens, seen


def _greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x[0, len(ids):].tolist()
