"""A replica's own ``vllm-jd serve``: started on a free local port, dying with the replica
(``lifetime``), and the HTTP forwarding of requests to it (plain and streamed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from vllm_jd.serving.lifetime import VLLM_JD_DIE_WITH_PARENT, die_with_parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, store: str, clusters_per_replica: int | None, server_args: list[str],
                 timeout: float = 600) -> tuple[subprocess.Popen, int, Path]:
    """Start ``vllm-jd serve`` on a free local port and wait for /health; returns (process, port, log)."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "vllm-jd"), "serve", model, "--jd-store", store,
           "--host", "127.0.0.1", "--port", str(port), *server_args]
    if clusters_per_replica:
        cmd += ["--jd-max-resident-clusters", str(clusters_per_replica)]
    env = {**os.environ, VLLM_JD_DIE_WITH_PARENT: "1"}  # HF_HUB_OFFLINE etc. come from Ray's environment
    env.pop("VLLM_JD_STORE", None)
    log = Path(tempfile.mkstemp(prefix="vllm-jd-replica-", suffix=".log")[1])
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=die_with_parent)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm-jd serve exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc, port, log
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"vllm-jd serve did not start in {timeout:.0f} s; see {log}")


def forward(port: int, method: str, path: str, body: bytes | None) -> tuple[int, dict, bytes]:
    """One request to the replica's local server: (status, headers, body), errors included."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, {"content-type": r.headers.get("content-type", "application/json")}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {"content-type": e.headers.get("content-type", "application/json")}, e.read()


def pump(port: int, path: str, body: bytes, put) -> None:
    """A streamed POST to the local server: ``put`` each chunk of its SSE bytes as it arrives
    (an error's body as one SSE event), then None."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            # whatever has arrived, not line by line: each chunk is one Ray streaming message
            # (an RPC), and a 30-token completion streams ~35 SSE lines
            while chunk := r.read1(65536):
                put(chunk)
    except urllib.error.HTTPError as e:
        put(b"data: " + e.read() + b"\n\n")
    finally:
        put(None)
