"""Cluster-aware admission: which waiting requests run next, which cluster bases to move.

A pure function of the queue and the residency state, with no vLLM import (the vLLM scheduler
subclass only translates its queues into ``Request``s and carries out the ``Plan``), so every
rule is tested on its own (``tests/scheduler``).

State: at most ``max_resident`` (K) clusters' bases are on the device, counting those being
loaded. Σ rows of every adapter stay resident, so only the cluster matters. A request can run
only when its cluster is resident (base-model requests, cluster ``BASE``, always can).

Rules, in order of precedence:

1. **Aging.** A request that has waited ``max_wait`` seconds or more is *overdue*. Overdue
   requests go first, oldest first. An overdue request's cluster, if not resident, takes a free
   residency slot, else replaces an idle cluster (which admits nothing this step), else the
   resident cluster with the fewest running requests (ties: the one whose oldest waiting
   request is youngest) is *drained*: no new request of it is admitted, so it becomes idle and
   is replaced. Unless the server is overloaded this bounds every wait by max_wait + one drain
   + one load, however popular the other clusters are (a Zipf head cannot starve the tail).
2. **Residency.** Otherwise requests of resident clusters are admitted in arrival order (FCFS
   overall, so FCFS within a cluster); requests of non-resident clusters are passed over.
   **Windows:** while an overdue request waits for a residency slot, a busy resident cluster
   admits a request (not itself overdue) only if it ends within the cluster's *window*: its
   longest running request's remaining tokens (``tails``) plus ``slack``; such requests ride
   along for free. The first request refused closes the cluster for the step (FCFS within a
   cluster). Without windows a trickle of arrivals keeps a busy cluster busy, so its slot turns
   over only by a drain, one cluster at a time, and every other cluster's queue waits behind it
   (vLLM's rule: only an idle cluster's slot is reused). With them every busy slot turns over
   within one request's length (bench/scheduling_sim.py; docs/measurements.md, "Cluster-aware
   scheduling").
3. **Loading.** Clusters needed by waiting requests and not resident are loaded, the one
   needed by the oldest request first, into free residency slots, then in place of idle
   clusters that no waiting request needs (then idle ones needed least urgently).

At most ``budget`` requests are admitted per call (the free sequence slots of the step).
Because admitted clusters are all resident and residency never exceeds K, a step never holds
more than K distinct clusters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

BASE = -1
"""Cluster id of requests for the base model (no adapter): they need no basis."""
WINDOW_SLACK = 8
"""Tokens past a busy cluster's tail that a new request of it may still run while others wait
(rule 2); the best p99 TTFT of the slacks swept (docs/measurements.md, "Cluster-aware scheduling")."""


@dataclass(frozen=True)
class Request:
    id: str
    cluster: int
    arrival: float
    """Seconds (any monotonic clock shared with ``now``)."""
    tokens: int | None = None
    """Most tokens it may generate (``max_tokens``), so the steps it holds its cluster; None: unknown."""


@dataclass(frozen=True)
class Plan:
    admit: tuple[str, ...]
    """Waiting request ids to schedule now, in order."""
    load: tuple[int, ...]
    """Clusters whose bases to start moving to the device (asynchronously)."""
    evict: tuple[int, ...]
    """Resident clusters to release first (idle: no running request uses them)."""
    drain: tuple[int, ...] = ()
    """Resident clusters that admit nothing new until they are idle (aging)."""


def plan_step(waiting: Iterable[Request], running: dict[int, int], resident: set[int], loading: set[int],
              max_resident: int, now: float, max_wait: float, budget: int, admit_on_load: bool = False,
              tails: dict[int, int] | None = None, slack: int = WINDOW_SLACK) -> Plan:
    """Decide one scheduling step.

    waiting: requests not yet running (any order; sorted by arrival here). running: cluster →
    number of running requests. resident: clusters on the device; loading: clusters being moved
    there (they count against ``max_resident`` but cannot serve yet). budget: most requests to
    admit now. admit_on_load: a cluster loaded by this plan admits requests in this same step
    (the step waits for its copy: right when a copy is short next to a step, as for a cluster's
    bases on CPU, ~1 ms of PCIe on a GPU against a ~25 ms decode step); otherwise it admits from
    the next step on, and its copy overlaps this step. Either way loads are decided first for
    overdue requests; with ``admit_on_load`` the other loads come before admission too, taking
    only free slots and idle clusters that nobody waits for (an idle cluster with waiting
    requests admits them now instead). tails: cluster → most tokens any of its running requests
    may still generate; given, busy clusters admit by the window rule (rule 2) while an overdue
    request waits for a slot; ``slack`` tokens past the tail still fit (a request of 12 joins a
    tail of 10 at slack 2); a request whose ``tokens`` is None never fits.
    """
    if max_resident < 1:
        raise ValueError(f"max_resident must be ≥ 1, got {max_resident}")
    if max_wait <= 0:
        raise ValueError(f"max_wait must be > 0, got {max_wait}")
    queue = sorted(waiting, key=lambda r: (r.arrival, r.id))
    first_wait: dict[int, float] = {}  # cluster → arrival of its oldest waiting request
    for r in queue:
        if r.cluster != BASE:
            first_wait.setdefault(r.cluster, r.arrival)
    overdue = [r for r in queue if now - r.arrival >= max_wait]
    busy = {c for c, n in running.items() if n > 0}
    idle = resident - busy
    free = max_resident - len(resident | loading)
    load, evict, drain, free = _place_overdue(overdue, running, resident, loading, idle, first_wait, free)
    closed = drain | set(evict)
    serving = set(resident)
    if admit_on_load:
        free = _load_before_admission(queue, resident | loading, idle - closed, first_wait, free, load, evict)
        serving |= set(load)

    # 2. admission: overdue first, then FCFS over the requests whose cluster serves now; while an
    #    overdue request waits for a slot, busy clusters admit (overdue requests aside) only within
    #    their window (from as soon as anyone waits: p99 TTFT +10-25% at light load in simulation)
    contended = tails is not None and any(r.cluster not in serving for r in overdue if r.cluster != BASE)
    window = {c: tails.get(c, 0) + slack for c in busy - {BASE}} if contended else {}  # base requests need no slot
    admit = _admit(overdue + queue, budget, serving, closed, window, now, max_wait)
    if not admit_on_load:
        _load_awaited(queue, set(admit), resident | loading, idle, closed, first_wait, free, load, evict)
    return Plan(tuple(admit), tuple(load), tuple(evict), tuple(sorted(drain)))


def _place_overdue(overdue: list[Request], running: dict[int, int], resident: set[int], loading: set[int],
                   idle: set[int], first_wait: dict[int, float], free: int) -> tuple[list, list, set, int]:
    """Rule 1: overdue requests whose cluster is not resident take a free slot, else an idle
    cluster (even one with younger waiting requests: it admits nothing this step), else one busy
    cluster is drained. Returns (load, evict, drain, free slots left)."""
    load: list[int] = []
    evict: list[int] = []
    drain: set[int] = set()
    late = {r.cluster for r in overdue}
    starving = []
    for r in overdue:
        if r.cluster != BASE and r.cluster not in resident | loading and r.cluster not in starving:
            starving.append(r.cluster)
    spare = sorted(idle - late, key=lambda c: (c in first_wait, -first_wait.get(c, 0.0), c))
    for c in starving:
        if free > 0:
            free -= 1
        elif spare:
            evict.append(spare.pop(0))
        else:
            if resident and not (idle & late):
                # every resident cluster is busy: stop feeding one so that it drains and can be
                # replaced; never one with overdue requests of its own (unless all have); the
                # choice is stable from step to step (its running count only falls as it drains)
                drain.add(min(resident, key=lambda c: (c in late, running.get(c, 0),
                                                       -first_wait.get(c, float("inf")), c)))
            break
        load.append(c)
    return load, evict, drain, free


def _load_before_admission(queue: list[Request], present: set[int], open_idle: set[int],
                           first_wait: dict[int, float], free: int, load: list[int], evict: list[int]) -> int:
    """With ``admit_on_load``: every other cluster the queue needs, in arrival order, into free
    slots, then in place of idle clusters nobody waits for (appended to ``load`` / ``evict``).
    Returns the free slots left."""
    unwanted = sorted(c for c in open_idle if c not in first_wait)
    for r in queue:
        c = r.cluster
        if c == BASE or c in present or c in load:
            continue
        if free > 0:
            free -= 1
        elif unwanted:
            evict.append(unwanted.pop(0))
        else:
            break
        load.append(c)
    return free


def _admit(candidates: list[Request], budget: int, serving: set[int], closed: set[int], window: dict[int, int],
           now: float, max_wait: float) -> list[str]:
    """Rule 2: up to ``budget`` request ids, in ``candidates``' order, whose cluster serves now and
    is not closed; a request outside its busy cluster's ``window`` closes the cluster (added to
    ``closed``)."""
    admit: list[str] = []
    seen: set[str] = set()
    for r in candidates:
        if len(admit) >= budget:
            break
        c = r.cluster
        if r.id in seen or not (c == BASE or (c in serving and c not in closed)):
            continue
        if c in window and now - r.arrival < max_wait and (r.tokens is None or r.tokens > window[c]):
            closed.add(c)  # FCFS within a cluster: nothing after a refused request of it either
            continue
        admit.append(r.id)
        seen.add(r.id)
    return admit


def _load_awaited(queue: list[Request], admitted: set[str], present: set[int], idle: set[int], closed: set[int],
                  first_wait: dict[int, float], free: int, load: list[int], evict: list[int]) -> None:
    """Rule 3: other clusters the queue needs, oldest need first: free slots, then idle clusters
    that admitted nothing (those nobody waits for first, then the least urgently awaited);
    appended to ``load`` / ``evict``."""
    admitted_clusters = {r.cluster for r in queue if r.id in admitted}
    evictable = sorted(idle - admitted_clusters - closed, key=lambda c: (c in first_wait, -first_wait.get(c, 0.0), c))
    for r in queue:
        c = r.cluster
        if r.id in admitted or c == BASE or c in present or c in load:
            continue
        if free > 0:
            free -= 1
        elif evictable and (evictable[0] not in first_wait or _more_urgent(c, evictable[0], first_wait)):
            evict.append(evictable.pop(0))
        else:
            break
        load.append(c)


def _more_urgent(c: int, other: int, first_wait: dict[int, float]) -> bool:
    """Replace an idle cluster that still has waiting requests only for an older need."""
    return first_wait.get(c, float("inf")) < first_wait.get(other, float("inf"))


def plan_fcfs(waiting: Iterable[Request], running: dict[int, int], resident: set[int], max_resident: int,
              last_used: dict[int, float], budget: int) -> Plan:
    """The baseline: vLLM's own rule for LoRA slots (``max_loras``), applied to clusters.

    Requests are admitted in arrival order; one is skipped only when its cluster is not among
    the clusters of the running and already admitted requests and those number K already
    (vLLM 0.32 ``Scheduler.schedule``: "Scheduling would exceed max_loras, skip"). The clusters
    it admits are loaded at once (the step waits for them, as vLLM loads an adapter into a
    slot), replacing the least recently used idle clusters (``last_used``: cluster → time).
    No aging, no prefetch, no preference for resident clusters.
    """
    if max_resident < 1:
        raise ValueError(f"max_resident must be ≥ 1, got {max_resident}")
    in_batch = {c for c, n in running.items() if n > 0 and c != BASE}
    admit: list[str] = []
    for r in sorted(waiting, key=lambda r: (r.arrival, r.id)):
        if len(admit) >= budget:
            break
        if r.cluster != BASE and r.cluster not in in_batch:
            if len(in_batch) >= max_resident:
                continue
            in_batch.add(r.cluster)
        admit.append(r.id)
    load = sorted(in_batch - resident)
    free = max_resident - len(resident)
    idle = sorted(resident - in_batch, key=lambda c: (last_used.get(c, float("-inf")), c))
    evict = idle[: max(0, len(load) - free)]
    return Plan(tuple(admit), tuple(load), tuple(evict))
