"""Changing a store safely: one lock, staged shards, one atomic commit, garbage collection.

A store S is a directory whose manifest names every shard it uses; shards are immutable and
uniquely named. Every change is therefore: write new shards where no reader looks (a staging
folder), then, holding S's exclusive lock, move them into ``S/tensors`` and replace
``S/manifest.json`` (``os.replace``: the commit point), then delete what the new manifest no longer
names. S is a valid store at every instant: a crash before the rename leaves the old store plus
unreferenced files, which the next commit (or ``fsck --repair``) removes.

Locks are ``flock`` on the store directory itself, never replaced, so every process locks the
same inode: exclusive for writers, shared for readers that open shards after reading the
manifest (a shard is never deleted under them). A staging folder holds an exclusive ``flock`` on
itself while its writer lives, so a cleaner tells a live one from one left by a killed process.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vllm_jd.store.errors import StoreBusy, StoreError
from vllm_jd.store.format import MANIFEST, Manifest, read_manifest, write_manifest

logger = logging.getLogger(__name__)
STAGING_PREFIX = ".staging-"
TENSORS = "tensors"
MIN_AGE_S = 5.0


def crash_point(name: str) -> None:
    """Test hook: ``VLLM_JD_CRASH_AT=name`` ends the process here as a kill -9 would (no cleanup),
    so tests put a crash between any two steps of a commit deterministically."""
    if os.environ.get("VLLM_JD_CRASH_AT") == name:
        os._exit(137)


@contextmanager
def locked(store: str | Path, shared: bool = False, timeout: float | None = None) -> Iterator[None]:
    """Hold ``store``'s lock: exclusive (writers) or shared (readers). ``timeout`` seconds (None:
    wait as long as it takes, saying so after 2 s) then StoreError: the store stays untouched."""
    store = Path(store)
    if not (store / MANIFEST).exists():
        raise StoreError(f"{store} is not a vllm-jd store: no {MANIFEST}")
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        t0, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - t0
                if timeout is not None and waited >= timeout:
                    raise StoreBusy(f"{store} is busy: another writer has held its lock for {waited:.0f} s; "
                                     "nothing was changed, try again") from None
                if not told and waited > 2:
                    logger.info("waiting for the lock of %s (another vllm-jd command is writing it)", store)
                    told = True
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def live_folder(path: Path) -> Iterator[Path]:
    """Create ``path`` and hold an exclusive lock on it until the block ends (then it is removed,
    unless the block moved it away): the mark of a folder whose writer is alive."""
    path.mkdir(parents=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staging_folder(path: Path) -> Iterator[Path]:
    """A ``live_folder`` laid out as a store (its ``tensors`` subfolder made): where a writer puts
    new shards before ``commit`` or ``publish``."""
    with live_folder(path) as tmp:
        (tmp / TENSORS).mkdir()
        yield tmp


def is_stale(path: Path) -> bool:
    """True if no live writer holds ``path`` (a staging or temporary folder). A folder younger
    than ``MIN_AGE_S`` is never stale: its writer may be between ``mkdir`` and ``flock``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False  # gone already, or not a folder: not ours to remove
    if time.time() - os.fstat(fd).st_mtime < MIN_AGE_S:
        os.close(fd)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def leftovers(store: Path, manifest: Manifest) -> list[Path]:
    """What a killed writer can leave behind: shards no manifest names, staging folders and
    sibling temporary folders nobody holds, temporary manifests. Never anything in use."""
    store = Path(store)
    named = {Path(s).name for s in manifest.weight_map.values()}
    out = []
    tensors = store / TENSORS
    if tensors.is_dir():
        out += [p for p in tensors.iterdir() if p.name not in named and not p.is_dir()]
    out += [p for p in store.iterdir() if p.name.startswith(STAGING_PREFIX) and is_stale(p)]
    out += [p for p in store.iterdir() if p.name.startswith(f".{MANIFEST}.") and p.name.endswith(".tmp")]
    out += [p for p in store.parent.iterdir()
            if p.name.startswith((f".{store.name}.tmp-", f".{store.name}.old-")) and is_stale(p)]
    return sorted(out)


def collect_garbage(store: Path, manifest: Manifest) -> list[Path]:
    """Remove ``leftovers``; the caller holds the exclusive lock. Returns what was removed."""
    removed = leftovers(store, manifest)
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if removed:
        logger.info("removed %d leftover files of earlier writers from %s", len(removed), store)
    return removed


def commit(store: Path, staged: Path, manifest: Manifest) -> None:
    """Move the shards under ``staged/tensors`` into the store, replace its manifest, clean up.
    The caller holds the exclusive lock and has written every shard ``manifest`` names."""
    (store / TENSORS).mkdir(exist_ok=True)
    src = staged / TENSORS
    for p in sorted(src.iterdir()) if src.is_dir() else ():
        os.replace(p, store / TENSORS / p.name)  # unique names: nothing the old manifest uses is touched
        crash_point("commit:moving-shards")
    crash_point("commit:before-manifest")
    write_manifest(store, manifest)
    crash_point("commit:after-manifest")
    collect_garbage(store, manifest)


@dataclass
class Staging:
    """Where a command writes a new store version: ``dir/tensors/<shard>``, named in the weight map
    as ``tensors/<shard>``. ``commit(manifest)`` publishes it (see ``writing``)."""

    dir: Path
    out: Path
    generation: str
    replaces_store: bool

    def shard(self, stem: str) -> str:
        """A weight-map path for a new shard, unique to this version."""
        return f"{TENSORS}/{self.generation[:8]}-{stem}.safetensors"


def check_writable(out: str | Path) -> Path:
    """``out`` if a store may be written there (absent, an empty folder, or a store), else StoreError:
    asked before long work (downloads, compression) as well as when writing starts."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise StoreError(f"refusing to overwrite {out}: it exists and is not a vllm-jd store")
    return out


@contextmanager
def writing(out: str | Path) -> Iterator[Staging]:
    """Stage a new store version for ``out`` (absent, an empty folder, or a store).

    The block writes shards under ``staging.dir`` and ends by calling ``publish(staging, manifest)``
    (directly, or through ``publish``'s ``merge``). If the block fails, nothing of it remains and
    ``out`` is untouched. A new store is built in a sibling folder renamed into place; an existing
    one gets its new shards and manifest in one commit under its lock.
    """
    out = check_writable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    generation = uuid.uuid4().hex
    replaces = (out / MANIFEST).exists()
    if not replaces:  # what a killed earlier attempt at this store left (an existing store's commit cleans its own)
        for p in out.parent.glob(f".{out.name}.tmp-*"):
            if is_stale(p):
                shutil.rmtree(p, ignore_errors=True)
    place = out / f"{STAGING_PREFIX}{generation[:8]}" if replaces else out.parent / f".{out.name}.tmp-{generation[:8]}"
    with staging_folder(place) as tmp:
        yield Staging(tmp, out, generation, replaces)


def publish(staging: Staging, manifest: Manifest,
            merge: Callable[[Manifest, Manifest, Staging], Manifest] | None = None) -> None:
    """Make ``manifest`` (whose shards are staged) the store at ``staging.out``.

    merge(current, new, staging) → the manifest to commit, called under the lock with the
    store's current manifest (``compress --from-store S --out S`` carries over what was added
    meanwhile); it may write more shards into ``staging.dir``.
    """
    manifest.generation = staging.generation
    out = staging.out
    if not staging.replaces_store:
        write_manifest(staging.dir, manifest)
        crash_point("publish:before-rename")
        try:
            os.rename(staging.dir, out)  # atomic; fails if a store appeared at ``out`` meanwhile
        except OSError as e:
            raise StoreError(f"cannot create {out}: {e}; nothing was written") from None
        return
    with locked(out):
        if merge is not None:
            manifest = merge(read_manifest(out), manifest, staging)
        commit(out, staging.dir, manifest)


def remove_adapters(store: str | Path, names: list[str], lock_timeout: float | None = None) -> None:
    """Delete adapters ``names`` from the store (one commit). Their tensors stay in their shards,
    unread, until ``compact`` or a ``compress --from-store``; StoreError naming one that is not there."""
    store = Path(store)
    with locked(store, timeout=lock_timeout):
        manifest = read_manifest(store)
        for name in names:
            if name in manifest.adapters:
                del manifest.adapters[name]
            elif name in manifest._broken:
                del manifest._broken[name]
            elif name in manifest.quarantined:  # deleting is how a quarantined name becomes free again
                del manifest.quarantined[name]
            else:
                raise StoreError(f"no adapter named {name!r} in {store}")
        write_manifest(store, manifest)
