"""Store tensor dtypes: how U_c, V_c and Σ_i are written (``--basis-dtype``, ``--sigma-dtype``).

    fp32   as computed (default)
    bf16   8-bit mantissa: relative rounding error ≤ 2⁻⁹ per entry
    fp16   11-bit mantissa, range ±65504 (Σ of a large-norm adapter can overflow: refused)
    int8   symmetric, one float32 scale per channel: q = round(x / s), s = max|x| / 127

int8 channels: a column of U_c [d_out, r] or V_c [d_in, r] (each is a unit vector, so its
entries share one magnitude scale; 4 bytes per column is < 0.1% of a 4096-row column), and a
row of Σ_i ([k, r, r] full → scales [k, r, 1]; [k, r] diag → one scale per adapter [k, 1]).
The scale of key ``K`` is stored as ``K.scale``. Readers get float32 back (``dequantize``);
serving converts once at load to the model dtype, so the GPU kernels see ordinary tensors and
the saving is on disk and in host→device transfer (see docs/commands.md, "Store options: dtypes and ComPEFT").

Because a quantised U_c is no longer exactly orthonormal, the error a store reports for such
a store is computed with ``compress.factors.reconstruction_losses``, which assumes nothing about U and V.
"""

from __future__ import annotations

from typing import Literal

import torch

StoreDtype = Literal["fp32", "bf16", "fp16", "int8"]
STORE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                                        "int8": torch.int8}
SCALE_SUFFIX = ".scale"
_FP16_MAX = 65504.0


def bytes_per_entry(dtype: str) -> int:
    """Bytes of one stored entry of a tensor of store dtype ``dtype`` (scales not included)."""
    return STORE_DTYPES[dtype].itemsize


def encode(key: str, x: torch.Tensor, dtype: str, kind: Literal["basis", "sigma"]) -> dict[str, torch.Tensor]:
    """The stored tensors of ``x`` under ``key``: {key: x in ``dtype``} (+ {key.scale: s} for int8).

    kind "basis": x is U_c or V_c [d, r], one int8 scale per column → scale [1, r].
    kind "sigma": x is Σ rows [k, r, r] or [k, r], one int8 scale per last-dim vector → [k, r, 1] / [k, 1].
    """
    if dtype not in STORE_DTYPES:
        raise ValueError(f"store dtype {dtype!r} is not one of {', '.join(STORE_DTYPES)}")
    x = x.float()
    if dtype == "int8":
        dim = 0 if kind == "basis" else -1
        scale = x.abs().amax(dim=dim, keepdim=True) / 127
        q = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(-127, 127).to(torch.int8)
        return {key: q.contiguous(), key + SCALE_SUFFIX: scale.contiguous()}
    if dtype == "fp16" and x.numel() and float(x.abs().max()) > _FP16_MAX:
        raise ValueError(f"tensor {key} has entries up to {float(x.abs().max()):.3g}, beyond float16's range "
                         f"±{_FP16_MAX:.0f}; use --{kind}-dtype bf16 or fp32")
    return {key: x.to(STORE_DTYPES[dtype]).contiguous()}


def decode(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float32 value of a stored tensor; ``scale`` is its ``.scale`` tensor for int8 (else None)."""
    if x.dtype == torch.int8:
        if scale is None:
            raise ValueError("an int8 store tensor needs its .scale tensor")
        return x.float() * scale.float()
    return x.float()


def roundtrip(x: torch.Tensor, dtype: str, kind: Literal["basis", "sigma"]) -> torch.Tensor:
    """What a reader gets back after ``x`` is stored as ``dtype``: float32, same shape as x."""
    t = encode("x", x, dtype, kind)
    return decode(t["x"], t.get("x" + SCALE_SUFFIX))
