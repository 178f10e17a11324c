"""Model, adapters and store for ``gpu-check``, built offline.

``mistral``: hidden 4096, 4 layers, 32 query / 8 KV heads, MLP 14336 (Mistral-7B's shapes, random
weights, bf16), 1,024 rank-16 adapters on q/k/v planted in 8 clusters, compressed at rank 16
into 8 clusters on the check's device. ``tiny``: the same recipe at test size, for CPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Scale:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    adapters: int
    clusters: int
    rank: int


SCALES = {
    "mistral": Scale(hidden=4096, layers=4, heads=32, kv_heads=8, intermediate=14336, adapters=1024, clusters=8,
                     rank=16),
    "tiny": Scale(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, adapters=16, clusters=2, rank=8),
}


@contextlib.contextmanager
def stdout_to_stderr():
    """Send what the builders print (the tokenizer trainer writes to fd 1 from Rust) to stderr,
    so stdout holds only the report's JSON lines."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def prepare(root: Path, scale: Scale, device: str, report) -> dict[str, Path]:
    """Write model/, adapters/ and store/ under ``root`` (kept when already there); ``report``
    receives one dict per phase. Returns the three paths."""
    from vllm_jd.compress.pipeline import compress
    from vllm_jd.compress.synthetic import make_adapters
    from vllm_jd.config import CompressConfig
    from vllm_jd.tiny_model import llama_lora_modules, make_tiny_llama

    paths = {name: root / name for name in ("model", "adapters", "store")}
    dims = dict(hidden=scale.hidden, layers=scale.layers, heads=scale.heads, kv_heads=scale.kv_heads,
                intermediate=scale.intermediate)
    t = time.perf_counter()
    if not (paths["model"] / "config.json").exists():
        with stdout_to_stderr():
            make_tiny_llama(paths["model"], dtype=torch.bfloat16, **dims)
    report({"check": "prepare_model", "seconds": round(time.perf_counter() - t, 1), **dims})
    t = time.perf_counter()
    if not paths["adapters"].exists():
        modules = llama_lora_modules(**dims, targets=("q_proj", "k_proj", "v_proj"))
        make_adapters(paths["adapters"], scale.adapters, modules, rank=scale.rank,
                      structure=f"planted:{scale.clusters}", seed=0, alpha=2 * scale.rank, dtype=torch.bfloat16)
    report({"check": "prepare_adapters", "adapters": scale.adapters, "seconds": round(time.perf_counter() - t, 1)})
    t = time.perf_counter()
    if not (paths["store"] / "manifest.json").exists():
        compress([paths["adapters"]], paths["store"], CompressConfig(rank=scale.rank, clusters=scale.clusters,
                                                                     device=device), progress=False)
    report({"check": "compress", "device": device, "rank": scale.rank, "clusters": scale.clusters,
            "seconds": round(time.perf_counter() - t, 1)})
    return paths
