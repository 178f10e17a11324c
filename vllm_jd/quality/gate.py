"""``compress --verify-model``: a store is published only once every adapter has been measured.

The store is compressed into a fresh sibling folder ``.<out>.gate-<id>``, verified there, and
the adapters below the threshold are stored exactly; only then is the folder renamed to
``--out``. A failure (a model that does not fit, prompts naming unknown adapters, a missing
original) or an interrupt removes the folder: ``--out`` is never a store that skipped the gate.
``--out`` must therefore be new (absent or an empty folder): an existing store is verified in
place with ``vllm-jd verify STORE --repair``. A run killed outright (SIGKILL) cannot clean up:
its ``.<out>.gate-<id>`` folder stays beside ``--out`` (never at it, never served) until the next
gated compress to the same ``--out`` removes it. Each run holds an flock on
``.<out>.gate-<id>.lock`` while it works, so only folders whose run is gone are removed, never one
a concurrent run is filling.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


def check_new(out: str | Path) -> Path:
    """``out`` if a gated store may be created there (absent, or an empty folder), else ValueError."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--verify-model writes a new store, and {out} exists: choose a new --out, or verify the "
                         f"existing store with `vllm-jd verify {out} --model MODEL --repair`")
    return out


def remove_stale(out: Path) -> list[Path]:
    """Remove the staged folders of gated runs to ``out`` that were killed (their lock is free);
    returns them. A folder whose run still holds its lock is left alone."""
    removed = []
    for lock in sorted(out.parent.glob(f".{out.name}.gate-*.lock")):
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a run in progress
            staged = lock.with_suffix("")
            if staged.exists():
                shutil.rmtree(staged)
                removed.append(staged)
                logger.warning("vllm-jd: removed %s, left by a gated compress that was killed", staged)
            lock.unlink()
    return removed


@contextmanager
def gated(out: str | Path) -> Iterator[Path]:
    """Yield a fresh folder to compress, verify and repair into; renamed to ``out`` when the
    block ends normally, removed when it raises (or is interrupted). Staged folders that killed
    runs left for the same ``out`` are removed first (``remove_stale``)."""
    out = check_new(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.parent / f".{out.name}.gate-{uuid.uuid4().hex[:8]}"
    lock = tmp.with_name(tmp.name + ".lock")
    with open(lock, "w") as held:  # taken before the folder exists: a folder without a free lock is live
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            yield tmp
            check_new(out)  # nothing appeared there meanwhile
            if out.exists():
                out.rmdir()
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; removed after a failure
            lock.unlink(missing_ok=True)
