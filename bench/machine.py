"""The machine a benchmark line was measured on: CPU name, AMX and AVX512-BF16, core count
(every line names the CPU; the CPU of this project's machines varies between sessions)."""

from __future__ import annotations

import os
import re
from pathlib import Path


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    name = re.search(r"model name\s*:\s*(.*)", info)
    flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split())
    return {"cpu": name.group(1) if name else "unknown", "amx": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "cores": os.cpu_count()}
