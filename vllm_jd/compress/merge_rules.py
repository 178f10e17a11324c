"""Merge rules of Compress-then-Merge: T task coordinate matrices → one matrix.

CtM (``merge.py``) expresses every task's update of a module in one shared basis,
``ΔW^(t) ≈ U O^(t) Vᵀ`` with O^(t) ∈ ℝ^{r×r}, and merges only the coordinates:
``O_merged = 𝓜({O^(t)})`` (paper eq. 6). Every rule here maps O [T, r, r] → O_merged [r, r]
(any [T, a, b] works: the rules see each task's a·b entries as one flat vector). The merge
scaling factor α is applied by the caller, not here.

- **Task arithmetic**: ``Σ_t O^(t)``.
- **TIES** (Yadav et al. 2023): per task, trim to the top-K% of its entries by magnitude;
  elect each entry's sign as the sign of the sum of the trimmed values (an exact tie goes to
  the majority of the elected signs); take the *disjoint mean*: the mean over the tasks whose
  trimmed value is non-zero and agrees with the elected sign. An entry no task agrees with is 0.
  Element-wise, hence sensitive to the basis (a rotation of U, V changes the result; notes
  B.3) — which is why ``merge`` canonicalises its basis before applying a rule.
- **DARE-TIES** (Yu et al. 2024): drop every entry independently with probability p, rescale the
  survivors by 1/(1−p) (so each entry is unbiased), then TIES. p = 0 is TIES exactly.
"""

from __future__ import annotations

import math

import torch

RULES = ("task-arithmetic", "ties", "dare-ties")


def canonical_rule(rule: str) -> str:
    """``rule`` with ``_`` read as ``-``; ValueError naming it if it is not one of ``RULES``."""
    name = rule.strip().lower().replace("_", "-")
    if name not in RULES:
        raise ValueError(f"unknown merge rule {rule!r}: expected one of {', '.join(RULES)}")
    return name


def _check(O: torch.Tensor) -> None:
    if O.dim() != 3 or O.shape[0] < 1:
        raise ValueError(f"expected coordinates O of shape [T ≥ 1, r, r], got {tuple(O.shape)}")


def _check_topk(topk: float) -> None:
    if not (0 < topk <= 100):
        raise ValueError(f"topk must be a percentage in (0, 100], got {topk}")


def task_arithmetic(O: torch.Tensor) -> torch.Tensor:
    """Sum of the task coordinates: O [T, r, r] → [r, r]."""
    _check(O)
    return O.sum(0)


def trim(O: torch.Tensor, topk: float) -> torch.Tensor:
    """Keep each task's top-``topk``% entries by magnitude, zero the rest: [T, r, r] → [T, r, r].

    Each task keeps ``k = ceil(topk/100 · r²)`` entries (at least 1); entries tied with the
    k-th largest magnitude are all kept, as in the reference TIES code (``abs ≥ kth value``).
    """
    _check(O)
    _check_topk(topk)
    flat = O.reshape(O.shape[0], -1)
    n = flat.shape[1]
    k = min(n, max(1, math.ceil(topk / 100 * n)))
    kth = flat.abs().topk(k, dim=1).values[:, -1:]  # k-th largest magnitude per task  [T, 1]
    return torch.where(flat.abs() >= kth, flat, torch.zeros_like(flat)).reshape(O.shape)


def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """Elected sign per entry, [T, r, r] → [r, r] of ±1 (or 0 where nothing can be elected).

    sign(Σ_t trimmed_t); an entry whose sum is exactly 0 takes the majority of the elected signs
    (the reference ``resolve_zero_signs(..., "majority")``).
    """
    sign = torch.sign(trimmed.sum(0))
    majority = torch.sign(sign.sum())
    return torch.where(sign == 0, majority, sign)


def disjoint_mean(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean over the tasks agreeing with ``sign``: trimmed [T, r, r], sign [r, r] → [r, r].

    A task agrees at an entry if its value is non-zero and has the elected sign; an entry with
    no agreeing task is 0 (the count is clamped to 1, as in the reference code).
    """
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    return selected.sum(0) / agree.sum(0).clamp_min(1).to(trimmed.dtype)


def ties(O: torch.Tensor, topk: float) -> torch.Tensor:
    """TIES merge (trim, elect sign, disjoint mean) of O [T, r, r] → [r, r]; topk in (0, 100]."""
    trimmed = trim(O, topk)
    return disjoint_mean(trimmed, elect_sign(trimmed))


def dare(O: torch.Tensor, drop: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Drop each entry with probability ``drop`` and rescale survivors by 1/(1−drop): [T, r, r].

    The mask is drawn on the CPU from ``generator`` so a seed gives the same result everywhere.
    """
    _check(O)
    if not (0 <= drop < 1):
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    if drop == 0:
        return O
    keep = torch.rand(O.shape, generator=generator, dtype=torch.float64) >= drop
    return O * keep.to(O.device, O.dtype) / (1 - drop)


def dare_ties(O: torch.Tensor, topk: float, drop: float, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """DARE then TIES: O [T, r, r] → [r, r]; drop in [0, 1) (0 = TIES), topk in (0, 100]."""
    _check_topk(topk)
    return ties(dare(O, drop, generator), topk)


def apply_rule(rule: str, O: torch.Tensor, topk: float = 25.0, drop: float = 0.05,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the rule named ``rule`` (see ``RULES``) to O [T, r, r] → [r, r]."""
    name = canonical_rule(rule)
    if name == "task-arithmetic":
        return task_arithmetic(O)
    if name == "ties":
        return ties(O, topk)
    return dare_ties(O, topk, drop, generator)
