"""Write standard PEFT LoRA adapters (``export`` and ``merge`` produce them): the config and the
safetensors weights, atomically, into a folder that must not already hold anything."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_jd.compress.peft_io import CONFIG_NAME, SAFETENSORS_NAME
from vllm_jd.store.errors import StoreError


def write_adapter(out: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
                  base_model: str | None) -> None:
    """Write a standard PEFT LoRA adapter with scale 1 (``lora_alpha = r``).

    factors: module → ``(A [r_m, d_in], B [d_out, r_m])``; modules may have different ranks
    (recorded in ``rank_pattern``); ``rank`` is the default ``r``. ``target_modules`` names every
    module in full, so PEFT adds LoRA to exactly these (no zero LoRA on layers the source skipped).
    """
    out.mkdir(parents=True, exist_ok=True)
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
        if a.shape[0] != rank:
            rank_pattern[module] = int(a.shape[0])
            alpha_pattern[module] = int(a.shape[0])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": rank, "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "target_modules": sorted(factors), "modules_to_save": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "inference_mode": True,
    }
    save_file(tensors, str(out / SAFETENSORS_NAME))
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def refuse_non_empty(out: Path) -> None:
    """StoreError unless ``out`` is absent or an empty folder (nothing of the user's is overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"refusing to write into {out}: it exists and is not an empty folder")


def write_adapter_atomic(out: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
                         base_model: str | None, extra_files: dict[str, str] | None = None) -> Path:
    """``write_adapter`` into a sibling temporary folder renamed to ``out`` only when complete
    (plus ``extra_files``: name → text); on failure nothing is left behind."""
    import uuid

    refuse_non_empty(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_adapter(tmp, factors, rank, base_model)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
