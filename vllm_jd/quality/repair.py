"""``vllm-jd verify --repair``: adapters that lost too much are stored exactly.

Each one is put back from its original (``verify.original_folder``) as an exact singleton
cluster: lossless, at the adapter's own rank. An exact singleton is the one choice that is
certain to pass; a re-fitted cluster at a higher rank would need a threshold on the error, which
is what failed. The old entry is replaced in the same commit, under the store's lock, so a crash
leaves either the old entry or the new one (its old Σ rows stay unused until the next
recompression, as after ``vllm-jd remove``). A running server keeps its old rows for the name
until it is restarted (or the store is switched).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from vllm_jd.compress.peft_io import open_adapter
from vllm_jd.compress.project import place
from vllm_jd.quality.verify import AdapterQuality, Scorer, verify
from vllm_jd.store.errors import AdapterError
from vllm_jd.store.format import TensorReader, read_manifest
from vllm_jd.store.transaction import STAGING_PREFIX, commit, locked, staging_folder


def store_exactly(store: str | Path, originals: dict[str, Path]) -> int:
    """Replace each adapter ``name`` of ``store`` by an exact singleton of ``originals[name]``,
    in one commit; returns the bytes the new tensors take."""
    store = Path(store)
    if not originals:
        return 0
    with locked(store):
        manifest = read_manifest(store)
        adapters = []
        for name, folder in originals.items():
            if name not in manifest.adapters:
                raise AdapterError(name, f"is no longer in {store}; nothing was changed")
            a = open_adapter(name, folder)
            a.source = manifest.adapters.pop(name).source  # the same original, recorded as before
            adapters.append(a)
        with staging_folder(store / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}") as staged:
            place(TensorReader(store, manifest), manifest, adapters, staged, max_error=1.0, force_exact=True)
            added = sum(f.stat().st_size for f in staged.rglob("*.safetensors"))
            commit(store, staged, manifest)
    return added


def verify_and_repair(store: str | Path, model: str, prompts, threshold: float, names=None, max_tokens: int = 32,
                      device: str = "cpu", progress: bool = True, repair: bool = True
                      ) -> tuple[list[AdapterQuality], list[AdapterQuality], int]:
    """``verify``; with ``repair``, store the adapters below ``threshold`` exactly and verify those
    again. Returns (before, after: the repaired ones re-verified, bytes the repair added)."""
    scorer = Scorer(model, device, progress=progress)  # the model is read once for both passes
    before = verify(store, model, prompts, names, max_tokens, device, progress, scorer)
    below = {r.name: r.original for r in before if not r.passes(threshold)}
    if not (repair and below):
        return before, [], 0
    added = store_exactly(store, below)
    return before, verify(store, model, prompts, list(below), max_tokens, device, progress, scorer), added
