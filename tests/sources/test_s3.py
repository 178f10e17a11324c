"""s3:// sources through s3fs against a local S3 emulator (moto's server): a bucket folder of
adapters fetched, recorded by URL, fetched again from the cache without a download."""

from __future__ import annotations

import pytest
from hub_cache import FILES

s3fs = pytest.importorskip("s3fs", reason="s3fs is in the test extra; `make setup` installs it")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")

from vllm_jd.sources.fetch import fetch_one  # noqa: E402
from vllm_jd.sources.spec import parse_source  # noqa: E402


@pytest.fixture
def bucket(zoo, monkeypatch):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{host}:{port}")
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("adapters")
    for a in sorted(zoo.iterdir()):
        for f in FILES:
            fs.pipe(f"adapters/team/{a.name}/{f}", (a / f).read_bytes())
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


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
