"""Offline compression of many LoRA adapters into shared bases (paper: *Compress then Serve*).

Notation, used in every module of this package:

- Adapter ``i`` has, per target module ``m``, PEFT factors ``A_i`` (r_i × d_in) and ``B_i``
  (d_out × r_i) and scale ``s_i = lora_alpha / r_i`` (``/ sqrt(r_i)`` with rsLoRA).
  Its update is ``P_i = s_i · B_i A_i``.
- A store keeps, per module and cluster ``c``, a shared basis ``U_c`` (d_out × r) and ``V_c``
  (d_in × r), and per adapter ``Σ_i`` (r × r for JD-Full, a vector of r for JD-Diag and SVD)
  so that ``P_i ≈ U_c Σ_i V_cᵀ``. The scale is folded into ``Σ_i``.
- Serving computes, per token, shrink ``h = V_cᵀ x`` → sigma ``g = Σ_i h`` → expand ``y += U_c g``.

In memory, a module's factors for n adapters are held as ``A`` [n, r_max, d_in] and
``Bt`` [n, r_max, d_out] (``Bt[i] = s_i B_iᵀ``, ranks zero-padded), see ``factors.py``.
"""

from vllm_jd.store.errors import AdapterError, StoreError

__all__ = ["AdapterError", "StoreError"]
