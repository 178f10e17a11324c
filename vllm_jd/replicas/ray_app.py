"""``vllm-jd serve-ray MODEL --jd-store STORE --replicas N [--clusters-per-replica K]``: Ray Serve replicas.

Two deployments:

- ``JDReplica`` (N replicas): each runs one ``vllm-jd serve`` (the plugin, a resident cluster
  budget of K, the cluster-aware scheduler) on a local port and proxies requests to it. Its
  ``@serve.multiplexed`` loader takes a cluster id: Ray then counts the cluster as held by this
  replica and evicts the least recently used one past K, which releases it (the server's own
  scheduler moves the bases; the lease only tells Ray's router where a cluster lives).
- ``JDIngress`` (one): the OpenAI-compatible API (completions and chat, streaming or not,
  ``/v1/models``, ``/health``). It maps ``model`` → adapter → cluster (``routing.Router``) and
  calls the replicas with that multiplexed model id, so Ray's router gives affinity (requests
  go to the replica holding their cluster), fallback (else the least loaded replica) and
  eviction. The first request of an id is routed alone (``placement``), so a burst of a new
  cluster does not land on several replicas. ``--routing adapter`` uses the adapter as the id
  instead (what Ray Serve LLM does; the benchmark's baseline). Every answer names its replica
  in ``x-vllm-jd-replica``.

The same application for ``serve run`` or a Serve config file: ``app_builder``.

A replica process that dies takes its server's whole process tree with it (``lifetime``); Ray starts a new
replica, and requests that were on it get a 503 (not a hang): the handle raises, the ingress
answers. Not supported here: the admin route and adapter registration while serving (each
replica has its own server; register by recompressing and restarting).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shlex
import signal
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from vllm_jd.replicas.local_server import forward, pump, start_server
from vllm_jd.replicas.placement import FirstPlacement
from vllm_jd.replicas.routing import Router

logger = logging.getLogger(__name__)
REPLICA_HEADER = "x-vllm-jd-replica"
REPLICA_DIR = "VLLM_JD_REPLICA_DIR"
"""If set, each replica writes ``<id>.json`` (its server's port and pids) there."""


class ClusterLease:
    """A multiplexed id held by a replica; Ray drops it (``__del__``) when it evicts the id."""

    def __init__(self, model_id: str, held: set[str]):
        self.model_id, self.held = model_id, held
        held.add(model_id)

    def __del__(self):
        self.held.discard(self.model_id)


class ReplicaBody:
    """What a replica does (``replica_deployment`` adds Ray's deployment and multiplexing, which
    are fixed when the class is defined): runs its own ``vllm-jd serve`` and forwards requests."""

    clusters_per_replica: int | None = None

    def __init__(self, model: str, store: str, server_args: list[str], omp_num_threads: str | None = None):
        # Ray sets OMP_NUM_THREADS=1 in an actor that reserves no CPU; the server is no such
        # actor: it gets the driver's setting, or none and vLLM picks its own thread count.
        if omp_num_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp_num_threads
        self.proc, self.port, self.log = start_server(model, store, self.clusters_per_replica, server_args)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.held: set[str] = set()
        if folder := os.environ.get(REPLICA_DIR):  # where benchmarks find every replica's server
            Path(folder, f"{self.replica_id}.json").write_text(json.dumps(self.info()))

    def __del__(self):
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    async def _lease(self) -> None:
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.hold(model_id)

    async def place(self) -> str:
        """Take the request's multiplexed id (the ingress's first request of an id)."""
        await self._lease()
        return self.replica_id

    def info(self) -> dict:
        return {"replica": self.replica_id, "pid": os.getpid(), "server_pid": self.proc.pid, "port": self.port,
                "held": sorted(self.held)}

    async def call(self, method: str, path: str, body: bytes | None) -> tuple[int, dict, bytes]:
        """One request to the local server: (status, headers, body)."""
        await self._lease()
        status, headers, content = await asyncio.to_thread(forward, self.port, method, path, body)
        return status, {**headers, REPLICA_HEADER: self.replica_id}, content


    async def stream(self, path: str, body: bytes):
        """A streamed request: yields this replica's id first, then the server's SSE bytes."""
        await self._lease()
        yield self.replica_id.encode()
        queue: asyncio.Queue = asyncio.Queue()
        put = functools.partial(asyncio.get_running_loop().call_soon_threadsafe, queue.put_nowait)
        task = asyncio.ensure_future(asyncio.to_thread(pump, self.port, path, body, put))
        while (line := await queue.get()) is not None:
            yield line
        await task


def replica_deployment(clusters_per_replica: int | None, ids_per_replica: int, gpus_per_replica: float = 0,
                       max_ongoing_requests: int = 256):
    """The replica class with Ray's multiplexing cache sized to ``ids_per_replica``
    (``Router.ids_per_replica``; fixed at class definition).

    ``gpus_per_replica`` G > 0 makes Ray place each replica where G GPUs are free and set its
    ``CUDA_VISIBLE_DEVICES`` to them, which its server inherits (give G = the server's
    ``--tensor-parallel-size``); 0 leaves placement to the number of replicas per node and the
    server sees every GPU of its node. ``max_ongoing_requests`` is how many requests a replica
    takes before Ray's router sends a request of a cluster it holds to another replica (which
    then loads that cluster): affinity against load balance.
    """
    cache, per_replica = ids_per_replica, clusters_per_replica

    @serve.deployment(ray_actor_options={"num_cpus": 0, "num_gpus": gpus_per_replica},
                      max_ongoing_requests=max_ongoing_requests)
    class JDReplica(ReplicaBody):
        clusters_per_replica = per_replica

        @serve.multiplexed(max_num_models_per_replica=cache)
        async def hold(self, model_id: str) -> ClusterLease:
            return ClusterLease(model_id, self.held)

    return JDReplica


app = FastAPI()


MATCHING_TIMEOUT_ENV = "RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S"
MATCHING_TIMEOUT_S = "10"
"""How long the ingress's router keeps trying the replica that holds a request's cluster before
it sends the request to any replica (which then loads the cluster). Ray's default, 1 s, is
shorter than routing itself takes on a saturated machine, and cluster loads then grew round
after round (docs/ray.md). A replica that is full (``--max-ongoing-requests``) or dead is
skipped at once anyway."""


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(app)
class JDIngress:
    def __init__(self, replica, store: str, routing: str, model: str, replicas_target: int = 1):
        self.replica, self.router, self.model = replica, Router(store, routing), model
        self.replicas_target = replicas_target
        self.placement = FirstPlacement()

    def _handle(self, model_id: str | None):
        return self.replica.options(multiplexed_model_id=model_id) if model_id else self.replica

    async def _placed_handle(self, model: str | None):
        """The handle for ``model``, once its multiplexed id has a replica (``placement``)."""
        model_id = self.router.model_id(model)
        handle = self._handle(model_id)
        if model_id:
            await self.placement.ensure(model_id, lambda: handle.place.remote())
        return handle

    async def _forward(self, request: Request, path: str) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return JSONResponse({"error": {"message": "the body is not JSON", "code": 400}}, 400)
        try:
            handle = await self._placed_handle(body.get("model"))
            if body.get("stream"):
                gen = handle.options(stream=True).stream.remote(path, raw)
                replica = (await gen.__anext__()).decode()

                async def rest():
                    try:
                        async for chunk in gen:
                            yield chunk
                    except Exception as e:  # noqa: BLE001 - the replica died mid-stream: end the stream
                        logger.warning("vllm-jd: stream from replica %s broke: %s", replica, e)
                return StreamingResponse(rest(), media_type="text/event-stream", headers={REPLICA_HEADER: replica})
            status, headers, content = await handle.call.remote("POST", path, raw)
            return Response(content, status, headers)
        except Exception as e:  # noqa: BLE001 - a dead replica: fail fast with 503, never hang
            logger.warning("vllm-jd: replica call failed: %s", e)
            self.placement.forget()  # the dead replica's ids are to be placed again
            return JSONResponse({"error": {"message": f"replica unavailable: {type(e).__name__}", "code": 503}}, 503)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._forward(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(self) -> Response:
        status, headers, content = await self.replica.call.remote("GET", "/v1/models", None)
        return Response(content, status, headers)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 once a replica can serve, else 503; the body counts the replicas running against
        the target (``{"replicas_running": 1, "replicas_target": 2}`` while one still starts: a
        server start takes 10–60 s, and until the second is up every cluster goes to the first)."""
        running = await asyncio.to_thread(self._replicas_running)
        return JSONResponse({"replicas_running": running, "replicas_target": self.replicas_target},
                            200 if running else 503)

    def _replicas_running(self) -> int:
        """Running replicas of this application's JDReplica deployment, as Serve's controller
        sees them (``serve.status()``)."""
        app_name = serve.get_replica_context().app_name
        deployment = serve.status().applications[app_name].deployments["JDReplica"]
        states = {str(getattr(k, "value", k)): n for k, n in deployment.replica_states.items()}
        return states.get("RUNNING", 0)

    @app.get("/v1/jd/replica")
    async def replica_info(self, model: str | None = None) -> JSONResponse:
        """The replica a request naming ``model`` goes to now (its id, pids, held clusters)."""
        return JSONResponse(await self._handle(self.router.model_id(model)).info.remote())


def build(model: str, store: str, replicas: int = 2, clusters_per_replica: int | None = None,
          routing: str = "cluster", server_args: list[str] | None = None, gpus_per_replica: float = 0,
          max_ongoing_requests: int = 256):
    """The Ray Serve application (``serve.run(build(...))``). Local paths are made absolute:
    replicas may run in another working directory."""
    if replicas < 1:
        raise ValueError(f"--replicas {replicas}: expected ≥ 1")
    if clusters_per_replica is not None and clusters_per_replica < 1:
        raise ValueError(f"--clusters-per-replica {clusters_per_replica}: expected ≥ 1")
    if gpus_per_replica < 0:
        raise ValueError(f"--gpus-per-replica {gpus_per_replica}: expected ≥ 0")
    if max_ongoing_requests < 1:
        raise ValueError(f"--max-ongoing-requests {max_ongoing_requests}: expected ≥ 1")
    store = str(Path(store).resolve())
    model = str(Path(model).resolve()) if Path(model).exists() else model  # else a hub id
    router = Router(store, routing)  # refuses a bad store or routing before any replica starts
    replica = replica_deployment(clusters_per_replica, router.ids_per_replica(clusters_per_replica), gpus_per_replica,
                                 max_ongoing_requests).options(
        num_replicas=replicas).bind(model, store, list(server_args or []), os.environ.get("OMP_NUM_THREADS"))
    ingress = JDIngress.options(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {
        MATCHING_TIMEOUT_ENV: os.environ.get(MATCHING_TIMEOUT_ENV, MATCHING_TIMEOUT_S)}}})
    return ingress.bind(replica, store, routing, model, replicas)


def app_builder(args: dict):
    """``serve run vllm_jd.replicas.ray_app:app_builder model=M jd_store=S replicas=2 ...`` or a
    Serve config file's ``import_path`` (its ``args``): the application ``vllm-jd serve-ray``
    deploys. Keys: ``model``, ``jd_store`` (required), ``replicas``, ``clusters_per_replica``,
    ``routing``, ``gpus_per_replica``, ``max_ongoing_requests``, ``server_args`` (a list, or one
    string split like a shell line: the other ``vllm-jd serve`` arguments)."""
    args = dict(args)
    known = {"model", "jd_store", "replicas", "clusters_per_replica", "routing", "gpus_per_replica",
             "max_ongoing_requests", "server_args"}
    if bad := sorted(set(args) - known):
        raise ValueError(f"unknown argument(s) {bad}: expected {sorted(known)}")
    for key in ("model", "jd_store"):
        if not args.get(key):
            raise ValueError(f"{key}=... is required")
    server_args = args.get("server_args") or []
    if isinstance(server_args, str):
        server_args = shlex.split(server_args)
    # config values may come as strings; a key left out keeps build()'s default
    convert = {"replicas": int, "clusters_per_replica": lambda v: int(v) if v not in (None, "") else None,
               "routing": str, "gpus_per_replica": float, "max_ongoing_requests": int}
    options = {key: convert[key](args[key]) for key in convert if key in args}
    return build(args["model"], args["jd_store"], server_args=[str(a) for a in server_args], **options)


def run(model: str, store: str, replicas: int, clusters_per_replica: int | None, routing: str, host: str, port: int,
        server_args: list[str], block: bool = True, gpus_per_replica: float = 0,
        max_ongoing_requests: int = 256) -> None:
    """Start Ray locally (or join ``RAY_ADDRESS``), deploy, and serve on host:port until interrupted."""
    import ray

    app = build(model, store, replicas, clusters_per_replica, routing, server_args, gpus_per_replica,
                max_ongoing_requests)  # bad values fail before Ray starts
    if not ray.is_initialized():
        # a local Ray only carries requests and answers between actors: a small object store
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                 **({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": max(4, os.cpu_count() or 1),
                                                              "object_store_memory": 256 * 2**20}))
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="vllm-jd", route_prefix="/")
    logger.info("vllm-jd serve-ray: %d replicas on http://%s:%d (routing by %s)", replicas, host, port, routing)
    while block:
        time.sleep(3600)
