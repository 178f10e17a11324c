"""Fetch an fsspec URL source (``s3://``, ``gs://``, ``az://``, ``file://``, ``memory://``, …) into
vllm-jd's download cache.

The cache is ``$VLLM_JD_CACHE`` (default ``~/.cache/vllm-jd``) ``/sources/<sha256 of the folder
URL>/``; a file is downloaded to ``<file>.part`` next to a note of the remote file's identity
(size, etag, mtime) and renamed when complete and of the remote's size. A later fetch resumes
a ``.part`` whose note still matches (ranged reads from its length) and skips a complete file
whose note matches, so a dropped connection or a second run costs only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vllm_jd.sources.spec import FSSPEC_EXTRAS, Source
from vllm_jd.store.errors import AdapterError

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
CHUNK = 8 << 20
ATTEMPTS = 3
"""Reads per file before giving up; each one resumes where the last stopped."""


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
    itself if it has ``adapter_config.json``, else each subfolder that has one. AdapterError
    naming the source when nothing is there or a read fails."""
    fs, root = filesystem(source)
    name = source.default_name
    try:
        if fs.isfile(f"{root}/{CONFIG}"):
            folders = [root]
        else:
            subs = [p["name"] for p in fs.ls(root, detail=True) if p.get("type") == "directory"]
            folders = sorted(s.rstrip("/") for s in subs if fs.isfile(f"{s.rstrip('/')}/{CONFIG}"))
    except Exception as e:  # noqa: BLE001 - backends raise their own types (botocore, aiohttp, …)
        raise AdapterError(name, f"cannot list it: {e.__class__.__name__}: {e}", source.text) from None
    if not folders:
        raise AdapterError(name, f"no {CONFIG} in the folder or its subfolders", source.text)
    out = []
    for folder in folders:
        url = source.url if folder == root else f"{source.url}/{folder.rsplit('/', 1)[-1]}"
        leaf = folder.rsplit("/", 1)[-1]
        sub_name = name if folder == root else f"{source.name}/{leaf}" if source.name else leaf
        out.append((sub_name, _fetch_folder(fs, folder, url, sub_name), url))
    return out


def _fetch_folder(fs, folder: str, url: str, name: str) -> Path:
    local = cache_root() / hashlib.sha256(url.encode()).hexdigest()[:32]
    local.mkdir(parents=True, exist_ok=True)
    weights = next((w for w in WEIGHTS if fs.isfile(f"{folder}/{w}")), None)
    if weights is None:
        raise AdapterError(name, f"missing {WEIGHTS[0]} (or {WEIGHTS[1]})", url)
    for f in (CONFIG, weights):
        try:
            download(fs, f"{folder}/{f}", local / f)
        except Exception as e:  # noqa: BLE001 - as above
            raise AdapterError(name, f"download of {f} failed: {e.__class__.__name__}: {e}", url) from None
    for stale in (w for w in WEIGHTS if w != weights):
        (local / stale).unlink(missing_ok=True)  # a weights file the source no longer has must not be read
    return local


def _identity(fs, path: str) -> dict:
    info = fs.info(path)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    return {"size": int(info["size"]), "etag": str(info.get("ETag") or info.get("etag") or ""),
            "mtime": str(mtime or "")}


def download(fs, rpath: str, local: Path) -> None:
    """``rpath`` into ``local`` (see the module: resume, skip when unchanged, size verified)."""
    ident = _identity(fs, rpath)
    note, part = local.with_name(local.name + ".json"), local.with_name(local.name + ".part")
    known = json.loads(note.read_text()) if note.is_file() else None
    if known == ident and local.is_file() and local.stat().st_size == ident["size"]:
        return
    local.unlink(missing_ok=True)
    if known != ident:
        part.unlink(missing_ok=True)  # a partial file of other bytes: start over
        note.write_text(json.dumps(ident))
    for attempt in range(ATTEMPTS):
        try:
            _read_rest(fs, rpath, part)
            break
        except OSError:
            if attempt == ATTEMPTS - 1:
                raise
    if (got := part.stat().st_size) != ident["size"]:
        raise OSError(f"{rpath}: got {got} bytes, the source has {ident['size']}")
    os.replace(part, local)


def _read_rest(fs, rpath: str, part: Path) -> None:
    offset = part.stat().st_size if part.is_file() else 0
    with fs.open(rpath, "rb") as src, open(part, "ab") as dst:
        src.seek(offset)
        while chunk := src.read(CHUNK):
            dst.write(chunk)
