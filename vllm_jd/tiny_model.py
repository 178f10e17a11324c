"""A tiny Llama and tokenizer built offline, for tests, demos and CPU benchmarks.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in a second on Python's own
standard-library sources, the model has random weights. The CPU attention backend accepts head
sizes {32, 64, 80, …}, so heads are 64 wide.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _corpus(limit: int = 200) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit]
    return [f.read_text(errors="ignore") for f in files]


def make_tokenizer(out: Path, vocab_size: int = 2048) -> None:
    """Train and save a byte-level BPE tokenizer (``PreTrainedTokenizerFast``) under ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def make_tiny_llama(out: str | Path, hidden: int = 256, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate: int = 512, vocab_size: int = 2048, dtype: torch.dtype = torch.float32,
                    seed: int = 0) -> Path:
    """Write a random-weight ``LlamaForCausalLM`` and its tokenizer to ``out``; returns ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out, vocab_size)
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab_size,
                      max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                      pad_token_id=2, torch_dtype=dtype)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(str(out), safe_serialization=True)
    cfg_path = out / "config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg_path.write_text(json.dumps(cfg_json, indent=2))
    return out


ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_lora_modules(hidden: int = 256, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 512,
                       targets=ALL_TARGETS) -> dict[str, tuple[int, int]]:
    """Module → (d_in, d_out) of a Llama's LoRA targets, by PEFT name (defaults: ``make_tiny_llama``'s)."""
    kv = kv_heads * (hidden // heads)
    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}
    block = {t: "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for t in dims}
    return {f"model.layers.{i}.{block[t]}.{t}": dims[t] for i in range(layers) for t in targets}
