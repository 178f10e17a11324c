"""The Ray Serve application `vllm-jd serve-ray` deploys, built without starting Ray: replica
count, the multiplexing cache of K clusters, GPU placement, arguments passed through, and bad
values refused before Ray starts (exit 2)."""

from __future__ import annotations

import pytest

from vllm_jd.cli import main as cli

pytest.importorskip("ray.serve")
from vllm_jd.replicas.ray_app import app_builder, build  # noqa: E402


def replica_of(app):
    ingress = app._bound_deployment
    return ingress, ingress.init_args[0]._bound_deployment


def test_build_places_replicas_and_passes_arguments_through(store, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    ingress, replica = replica_of(build("some/hub-model", str(store), replicas=3, clusters_per_replica=4,
                                        server_args=["--dtype", "bfloat16"], gpus_per_replica=2))
    assert replica.num_replicas == 3 and replica.ray_actor_options == {"num_cpus": 0, "num_gpus": 2}
    assert replica.init_args == ("some/hub-model", str(store.resolve()), ["--dtype", "bfloat16"], "3")
    assert ingress.init_args[1:] == (str(store.resolve()), "cluster", "some/hub-model", 3)  # 3: /health's target
    # the ingress's router waits for a cluster's replica longer than Ray's 1 s default
    env = ingress.ray_actor_options["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": "10"}
    monkeypatch.setenv("RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S", "3")  # the user's choice wins
    ingress, _ = replica_of(build("m", str(store)))
    assert ingress.ray_actor_options["runtime_env"]["env_vars"]["RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S"] == "3"


def test_app_builder_for_serve_run_and_config_files(store):
    _, replica = replica_of(app_builder({"model": "m", "jd_store": str(store), "replicas": "2", "routing": "adapter",
                                         "server_args": "--dtype float32 --max-model-len 256"}))
    assert replica.num_replicas == 2 and replica.init_args[2] == ["--dtype", "float32", "--max-model-len", "256"]
    with pytest.raises(ValueError, match="jd_store=... is required"):
        app_builder({"model": "m"})
    with pytest.raises(ValueError, match="unknown argument"):
        app_builder({"model": "m", "jd_store": str(store), "replica": 2})


@pytest.mark.parametrize("flag,value", [("--replicas", "0"), ("--clusters-per-replica", "0"),
                                        ("--gpus-per-replica", "-1"), ("--routing", "random")])
def test_bad_values_exit_2_before_ray_starts(store, flag, value, capsys):
    code = None
    try:
        code = cli(["serve-ray", "m", "--jd-store", str(store), flag, value])
    except SystemExit as e:  # argparse refuses a choice itself
        code = e.code
    assert code == 2
    import ray

    assert not ray.is_initialized()
