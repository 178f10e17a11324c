"""Store writes: nothing acknowledged is lost, the store is valid at every instant of a commit (a
kill at each step, injected deterministically), leftovers of killed writers are cleaned, a live
writer's are not, and a busy lock is a clear error rather than a hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_MODULES

from vllm_jd.cli import main as cli
from vllm_jd.compress import pipeline
from vllm_jd.compress.project import add_named
from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.store.errors import StoreError
from vllm_jd.store.format import read_manifest
from vllm_jd.store.transaction import MIN_AGE_S, leftovers, live_folder, locked
from vllm_jd.store.validate import check_store


@pytest.fixture
def grown(tmp_path):
    make_adapters(tmp_path / "a", 6, TINY_MODULES, rank=4, structure="shared", seed=21)
    make_adapters(tmp_path / "b", 3, TINY_MODULES, rank=4, structure="random", seed=22, prefix="late")
    store = tmp_path / "s"
    assert cli(["-q", "compress", str(tmp_path / "a"), "--out", str(store), "--rank", "4", "--clusters", "1"]) == 0
    assert cli(["-q", "add", str(store), str(tmp_path / "b" / "late-0000")]) == 0
    return tmp_path, store


def test_an_adapter_repaired_while_recompressing_stays_exact(grown, monkeypatch):
    from vllm_jd.quality.repair import store_exactly

    tmp, store = grown
    real_publish = pipeline.publish

    def publish_after_a_repair(staging, manifest, merge=None):
        store_exactly(store, {"adapter-0003": tmp / "a" / "adapter-0003"})  # `verify --repair` meanwhile
        return real_publish(staging, manifest, merge)

    monkeypatch.setattr(pipeline, "publish", publish_after_a_repair)
    # --max-error 0.9: add's rule would put the repaired adapter into the new shared basis
    assert cli(["-q", "compress", "--from-store", str(store), "--out", str(store), "--rank", "4",
                "--clusters", "1", "--max-error", "0.9"]) == 0
    m = read_manifest(store)
    assert m.clusters[m.adapters["adapter-0003"].cluster].kind == "exact"
    assert m.adapters["adapter-0003"].error == 0.0
    assert m.clusters[m.adapters["adapter-0002"].cluster].kind == "shared"


def age(paths) -> None:
    """Make folders look older than MIN_AGE_S (as they would be after a real crash)."""
    old = time.time() - 10 * MIN_AGE_S
    for p in paths:
        os.utime(p, (old, old))


def test_in_place_recompression_carries_over_what_changed_meanwhile(grown, monkeypatch):
    tmp, store = grown
    real_publish = pipeline.publish

    def publish_after_others_wrote(staging, manifest, merge=None):
        # between the recompression's snapshot and its commit, another writer adds one adapter and removes one
        add_named(store, [("late-0001", tmp / "b" / "late-0001")])
        from vllm_jd.store.transaction import remove_adapters

        remove_adapters(store, ["adapter-0002"])
        return real_publish(staging, manifest, merge)

    monkeypatch.setattr(pipeline, "publish", publish_after_others_wrote)
    assert cli(["-q", "compress", "--from-store", str(store), "--out", str(store), "--rank", "4",
                "--clusters", "2"]) == 0
    m = read_manifest(store)
    assert "late-0001" in m.adapters  # acknowledged while recompressing: kept (once lost 5 of 5)
    assert "adapter-0002" not in m.adapters  # removed while recompressing: stays removed
    assert "late-0000" in m.adapters and len(m.adapters) == 7
    assert check_store(store, m).ok and not leftovers(store, m)


CRASHES = ["commit:moving-shards", "commit:before-manifest", "commit:after-manifest"]


def run_cli(args: list[str], crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_JD_CRASH_AT": crash_at or ""}
    return subprocess.run([sys.executable, "-m", "vllm_jd.cli", "-q", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("crash", CRASHES)
@pytest.mark.parametrize("command", ["recompress", "add"])
def test_a_kill_at_every_commit_step_leaves_a_valid_store(grown, crash, command):
    tmp, store = grown
    before = set(read_manifest(store).adapters)
    if command == "add":
        args = ["add", str(store), str(tmp / "b" / "late-0001")]
        after = before | {"late-0001"}
    else:
        args = ["compress", "--from-store", str(store), "--out", str(store), "--rank", "4", "--clusters", "2"]
        after = before
    r = run_cli(args, crash_at=crash)
    assert r.returncode == 137, r.stderr
    m = read_manifest(store)  # readable, and either the old version or the new one, whole
    assert set(m.adapters) == (after if crash == "commit:after-manifest" else before)
    assert check_store(store, m).ok
    age([p for p in store.iterdir() if p.name.startswith(".staging-")])
    assert leftovers(store, m)  # the killed writer's staging folder (and moved or replaced shards)
    # the next writer cleans up after the killed one
    assert run_cli(["add", str(store), str(tmp / "b" / "late-0002")]).returncode == 0
    m = read_manifest(store)
    assert check_store(store, m).ok and not leftovers(store, m)
    assert sorted(p.name for p in store.iterdir()) == ["manifest.json", "tensors"]


def test_a_kill_before_a_new_store_is_renamed_leaves_nothing_at_its_place(grown):
    tmp, _ = grown
    new = tmp / "new"
    r = run_cli(["compress", str(tmp / "a"), "--out", str(new), "--rank", "2"], crash_at="publish:before-rename")
    assert r.returncode == 137 and not new.exists()
    temp = [p for p in tmp.iterdir() if p.name.startswith(".new.tmp-")]
    assert len(temp) == 1  # what the killed run left
    age(temp)
    assert run_cli(["compress", str(tmp / "a"), "--out", str(new), "--rank", "2"]).returncode == 0
    assert not [p for p in tmp.iterdir() if p.name.startswith(".new.tmp-")]
    assert check_store(new, read_manifest(new)).ok


def test_a_live_writers_folders_are_never_collected(grown):
    tmp, store = grown
    with live_folder(store / ".staging-live0000") as live:
        age([live])
        assert run_cli(["add", str(store), str(tmp / "b" / "late-0001")]).returncode == 0
        assert live.exists()  # locked by its (live) writer: not a leftover
    assert not live.exists()


def test_a_busy_store_is_a_clear_error_and_nothing_changes(grown):
    tmp, store = grown
    before = (store / "manifest.json").read_bytes()
    with locked(store):  # another writer holds the store
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="is busy"):
            add_named(store, [("late-0001", tmp / "b" / "late-0001")], lock_timeout=0.3)
        assert time.monotonic() - t0 < 5
    assert (store / "manifest.json").read_bytes() == before
    with locked(store, shared=True), locked(store, shared=True):  # readers share
        pass


def test_a_cancelled_registration_commits_nothing(grown):
    tmp, store = grown
    before = (store / "manifest.json").read_bytes()
    with pytest.raises(StoreError, match="cancelled"):
        add_named(store, [("late-0001", tmp / "b" / "late-0001")], still_wanted=lambda: False)
    assert (store / "manifest.json").read_bytes() == before
    assert not leftovers(store, read_manifest(store))


def test_sources_are_recorded_absolute(grown, monkeypatch):
    tmp, store = grown
    monkeypatch.chdir(tmp)
    assert cli(["-q", "add", str(store), "b/late-0001"]) == 0
    src = read_manifest(store).adapters["late-0001"].source
    assert Path(src).is_absolute() and Path(src) == tmp / "b" / "late-0001"


def test_an_adapter_set_aside_then_added_again_meanwhile_is_carried_over(grown, monkeypatch):
    import json

    tmp, store = grown
    raw = json.loads((store / "manifest.json").read_text())
    raw["adapters"]["adapter-0003"]["error"] = None  # broken at the snapshot: set aside
    (store / "manifest.json").write_text(json.dumps(raw))
    real_publish = pipeline.publish

    def publish_after_others_wrote(staging, manifest, merge=None):
        from vllm_jd.store.transaction import remove_adapters

        remove_adapters(store, ["adapter-0003"])  # meanwhile it is deleted and added again, healthy
        add_named(store, [("adapter-0003", tmp / "a" / "adapter-0003")])
        return real_publish(staging, manifest, merge)

    monkeypatch.setattr(pipeline, "publish", publish_after_others_wrote)
    assert cli(["-q", "compress", "--from-store", str(store), "--out", str(store), "--rank", "4",
                "--clusters", "1"]) == 0
    m = read_manifest(store)
    assert "adapter-0003" in m.adapters and "adapter-0003" not in m.quarantined  # the acknowledged add is kept
    assert check_store(store, m).ok


def test_a_fifo_as_a_recorded_source_falls_back_to_the_stored_copy(grown):
    tmp, store = grown
    src = tmp / "b" / "late-0000" / "adapter_model.safetensors"
    src.unlink()
    os.mkfifo(src)  # reading it would block for ever (under the lock, in the carry-over)
    r = run_cli(["compress", "--from-store", str(store), "--out", str(store), "--rank", "4", "--clusters", "1"])
    assert r.returncode == 0, r.stderr
    assert "late-0000" in read_manifest(store).adapters


def test_quarantined_names_can_be_removed_and_used_again(grown):
    import json

    tmp, store = grown
    raw = json.loads((store / "manifest.json").read_text())
    raw["adapters"]["late-0000"]["row"] = -1
    (store / "manifest.json").write_text(json.dumps(raw))
    assert cli(["-q", "fsck", str(store), "--repair"]) == 0
    assert "late-0000" in read_manifest(store).quarantined
    assert cli(["-q", "remove", str(store), "late-0000"]) == 0
    assert cli(["-q", "add", str(store), str(tmp / "b" / "late-0000")]) == 0
    m = read_manifest(store)
    assert "late-0000" in m.adapters and not m.quarantined


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "not a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "cannot read"),
    ('{"format": "vllm-jd-store", "adapters": {}, "adapters": {}}', "appears twice"),
    ('{"format": "vllm-jd-store", "format_version": 2, "rank": 1e999, "adapters": {}}', "non-finite number at rank"),
])
def test_malformed_manifests_are_one_line_errors(grown, capsys, text, message):
    _, store = grown
    (store / "manifest.json").write_text(text)
    for command in (["inspect", str(store)], ["fsck", str(store)], ["remove", str(store), "x"]):
        capsys.readouterr()
        assert cli(["-q", *command]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_unknown_fields_survive_a_write(grown):
    import json

    tmp, store = grown
    raw = json.loads((store / "manifest.json").read_text())
    raw["from_a_newer_version"] = {"x": 1}
    raw["adapters"]["late-0000"]["note"] = "kept"
    (store / "manifest.json").write_text(json.dumps(raw))
    assert cli(["-q", "add", str(store), str(tmp / "b" / "late-0001")]) == 0
    raw = json.loads((store / "manifest.json").read_text())
    assert raw["from_a_newer_version"] == {"x": 1} and raw["adapters"]["late-0000"]["note"] == "kept"
