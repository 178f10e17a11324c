"""The cluster-aware admission policy, without vLLM: unit cases and a step simulator under
uniform and Zipf popularity (cap, residency preference, FCFS within a cluster, aging bound)."""

from __future__ import annotations

import random

import pytest

from vllm_jd.scheduler.policy import BASE, Request, plan_step


def R(i, cluster, arrival):
    return Request(f"r{i}", cluster, arrival)


def test_prefers_resident_clusters_and_loads_the_next_one():
    waiting = [R(0, 2, 0.0), R(1, 1, 1.0), R(2, BASE, 2.0), R(3, 1, 3.0)]
    p = plan_step(waiting, running={}, resident={1}, loading=set(), max_resident=2, now=4.0, max_wait=100, budget=8)
    assert p.admit == ("r1", "r2", "r3")  # cluster 2 is passed over, base requests always run
    assert p.load == (2,) and p.evict == ()


def test_budget_and_fcfs_within_a_cluster():
    waiting = [R(i, 1, float(10 - i)) for i in range(6)]  # given in reverse arrival order
    p = plan_step(waiting, running={1: 3}, resident={1}, loading=set(), max_resident=1, now=20, max_wait=100, budget=4)
    assert p.admit == ("r5", "r4", "r3", "r2")


def test_never_more_than_k_clusters_and_evicts_idle_ones_first():
    waiting = [R(0, 5, 0.0), R(1, 6, 1.0), R(2, 7, 2.0)]
    # 3 resident of K = 3: cluster 2 is idle with nothing waiting, 3 is busy, 4 idle but wanted later
    waiting.append(R(3, 4, 5.0))
    p = plan_step(waiting, running={3: 2}, resident={2, 3, 4}, loading=set(), max_resident=3, now=6, max_wait=100,
                  budget=8)
    assert p.evict[0] == 2 and p.load[0] == 5
    assert 3 not in p.evict  # busy clusters are never evicted
    assert len(p.load) == len(p.evict) <= 2
    assert "r3" in p.admit and "r0" not in p.admit


def test_admit_on_load_serves_a_loaded_cluster_in_the_same_step():
    waiting = [R(0, 2, 0.0), R(1, 1, 1.0), R(2, 3, 2.0), R(3, 4, 3.0)]
    # K = 3: 1 is resident and busy, 5 is idle with nobody waiting, 6 idle with a request waiting
    waiting.append(R(4, 6, 4.0))
    p = plan_step(waiting, running={1: 1}, resident={1, 5, 6}, loading=set(), max_resident=3, now=5, max_wait=100,
                  budget=8, admit_on_load=True)
    assert p.load == (2,) and p.evict == (5,)  # only the idle cluster nobody waits for makes room
    assert p.admit == ("r0", "r1", "r4")  # the loaded cluster admits at once; 3 and 4 do not fit
    # without admit_on_load the loaded cluster waits a step
    q = plan_step(waiting, running={1: 1}, resident={1, 5, 6}, loading=set(), max_resident=3, now=5, max_wait=100,
                  budget=8)
    assert "r0" not in q.admit


def test_loading_clusters_count_against_k():
    p = plan_step([R(0, 9, 0.0)], running={1: 1}, resident={1}, loading={2}, max_resident=2, now=1, max_wait=100,
                  budget=4)
    assert p.load == () and p.admit == ()


def test_overdue_request_drains_a_busy_cluster():
    waiting = [R(0, 9, 0.0)] + [R(i, 1, 10.0 + i) for i in range(1, 5)] + [R(9, 2, 12.0)]
    p = plan_step(waiting, running={1: 5, 2: 1}, resident={1, 2}, loading=set(), max_resident=2, now=30, max_wait=20,
                  budget=8)
    assert p.drain == (2,)  # fewer running requests: drains first
    assert "r9" not in p.admit and {"r1", "r2", "r3", "r4"} <= set(p.admit)
    # once cluster 2 is idle it is replaced by the overdue request's cluster
    p2 = plan_step(waiting, running={1: 5}, resident={1, 2}, loading=set(), max_resident=2, now=31, max_wait=20,
                   budget=8)
    assert p2.evict == (2,) and p2.load == (9,)


@pytest.mark.parametrize("bad", [dict(max_resident=0), dict(max_wait=0)])
def test_bad_settings(bad):
    kw = dict(max_resident=2, max_wait=10) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        plan_step([], {}, set(), set(), now=0, budget=1, **kw)


def simulate(popularity: str, max_wait: float, clusters=16, k=4, steps=3000, rate=1.6, service=4, load_time=3,
             max_running=8, seed=0, admit_on_load=False, windows=False) -> dict:
    """Discrete-time replay: Poisson-ish arrivals, `service` steps per request, `load_time` per load
    (with ``admit_on_load`` a load completes within the step that admits its requests); with
    ``windows`` requests carry their length and the plan gets the clusters' tails (rule 2)."""
    rng = random.Random(seed)
    if popularity == "uniform":
        weights = [1.0] * clusters
    else:
        alpha = float(popularity.split(":")[1])
        weights = [1 / (c + 1) ** alpha for c in range(clusters)]
    waiting: list[Request] = []
    running: list[tuple[int, int]] = []  # (cluster, finish step)
    resident: set[int] = set()
    loading: dict[int, int] = {}
    admitted_order: dict[int, list[float]] = {}
    waits: list[float] = []
    n = 0
    for t in range(steps):
        running = [(c, f) for c, f in running if f > t]
        for c, ready in list(loading.items()):
            if ready <= t:
                resident.add(c)
                del loading[c]
        counts: dict[int, int] = {}
        for c, _ in running:
            counts[c] = counts.get(c, 0) + 1
        tails: dict[int, int] = {}
        for c, f in running:
            tails[c] = max(tails.get(c, 0), f - t)
        plan = plan_step(waiting, counts, resident, set(loading), k, float(t), max_wait, max_running - len(running),
                         admit_on_load=admit_on_load, tails=tails if windows else None, slack=1)
        for c in plan.evict:
            assert counts.get(c, 0) == 0, "evicted a busy cluster"
            resident.discard(c)
        for c in plan.load:
            if admit_on_load:
                resident.add(c)
            else:
                loading[c] = t + load_time
        assert len(resident | set(loading)) <= k
        by_id = {r.id: r for r in waiting}
        for rid in plan.admit:
            r = by_id[rid]
            assert r.cluster == BASE or r.cluster in resident
            running.append((r.cluster, t + service))
            waits.append(t - r.arrival)
            admitted_order.setdefault(r.cluster, []).append(r.arrival)
        assert len({c for c, _ in running if c != BASE}) <= k
        admitted = set(plan.admit)
        waiting = [r for r in waiting if r.id not in admitted]
        for _ in range(int(rate) + (rng.random() < rate - int(rate))):
            waiting.append(Request(f"q{n}", rng.choices(range(clusters), weights)[0], float(t), service))
            n += 1
    for arrivals in admitted_order.values():
        assert arrivals == sorted(arrivals), "FCFS within a cluster violated"
    waits.sort()
    return {"served": len(waits), "max_wait": waits[-1], "p99_wait": waits[int(0.99 * len(waits))],
            "left": len(waiting)}


@pytest.mark.parametrize("windows", [False, True])
@pytest.mark.parametrize("admit_on_load", [False, True])
@pytest.mark.parametrize("popularity", ["uniform", "zipf:1.0", "zipf:0.3"])
def test_waits_are_bounded_by_aging(popularity, admit_on_load, windows):
    max_wait, service, load_time = 60, 4, 3
    r = simulate(popularity, max_wait, service=service, load_time=load_time, admit_on_load=admit_on_load,
                 windows=windows)
    assert r["served"] > 4000 and r["left"] < 100  # keeps up with the load
    # an overdue request waits at most: max_wait, one drain (running requests finish), one load
    assert r["max_wait"] <= max_wait + service + load_time + 2, r


def test_aging_is_what_bounds_the_tail():
    # 8 arrivals per step, 16 requests/cluster running at once: the 4 Zipf-head clusters are
    # almost never idle, so without aging (max_wait effectively infinite) a tail cluster waits
    # until they happen to be; measured here: 415 steps without aging against 129 with it
    heavy = dict(rate=8, service=8, max_running=128, steps=1500)
    fair = simulate("zipf:1.0", max_wait=40, **heavy)
    unfair = simulate("zipf:1.0", max_wait=10**9, **heavy)
    assert unfair["max_wait"] > 2 * fair["max_wait"], (fair, unfair)
    assert fair["served"] >= unfair["served"]  # and it costs no throughput


# ---- the FCFS baseline (vLLM's max_loras rule applied to clusters) ---------------------------

def test_fcfs_skips_only_what_exceeds_k_and_keeps_arrival_order():
    from vllm_jd.scheduler.policy import plan_fcfs

    waiting = [R(0, 1, 0.0), R(1, 2, 1.0), R(2, 3, 2.0), R(3, 1, 3.0), R(4, BASE, 4.0), R(5, 2, 5.0)]
    p = plan_fcfs(waiting, running={}, resident=set(), max_resident=2, last_used={}, budget=8)
    assert p.admit == ("r0", "r1", "r3", "r4", "r5")  # cluster 3 would be a third: skipped, the rest go on
    assert p.load == (1, 2) and p.evict == ()


def test_fcfs_counts_running_clusters_and_evicts_least_recently_used_idle():
    from vllm_jd.scheduler.policy import plan_fcfs

    waiting = [R(0, 7, 0.0), R(1, 8, 1.0)]
    p = plan_fcfs(waiting, running={3: 2}, resident={3, 4, 5}, max_resident=3, last_used={4: 10.0, 5: 5.0}, budget=8)
    assert p.admit == ("r0", "r1")  # 3 running + 7 + 8 = K
    assert p.load == (7, 8) and p.evict == (5, 4)  # 5 was used longest ago; busy 3 stays
    p = plan_fcfs(waiting, running={3: 1, 4: 1, 5: 1}, resident={3, 4, 5}, max_resident=3, last_used={}, budget=8)
    assert p.admit == () and p.load == () and p.evict == ()
    assert plan_fcfs(waiting, {}, set(), 2, {}, budget=1).admit == ("r0",)


def test_fcfs_step_never_exceeds_k_clusters():
    from vllm_jd.scheduler.policy import plan_fcfs

    rng = random.Random(0)
    waiting = [R(i, rng.randrange(10), float(i)) for i in range(200)]
    running: dict[int, int] = {}
    resident: set[int] = set()
    for _ in range(40):
        p = plan_fcfs(waiting, running, resident, 4, {}, budget=6)
        resident = (resident - set(p.evict)) | set(p.load)
        assert len(resident) <= 4
        admitted = {r.id for r in waiting if r.id in p.admit}
        for r in waiting:
            if r.id in admitted:
                running[r.cluster] = running.get(r.cluster, 0) + 1
        waiting = [r for r in waiting if r.id not in admitted]
        assert {c for c, n in running.items() if n} <= resident
        for c in list(running):  # every running request finishes after one step
            running[c] = 0
