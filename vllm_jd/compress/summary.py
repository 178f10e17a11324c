"""What a compress run reports (``Summary``) and the module table of a set of adapters: shared by
the JD pipeline and the ComPEFT store writer, which would otherwise import each other."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vllm_jd.compress.peft_io import PeftAdapter
from vllm_jd.store.errors import AdapterError
from vllm_jd.store.format import Manifest, ModuleInfo


@dataclass
class Summary:
    manifest: Manifest
    seconds: float
    tried: list[tuple[int, int, float]]
    select_seconds: float = 0.0
    """Time to load the reference modules and choose rank, clusters and assignments."""
    module_seconds: list[float] | None = None
    """Time of each module's pass (load, fit every cluster, write its shard)."""
    phase_seconds: dict[str, float] | None = None
    """The module passes split: ``read`` (the adapters' factors), ``fit`` (every cluster's basis
    and errors), ``write`` (store dtypes and the shard)."""


def module_table(adapters: list[PeftAdapter]) -> list[ModuleInfo]:
    """Union of the adapters' modules with their dims; AdapterError if two adapters disagree."""
    seen: dict[str, tuple[int, int, str]] = {}
    for a in adapters:
        for m, s in a.modules.items():
            if m in seen and seen[m][:2] != (s.d_in, s.d_out):
                d_in, d_out, first = seen[m]
                raise AdapterError(a.name, f"module '{m}' maps {s.d_in}→{s.d_out} but adapter '{first}' "
                                           f"has {d_in}→{d_out}", a.path)
            seen.setdefault(m, (s.d_in, s.d_out, a.name))
    return [ModuleInfo(name=m, d_in=v[0], d_out=v[1]) for m, v in sorted(seen.items(), key=lambda kv: _sort_key(kv[0]))]


def _sort_key(module: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", module))
