"""Launcher of ``jd_fused_cpu.c``: the whole branch (shrink → sigma → expand) in one C call for
bf16 on x86 CPUs, built with the system's C compiler on first use, once per instruction set.

Why a C kernel: in a server the op's inputs are not in cache (every step brings new adapters,
and each of the model's layers has its own bases), and the torch path's ~10 ops per call each
stream a padded [C, L] grid through memory. The kernel takes a cluster's tokens 16 at a time and
applies shrink, Σ and expand without leaving cache, adding into y in place. Per-ISA costs per
layer call are in docs/measurements.md (``python bench/jd_lora_layer.py``).

Variants (``ISAS``, best first; the best this CPU runs is used, ``VLLM_JD_CPU_ISA`` names one):
``amx`` (AMX-BF16 tiles: Sapphire Rapids and later), ``avx512bf16`` (``vdpbf16ps``: Zen 4,
Cooper Lake), ``avx512`` (AVX-512F FMAs: Skylake-SP, Ice Lake), ``avx2`` (AVX2 + FMA: Zen 2/3,
Haswell and later). Each is built into ``$VLLM_JD_CACHE_DIR`` (default ``~/.cache/vllm_jd``),
named by a hash of the source and flags, and loaded with ctypes (no Python headers; ~1 s to
build). No compiler, none of these ISAs, or ``VLLM_JD_CPU_FUSED=0``: the torch path runs
instead (logged once). The kernel shares its tiles among torch's threads (OpenMP, the runtime
torch itself loaded), so a worker with many threads runs it as wide as its GEMMs.
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
from typing import NamedTuple

import numpy as np
import torch

from vllm_jd import envs
from vllm_jd.kernels.metadata import ClusterOrder

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("jd_fused_cpu.c")
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"]
ISAS = ("amx", "avx512bf16", "avx512", "avx2")
"""The kernel's variants, fastest first."""
_BUILD_FLAGS = {"amx": ["-DJD_AMX", *_AVX512, "-mavx512bf16", "-mamx-tile", "-mamx-bf16"],
                "avx512bf16": [*_AVX512, "-mavx512bf16"], "avx512": _AVX512, "avx2": ["-mavx2", "-mfma"]}
_CPU_FLAGS = {"amx": {"amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx512bw", "avx512vl", "fma"},
              "avx512bf16": {"avx512_bf16", "avx512f", "avx512bw", "avx512vl", "fma"},
              "avx512": {"avx512f", "avx512bw", "avx512vl", "fma"}, "avx2": {"avx2", "fma"}}
RANK_MULTIPLE = {"amx": 16, "avx512bf16": 16, "avx512": 16, "avx2": 16}
"""The rank each variant takes a multiple of: the Σ step's 16 lanes (AMX's expand takes a rank of
16 mod 32 in half tiles)."""
_D_IN_MULTIPLE = {"amx": 32, "avx512bf16": 2, "avx512": 2, "avx2": 2}
_P = ctypes.c_void_p
_I = ctypes.c_int64
ARGTYPES = [_P, _I, _P, _I, _P, _P, _P, ctypes.c_int, _P, _P, _P, _I, _I, _I, _I, _I, _P, ctypes.c_int]
"""``jd_fused_bf16``'s C arguments (see ``jd_fused_cpu`` below for what each is)."""


class Kernel(NamedTuple):
    isa: str
    fn: ctypes._CFuncPtr
    last_team: ctypes._CFuncPtr
    """The number of threads ``fn``'s last call ran its tiles on."""


def cpu_flags() -> set[str]:
    """This CPU's feature flags, from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def choose_isa(flags: set[str], wanted: str, amx_allowed: bool) -> str | None:
    """The variant to run on a CPU with ``flags``: ``wanted`` "auto" → the best it has (not
    ``amx`` unless ``amx_allowed``), "none" → None, a named one → it (ValueError naming what the
    CPU lacks where it cannot run here)."""
    if wanted == "none":
        return None
    if wanted != "auto":
        missing = _CPU_FLAGS[wanted] - flags
        if missing:
            raise ValueError(f"{envs.VLLM_JD_CPU_ISA}={wanted}: this CPU lacks {', '.join(sorted(missing))}")
        return wanted
    return next((isa for isa in ISAS if _CPU_FLAGS[isa] <= flags and (amx_allowed or isa != "amx")), None)


def build(isa: str = "amx", out_dir: Path | None = None, source: Path = _SOURCE) -> Path:
    """Compile variant ``isa`` of the kernel (if not built yet) and return the shared library's path.
    ``source``: another revision of ``jd_fused_cpu.c`` (bench/kernel_ab.py builds a baseline)."""
    src = source.read_bytes()
    cc = os.environ.get("CC", "cc")
    flags = ["-O3", *_BUILD_FLAGS[isa], "-fopenmp", "-shared", "-fPIC"]
    tag = hashlib.sha256(src + " ".join([cc] + flags).encode()).hexdigest()[:16]
    out_dir = out_dir or Path(envs.cache_dir())
    lib = out_dir / f"jd_fused_cpu-{isa}-{tag}.so"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # built aside, renamed: no half-written library
        os.close(fd)
        try:
            subprocess.run([cc, *flags, str(source), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


@functools.cache
def load(isa: str) -> Kernel | None:
    """Variant ``isa``, built and loaded, or None where it cannot run in this process (reason
    logged once). The caller checks the CPU has the ISA (``choose_isa``)."""
    try:
        lib = ctypes.CDLL(str(build(isa)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logger.warning("vllm-jd: could not build the fused CPU kernel (%s): %s", isa, detail[-500:])
        return None
    if lib.jd_isa_ok() != 1:
        logger.warning("vllm-jd: Linux refused this process AMX tiles (arch_prctl)")
        return None
    fn = lib.jd_fused_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = ARGTYPES
    return Kernel(isa, fn, lib.jd_last_team)


def runs_here(isa: str) -> bool:
    """Whether variant ``isa`` runs in this process: the CPU has its instructions and it builds and
    loads (tests and benchmarks that try every variant ask this)."""
    return _CPU_FLAGS[isa] <= cpu_flags() and load(isa) is not None


@functools.cache
def _lib() -> Kernel | None:
    """The variant this process runs (``VLLM_JD_CPU_ISA``, default the best the CPU has; AMX
    refused by Linux → the next best), or None: the torch path (reason logged once)."""
    if not envs.cpu_fused():
        logger.info("vllm-jd: fused CPU kernel off (VLLM_JD_CPU_FUSED=0)")
        return None
    flags, wanted = cpu_flags(), envs.cpu_isa()
    isa = choose_isa(flags, wanted, envs.cpu_amx())
    kernel = load(isa) if isa else None
    if kernel is None and isa == "amx" and wanted == "auto":
        isa = choose_isa(flags, "auto", amx_allowed=False)
        kernel = load(isa) if isa else None
    if kernel is None:
        logger.info("vllm-jd: no fused CPU kernel here (no AVX2/AVX-512, or it did not build); the CPU path uses torch ops")
    else:
        logger.info("vllm-jd: fused CPU kernel: %s", kernel.isa)
    return kernel


def kernel_isa() -> str | None:
    """The variant layers made now take (``ISAS``), or None where the torch path runs."""
    kernel = _lib()
    return kernel.isa if kernel else None


def usable(dtype: torch.dtype, d_in: int, rank: int, widths: list[int], isa: str | None = None) -> bool:
    """Whether variant ``isa`` (default: this process's) can run a layer: bf16, the rank and d_in
    multiples of what the variant takes (``RANK_MULTIPLE``), every slice width a multiple of 16,
    and the kernel built."""
    isa = isa or kernel_isa()
    if isa is None or dtype != torch.bfloat16:
        return False
    return not (d_in % _D_IN_MULTIPLE[isa] or rank % RANK_MULTIPLE[isa] or any(w % 16 for w in widths))


def served_rank(rank: int, dtype: torch.dtype, dims: list[tuple[int, int]]) -> int:
    """The rank to serve a store of ``rank`` at in this process: ``padded_rank`` for its kernel
    variant where one runs, else ``rank``."""
    isa = kernel_isa()
    return rank if isa is None else padded_rank(rank, dtype, dims, isa)


def padded_rank(rank: int, dtype: torch.dtype, dims: list[tuple[int, int]], isa: str) -> int:
    """The next multiple of variant ``isa``'s ``RANK_MULTIPLE`` (16) where only the rank keeps the
    kernel from running a store's layers (dims: (d_in, d_out) of every served module), else
    ``rank``. Zero columns and rows change no product, and the kernel at the padded rank beats
    torch ops at the store's (docs/measurements.md: 2.2× to 2.8× per layer call at 16 → 32 on AMX,
    when AMX took multiples of 32 only)."""
    padded = -(-rank // RANK_MULTIPLE[isa]) * RANK_MULTIPLE[isa]
    if padded == rank:
        return rank
    return padded if all(usable(dtype, d_in, padded, [d_out], isa) for d_in, d_out in dims) else rank


class FusedBases:
    """A layer's bases for kernel variant ``isa``, in the panel layouts every variant reads:
    Vp [C, S·R/16, d_in/2, 16, 2] and Up [C, D/16, R/2, 16, 2]
    (from ``JDLayerWeights``' V_all [d_in, C·S·R] and UT: S tensors [C·R, d_s]), plus the slice
    of every 16 output columns."""

    def __init__(self, V_all: torch.Tensor, UT: list[torch.Tensor], num_clusters: int, rank: int, isa: str):
        self.num_clusters, self.rank, self.isa = num_clusters, rank, isa
        every = slice(None)
        self.Vp = self._v_pairs(V_all, num_clusters, every)
        self.Up = self._u_pairs(UT, num_clusters, rank, every)
        widths = [u.shape[1] for u in UT]
        self.n_slice = np.repeat(np.arange(len(UT), dtype=np.int64), [w // 16 for w in widths])

    @staticmethod
    def _v_pairs(V_all: torch.Tensor, C: int, clusters: slice) -> torch.Tensor:
        """V_all [d_in, C·S·R] → clusters' [n, S·R/16, d_in/2, 16, 2]."""
        d_in = V_all.shape[0]
        return FusedBases._panels(V_all.view(d_in, C, -1)[:, clusters].permute(1, 0, 2))  # of [n, d_in, S·R]

    @staticmethod
    def _u_pairs(UT: list[torch.Tensor], C: int, R: int, clusters: slice) -> torch.Tensor:
        """UT: S tensors [C·R, d_s] → clusters' [n, D/16, R/2, 16, 2]."""
        return FusedBases._panels(torch.cat([ut.view(C, R, -1)[clusters] for ut in UT], 2))  # of [n, R, D]

    @staticmethod
    def _panels(M: torch.Tensor) -> torch.Tensor:
        """[n, K, N] → [n, N/16, K/2, 16, 2]: 16-column panels of row pairs, so that each panel's K
        loop reads one contiguous stream (in the row-pair layout [K/2, N, 2] each pair of rows was
        a 256-byte read N·4 bytes from the last: up to 1.07× slower at decode, docs/measurements.md)."""
        n, K, N = M.shape
        return M.reshape(n, K // 2, 2, N // 16, 16).permute(0, 3, 1, 4, 2).contiguous()

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
    rc = load(bases.isa).fn(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), bases.Vp.data_ptr(), bases.Up.data_ptr(),
                sig.data_ptr(), int(diag), order.tok.ctypes.data, order.row.ctypes.data, order.cstart.ctypes.data,
                bases.num_clusters, x.shape[1], S, R, y.shape[1], bases.n_slice.ctypes.data, torch.get_num_threads())
    if rc == -2:
        raise RuntimeError("jd_fused_cpu: the kernel may not use AMX in this process (arch_prctl refused)")
    if rc != 0:
        raise MemoryError("jd_fused_cpu: could not allocate its workspace")

