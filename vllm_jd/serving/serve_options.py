"""``vllm-jd serve``'s own options (``--jd-*``) and the environment each becomes for vLLM's
processes (read there by ``vllm_jd.envs``); ``serve`` builds vLLM's command line around them.

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

``--jd-resolve hf,fs --jd-resolve-allow PATTERN…`` fetches and registers, on first request, an
unknown model name that is an allowed Hub id or URL (``resolver``, ``sources.allow``).
"""

from __future__ import annotations

import importlib.metadata
import os
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
    VLLM_JD_SCHEDULER_POLICY,
    VLLM_JD_SPARE_ADAPTERS,
    VLLM_JD_UNLOAD_DELETES,
    positive,
)
from vllm_jd.serving.metrics import VLLM_JD_ADAPTER_METRICS


def option_value(args: list[str], name: str) -> str | None:
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
