"""Adapters registered while serving: ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

No vLLM import here (``patch`` wires these into vLLM's routes). Loading an adapter:

1. its folder must lie under the adapter root (``vllm-jd serve --jd-adapter-root``) after every
   symlink is resolved, and so must every file in it: no ``..`` traversal, no symlink escape;
2. it is added to the store on disk exactly as ``vllm-jd add`` would (projected onto the best
   cluster, or kept exact as a singleton above ``--jd-max-error``), atomically, under the
   store's lock, so a restart keeps it and concurrent registrations serialise;
3. vLLM then loads it by name like any store adapter: each worker finds the name missing,
   re-reads the manifest and writes the new Σ rows (and a new singleton's bases) in place.

A bad adapter raises ValueError (HTTP 400) with the reason and leaves the store unchanged; a
path outside the root raises PermissionError (HTTP 403). Unloading drops the adapter from the
manifest, so it stays unserved after a restart.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from vllm_jd.compress.project import Added, add_named
from vllm_jd.compress.store import remove_adapter

logger = logging.getLogger(__name__)


def resolve_under_root(lora_path: str, root: str) -> Path:
    """The real folder of ``lora_path`` (relative paths are taken from ``root``); PermissionError
    if it, or any file in it, resolves outside ``root``."""
    root_real = Path(root).resolve(strict=True)
    p = Path(lora_path)
    real = (p if p.is_absolute() else root_real / p).resolve()

    def inside(x: Path) -> bool:
        return x == root_real or root_real in x.parents

    if not inside(real):
        raise PermissionError(f"lora_path {lora_path!r} is outside the adapter root {root_real}")
    if real.is_dir():
        for f in real.rglob("*"):
            if not inside(f.resolve()):
                raise PermissionError(f"{f.name} in {lora_path!r} links outside the adapter root {root_real}")
    return real


def register(store: str | Path, name: str, lora_path: str, root: str, max_error: float) -> Added:
    """Add the adapter at ``lora_path`` to ``store`` under ``name`` (see module docstring)."""
    t0 = time.perf_counter()
    path = resolve_under_root(lora_path, root)
    if not path.is_dir():
        raise ValueError(f"lora_path {lora_path!r} is not a folder (expected a PEFT adapter folder)")
    [added] = add_named(store, [(name, path)], max_error)
    logger.info("vllm-jd: registered %s from %s: cluster %d (%s), error %.4f, %.3f s", name, path, added.cluster,
                added.kind, added.error, time.perf_counter() - t0)
    return added


def unregister(store: str | Path, name: str) -> None:
    """Drop ``name`` from the store's manifest (its tensors stay until the next recompression)."""
    remove_adapter(Path(store), name)
    logger.info("vllm-jd: unregistered %s from %s", name, store)
