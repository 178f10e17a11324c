"""The vLLM glue: plugin entry point, shared-basis LoRA layers, manager, `vllm-jd serve`.

Only ``patch.py`` changes vLLM's own objects; it checks the vLLM version first.
"""
