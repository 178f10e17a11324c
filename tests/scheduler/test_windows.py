"""Rule 2's windows: while an overdue request waits for a slot, a busy cluster admits only
requests that end within its longest running request (plus slack), in FCFS order; and in the
simulated server of bench/scheduling_sim.py they are what cuts the p99 TTFT below vLLM's rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vllm_jd.scheduler.policy import BASE, Request, plan_step

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import scheduling_sim  # noqa: E402


def R(i, cluster, arrival, tokens=None):
    return Request(f"r{i}", cluster, arrival, tokens)


def plan(waiting, running, tails, now=10.0, **kw):
    kw = dict(resident={1, 2}, loading=set(), max_resident=2, max_wait=5.0, budget=16, admit_on_load=True,
              tails=tails, slack=4) | kw
    return plan_step(waiting, running, now=now, **kw)


def test_busy_clusters_admit_only_what_ends_within_their_window():
    # cluster 3 has waited 10 s (overdue) with both slots busy: 2 (fewer running) is drained, and 1
    # admits only requests that end by its tail of 10 tokens + slack 4
    waiting = [R(0, 3, 0.0, 20), R(1, 1, 8.0, 14), R(2, 1, 8.5, 30), R(3, 1, 9.0, 5), R(4, 2, 9.0, 3), R(5, BASE, 9.5, 50)]
    p = plan(waiting, running={1: 3, 2: 1}, tails={1: 10, 2: 5})
    assert p.drain == (2,)
    # r2 would hold cluster 1 for 30 tokens: refused, and r3 behind it too (FCFS within a cluster);
    # base-model requests need no slot and are never held back
    assert p.admit == ("r1", "r5")


def test_running_base_requests_do_not_window_new_ones():
    # the scheduler counts running base-model requests (cluster BASE) like any cluster's
    waiting = [R(0, 3, 0.0, 20), R(1, BASE, 9.0, 50), R(2, 1, 9.0, 30)]
    p = plan(waiting, running={1: 3, 2: 1, BASE: 2}, tails={1: 10, 2: 5, BASE: 3})
    assert p.admit == ("r1",)


def test_no_windows_while_nobody_is_overdue():
    waiting = [R(0, 3, 9.0, 20), R(1, 1, 8.0, 14), R(2, 1, 8.5, 30), R(3, 1, 9.0, 5)]
    p = plan(waiting, running={1: 3, 2: 1}, tails={1: 10, 2: 5})
    assert p.admit == ("r1", "r2", "r3") and p.drain == ()


def test_no_windows_without_tails():
    waiting = [R(0, 3, 0.0, 20), R(1, 1, 8.0, 14), R(2, 1, 8.5, 30)]
    assert plan(waiting, running={1: 3, 2: 1}, tails=None).admit == ("r1", "r2")


def test_overdue_requests_ignore_windows_and_unknown_lengths_never_fit():
    waiting = [R(0, 3, 0.0, 20), R(1, 1, 1.0, 90), R(2, 1, 8.0, None)]
    p = plan(waiting, running={1: 3, 2: 1}, tails={1: 10, 2: 5})
    assert p.admit == ("r1",)  # overdue itself (waited 9 s); r2's length is unknown: it may not fit


def test_a_cluster_loaded_or_idle_admits_freely():
    # overdue cluster 3 replaces idle cluster 2 and admits its long requests at once (it has no
    # tail to keep within); then nobody overdue waits, so busy cluster 1 has no window either
    waiting = [R(0, 3, 0.0, 40), R(1, 3, 6.0, 40), R(2, 1, 8.0, 30)]
    p = plan(waiting, running={1: 2}, tails={1: 10})
    assert p.evict == (2,) and p.load == (3,)
    assert p.admit == ("r0", "r1", "r2")


@pytest.mark.parametrize("popularity", ["uniform", "zipf:1.0", "zipf:0.3"])
def test_windows_cut_the_p99_ttft_in_the_simulated_server(popularity):
    # 60 requests/s against ~46 that 4 resident clusters of 16 sustain (simulated); deterministic
    fcfs, ours, plain = [], [], []
    for seed in range(3):
        jobs = scheduling_sim.workload(popularity, 400, 60.0, 16, seed)
        fcfs.append(scheduling_sim.simulate("fcfs", jobs, k=4, max_wait=0.5))
        ours.append(scheduling_sim.simulate("cluster", jobs, k=4, max_wait=0.5))
        plain.append(scheduling_sim.simulate("cluster-nowindow", jobs, k=4, max_wait=0.5))
    for f, o, n in zip(fcfs, ours, plain, strict=True):
        assert o["p99_ttft_s"] < 0.9 * f["p99_ttft_s"], (o, f)
        assert o["p99_ttft_s"] < n["p99_ttft_s"], (o, n)  # the windows are what does it
        assert o["requests_per_s"] > 0.97 * f["requests_per_s"], (o, f)
    assert sum(o["requests_per_s"] for o in ours) > sum(f["requests_per_s"] for f in fcfs)


def test_the_simulated_server_keeps_the_invariants():
    # every request served once, never more than K clusters in a step, FCFS within a cluster
    jobs = scheduling_sim.workload("zipf:1.0", 300, 80.0, 16, 0)
    for policy in ("fcfs", "cluster", "cluster-nowindow"):
        r = scheduling_sim.simulate(policy, jobs, k=4, max_wait=0.5)
        assert r["served"] == len(jobs) and r["max_clusters_in_a_step"] <= 4
