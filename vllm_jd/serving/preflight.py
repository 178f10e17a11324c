"""Checks ``vllm-jd serve`` makes before any engine starts: a model vLLM serves no LoRA on, or a
store made for another model, is refused in seconds with one line (exit 2), not after the
engine's start-up with a long traceback.

The model's modules come from transformers on the "meta" device (no weights read, no memory),
under the checkpoint's names, which are the store's names. Where the model cannot be read here
(a Hub id not in the cache, a remote-code model), nothing is refused: vLLM decides as before.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def _hf_config(model: str):
    """The model's transformers config, or None where it cannot be read offline here."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model, local_files_only=True)  # never a download here
    except Exception as e:  # noqa: BLE001 (any failure: leave the decision to vLLM)
        logger.debug("vllm-jd preflight: cannot read %s's config here (%s); vLLM will check it", model, e)
        return None


def lora_support(architectures: list[str]) -> tuple[str, bool] | None:
    """(architecture, whether vLLM's class for it supports LoRA) for the first architecture vLLM
    knows natively, or None (vLLM would pick its Transformers backend, which supports LoRA)."""
    from vllm.model_executor.models.interfaces import supports_lora
    from vllm.model_executor.models.registry import ModelRegistry

    for arch in architectures:
        if arch in ModelRegistry.models and (cls := ModelRegistry._try_load_model_cls(arch)) is not None:
            return arch, bool(supports_lora(cls))
    return None


def linear_shapes(config) -> dict[str, tuple[int, int]] | None:
    """Module name → (d_in, d_out) of every linear layer (``nn.Linear`` and GPT-2's ``Conv1D``)
    of the model ``config`` describes, built on the meta device; None where transformers cannot."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001
        logger.debug("vllm-jd preflight: cannot build %s on the meta device (%s)", type(config).__name__, e)
        return None
    if getattr(model, "_checkpoint_conversion_mapping", None):  # module names differ from the checkpoint's
        return None
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            shapes[name] = tuple(module.weight.shape)  # Conv1D stores [d_in, d_out]
    return shapes


def check(model: str, store_modules: dict[str, tuple[int, int]]) -> None:
    """ValueError (one line) when vLLM serves no LoRA on ``model`` or the store's modules
    (name → (d_in, d_out)) are not the model's; silent where the model cannot be read here."""
    config = _hf_config(model)
    if config is None:
        return
    found = lora_support(list(getattr(config, "architectures", None) or []))
    if found is not None and not found[1]:
        raise ValueError(f"vLLM serves no LoRA on {found[0]} ({model}), so vllm-jd cannot serve adapters on it; "
                         "serve the model without --jd-store, or use a model vLLM supports LoRA for")
    shapes = linear_shapes(config)
    if shapes is None:
        return
    missing = [m for m in store_modules if m not in shapes]
    wrong = [f"{m} {store_modules[m][0]}→{store_modules[m][1]} (model: {shapes[m][0]}→{shapes[m][1]})"
             for m in store_modules if m in shapes and tuple(shapes[m]) != tuple(store_modules[m])]
    if missing or wrong:
        what = (f"{len(missing)} store modules are not in the model, e.g. {', '.join(missing[:3])}" if missing
                else f"{len(wrong)} store modules have other shapes, e.g. {'; '.join(wrong[:2])}")
        raise ValueError(f"the store was built for another model than {model}: {what}")
