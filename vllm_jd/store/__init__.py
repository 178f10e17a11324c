"""The on-disk store: ``ΔW_i ≈ U_c Σ_i V_cᵀ`` for every adapter i and adapted module, written once
by ``compress`` / ``add`` and read by the server, ``inspect``, ``export`` and ``fsck``.

- ``format``: the manifest (adapters, clusters, modules), tensor keys and shards, ``TensorReader``;
- ``transaction``: the store lock, staged commits (nothing half-written is ever read), leftovers;
- ``validate``: every tensor and value checked; ``fsck``: a store checked and repaired;
- ``dtypes``: fp32 / bf16 / fp16 / int8 tensors; ``compeft`` and ``ternary_codec``: ComPEFT's
  sparse ternary bases and their Golomb coding;
- ``names``: which adapter names are safe on disk; ``errors``: ``StoreError``, ``AdapterError``.

It imports nothing else of vllm_jd (tests/test_structure.py), so any tool can read a store
without the compression methods, the kernels or vLLM. The format itself: docs/store-format.md.
"""
