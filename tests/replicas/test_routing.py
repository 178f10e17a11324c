"""The multiplexed model id of a request: its adapter's cluster (or the adapter, the baseline)."""

from __future__ import annotations

import pytest

from vllm_jd.cli import main as cli
from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.replicas.routing import Router


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from helpers import TINY_MODULES

    root = tmp_path_factory.mktemp("routing")
    make_adapters(root / "a", 8, TINY_MODULES, rank=4, structure="planted:2", seed=0)
    assert cli(["-q", "compress", str(root / "a"), "--out", str(root / "s"), "--rank", "4", "--clusters", "2"]) == 0
    return root / "s"


def test_cluster_routing_groups_adapters_of_a_cluster(store):
    from vllm_jd.compress.store import read_manifest

    cluster_of = {n: a.cluster for n, a in read_manifest(store).adapters.items()}
    router = Router(str(store))
    ids = {n: router.model_id(n) for n in cluster_of}
    assert len(set(ids.values())) == 2
    for a in cluster_of:
        for b in cluster_of:
            assert (ids[a] == ids[b]) == (cluster_of[a] == cluster_of[b])
    assert router.model_id(None) is None and router.model_id("the-base-model") is None


def test_adapter_routing_and_bad_settings(store):
    router = Router(str(store), "adapter")
    assert [router.model_id(n) for n in router.names()] == router.names()
    with pytest.raises(ValueError, match="routing 'random'"):
        Router(str(store), "random")


def test_both_routings_let_a_replica_hold_the_same_share(store):
    # 8 adapters in 2 clusters: K clusters hold 4·K adapters on average
    assert Router(str(store)).ids_per_replica(1) == 1 and Router(str(store), "adapter").ids_per_replica(1) == 4
    assert Router(str(store), "adapter").ids_per_replica(None) == 1024
    with pytest.raises(ValueError, match="clusters_per_replica 0"):
        Router(str(store)).ids_per_replica(0)
