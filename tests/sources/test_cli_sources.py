"""`vllm-jd compress` / `add` / `compress --from-store` with Hub ids, URLs and --sources files
(offline: a pre-populated Hugging Face cache and fsspec's memory://)."""

from __future__ import annotations

import shutil

import fsspec
import pytest
from helpers import tree_digest
from hub_cache import COMMIT_ONE, COMMIT_ZOO, FILES

from vllm_jd.cli import main as cli
from vllm_jd.store.format import read_manifest


def test_compress_from_hub_ids_and_a_sources_file_records_pinned_sources(hf_cache, zoo, tmp_path):
    fsspec.filesystem("memory").pipe({f"/cli1/extra/{f}": (zoo / "adapter-0002" / f).read_bytes() for f in FILES})
    listing = tmp_path / "list.txt"
    listing.write_text("# two more\nacme/zoo/adapter-0001\nx=memory://cli1/extra\n")
    out = tmp_path / "store"
    assert cli(["-q", "compress", "acme/sql-lora", "--sources", str(listing), "--out", str(out), "--rank", "4",
                "--clusters", "1"]) == 0
    m = read_manifest(out)
    assert {n: a.source for n, a in m.adapters.items()} == {
        "acme/sql-lora": f"hf://acme/sql-lora@{COMMIT_ONE}",
        "acme/zoo/adapter-0001": f"hf://acme/zoo/adapter-0001@{COMMIT_ZOO}",
        "x": "memory://cli1/extra"}
    # --from-store fetches the recorded sources again (the cache has them): nothing is rebuilt
    again = tmp_path / "again"
    assert cli(["-q", "compress", "--from-store", str(out), "--out", str(again), "--rank", "4",
                "--clusters", "1"]) == 0
    m2 = read_manifest(again)
    assert {n: a.source for n, a in m2.adapters.items()} == {n: a.source for n, a in m.adapters.items()}
    assert all(m2.adapters[n].checksum == a.checksum for n, a in m.adapters.items())


def test_sources_files_may_be_repeated(hf_cache, tmp_path):
    (tmp_path / "a.txt").write_text("acme/sql-lora\n")
    (tmp_path / "b.txt").write_text("acme/zoo/adapter-0001\n")
    out = tmp_path / "store"
    assert cli(["-q", "compress", "--sources", str(tmp_path / "a.txt"), "--sources", str(tmp_path / "b.txt"),
                "--out", str(out), "--rank", "4"]) == 0
    assert sorted(read_manifest(out).adapters) == ["acme/sql-lora", "acme/zoo/adapter-0001"]
    with pytest.raises(SystemExit):
        cli(["-q", "compress", "acme/sql-lora", "--fetch-workers", "0", "--out", str(tmp_path / "x")])


def test_from_store_rebuilds_what_cannot_be_fetched(hf_cache, zoo, tmp_path, caplog):
    out = tmp_path / "store"
    assert cli(["-q", "compress", "acme/sql-lora", "acme/zoo", "--out", str(out), "--rank", "4",
                "--clusters", "1"]) == 0
    shutil.rmtree(hf_cache / "models--acme--sql-lora")  # deleted upstream and from the cache
    with caplog.at_level("WARNING"):
        assert cli(["-q", "compress", "--from-store", str(out), "--out", str(out), "--rank", "4",
                    "--clusters", "1"]) == 0
    assert "could not be fetched again" in caplog.text and "acme/sql-lora" in caplog.text
    assert "rebuilt from" in caplog.text and len(read_manifest(out).adapters) == 3


def test_add_from_the_hub_and_bad_sources_exit_2_with_the_store_unchanged(hf_cache, zoo, tmp_path, capsys):
    out = tmp_path / "store"
    assert cli(["-q", "compress", str(zoo / "adapter-0000"), "--out", str(out), "--rank", "4"]) == 0
    before = tree_digest(out)
    for bad, says in [(["acme/absent"], "not in the local Hugging Face cache"),
                      (["acme/zoo", "memory://cli2/none"], "memory://cli2/none"),
                      (["gs://b/a"], "pip install 'vllm-jd[gcs]'"),
                      (["no/such/folder/here"], "no such local file or folder, and as a Hugging Face Hub id")]:
        assert cli(["-q", "add", str(out), *bad]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
        assert tree_digest(out) == before
    assert cli(["-q", "add", str(out)]) == 2 and "no adapters given" in capsys.readouterr().err
    # the cheap checks come before any download (acme/absent would fail with another message)
    assert cli(["-q", "add", str(tmp_path / "nostore"), "acme/absent"]) == 2
    assert "acme/absent" not in capsys.readouterr().err
    assert cli(["-q", "add", str(out), "acme/absent", "--max-error", "-1"]) == 2
    assert "max_error" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert cli(["-q", "compress", "acme/absent", "--out", str(tmp_path / "afile")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert cli(["add", str(out), "acme/zoo", "--max-error", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "added acme/zoo/adapter-0001" in printed and "added acme/zoo/adapter-0002" in printed
    src = read_manifest(out).adapters["acme/zoo/adapter-0002"].source
    assert src == f"hf://acme/zoo/adapter-0002@{COMMIT_ZOO}"

