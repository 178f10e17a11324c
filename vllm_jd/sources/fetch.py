"""Fetch many sources at once: bounded parallel downloads, one progress bar, errors naming the
source. Local sources pass through untouched (their folders are read where they are)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from vllm_jd.sources.spec import Source, parse_source

logger = logging.getLogger(__name__)
DEFAULT_WORKERS = 8
"""Parallel fetches: enough to hide per-request latency, few enough not to trip a Hub's or a
bucket's rate limit."""


@dataclass(frozen=True)
class Fetched:
    """One adapter of a remote source, on local disk. ``recorded``: what a store records as its
    source (a Hub source pinned to its commit, a URL as given)."""

    name: str
    folder: Path
    recorded: str


def fetch_one(source: Source) -> list[Fetched]:
    """The adapters of one remote (hub or url) source, downloaded (see ``hub`` and ``remote``)."""
    if source.kind == "hub":
        from vllm_jd.sources.hub import fetch_hub as get
    elif source.kind == "url":
        from vllm_jd.sources.remote import fetch_url as get
    else:
        raise ValueError(f"{source.text!r} is a local path, not a remote source")
    return [Fetched(n, p, r) for n, p, r in get(source)]


def fetch_all(sources: Sequence[Source], workers: int = DEFAULT_WORKERS, progress: bool = True,
              tolerate: bool = False) -> list[list[Fetched]]:
    """``fetch_one`` of each remote source, in order, ``workers`` at a time. The first failure
    (in source order) is raised once every started fetch has ended, so a partial download is
    left resumable, never half-written; ``tolerate``: a failed source gives ``[]`` instead."""
    if workers < 1:
        raise ValueError(f"fetch workers must be ≥ 1, got {workers}")
    if not sources:
        return []
    results: list[list[Fetched] | BaseException | None] = [None] * len(sources)
    bar = tqdm(total=len(sources), desc="fetching adapters", unit="source", disable=not progress or len(sources) < 2)

    def run(i: int) -> None:
        try:
            results[i] = fetch_one(sources[i])
        except (ValueError, OSError) as e:
            results[i] = e
        bar.update(1)

    with ThreadPoolExecutor(max_workers=min(workers, len(sources)), thread_name_prefix="vllm-jd-fetch") as pool:
        list(pool.map(run, range(len(sources))))
    bar.close()
    for i, r in enumerate(results):
        if isinstance(r, BaseException):
            if not tolerate:
                raise r
            logger.info("could not fetch %s: %s", sources[i].text, r)
            results[i] = []
    return results  # type: ignore[return-value]


def parse_all(texts: Sequence[str]) -> list[Source]:
    """Every source parsed; ValueError on the first one that names nothing."""
    return [parse_source(str(t)) for t in texts]
