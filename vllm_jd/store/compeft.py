"""ComPEFT: sparse ternary compression of one adapter (Yadav et al., arXiv:2311.13171, §2, Alg. 1).

The task vector τ ∈ ℝ^d (for LoRA: the raw A and B parameters of every module concatenated in
sorted key order, as the official code does; not ΔW = BA) becomes

    τ̃ = c · γ̃,   γ̃ = sgn(τ) ⊙ top-k(|τ|),   c = α · σ(τ)

where top-k keeps the fraction k ("density") of entries with the largest magnitude, globally over
the whole vector, and σ is torch's default (unbiased, N−1) std of the *original* τ. Every kept
entry becomes ±c, everything else 0. c is stored in fp16 (the paper's "+16 bits"), so we round it
here once and every encoding reproduces τ̃ bit-exactly.

For LoRA the decoded adapter is still a normal LoRA: A′, B′ ∈ {−c, 0, c} and ΔW′ = B′A′ = c²·T_B T_A.

Count rule: the official ``topk_values_mask`` keeps ``|τ| >= kthvalue(|τ|, d − int(d·k))``, i.e.
int(d·k)+1 entries without ties (kthvalue is 1-indexed); ``rounding="code"`` reproduces that count,
``"exact"`` keeps int(d·k) as the paper's wording says. Ties never add entries here (see compeft).

Sizes (§2.2, footnote 2): the entropy of τ̃ and the expected size of Golomb–Rice coding of the
nonzero positions plus one sign bit each; the bit encodings themselves are in ternary_codec.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

Layout = list[tuple[str, tuple[int, ...]]]
_FP16_TINY = 6.103515625e-05  # smallest normal fp16; below it c loses relative precision


@dataclass
class Ternary:
    """τ̃ = scale · (pos − neg): d entries in {−scale, 0, +scale}.

    pos, neg: bool [d], disjoint. scale: Python float, exactly representable in fp16.
    """

    pos: torch.Tensor
    neg: torch.Tensor
    scale: float

    def __post_init__(self):
        if self.pos.dtype != torch.bool or self.neg.dtype != torch.bool:
            raise ValueError(f"pos/neg must be bool, got {self.pos.dtype}/{self.neg.dtype}")
        if self.pos.dim() != 1 or self.pos.shape != self.neg.shape:
            raise ValueError(f"pos/neg must be 1-D of equal length, got {tuple(self.pos.shape)}"
                             f"/{tuple(self.neg.shape)}")
        if (self.pos & self.neg).any():
            raise ValueError("pos and neg masks overlap; an entry cannot be both +scale and -scale")
        if not math.isfinite(self.scale) or fp16(self.scale) != self.scale:
            raise ValueError(f"scale {self.scale!r} is not a finite fp16 value")

    @property
    def d(self) -> int:
        return self.pos.numel()

    @property
    def nnz(self) -> int:
        """Number of nonzero entries (|pos| + |neg|)."""
        return int(self.pos.sum()) + int(self.neg.sum())

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """τ̃ as a dense [d] tensor of ``dtype`` (exact: ±scale is fp16, hence exact in fp32/64)."""
        return (self.pos.to(dtype) - self.neg.to(dtype)) * self.scale


def fp16(x: float) -> float:
    """x rounded to the nearest fp16 (round-half-even), back as a Python float."""
    return float(np.float16(x))


def check_density(density: float) -> float:
    """Return ``density`` as a float if it is in (0, 1]; ValueError naming it otherwise."""
    try:
        k = float(density)
    except (TypeError, ValueError):
        raise ValueError(f"density {density!r} is not a number in (0, 1]") from None
    if not (0.0 < k <= 1.0):  # also rejects NaN
        hint = f"; pass {k / 100:g} for {k:g}%" if 1.0 < k <= 100.0 else ""
        raise ValueError(f"density {density!r} is not in (0, 1]{hint}")
    return k


def keep_count(d: int, density: float, rounding: str = "code") -> int:
    """Entries kept out of ``d`` at ``density``: int(d·k)+1 ("code") or int(d·k) ("exact"), ≤ d."""
    k = check_density(density)
    if d < 0:
        raise ValueError(f"d {d!r} is negative")
    if rounding == "code":
        n = int(d * k) + 1
    elif rounding == "exact":
        n = int(d * k)
    else:
        raise ValueError(f"rounding {rounding!r} is not 'code' or 'exact'")
    return min(n, d)


def compeft(tau: torch.Tensor, density: float, alpha: float, rounding: str = "code") -> Ternary:
    """Algorithm 1 on a flat task vector ``tau`` [d] → Ternary with ``keep_count(d, density)`` kept.

    Exactly that many entries are kept: the n-th largest |τ| is found with kthvalue, entries above
    it are kept and ties at it are filled in index order (lowest first), so the result is
    deterministic and every kept magnitude ≥ every dropped one (the official code's assert).
    A kept entry that is exactly 0 has sign 0 and lands in neither mask (nnz may then be < n).
    scale = fp16(α · std(τ)), std unbiased in float64; for d ≤ 1 std is taken as 0 (torch: NaN).
    """
    if tau.dim() != 1:
        raise ValueError(f"tau must be a flat [d] vector, got shape {tuple(tau.shape)}")
    try:
        ok = math.isfinite(float(alpha)) and float(alpha) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"alpha {alpha!r} must be a finite number > 0")
    alpha = float(alpha)
    d = tau.numel()
    n = keep_count(d, density, rounding)
    x = tau.detach().cpu()
    x = x if x.is_floating_point() else x.to(torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("tau has NaN or Inf entries")
    std = float(x.double().std()) if d > 1 else 0.0  # float64 temporary only for the sum
    scale = fp16(alpha * std)
    if not math.isfinite(scale):
        raise ValueError(f"alpha·std = {alpha * std!r} overflows fp16 (max 65504)")
    if 0 < scale < _FP16_TINY:
        logger.warning("ComPEFT scale %.3g is subnormal in fp16 (stored as %.3g)", alpha * std, scale)
    mag = x.abs()  # exact in any float dtype, so the ranking is that of |τ|
    if n == d:
        keep = torch.ones(d, dtype=torch.bool)
    elif n == 0:
        keep = torch.zeros(d, dtype=torch.bool)
    else:
        thr = torch.kthvalue(mag, d - n + 1).values  # n-th largest magnitude
        keep = mag > thr  # fewer than n entries
        ties = (mag == thr).nonzero().squeeze(1)
        keep[ties[: n - int(keep.sum())]] = True
    t = Ternary(pos=keep & (x > 0), neg=keep & (x < 0), scale=scale)
    logger.debug("ComPEFT: d=%d kept=%d nnz=%d std=%.4g scale=%.4g", d, n, t.nnz, std, scale)
    return t


def flatten(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Layout]:
    """Concatenate tensors in sorted key order into one float32 [Σ numel] vector (+ its layout)."""
    layout = [(key, tuple(tensors[key].shape)) for key in sorted(tensors)]
    parts = [tensors[key].detach().to("cpu", torch.float32).reshape(-1) for key, _ in layout]
    flat = torch.cat(parts) if parts else torch.zeros(0)
    return flat, layout


def unflatten(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Inverse of flatten: split ``flat`` [d] into tensors with the shapes in ``layout``."""
    sizes = [math.prod(shape) for _, shape in layout]
    if flat.dim() != 1 or flat.numel() != sum(sizes):
        raise ValueError(f"flat vector of shape {tuple(flat.shape)} does not match the layout's "
                         f"{sum(sizes)} entries")
    return {key: part.reshape(shape) for (key, shape), part in zip(layout, flat.split(sizes), strict=True)}


def compeft_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], density: float,
                    alpha: float, rounding: str = "code") -> tuple[Ternary, Layout]:
    """ComPEFT of a whole LoRA adapter: one global top-k and one σ over all raw factors.

    factors: module → (lora_A [r, d_in], lora_B [d_out, r]) as stored in the PEFT file (B not
    transposed, LoRA scale s = lora_alpha/r NOT folded in: ComPEFT compresses the parameters).
    Flat keys are f"{module}.lora_A" / f"{module}.lora_B".
    """
    tensors = {}
    for module, (a, b) in factors.items():
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"module '{module}': lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                             "are not [r, d_in] and [d_out, r]")
        tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = a, b
    flat, layout = flatten(tensors)
    return compeft(flat, density, alpha, rounding), layout


def decode_adapter(t: Ternary, layout: Layout) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module → (A′ [r, d_in], B′ [d_out, r]) float32 with entries in {−c, 0, c}."""
    parts = unflatten(t.dense(torch.float32), layout)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in parts:
        module, _, which = key.rpartition(".")
        if which == "lora_A":
            out[module] = (parts[key], parts[f"{module}.lora_B"])
        elif which != "lora_B":
            raise ValueError(f"layout key '{key}' is not '<module>.lora_A' or '<module>.lora_B'")
    return out


def entropy_bits(d: int, density: float) -> float:
    """Paper §2.2: −((1−k)log2(1−k) + k·log2(k/2))·d + 16 bits (uniform signs; 0·log 0 = 0)."""
    k = check_density(density)
    h = -((1 - k) * math.log2(1 - k) if k < 1 else 0.0) - k * math.log2(k / 2)
    return h * d + 16


def golomb_parameter(density: float) -> int:
    """Rice parameter b* = 1 + ⌊log2(log(φ−1) / log(1−p))⌋, clamped ≥ 0 (footnote 2, p = density)."""
    p = check_density(density)
    if p == 1.0:
        return 0
    phi = (math.sqrt(5) + 1) / 2
    return max(0, 1 + math.floor(math.log2(math.log(phi - 1) / math.log1p(-p))))


def golomb_expected_bits(d: int, density: float) -> float:
    """Footnote 2: k·d·(b̄_pos + 1) + 16, b̄_pos = b* + 1/(1 − (1−p)^(2^b*)) (+1 = sign bit)."""
    p = check_density(density)
    b = golomb_parameter(p)
    b_pos = b + 1 / (1 - (1 - p) ** (2 ** b))
    return p * d * (b_pos + 1) + 16
