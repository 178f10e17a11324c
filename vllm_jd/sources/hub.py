"""Fetch a Hugging Face Hub source into the user's HF cache.

Only the adapter files are downloaded (``snapshot_download`` with ``allow_patterns``), first the
configs, then the weights of the adapters found, both at the commit the first call resolved, so
one source is one consistent snapshot. ``huggingface_hub`` itself honours the user's cache
(``HF_HOME`` / ``HF_HUB_CACHE``), token (``HF_TOKEN`` or ``hf auth login``) and resumes partial
files; ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read here at each call (the library reads them
once at import), so a server's environment and the tests' can change them.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm.auto import tqdm

from vllm_jd.sources.spec import Source
from vllm_jd.store.errors import AdapterError

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class _Quiet(tqdm):
    """A disabled bar: one bar per adapter, drawn by ``fetch``, instead of one per file."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def fetch_hub(source: Source) -> list[tuple[str, Path, str]]:
    """``(name, local folder, recorded source)`` of each adapter ``source`` holds: the repo (or
    subfolder) itself if it has ``adapter_config.json``, else each subfolder that has one.
    AdapterError naming the source when the repo, revision or adapter files are missing, the
    download fails, or it is offline and not cached."""
    sub = f"{source.subfolder}/" if source.subfolder else ""
    top = _snapshot(source, source.revision, [f"{sub}{CONFIG}", f"{sub}*/{CONFIG}"])
    commit = top.name  # snapshots/<commit>: the revision the Hub resolved, pinned for the second call
    base = top / source.subfolder if sub else top
    if (base / CONFIG).is_file():
        folders = [base]
    else:
        folders = sorted(p.parent for p in base.glob(f"*/{CONFIG}"))
        if not folders:
            raise AdapterError(source.default_name, f"no {CONFIG} in {source.repo_id}/{sub} or its subfolders "
                                                    f"at revision {commit[:12]}", source.text)
    if source.name is not None and folders != [base]:
        raise AdapterError(source.name, f"{source.name}= names one adapter, but {source.repo_id}/{sub} holds "
                                        f"{len(folders)}", source.text)
    rel = {p: f"{p.relative_to(top).as_posix()}/" if p != top else "" for p in folders}
    _snapshot(source, commit, [f"{r}{WEIGHTS[0]}" for r in rel.values()])
    if lacking := [p for p in folders if not (p / WEIGHTS[0]).is_file()]:  # .bin only where no safetensors
        _snapshot(source, commit, [f"{rel[p]}{WEIGHTS[1]}" for p in lacking])
    if folders == [base]:
        return [(source.default_name, base, source.pinned(commit))]
    out = []
    for p in folders:
        subfolder = p.relative_to(top).as_posix()
        name = f"{source.repo_id}/{subfolder}"
        out.append((name, p, source.pinned(commit, subfolder)))
    return out


def _snapshot(source: Source, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import errors as hf
    from huggingface_hub import snapshot_download

    name = source.default_name
    try:
        return Path(snapshot_download(source.repo_id, revision=revision, allow_patterns=patterns,
                                      endpoint=os.environ.get("HF_ENDPOINT") or None,
                                      local_files_only=offline(), tqdm_class=_Quiet))
    except hf.RepositoryNotFoundError:
        why = f"no Hub repository {source.repo_id} (or it is private or gated: set HF_TOKEN)"
    except hf.RevisionNotFoundError:
        why = f"the Hub repository {source.repo_id} has no revision {revision!r}"
    except hf.LocalEntryNotFoundError:
        why = (f"{source.repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
               if offline() else f"could not reach the Hub for {source.repo_id} (and it is not cached)")
    except Exception as e:  # noqa: BLE001 - any failure of the download (HTTP, TLS, disk) is this source's
        why = f"download failed: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if source.guessed:
        why = f"no such local file or folder, and as a Hugging Face Hub id: {why}"
    raise AdapterError(name, why, source.text)
