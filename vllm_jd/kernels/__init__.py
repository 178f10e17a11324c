"""Shared-basis LoRA ops: shrink → sigma → expand.

For T tokens, S output slices (3 for a packed q/k/v layer), C clusters, N adapters, rank R:

- ``jd_shrink``: ``h[t, s] = V[s, c(t)]ᵀ x[t]``                h: [T, S, R]
- ``jd_sigma``:  ``g[t, s] = Σ[s, a(t)] h[t, s]`` (or σ ⊙ h)     g: [T, S, R]
- ``jd_expand``: ``y[t, slice s] += U[s, c(t)] g[t, s]``

``a(t)`` is token t's Σ row (``N`` = the all-zero "no adapter" row) and ``c(t)`` its cluster.
``reference.py`` holds float32 twins (the test oracle); ``torch_ops.py`` the CPU path, which
runs ``jd_fused_cpu.c`` (all three steps in one C call, on AMX, AVX-512 or AVX2, launched by
``jd_fused_cpu.py``) where it can, else torch ops with ``amx.py``'s prepacked GEMMs; ``gpu/``
the Triton kernels.
"""
