"""s3:// sources through s3fs against a local S3 emulator (moto's server, in a child process: its
Flask globals must not enter this process, where vLLM's kernel rebinding walks every module):
a bucket folder of adapters fetched, recorded by URL, fetched again from the cache without a
download."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_cache import FILES

from vllm_jd.sources.fetch import fetch_one
from vllm_jd.sources.spec import parse_source

if importlib.util.find_spec("s3fs") is None or importlib.util.find_spec("moto") is None:
    pytest.skip("s3fs and moto[server] are in the test extra; `make setup` installs them", allow_module_level=True)
import s3fs  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def bucket(zoo, monkeypatch):
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert server.poll() is None and time.time() < deadline, "moto_server did not start"
            time.sleep(0.1)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("adapters")
        for a in sorted(zoo.iterdir()):
            for f in FILES:
                fs.pipe(f"adapters/team/{a.name}/{f}", (a / f).read_bytes())
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.terminate()
        server.wait(30)


def test_s3_folder_of_adapters(bucket, zoo, monkeypatch):
    got = fetch_one(parse_source("s3://adapters/team/"))
    assert [(g.name, g.recorded) for g in got] == [(f"adapter-000{i}", f"s3://adapters/team/adapter-000{i}")
                                                  for i in range(3)]
    assert all((g.folder / f).read_bytes() == (zoo / g.name / f).read_bytes() for g in got for f in FILES)
    opened = []
    real = s3fs.S3FileSystem._open
    monkeypatch.setattr(s3fs.S3FileSystem, "_open", lambda self, path, *a, **k: opened.append(path) or
                        real(self, path, *a, **k))
    again = fetch_one(parse_source("s3://adapters/team/adapter-0001"))
    assert again[0].folder == got[1].folder and opened == []  # unchanged (etag, size): nothing downloaded


def test_a_resumed_download_is_checked_against_the_md5_etag(bucket, zoo):
    [f] = fetch_one(parse_source("s3://adapters/team/adapter-0002"))
    weights = f.folder / FILES[1]
    good = weights.read_bytes()
    part = weights.with_name(weights.name + ".part")
    part.write_bytes(b"\0" * (len(good) // 2))  # a partial file of other bytes, its note still matching
    weights.unlink()
    with pytest.raises(ValueError, match="does not match the source's MD5 etag"):
        fetch_one(parse_source("s3://adapters/team/adapter-0002"))
    assert not part.exists() and not weights.exists()
    [g] = fetch_one(parse_source("s3://adapters/team/adapter-0002"))  # the next fetch starts over
    assert (g.folder / FILES[1]).read_bytes() == good
