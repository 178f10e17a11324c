"""vllm-jd: serve thousands of LoRA adapters through shared bases (``ΔW_i ≈ U_c Σ_i V_cᵀ``).

``import vllm_jd`` stays light: torch and vLLM are imported by the subpackages that need them.
"""

__version__ = "0.1.0"
