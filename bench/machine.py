"""The machine a benchmark line was measured on: CPU name, AMX and AVX512-BF16, core count
(every line names the CPU; the CPU of this project's machines varies between sessions), and the
CPU path a vllm-jd server takes on it."""

from __future__ import annotations

import os
import re
from pathlib import Path


def machine() -> dict:
    from vllm_jd.kernels.jd_fused_cpu import cpu_flags

    name = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    flags = cpu_flags()
    return {"cpu": name.group(1) if name else "unknown", "amx": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "cores": os.cpu_count()}


def cpu_paths(rank: int, modules: dict[str, tuple[int, int]], amx_allowed: bool) -> dict:
    """Which CPU path each vllm-jd system served on: "jd" the fused kernel's variant for this CPU
    where it can run (at the rank ``jd_fused_cpu.served_rank`` pads to), else torch ops; "jd-amx"
    torch ops with AMX GEMMs (where AMX is allowed); "jd-torch" torch ops only. Plus the machine."""
    import torch

    from vllm_jd import envs
    from vllm_jd.kernels import jd_fused_cpu

    isa = jd_fused_cpu.choose_isa(jd_fused_cpu.cpu_flags(), envs.cpu_isa(), amx_allowed and envs.cpu_amx())
    isa = isa if envs.cpu_fused() else None
    served = jd_fused_cpu.padded_rank(rank, torch.bfloat16, list(modules.values()), isa) if isa else rank
    if isa and not all(jd_fused_cpu.usable(torch.bfloat16, d_in, served, [d_out], isa) for d_in, d_out in modules.values()):
        isa = None
    return {**machine(), "served_rank": served,
            "jd_path": f"fused kernel ({isa}), rank {served}" if isa else f"torch ops, rank {rank}",
            "jd-amx_path": "torch ops + AMX GEMMs" if amx_allowed else "torch ops", "jd-torch_path": "torch ops"}
