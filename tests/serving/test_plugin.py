"""Plugin entry point, version guard, `vllm-jd serve` argument building, bulk model names."""

from __future__ import annotations

import importlib.metadata
import json
import os
import textwrap

import pytest
from conftest import run_python

from vllm_jd.serving.patch import check_vllm_version
from vllm_jd.serving.serve import build_vllm_args


def test_entry_point_is_registered():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "vllm_jd.serving.plugin:register" for ep in eps)


@pytest.mark.parametrize("version", ["0.33.0", "0.31.2", "1.0.0"])
def test_version_guard_refuses_other_vllm(version):
    with pytest.raises(RuntimeError, match=f"supports only vllm==0.32.0, found vllm {version}"):
        check_vllm_version(version)


def test_version_guard_accepts_pinned():
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.0+cpu")
    check_vllm_version()  # the installed one


def test_register_without_store_is_inert():
    code = textwrap.dedent("""
        import sys
        from vllm_jd.serving.plugin import register
        register(); register()
        print("LOADED", "vllm" in sys.modules, "vllm_jd.serving.patch" in sys.modules)
    """)
    proc = run_python(code, {"VLLM_JD_STORE": None})
    assert "LOADED False False" in proc.stdout, proc.stderr


def test_register_with_store_patches_once(serving_store):
    code = textwrap.dedent("""
        from vllm_jd.serving.plugin import register
        register(); register()
        import vllm.v1.worker.lora_model_runner_mixin as mixin
        print("MANAGER", mixin.LRUCacheWorkerLoRAManager.__name__)
    """)
    proc = run_python(code, {"VLLM_JD_STORE": str(serving_store)})
    assert "MANAGER JDWorkerLoRAManager" in proc.stdout, proc.stderr[-2000:]


def test_serve_args(serving_store, adapter_names):
    argv, store = build_vllm_args(["/m", "--jd-store", str(serving_store), "--port", "9000"])
    assert store == serving_store.resolve()
    assert argv[:4] == ["serve", "/m", "--port", "9000"]
    opts = {argv[i]: argv[i + 1] for i in range(5, len(argv) - 1)}
    assert "--enable-lora" in argv and opts["--max-lora-rank"] == "16"
    assert opts["--max-loras"] == opts["--max-num-seqs"] == "256"
    assert int(opts["--max-cpu-loras"]) >= len(adapter_names)
    argv, _ = build_vllm_args(["/m", f"--jd-store={serving_store}", "--max-num-seqs", "8"])
    assert argv[argv.index("--max-loras") + 1] == "8" and argv.count("--max-num-seqs") == 1


def test_serve_without_a_store_serves_the_base_model():
    assert build_vllm_args(["/m", "--port", "9000"]) == (["serve", "/m", "--port", "9000"], None)


@pytest.mark.parametrize("argv, message", [
    (["/m", "--jd-admin"], "--jd-admin needs --jd-store STORE"),
    (["/m", "--jd-max-error", "0.3"], "--jd-max-error needs --jd-store STORE"),
    (["--jd-store", "X"], "usage: vllm-jd serve MODEL"),
    (["/m", "--jd-store", "/nonexistent"], "not a vllm-jd store"),
])
def test_serve_args_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        build_vllm_args(argv)


@pytest.mark.parametrize("flag", ["--lora-modules", "--max-loras"])
def test_serve_refuses_conflicting_flags(serving_store, flag):
    with pytest.raises(ValueError, match=flag):
        build_vllm_args(["/m", "--jd-store", str(serving_store), flag, "a=b"])


def test_ten_thousand_model_names(tmp_path, monkeypatch):
    """Registering a store's adapters is one dict insert each: 10,000 names, unique stable ids."""
    import torch
    from safetensors.torch import save_file
    from vllm.utils.counter import AtomicCounter

    from vllm_jd.serving.patch import register_store_adapters

    (tmp_path / "tensors").mkdir()  # a real store: every name is checked against its tensors first
    save_file({"U.0.m": torch.eye(4, 2), "V.0.m": torch.eye(4, 2), "sigma.0.0.m": torch.ones(10_000, 2, 2)},
              str(tmp_path / "tensors" / "s.safetensors"))
    manifest = {"format": "vllm-jd-store", "format_version": 1, "method": "jd-full", "sigma": "full", "rank": 2,
                "modules": [{"name": "m", "d_in": 4, "d_out": 4}], "clusters": [{"id": 0, "rank": 2, "kind": "shared"}],
                "adapters": {f"a{i}": {"cluster": 0, "block": 0, "row": i, "rank": 8, "lora_params": 64, "checksum": "",
                                       "source": "", "error": 0.0, "module_errors": [0.0]} for i in range(10_000)},
                "weight_map": {k: "tensors/s.safetensors" for k in ("U.0.m", "V.0.m", "sigma.0.0.m")}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("VLLM_JD_STORE", str(tmp_path))

    class Models:
        lora_requests: dict = {}
        lora_id_counter = AtomicCounter(3)

        def is_base_model(self, name):
            return name == "base"

    models = Models()
    assert register_store_adapters(models) == 10_000
    ids = {r.lora_int_id for r in models.lora_requests.values()}
    assert len(ids) == 10_000 and min(ids) == 4 and models.lora_id_counter.inc(0) == 10_003


def test_jd_options_become_environment(serving_store, tmp_path, monkeypatch):
    from vllm_jd.serving.serve_options import jd_environment, split_jd_options

    monkeypatch.setenv("VLLM_PLUGINS", "vllm_jd")  # set by the user: left alone

    ours, rest = split_jd_options(["/m", "--jd-store", str(serving_store), f"--jd-adapter-root={tmp_path}",
                                   "--jd-max-error", "0.3", "--jd-adapter-metrics", "--port", "9000"])
    assert rest == ["/m", "--port", "9000"]
    env = jd_environment(ours)
    assert env == {"VLLM_JD_ADAPTER_ROOT": str(tmp_path.resolve()), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
                   "VLLM_JD_MAX_ERROR": "0.3", "VLLM_JD_ADAPTER_METRICS": "1"}
    # our options never reach vLLM's parser
    argv, _ = build_vllm_args(["/m", "--jd-store", str(serving_store), "--jd-adapter-root", str(tmp_path)])
    assert not any(a.startswith("--jd-") for a in argv)


@pytest.mark.parametrize("opts, message", [
    ({"--jd-adapter-root": "/no/such/dir"}, "not a folder"),
    ({"--jd-max-error": "-1"}, "expected a number > 0"),
    ({"--jd-max-error": "x"}, "expected a number > 0"),
    ({"--jd-spare-adapters": "-3"}, "expected an integer ≥ 0"),
    ({"--jd-max-resident-clusters": "0"}, "expected an integer ≥ 1"),
    ({"--jd-max-wait": "2"}, "add --jd-max-resident-clusters"),
    ({"--jd-max-resident-clusters": "2", "--jd-max-wait": "0"}, "expected seconds > 0"),
    ({"--jd-max-resident-clusters": "2", "--jd-scheduler-policy": "lifo"}, "expected one of cluster, fcfs"),
    ({"--jd-resolve": "hf"}, "needs --jd-resolve-allow"),
    ({"--jd-resolve": "git", "--jd-resolve-allow": "a/*"}, "unknown source kind 'git'"),
    ({"--jd-resolve": "hf", "--jd-resolve-allow": "*"}, "allows every name"),
    ({"--jd-resolve-allow": "a/*"}, "applies to --jd-resolve"),
])
def test_jd_option_errors(opts, message):
    from vllm_jd.serving.serve_options import jd_environment

    with pytest.raises(ValueError, match=message):
        jd_environment(opts)


def test_resolve_options_take_a_list_of_patterns(monkeypatch):
    from vllm_jd.serving.serve_options import jd_environment, split_jd_options

    monkeypatch.setenv("VLLM_PLUGINS", "vllm_jd")
    ours, rest = split_jd_options(["/m", "--jd-resolve", "hf,fs", "--jd-resolve-allow", "myorg/*", "s3://b/a/*",
                                   "--port", "9000", "--jd-resolve-allow=team/*"])
    assert rest == ["/m", "--port", "9000"]
    assert jd_environment(ours) == {"VLLM_JD_RESOLVE": "hf,fs", "VLLM_JD_RESOLVE_ALLOW": "myorg/*\ns3://b/a/*\nteam/*",
                                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    with pytest.raises(ValueError, match="needs at least one value"):
        split_jd_options(["/m", "--jd-resolve-allow", "--port", "1"])


def test_resident_budget_sets_the_scheduler(serving_store, monkeypatch):
    from vllm_jd.serving.serve_options import JD_SCHEDULER_CLS, jd_environment, split_jd_options

    monkeypatch.setenv("VLLM_PLUGINS", "vllm_jd")

    argv = ["/m", "--jd-store", str(serving_store), "--jd-max-resident-clusters", "2", "--jd-max-wait=1.5",
            "--jd-scheduler-policy", "fcfs"]
    assert jd_environment(split_jd_options(argv)[0]) == {
        "VLLM_JD_MAX_RESIDENT_CLUSTERS": "2", "VLLM_JD_MAX_WAIT": "1.5", "VLLM_JD_SCHEDULER_POLICY": "fcfs"}
    vllm_argv, _ = build_vllm_args(argv)
    assert vllm_argv[vllm_argv.index("--scheduler-cls") + 1] == JD_SCHEDULER_CLS
    assert "--scheduler-cls" not in build_vllm_args(["/m", "--jd-store", str(serving_store)])[0]
    with pytest.raises(ValueError, match="needs vllm-jd's scheduler"):
        build_vllm_args([*argv, "--scheduler-cls", "my.Scheduler"])


def test_admin_flag_names_our_endpoint_plugin_without_turning_others_off():
    from vllm_jd.serving.serve_options import admin_plugins, jd_environment

    assert admin_plugins("other") == "other,vllm_jd,vllm_jd_admin"
    assert admin_plugins("vllm_jd_admin,vllm_jd") == "vllm_jd_admin,vllm_jd"
    unset = admin_plugins(None).split(",")
    assert "vllm_jd" in unset and "vllm_jd_admin" in unset  # plus every installed general plugin
    assert "vllm_jd_admin" in jd_environment({"--jd-admin": "1"})["VLLM_PLUGINS"]


def test_no_start_up_noise_about_plugins_or_our_variables(monkeypatch):
    """Unset VLLM_PLUGINS made vLLM warn on every start that it found endpoint plugins it won't
    load; our VLLM_JD_* variables made it warn "Unknown vLLM environment variable"."""
    import vllm.envs as vllm_envs
    from vllm.platforms.interface import Platform

    from vllm_jd.serving.patch import register_env_names
    from vllm_jd.serving.serve_options import general_plugins, jd_environment

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    plugins = jd_environment({})["VLLM_PLUGINS"].split(",")
    assert plugins == general_plugins() and "vllm_jd" in plugins and "vllm_jd_admin" not in plugins
    register_env_names()  # whatever this process set before
    for name in [n for n in os.environ if n.startswith("VLLM_") and n not in vllm_envs.environment_variables]:
        monkeypatch.delenv(name)  # other tests' unknown variables (VLLM_DIST_IDENT, …) are not ours to judge
    monkeypatch.setenv("VLLM_JD_ONLY_IN_THIS_TEST", "2")
    with pytest.raises(ValueError, match="Unknown vLLM environment variable detected: VLLM_JD_ONLY_IN_THIS_TEST"):
        Platform.validate_environ(hard_fail=True)
    register_env_names()
    Platform.validate_environ(hard_fail=True)
    assert vllm_envs.environment_variables["VLLM_JD_ONLY_IN_THIS_TEST"]() == "2"


def test_vllm_jd_runs_on_the_v1_model_runner(monkeypatch):
    """vLLM 0.32 picks Model Runner V2 on CUDA; patch 6 hooks V1, so vllm-jd chooses V1 and refuses an
    explicit V2 instead of silently losing its slot table."""
    from vllm_jd.serving.patch import V2_RUNNER, choose_v1_runner

    monkeypatch.delenv(V2_RUNNER, raising=False)
    choose_v1_runner()
    import vllm.envs as envs

    assert envs.VLLM_USE_V2_MODEL_RUNNER is False
    monkeypatch.setenv(V2_RUNNER, "1")
    with pytest.raises(ValueError, match="V1 model runner only"):
        choose_v1_runner()
    monkeypatch.setenv(V2_RUNNER, "0")
    choose_v1_runner()  # the user's own V1 choice is kept


def test_serve_refuses_an_explicit_v2_runner(serving_store, tmp_path, capsys, monkeypatch):
    from vllm_jd.cli import main as cli

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    for name in ("VLLM_JD_STORE", "VLLM_HTTP_TIMEOUT_KEEP_ALIVE"):  # serve() sets them: undone after the test
        monkeypatch.setenv(name, "")
    assert cli(["serve", str(tmp_path), "--jd-store", str(serving_store)]) == 2
    assert "V1 model runner only" in capsys.readouterr().err
