"""Fetch an fsspec URL source (``s3://``, ``gs://``, ``az://``, ``file://``, ``memory://``, …) into
vllm-jd's download cache.

The cache is ``$VLLM_JD_CACHE`` (default ``~/.cache/vllm-jd``) ``/sources/<sha256 of the folder
URL>/``, one folder per adapter, fetched under an exclusive lock on ``.lock`` (threads and
processes fetching the same URL take turns; the second finds the files complete). A file is
downloaded to ``<file>.part`` next to a note of the remote file's identity (size, etag, mtime)
and renamed when complete. Where the backend gives an etag or an mtime, a later fetch skips a
complete file whose note matches and resumes a ``.part`` whose note matches (ranged reads from its
length; an MD5 etag, as S3 gives for single-part objects, is checked after a resume); where it
gives neither (plain HTTP), every fetch downloads again, since a size alone cannot tell a retrained
adapter of the same shapes. The cache is trusted like the Hugging Face cache: edit it and you own
what it serves.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path

from vllm_jd.sources.spec import FSSPEC_EXTRAS, Source
from vllm_jd.store.errors import AdapterError

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
CHUNK = 8 << 20
ATTEMPTS = 3
"""Reads per file before giving up; each one resumes where the last stopped."""
_MD5 = re.compile(r"^[0-9a-f]{32}$")


def cache_root() -> Path:
    return Path(os.environ.get("VLLM_JD_CACHE") or Path.home() / ".cache" / "vllm-jd") / "sources"


def filesystem(source: Source):
    """``(fs, path)`` of ``source.url``; ValueError naming the extra to install when fsspec has
    no backend for its scheme."""
    import fsspec

    scheme = source.url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(source.url)
    except ImportError as e:
        extra = FSSPEC_EXTRAS.get(scheme)
        hint = f"pip install 'vllm-jd[{extra}]'" if extra else f"install fsspec's backend for {scheme}://"
        raise ValueError(f"adapter source {source.text!r}: {scheme}:// needs a package that is not installed "
                         f"({e}); {hint}") from None
    except ValueError as e:
        raise ValueError(f"adapter source {source.text!r}: fsspec cannot open {scheme}:// URLs ({e})") from None


def fetch_url(source: Source) -> list[tuple[str, Path, str]]:
    """``(name, local folder, recorded source)`` of each adapter under ``source.url``: the folder
    itself if it has ``adapter_config.json``, else each subfolder that has one (``NAME=`` only
    for the first case). AdapterError naming the source when nothing is there or a read fails."""
    fs, root = filesystem(source)
    name = source.default_name
    try:
        if fs.isfile(f"{root}/{CONFIG}"):
            folders = [root]
        else:  # symlinked folders are listed as "other" by some backends: ask each entry
            subs = [p["name"].rstrip("/") for p in fs.ls(root, detail=True) if p.get("type") != "file"]
            folders = sorted(s for s in subs if fs.isfile(f"{s}/{CONFIG}"))
    except Exception as e:  # noqa: BLE001 - backends raise their own types (botocore, aiohttp, …)
        raise AdapterError(name, f"cannot list it: {e.__class__.__name__}: {e}", source.public) from None
    if not folders:
        raise AdapterError(name, f"no {CONFIG} in the folder or its subfolders", source.public)
    if source.name is not None and folders != [root]:
        raise AdapterError(source.name, f"{source.name}= names one adapter, but {source.public} holds "
                                        f"{len(folders)}", source.public)
    out = []
    for folder in folders:
        leaf = folder.rsplit("/", 1)[-1]
        public = source.public if folder == root else f"{source.public}/{leaf}"
        sub_name = name if folder == root else leaf
        out.append((sub_name, _fetch_folder(fs, folder, public, sub_name), public))
    return out


def _fetch_folder(fs, folder: str, public: str, name: str) -> Path:
    local = cache_root() / hashlib.sha256(public.encode()).hexdigest()[:32]
    local.mkdir(parents=True, exist_ok=True)
    weights = next((w for w in WEIGHTS if fs.isfile(f"{folder}/{w}")), None)
    if weights is None:
        raise AdapterError(name, f"missing {WEIGHTS[0]} (or {WEIGHTS[1]})", public)
    with _locked(local / ".lock"):
        for f in (CONFIG, weights):
            try:
                download(fs, f"{folder}/{f}", local / f)
            except Exception as e:  # noqa: BLE001 - as above
                raise AdapterError(name, f"download of {f} failed: {e.__class__.__name__}: {e}", public) from None
        for stale in (w for w in WEIGHTS if w != weights):
            (local / stale).unlink(missing_ok=True)  # a weights file the source no longer has must not be read
    return local


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _identity(fs, path: str) -> dict:
    info = fs.info(path)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    return {"size": int(info["size"]), "etag": str(info.get("ETag") or info.get("etag") or ""),
            "mtime": str(mtime or "")}


def download(fs, rpath: str, local: Path) -> None:
    """``rpath`` into ``local`` (see the module: resume, skip when unchanged, size verified).
    The caller holds the folder's lock."""
    ident = _identity(fs, rpath)
    note, part = local.with_name(local.name + ".json"), local.with_name(local.name + ".part")
    known = json.loads(note.read_text()) if note.is_file() else None
    trusted = known == ident and bool(ident["etag"] or ident["mtime"])
    if trusted and local.is_file() and local.stat().st_size == ident["size"]:
        return
    local.unlink(missing_ok=True)
    if not trusted or (part.is_file() and part.stat().st_size > ident["size"]):
        part.unlink(missing_ok=True)  # other bytes, or unknowable: start over
        note.write_text(json.dumps(ident))
    resumed = part.is_file() and part.stat().st_size > 0
    for attempt in range(ATTEMPTS):
        try:
            _read_rest(fs, rpath, part)
            break
        except OSError:
            if attempt == ATTEMPTS - 1:
                raise
            resumed = True
    if (got := part.stat().st_size) != ident["size"]:
        part.unlink()
        raise OSError(f"{rpath}: got {got} bytes, the source has {ident['size']}")
    if resumed and _MD5.match(etag := ident["etag"].strip('"')) and _md5(part) != etag:
        part.unlink()
        raise OSError(f"{rpath}: the resumed download does not match the source's MD5 etag; fetch it again")
    os.replace(part, local)


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_rest(fs, rpath: str, part: Path) -> None:
    offset = part.stat().st_size if part.is_file() else 0
    with fs.open(rpath, "rb") as src, open(part, "ab") as dst:
        src.seek(offset)
        while chunk := src.read(CHUNK):
            dst.write(chunk)
