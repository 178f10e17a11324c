"""Figures that the engine and worker processes hand to the API server's ``/metrics``.

vLLM serves ``/metrics`` from the API server process, but residency is decided in the engine
core (the scheduler) and carried out in the workers (the copies). Each writes a small JSON file
into ``VLLM_JD_RUNTIME_DIR`` (atomically: write, then rename), at most once a second, and the
API server reads them when scraped. No file, no figures: the metrics then read zero.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from vllm_jd.envs import runtime_dir

PERIOD_S = 1.0


class Snapshot:
    """Rate-limited writer of one process's figures (``name``: "scheduler", "worker")."""

    def __init__(self, name: str):
        folder = runtime_dir()
        self.path = Path(folder) / f"{name}.json" if folder else None
        self._last = 0.0

    def write(self, data: dict, force: bool = False) -> None:
        if self.path is None or (not force and time.monotonic() - self._last < PERIOD_S):
            return
        self._last = time.monotonic()
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)


def read(name: str) -> dict:
    """The last figures written by ``name`` ({} if none)."""
    folder = runtime_dir()
    if not folder:
        return {}
    try:
        return json.loads((Path(folder) / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}
