"""Tokenizer, batches and greedy evaluation for the zoo's character-level model.

The tokenizer is byte-level BPE with **no merges** (one token per byte, plus ``<s>``, ``</s>``,
``<pad>``): every string tokenizes to its bytes, so ``tokens(prompt) + tokens(answer)`` is
exactly ``tokens(prompt + answer)`` and string tasks such as reversal are learnable by a tiny
model. It is a ``PreTrainedTokenizerFast`` saved in the model folder, so ``AutoTokenizer`` and
vLLM load it like any other; no BOS is added.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

SPECIALS = ["<s>", "</s>", "<pad>"]
PAD_ID = 2
IGNORE = -100


def make_char_tokenizer(out: Path | None = None):
    """Build (and save under ``out`` if given) the byte-level tokenizer; returns it (259 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vllm_jd.tiny_model import CHAT_TEMPLATE

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIALS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    if out is not None:
        fast.save_pretrained(str(out))
    return fast


def encode_examples(tok, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """``(prompt, answer)`` → ``(prompt ids, answer ids)``; the answer ids are of ``" " + answer + "\\n"``."""
    return [(tok(p, add_special_tokens=False).input_ids, tok(f" {a}\n", add_special_tokens=False).input_ids)
            for p, a in pairs]


def collate(encoded: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` — each [B, T].

    Labels are the answer tokens only (prompt and padding are ``-100``); the model's own shift
    makes position t predict token t + 1.
    """
    length = max(len(p) + len(a) for p, a in encoded)
    ids = torch.full((len(encoded), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for row, (p, a) in enumerate(encoded):
        n = len(p) + len(a)
        ids[row, :n] = torch.tensor(p + a)
        mask[row, :n] = 1
        labels[row, len(p):n] = torch.tensor(a)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(encoded: list, batch_size: int, steps: int, seed: int):
    """Yield ``steps`` batches (``collate`` dicts) sampled by shuffled epochs, deterministically."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        pick, order = order[:batch_size], order[batch_size:]
        yield collate([encoded[i] for i in pick])


@torch.no_grad()
def greedy(model, tok, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 128) -> list[str]:
    """Greedy continuations of ``prompts`` (stopping at a newline), decoded, newline excluded.

    Left-pads each batch to [B, T] and decodes token by token with the KV cache.
    """
    newline = tok.convert_tokens_to_ids("Ċ")
    model.eval()
    outs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [tok(p, add_special_tokens=False).input_ids for p in prompts[start:start + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([[PAD_ID] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=newline, pad_token_id=PAD_ID)
        for row in gen[:, width:].tolist():
            row = row[:row.index(newline)] if newline in row else row
            outs.append(tok.decode([t for t in row if t != PAD_ID]))
    return outs
