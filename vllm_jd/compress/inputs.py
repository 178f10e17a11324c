"""The adapters a command was given, wherever they live: local folders (or folders of them), Hub
ids and URLs, on the command line or in a ``--sources`` file. Everything remote is fetched and
every name checked before a store is touched, so a bad source changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_jd.compress.peft_io import discover
from vllm_jd.sources.fetch import DEFAULT_WORKERS, fetch_all
from vllm_jd.sources.spec import parse_source, read_source_list
from vllm_jd.store.errors import AdapterError
from vllm_jd.store.names import name_problem


@dataclass(frozen=True)
class Input:
    """One adapter to read: its name, its local folder and what a store records as its source
    (None: the folder, absolute)."""

    name: str
    folder: Path
    source: str | None = None


def source_texts(adapters: Sequence[str], sources_files: Sequence[str] = ()) -> list[str]:
    """The command line's sources followed by those of each ``--sources FILE``, in order."""
    return [*map(str, adapters), *(s for f in sources_files for s in read_source_list(f))]


def gather(texts: Sequence[str | Path], workers: int = DEFAULT_WORKERS, progress: bool = True) -> list[Input]:
    """Each source of ``texts`` as Inputs (a folder of adapters gives several); remote ones
    fetched ``workers`` at a time. ValueError (AdapterError) naming the source on a missing or
    unfetchable source, a bad or duplicate name, or an empty list."""
    parsed = [parse_source(str(t)) for t in texts]
    remote = [s for s in parsed if s.kind != "local"]
    fetched = iter(fetch_all(remote, workers, progress))
    out: list[Input] = []
    for s in parsed:
        if s.kind != "local":
            out.extend(Input(f.name, f.folder, f.recorded) for f in next(fetched))
            continue
        found = discover([s.path])
        if s.name is not None:
            if len(found) != 1:
                raise AdapterError(s.name, f"{s.name}= names one adapter, but {s.path} holds {len(found)}", s.path)
            found = [(s.name, found[0][1])]
        out.extend(Input(n, p) for n, p in found)
    if not out:
        raise ValueError("no adapters given: pass at least one PEFT adapter folder, Hub id or URL")
    seen: dict[str, Input] = {}
    for i in out:
        if (why := name_problem(i.name)) is not None:
            raise AdapterError(i.name[:80], why, i.source or i.folder)
        if i.name in seen:
            first = seen[i.name]
            raise AdapterError(i.name, f"duplicate adapter name: both {first.source or first.folder} and "
                                       f"{i.source or i.folder} (name one with NAME=SOURCE)", i.folder)
        seen[i.name] = i
    return out
