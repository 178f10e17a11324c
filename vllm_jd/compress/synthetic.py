"""Synthetic PEFT adapters for demos, tests and benchmarks (nothing is downloaded).

Structures:
- ``random``: independent Gaussian factors (the paper's "random LoRA" control, §5.3);
- ``shared``: a common low-rank component plus noise, like adapters trained from one base
  (B_i = U₀X_i + ε, A_i = Y_iV₀ᵀ + ε);
- ``planted:K``: K groups, each spanning its own bases exactly (B_i = U_gX_i, A_i = Y_iV_gᵀ).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_QKV = ("q_proj", "k_proj", "v_proj")


def llama_modules(layers: int, hidden: int, kv_dim: int, targets=LLAMA_QKV) -> dict[str, tuple[int, int]]:
    """Module → (d_in, d_out) of a Llama-style model's attention projections."""
    out = {}
    for layer in range(layers):
        for t in targets:
            d_out = hidden if t in ("q_proj", "o_proj") else kv_dim
            out[f"model.layers.{layer}.self_attn.{t}"] = (hidden, d_out)
    return out


def factors(modules: dict[str, tuple[int, int]], n: int, rank: int, structure: str, seed: int,
            noise: float = 0.1, shared_rank: int | None = None):
    """Yield (i, {module: (A [r, d_in], B [d_out, r])}) for n adapters, deterministic in seed."""
    g = torch.Generator().manual_seed(seed)
    kind, _, arg = structure.partition(":")
    groups = int(arg) if kind == "planted" else 1
    q = shared_rank or (rank if kind == "planted" else 2 * rank)
    bases = {m: [(torch.randn(d_out, q, generator=g), torch.randn(d_in, q, generator=g)) for _ in range(groups)]
             for m, (d_in, d_out) in modules.items()}
    for i in range(n):
        out = {}
        for m, (d_in, d_out) in modules.items():
            if kind == "random":
                a, b = torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g)
            else:
                U0, V0 = bases[m][i % groups]
                b = U0 @ torch.randn(q, rank, generator=g)
                a = torch.randn(rank, q, generator=g) @ V0.T
                if kind == "shared":
                    b = b + noise * (q**0.5) * torch.randn(d_out, rank, generator=g)
                    a = a + noise * (q**0.5) * torch.randn(rank, d_in, generator=g)
            out[m] = (a / d_in**0.5, b / rank**0.5)
        yield i, out


def write_adapter(out: Path, mods: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: float,
                  dtype: torch.dtype = torch.float32, base_model: str = "tiny-llama", **config) -> Path:
    """Write one PEFT adapter folder with ``r = rank`` and ``lora_alpha = alpha``."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m, (a, b) in mods.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
           "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
           "target_modules": sorted({m.rsplit(".", 1)[-1] for m in mods}), **config}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def make_adapters(root: Path, n: int, modules: dict[str, tuple[int, int]], rank: int = 16,
                  structure: str = "shared", seed: int = 0, alpha: float = 32, prefix: str = "adapter",
                  dtype: torch.dtype = torch.float32) -> list[Path]:
    """Write n synthetic adapters under ``root`` as ``<prefix>-0000`` …; returns their folders."""
    root = Path(root)
    paths = []
    for i, mods in factors(modules, n, rank, structure, seed):
        paths.append(write_adapter(root / f"{prefix}-{i:04d}", mods, rank, alpha, dtype))
    return paths
