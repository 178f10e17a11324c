"""``compress --verify-model``: a store is published only once every adapter has been measured.

The store is compressed into a fresh sibling folder ``.<out>.gate-<id>``, verified there, and
the adapters below the threshold are stored exactly; only then is the folder renamed to
``--out``. A failure (a model that does not fit, prompts naming unknown adapters, a missing
original) or an interrupt removes the folder: ``--out`` is never a store that skipped the gate.
``--out`` must therefore be new (absent or an empty folder): an existing store is verified in
place with ``vllm-jd verify STORE --repair``. A run killed outright (SIGKILL) cannot clean up:
its ``.<out>.gate-<id>`` folder stays beside ``--out`` (never at it, never served) until deleted.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_new(out: str | Path) -> Path:
    """``out`` if a gated store may be created there (absent, or an empty folder), else ValueError."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--verify-model writes a new store, and {out} exists: choose a new --out, or verify the "
                         f"existing store with `vllm-jd verify {out} --model MODEL --repair`")
    return out


@contextmanager
def gated(out: str | Path) -> Iterator[Path]:
    """Yield a fresh folder to compress, verify and repair into; renamed to ``out`` when the
    block ends normally, removed when it raises (or is interrupted)."""
    out = check_new(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.gate-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        check_new(out)  # nothing appeared there meanwhile
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; removed after a failure
