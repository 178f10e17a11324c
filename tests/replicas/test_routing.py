"""The multiplexed model id of a request: its adapter's cluster (or the adapter, the baseline)."""

from __future__ import annotations

import pytest

from vllm_jd.replicas.routing import Router


def test_cluster_routing_groups_adapters_of_a_cluster(store):
    from vllm_jd.store.format import read_manifest

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
