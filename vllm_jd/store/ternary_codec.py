"""Bit encodings of a ComPEFT Ternary τ̃ = c·(pos − neg) (paper §2.2), numpy-vectorised.

Two bit masks ("for computational efficiency"): fp16 c, then packbits(pos), then packbits(neg).
The information payload is exactly ``mask_bits(d) = 2d + 16``; the byte string is
2 + 2·⌈d/8⌉ bytes because each mask is padded (with zero bits) to whole bytes. The masks support
the paper's bit ops directly: ``ternary_dot`` (AND + popcount) and ``hamming`` (XOR + popcount).

Golomb–Rice ("for maximal compression"): the gaps g_i = p_i − p_{i−1} − 1 between nonzero
positions (zeros skipped; p_{−1} = −1, so g_0 = p_0) are geometric with parameter k, and each is
coded with Rice parameter b = b*(nnz/d) (footnote 2): quotient g >> b in unary (that many ones,
then a zero), remainder in b bits MSB-first; then one sign bit per nonzero (1 = negative).
Instead of interleaving per gap, the stream is [all unary codes][all remainders][all signs]: the
same number of bits, but decoding is vectorised — the nnz zero bits of the unary section mark
the code ends, so the quotients are their diffs. ``golomb_bits`` = 16 (c) + that payload, i.e.
the quantity the paper's formula estimates. The byte string adds a 9-byte header beyond c
(b: uint8, nnz: uint64; ``GOLOMB_EXTRA_HEADER_BITS`` = 72) and pads the bit stream once to a byte.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from vllm_jd.store.compeft import Ternary, decode_adapter, golomb_parameter

__all__ = ["mask_bits", "encode_masks", "decode_masks", "golomb_parameter", "golomb_bits",
           "encode_golomb", "decode_golomb", "ternary_dot", "hamming", "GOLOMB_EXTRA_HEADER_BITS"]

_SCALE = struct.Struct("<e")  # fp16 little-endian
_GOLOMB_HEADER = struct.Struct("<eBQ")  # scale, b, nnz
GOLOMB_EXTRA_HEADER_BITS = 8 * (_GOLOMB_HEADER.size - _SCALE.size)
_POPCOUNT_LUT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> int:
    """Total number of set bits in a uint8 array."""
    if hasattr(np, "bitwise_count"):  # numpy ≥ 2.0
        return int(np.bitwise_count(x).sum(dtype=np.int64))
    return int(_POPCOUNT_LUT[x].sum(dtype=np.int64))


def _np_bool(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def mask_bits(d: int) -> int:
    """Information payload of the two-mask encoding: 2 bits per entry + 16 for the fp16 scale."""
    return 2 * d + 16


def encode_masks(t: Ternary) -> bytes:
    """fp16 scale (2 bytes) + packbits(pos) + packbits(neg): 2 + 2·⌈d/8⌉ bytes."""
    return _SCALE.pack(t.scale) + np.packbits(_np_bool(t.pos)).tobytes() + np.packbits(_np_bool(t.neg)).tobytes()


def _split_masks(data: bytes, d: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(scale, packed pos [⌈d/8⌉] uint8, packed neg [⌈d/8⌉] uint8) of a mask payload, checked."""
    nb = (d + 7) // 8
    if d < 0 or len(data) != 2 + 2 * nb:
        raise ValueError(f"mask payload of {len(data)} bytes does not hold d={d} entries "
                         f"(expected {2 + 2 * max(nb, 0)} bytes)")
    raw = np.frombuffer(data, dtype=np.uint8, offset=2)
    pos, neg = raw[:nb], raw[nb:]
    pad = (1 << (8 * nb - d)) - 1  # the low bits of the last byte are padding
    if nb and ((pos[-1] & pad) or (neg[-1] & pad)):
        raise ValueError(f"mask payload has nonzero padding bits beyond d={d}")
    return _SCALE.unpack_from(data)[0], pos, neg


def decode_masks(data: bytes, d: int) -> Ternary:
    """Inverse of encode_masks; ValueError on a wrong length, padding or overlapping masks."""
    scale, pos, neg = _split_masks(data, d)
    unpack = lambda m: torch.from_numpy(np.unpackbits(m, count=d).view(np.bool_))  # noqa: E731
    return Ternary(pos=unpack(pos), neg=unpack(neg), scale=float(scale))


def _rice_parts(t: Ternary) -> tuple[int, np.ndarray, np.ndarray]:
    """(b, idx [nnz] nonzero positions, gaps [nnz] zeros skipped before each), int64."""
    idx = np.flatnonzero(_np_bool(t.pos | t.neg))
    b = golomb_parameter(idx.size / t.d) if idx.size else 0
    return b, idx, np.diff(idx, prepend=-1) - 1


def golomb_bits(t: Ternary) -> int:
    """Exact payload bits of encode_golomb: 16 (scale) + Σ(q_i + 1) + nnz·b + nnz (signs).

    The byte string is 9 header bytes (b, nnz) + 2 + ⌈(golomb_bits − 16)/8⌉ bytes on top.
    """
    b, idx, gaps = _rice_parts(t)
    return 16 + int(((gaps >> b) + 1).sum()) + idx.size * (b + 1)


def encode_golomb(t: Ternary) -> bytes:
    """Header <scale fp16, b uint8, nnz uint64> + packbits([unary q][b-bit remainders][signs])."""
    b, idx, gaps = _rice_parts(t)
    ends = np.cumsum((gaps >> b) + 1)  # the unary code of gap i ends with a 0 at ends[i] − 1
    unary = np.ones(int(ends[-1]) if idx.size else 0, dtype=np.uint8)
    unary[ends - 1] = 0
    shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
    rem = ((gaps[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)  # low b bits, MSB first
    signs = _np_bool(t.neg)[idx].astype(np.uint8)
    bits = np.concatenate([unary, rem, signs])
    return _GOLOMB_HEADER.pack(t.scale, b, idx.size) + np.packbits(bits).tobytes()


def decode_golomb(data: bytes, d: int) -> Ternary:
    """Inverse of encode_golomb for a vector of ``d`` entries; ValueError on malformed data."""
    if len(data) < _GOLOMB_HEADER.size:
        raise ValueError(f"Golomb payload of {len(data)} bytes is shorter than its "
                         f"{_GOLOMB_HEADER.size}-byte header")
    scale, b, nnz = _GOLOMB_HEADER.unpack_from(data)
    if nnz > d or b > 62:
        raise ValueError(f"Golomb header (b={b}, nnz={nnz}) is invalid for d={d}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=_GOLOMB_HEADER.size))
    zeros = np.flatnonzero(bits == 0)[:nnz]  # the first nnz zeros all lie in the unary section
    if zeros.size < nnz:
        raise ValueError(f"Golomb payload of {len(data)} bytes is truncated (nnz={nnz})")
    u_end = int(zeros[-1]) + 1 if nnz else 0
    need = u_end + nnz * (b + 1)
    if not (need <= bits.size < need + 8) or bits[need:].any():
        raise ValueError(f"Golomb payload of {len(data)} bytes does not match b={b}, nnz={nnz}")
    q = np.diff(zeros, prepend=-1) - 1
    rem = bits[u_end:u_end + nnz * b].reshape(nnz, b).astype(np.int64)
    gaps = q << b
    for j in range(b):  # loop over the ≤ 62 bit planes, not over entries
        gaps |= rem[:, j] << (b - 1 - j)
    idx = np.cumsum(gaps + 1) - 1
    if nnz and idx[-1] >= d:
        raise ValueError(f"Golomb payload has a nonzero at position {idx[-1]} ≥ d={d}")
    neg_sign = bits[u_end + nnz * b:need].view(np.bool_)
    pos, neg = np.zeros(d, dtype=np.bool_), np.zeros(d, dtype=np.bool_)
    pos[idx[~neg_sign]] = True
    neg[idx[neg_sign]] = True
    return Ternary(pos=torch.from_numpy(pos), neg=torch.from_numpy(neg), scale=float(scale))


def ternary_dot(a: bytes, b: bytes, d: int) -> int:
    """⟨sgn τ̃_a, sgn τ̃_b⟩ from two mask payloads by AND + popcount (paper §2.2).

    = |a⁺∧b⁺| + |a⁻∧b⁻| − |a⁺∧b⁻| − |a⁻∧b⁺|. Multiply by c_a·c_b for ⟨τ̃_a, τ̃_b⟩.
    """
    _, ap, an = _split_masks(a, d)
    _, bp, bn = _split_masks(b, d)
    return _popcount(ap & bp) + _popcount(an & bn) - _popcount(ap & bn) - _popcount(an & bp)


def hamming(a: bytes, b: bytes, d: int) -> int:
    """Hamming distance of the two 2d-bit mask strings by XOR + popcount, twice (paper §2.2).

    Equals Σ_i |sgn τ̃_a,i − sgn τ̃_b,i| (a +1 vs −1 disagreement counts 2).
    """
    _, ap, an = _split_masks(a, d)
    _, bp, bn = _split_masks(b, d)
    return _popcount(ap ^ bp) + _popcount(an ^ bn)


def decode_bases(payload: torch.Tensor, info, dims: dict[str, tuple[int, int]],
                 rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module → (U [d_out, rank], V [d_in, rank]) float32 of a coded singleton, zero-padded to the
    cluster's rank. info: the cluster's ``store.CompeftInfo`` (ranks, d, encoding; not imported:
    the store format imports this module); dims: module → (d_in, d_out) from the manifest."""
    layout = []
    for m, r in info.ranks.items():
        d_in, d_out = dims[m]
        layout += [(f"{m}.lora_A", (r, d_in)), (f"{m}.lora_B", (d_out, r))]
    layout.sort()  # compeft.flatten concatenates in sorted key order
    data = payload.numpy().tobytes()
    t = decode_golomb(data, info.d) if info.encoding == "golomb" else decode_masks(data, info.d)
    out = {}
    for m, (a, b) in decode_adapter(t, layout).items():
        pad = rank - a.shape[0]
        out[m] = (torch.nn.functional.pad(b, (0, pad)), torch.nn.functional.pad(a.T, (0, pad)))
    return out
