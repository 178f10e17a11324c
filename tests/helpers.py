"""Helpers shared by tests (importable as `helpers`; pytest adds tests/ to sys.path)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from vllm_jd.compress.factors import ModuleFactors, normalize
from vllm_jd.compress.synthetic import llama_modules

# 3 layers of a hidden-64 Llama with 32-wide k/v: small enough for ms-scale JD, odd enough
# (q 64→64, k/v 64→32) to catch d_in/d_out mix-ups.
TINY_MODULES = llama_modules(layers=3, hidden=64, kv_dim=32)


def random_factors(seed: int, n=12, r=4, d_in=24, d_out=20, dtype=torch.float64) -> ModuleFactors:
    """n random rank-r updates, normalised to unit norm (float64: exact-math checks)."""
    g = torch.Generator().manual_seed(seed)
    f = ModuleFactors(torch.randn(n, r, d_in, generator=g, dtype=dtype),
                      torch.randn(n, r, d_out, generator=g, dtype=dtype))
    return normalize(f)[0]


def dense(f: ModuleFactors) -> torch.Tensor:
    """Every P_i densely: [n, d_out, d_in]."""
    return f.Bt.transpose(1, 2) @ f.A


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes: equal digests = byte-for-byte equal."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def dense_update(adapter_dir: Path, module: str) -> torch.Tensor:
    """P = s·B A of one module of a PEFT adapter folder (float64)."""
    from vllm_jd.compress.peft_io import open_adapter

    a = open_adapter(adapter_dir.name, adapter_dir)
    A, Bt = a.factors(module)
    return Bt.T.double() @ A.double()
