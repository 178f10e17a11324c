"""The GPU path, grouped by cluster: shrink (``h = x V_c``) and expand (``y += g U_cᵀ``) run per
tile of one cluster's tokens, so a basis is read once per tile whatever adapters the tokens
use; Σ runs per tile of one adapter's tokens in between.

- ``tiles.py``: the step's tile lists (host, numpy) and their static bounds;
- ``buffers.py``: those lists in static device buffers, written once per step (graph-safe);
- ``config.py``: block sizes and split-K per shape;
- ``jd_triton.py``: the three Triton kernels and ``jd_lora_gpu``;
- ``plan.py``: the byte and tile model of one call (pure, tested on CPU);
- ``selfcheck.py``: the start-up parity check against the float32 twin on the real device.
"""
