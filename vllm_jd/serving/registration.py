"""Adapters registered while serving: ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

No vLLM import here (``patch`` wires these into vLLM's routes). Loading an adapter:

1. its folder must lie under the adapter root (``vllm-jd serve --jd-adapter-root``) after every
   symlink is resolved (no ``..`` traversal, no symlink escape); its two files are then read
   through descriptors opened component by component with ``O_NOFOLLOW`` from the root's own
   descriptor (``copy_under_root``), into a private folder: a symlink swapped in after the check
   cannot redirect the read, and a FIFO or device is refused instead of blocking a thread;
2. the copy is added to the store exactly as ``vllm-jd add`` would (projected onto the best
   cluster, or kept exact as a singleton above ``--jd-max-error``), atomically, under the store's
   lock (waited for at most the registration timeout), so a restart keeps it and concurrent
   registrations serialise; the source recorded is the folder under the root;
3. vLLM then loads it by name like any store adapter: each worker reads the manifest and writes
   the adapter's Σ rows (and a new singleton's bases) in place (``manager.jd_refresh``). If that
   fails, the adapter is removed from the store again (``patch``), so the manifest never names
   an adapter the server could not serve.

A bad adapter raises ValueError (HTTP 400) with the reason and leaves the store unchanged; a
path outside the root raises PermissionError (HTTP 403). Unloading drops the adapter from
memory only, as vLLM's unload does (a restart serves it again); deleting it from the store is
``vllm-jd serve --jd-unload-deletes`` or ``vllm-jd remove`` (``unregister``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vllm_jd.compress.peft_io import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, open_adapter
from vllm_jd.compress.project import Added, add_named
from vllm_jd.store.errors import AdapterError, StoreError
from vllm_jd.store.format import read_manifest
from vllm_jd.store.transaction import remove_adapters

logger = logging.getLogger(__name__)
MAX_FILE_BYTES = 16 << 30
"""Largest adapter file read (16 GiB: a rank-256 adapter of a 70B model is ~5 GB)."""


def resolve_under_root(lora_path: str, root: str) -> Path:
    """The real folder of ``lora_path`` (relative paths are taken from ``root``); PermissionError
    if it resolves outside ``root``."""
    root_real = Path(root).resolve(strict=True)
    p = Path(lora_path)
    real = (p if p.is_absolute() else root_real / p).resolve()
    if real != root_real and root_real not in real.parents:
        raise PermissionError(f"lora_path {lora_path!r} is outside the adapter root {root_real}")
    return real


def _open_dir_under(root: Path, real: Path) -> int:
    """A descriptor of folder ``real`` opened from ``root`` one component at a time, refusing any
    symlink on the way (the resolved path has none, so one is a swap made after the check)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for part in real.relative_to(root).parts:
        try:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as e:
            try:
                link = stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode)
            except OSError:
                link = False
            os.close(fd)
            if link or e.errno == errno.ELOOP:
                raise PermissionError(f"{real} changed while it was read (a symlink appeared on the way): "
                                      "refused") from None
            if e.errno == errno.ENOENT:
                raise ValueError(f"{real} does not exist") from None
            raise ValueError(f"{real} is not a folder (expected a PEFT adapter folder)") from None
        os.close(fd)
        fd = nxt
    return fd


def _copy_file(dir_fd: int, name: str, dest: Path, limit: int, ticket: Ticket | None) -> bool:
    """Copy regular file ``name`` of the folder ``dir_fd`` to ``dest``; False if it is absent.
    Refused: anything but a regular file with one link, over ``limit`` bytes or more than the
    temporary folder's free space; the copy stops as soon as the caller gave up (``ticket``)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise PermissionError(f"{name}: cannot be opened safely ({e.strerror}; symlinks are refused)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{name} is not a regular file (a FIFO, device or folder cannot be an adapter file)")
        if st.st_nlink > 1:  # a hard link into the root can name any file of its file system
            raise PermissionError(f"{name} has {st.st_nlink} hard links; an adapter file under the root must have one")
        if st.st_size > min(limit, shutil.disk_usage(dest.parent).free // 2):
            raise ValueError(f"{name} is {st.st_size} bytes: more than an adapter of its rank for this store's "
                             f"modules can be ({limit}), or than half the free space for its copy")
        with os.fdopen(os.dup(fd), "rb") as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 22):
                if ticket is not None and ticket.state == "cancelled":
                    raise ValueError("cancelled while copying")
                out.write(chunk)
        return True
    finally:
        os.close(fd)


def weights_limit(manifest, config_file: Path) -> int:
    """Largest weights file an adapter can need: its rank (``r``, ``rank_pattern``) on every module
    of the store in float64, plus 1 MiB of header; ``MAX_FILE_BYTES`` if the config cannot say."""
    try:
        config = json.loads(config_file.read_text())
        ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
        r = max(int(x) for x in ranks if isinstance(x, (int, float)) and not isinstance(x, bool))
    except (OSError, ValueError, AttributeError):
        return MAX_FILE_BYTES
    return min(MAX_FILE_BYTES, sum(r * (m.d_in + m.d_out) * 8 for m in manifest.modules) + (1 << 20))


def copy_under_root(real: Path, root: str, into: Path, manifest=None, ticket: Ticket | None = None) -> Path:
    """Copy the adapter at ``real`` (already resolved under ``root``) into folder ``into`` through
    descriptors (module docstring, step 1), its weights bounded by ``weights_limit`` for the
    store's ``manifest``; returns ``into``."""
    dir_fd = _open_dir_under(Path(root).resolve(strict=True), real)
    try:
        if not _copy_file(dir_fd, CONFIG_NAME, into / CONFIG_NAME, 1 << 20, ticket):
            raise ValueError(f"{real}: missing {CONFIG_NAME}")
        limit = MAX_FILE_BYTES if manifest is None else weights_limit(manifest, into / CONFIG_NAME)
        if not _copy_file(dir_fd, SAFETENSORS_NAME, into / SAFETENSORS_NAME, limit, ticket):
            if not _copy_file(dir_fd, BIN_NAME, into / BIN_NAME, limit, ticket):
                raise ValueError(f"{real}: missing {SAFETENSORS_NAME} (or {BIN_NAME})")
    finally:
        os.close(dir_fd)
    return into


class Ticket:
    """The race between a registration's commit and its caller giving up (timeout): exactly one
    wins. ``go`` is asked under the store lock just before the commit; ``cancel`` by the caller."""

    def __init__(self):
        self._lock, self.state = threading.Lock(), "waiting"

    def go(self) -> bool:
        with self._lock:
            if self.state == "cancelled":
                return False
            self.state = "committing"
            return True

    def cancel(self) -> bool:
        """True if the registration will commit nothing; False if its commit already started."""
        with self._lock:
            if self.state == "committing":
                return False
            self.state = "cancelled"
            return True


def register(store: str | Path, name: str, lora_path: str, root: str, max_error: float,
             lock_timeout: float | None = None, ticket: Ticket | None = None, generation: str | None = None,
             ) -> Added:
    """Add the adapter at ``lora_path`` to ``store`` under ``name`` (see module docstring).

    generation: the store version the server serves; a store recompressed since is refused (its
    new clusters are not the ones the workers hold)."""
    path = resolve_under_root(lora_path, root)
    manifest = read_manifest(Path(store))
    with tempfile.TemporaryDirectory(prefix="vllm-jd-register-") as tmp:
        copy_under_root(path, root, Path(tmp), manifest, ticket)
        return add_folder(store, name, Path(tmp), str(path), max_error, lock_timeout, ticket, generation, manifest)


def add_folder(store: str | Path, name: str, folder: Path, source: str, max_error: float,
               lock_timeout: float | None = None, ticket: Ticket | None = None, generation: str | None = None,
               manifest=None) -> Added:
    """The adapter in ``folder`` (a private copy, or a fetched source) added to ``store`` under
    ``name`` as ``vllm-jd add`` would, recording ``source``; the store's entry if it already
    holds these exact weights under ``name`` (``already_stored``). manifest: the store's, if the
    caller has just read it."""
    t0 = time.perf_counter()
    manifest = read_manifest(Path(store)) if manifest is None else manifest
    if (stored := already_stored(manifest, name, folder)) is not None:
        return stored
    still_wanted: Callable[[], bool] | None = ticket.go if ticket is not None else None
    [added] = add_named(store, [(name, folder)], max_error, lock_timeout=lock_timeout, still_wanted=still_wanted,
                        sources=[source], generation=generation)
    logger.info("vllm-jd: registered %s from %s: cluster %d (%s), error %.4f, %.3f s", name, source, added.cluster,
                added.kind, added.error, time.perf_counter() - t0)
    return added


def already_stored(manifest, name: str, folder: Path) -> Added | None:
    """The store's (``manifest``'s) entry for ``name`` if it holds exactly the adapter in ``folder``
    (an adapter unloaded from memory and loaded again); None if the name is free; AdapterError if
    the name holds other weights (delete it first: registering over it would change what it serves)."""
    info = manifest.adapters.get(name)
    if info is None:
        return None
    if open_adapter(name, folder).checksum() != info.checksum:
        raise AdapterError(name, "another adapter of this name is in the store; delete it first (`vllm-jd remove`, "
                                 "or unload with --jd-unload-deletes)", folder)
    return Added(name, info.cluster, manifest.clusters[info.cluster].kind, info.error, new=False, block=info.block,
                 row=info.row)


def unregister(store: str | Path, name: str, lock_timeout: float | None = None) -> None:
    """Delete ``name`` from the store's manifest (its tensors stay until ``compact`` or a recompression)."""
    remove_adapters(Path(store), [name], lock_timeout=lock_timeout)
    logger.info("vllm-jd: deleted %s from %s", name, store)


def rollback(store: str | Path, name: str) -> None:
    """Undo a registration the workers could not serve (best effort: logged if it fails too)."""
    try:
        remove_adapters(Path(store), [name])
        logger.warning("vllm-jd: %s was removed from %s again: the workers could not serve it", name, store)
    except (StoreError, OSError) as e:
        logger.error("vllm-jd: %s is in %s but could not be served, and removing it failed: %s", name, store, e)
