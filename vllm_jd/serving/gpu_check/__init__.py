"""``vllm-jd gpu-check``: one offline command that proves the GPU path on the machine it runs on.

``prepare.py`` builds a random-weight model, synthetic adapters and their store; ``kernels.py``
checks the Triton kernels on the device (parity, CUDA-graph replay, time against the q/k/v
GEMM); ``engines.py`` runs vLLM engines (served-token parity with vLLM's own LoRA, requests/s);
``main.py`` runs them in order and prints one JSON line per figure. Without CUDA the kernel and
engine throughput parts report themselves skipped, so the rest runs in ``make test``.
"""
