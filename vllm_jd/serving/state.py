"""Per-process serving state shared by the manager (writer) and every layer (readers)."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_jd.kernels.metadata import JDMeta


@dataclass
class JDState:
    """meta: the current step's token → (Σ row, cluster) metadata; None before the first step."""

    meta: JDMeta | None = None
