"""Remote sources fetched for real, offline: fsspec's memory:// and file://, an S3 emulator
(moto) through s3fs, and a pre-populated Hugging Face cache with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
import pytest
from hub_cache import COMMIT_ONE, COMMIT_ZOO, FILES

from vllm_jd.compress.inputs import gather
from vllm_jd.sources import remote
from vllm_jd.sources.fetch import fetch_one
from vllm_jd.sources.spec import parse_source
from vllm_jd.store.errors import AdapterError


def put_memory(zoo: Path, prefix: str) -> None:
    fs = fsspec.filesystem("memory")
    for a in sorted(zoo.iterdir()):
        for f in FILES:
            fs.pipe(f"/{prefix}/{a.name}/{f}", (a / f).read_bytes())


def same_files(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in FILES)


def test_memory_folder_of_adapters_and_one_adapter(zoo):
    put_memory(zoo, "m1")
    got = fetch_one(parse_source("memory://m1"))
    assert [f.name for f in got] == ["adapter-0000", "adapter-0001", "adapter-0002"]
    assert all(same_files(f.folder, zoo / f.name) for f in got)
    assert got[1].recorded == "memory://m1/adapter-0001"
    one = fetch_one(parse_source("sql=memory://m1/adapter-0002/"))
    assert [(f.name, f.recorded) for f in one] == [("sql", "memory://m1/adapter-0002")]


def test_file_url_resumes_a_partial_download_and_skips_a_complete_one(zoo, cache):
    url = f"file://{zoo / 'adapter-0001'}"
    [f] = fetch_one(parse_source(url))
    weights = f.folder / FILES[1]
    full = weights.read_bytes()
    # a dropped connection leaves <file>.part and the note of what it is part of
    weights.rename(weights.with_name(weights.name + ".part"))
    part = weights.with_name(weights.name + ".part")
    part.write_bytes(full[: len(full) // 2])
    reads = []
    real_open = fsspec.implementations.local.LocalFileSystem._open

    def spy(self, path, mode="rb", **kw):
        reads.append(path)
        return real_open(self, path, mode, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fsspec.implementations.local.LocalFileSystem, "_open", spy)
        [again] = fetch_one(parse_source(url))
        assert again.folder == f.folder and weights.read_bytes() == full and not part.exists()
        assert [Path(p).name for p in reads] == [FILES[1]]  # the config was complete: not read again
        reads.clear()
        fetch_one(parse_source(url))
        assert reads == []  # both complete and unchanged: nothing read


def test_a_changed_source_file_is_downloaded_again(zoo, tmp_path):
    src = tmp_path / "a"
    shutil.copytree(zoo / "adapter-0000", src)
    [f] = fetch_one(parse_source(f"file://{src}"))
    (f.folder / FILES[1]).with_name(FILES[1] + ".part").write_bytes(b"junk")
    shutil.copy(zoo / "adapter-0001" / FILES[1], src / FILES[1])  # the source changed
    [g] = fetch_one(parse_source(f"file://{src}"))
    assert (g.folder / FILES[1]).read_bytes() == (zoo / "adapter-0001" / FILES[1]).read_bytes()


def test_missing_things_name_the_source(zoo):
    fsspec.filesystem("memory").pipe("/m2/empty/readme.txt", b"x")
    with pytest.raises(AdapterError, match="no adapter_config.json") as e:
        fetch_one(parse_source("memory://m2/empty"))
    assert "memory://m2/empty" in str(e.value)
    fsspec.filesystem("memory").pipe("/m2/noweights/adapter_config.json", b"{}")
    with pytest.raises(AdapterError, match="missing adapter_model.safetensors"):
        fetch_one(parse_source("memory://m2/noweights"))
    with pytest.raises(ValueError, match=r"gs:// needs a package .*pip install 'vllm-jd\[gcs\]'"):
        fetch_one(parse_source("gs://bucket/adapters/a"))


def test_gather_mixes_local_and_remote_and_refuses_duplicate_names(zoo):
    put_memory(zoo, "m3")
    got = gather([str(zoo / "adapter-0000"), "b=memory://m3/adapter-0001"], progress=False)
    assert [(i.name, i.source) for i in got] == [("adapter-0000", None), ("b", "memory://m3/adapter-0001")]
    with pytest.raises(AdapterError, match="duplicate adapter name"):
        gather([str(zoo), "memory://m3"], progress=False)
    with pytest.raises(AdapterError, match="names one adapter"):
        gather([f"x={zoo}"], progress=False)


def test_hub_offline_from_the_cache(hf_cache, zoo):
    [f] = fetch_one(parse_source("acme/sql-lora"))
    assert f.name == "acme/sql-lora" and f.recorded == f"hf://acme/sql-lora@{COMMIT_ONE}"
    assert same_files(f.folder, zoo / "adapter-0000")
    got = fetch_one(parse_source("acme/zoo"))
    assert [(g.name, g.recorded) for g in got] == [
        ("acme/zoo/adapter-0001", f"hf://acme/zoo/adapter-0001@{COMMIT_ZOO}"),
        ("acme/zoo/adapter-0002", f"hf://acme/zoo/adapter-0002@{COMMIT_ZOO}")]
    [sub] = fetch_one(parse_source(f"hf://acme/zoo/adapter-0002@{COMMIT_ZOO}"))  # a recorded source fetches again
    assert sub.name == "acme/zoo/adapter-0002" and same_files(sub.folder, zoo / "adapter-0002")


def test_hub_offline_and_not_cached_says_so(hf_cache):
    with pytest.raises(AdapterError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set") as e:
        fetch_one(parse_source("acme/absent"))
    assert "acme/absent" in str(e.value)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        fetch_one(parse_source("acme/zoo/nothing-here"))


def test_remote_cache_keys_do_not_collide(zoo, cache):
    put_memory(zoo, "m4")
    a = fetch_one(parse_source("memory://m4/adapter-0000"))[0].folder
    b = fetch_one(parse_source("memory://m4/adapter-0001"))[0].folder
    assert a != b and a.parent == b.parent == remote.cache_root()


def test_the_same_url_twice_in_one_command_is_fetched_once_at_a_time(zoo, tmp_path):
    src = tmp_path / "big"
    shutil.copytree(zoo / "adapter-0001", src)
    got = gather([f"a=file://{src}", f"b=file://{src}", f"c=file://{src}"], workers=3, progress=False)
    assert len({i.folder for i in got}) == 1 and same_files(got[0].folder, src)
    assert [p.name for p in got[0].folder.iterdir() if p.suffix == ".part"] == []


def test_without_etag_or_mtime_every_fetch_downloads_again(zoo, tmp_path):
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    shutil.copytree(zoo / "adapter-0002", root / "swap")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_header(self, key, value):
            if key.lower() != "last-modified":  # like a server that tells neither etag nor mtime
                super().send_header(key, value)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/swap"
        [first] = fetch_one(parse_source(url))
        assert same_files(first.folder, zoo / "adapter-0002")
        shutil.copy(zoo / "adapter-0000" / FILES[1], root / "swap" / FILES[1])  # retrained: same shapes, same size
        [again] = fetch_one(parse_source(url))
        assert (again.folder / FILES[1]).read_bytes() == (zoo / "adapter-0000" / FILES[1]).read_bytes()
    finally:
        server.shutdown()


def test_a_name_for_a_folder_of_adapters_is_refused_everywhere(zoo, hf_cache):
    put_memory(zoo, "m5")
    for text in ("x=memory://m5", "x=acme/zoo"):
        with pytest.raises(AdapterError, match="x= names one adapter, but"):
            fetch_one(parse_source(text))
