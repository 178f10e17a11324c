"""Which unknown model names a server may fetch and register on first request (pure).

``vllm-jd serve --jd-resolve hf,fs --jd-resolve-allow 'myorg/*' 's3://bucket/adapters/*'``: a
request's ``model`` that is no served name is read as a source (``spec.parse_source``, never as
a local path: a request must not make the server read its own disk) and is resolvable when its
kind is enabled (``hf``: Hub ids; ``fs``: fsspec URLs) and it matches an allowed pattern
(``fnmatch``; ``*`` also crosses ``/``). Everything else is left to vLLM's 404, with no fetch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from vllm_jd.sources.spec import Source, parse_source

KINDS = {"hf": "hub", "fs": "url"}
"""--jd-resolve value → the Source kind it enables."""


def parse_kinds(text: str) -> frozenset[str]:
    """``"hf,fs"`` → the Source kinds enabled; ValueError naming an unknown one or an empty list."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("--jd-resolve: expected hf, fs or hf,fs")
    if bad := [p for p in parts if p not in KINDS]:
        raise ValueError(f"--jd-resolve {text!r}: unknown source kind {bad[0]!r} (expected hf, fs or hf,fs)")
    return frozenset(KINDS[p] for p in parts)


def check_patterns(patterns: Sequence[str], kinds: frozenset[str]) -> None:
    """ValueError unless there is at least one pattern and none allows everything."""
    if not patterns:
        raise ValueError("--jd-resolve needs --jd-resolve-allow PATTERN [PATTERN …] (e.g. 'myorg/*' or "
                         "'s3://bucket/adapters/*'): which model names may be fetched")
    for p in patterns:
        if not p.strip() or p.strip("*/") == "":
            raise ValueError(f"--jd-resolve-allow {p!r}: allows every name; name an organisation, repo or URL prefix")


def resolvable(name: str, kinds: frozenset[str], patterns: Sequence[str]) -> Source | None:
    """The source to fetch for model ``name``, or None (not allowed, or not a Hub id / URL)."""
    if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
        return None
    try:
        source = parse_source(name, exists=lambda _: False)
    except ValueError:
        return None
    if source.kind not in kinds or source.name is not None:  # NAME=… is no model name
        return None
    return source
