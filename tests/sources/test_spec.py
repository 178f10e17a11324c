"""parse_source: which form a source string is, decided without the network (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_jd.sources.spec import parse_source, read_source_list


def nothing_exists(_: str) -> bool:
    return False


@pytest.mark.parametrize("text, repo, sub, rev, name", [
    ("org/name", "org/name", "", None, "org/name"),
    ("org/name@v1", "org/name", "", "v1", "org/name"),
    ("org/name/sql/v2", "org/name", "sql/v2", None, "org/name/sql/v2"),
    ("org/name/sql@refs/pr/1", "org/name", "sql", "refs/pr/1", "org/name/sql"),
    ("hf://org/name@0123abcd", "org/name", "", "0123abcd", "org/name"),
    ("mine=org/name/a", "org/name", "a", None, "mine"),
    ("Org-1/na_me.v2", "Org-1/na_me.v2", "", None, "Org-1/na_me.v2"),
])
def test_hub_ids(text, repo, sub, rev, name):
    s = parse_source(text, nothing_exists)
    assert (s.kind, s.repo_id, s.subfolder, s.revision, s.default_name) == ("hub", repo, sub, rev, name)


def test_pinned_source_names_the_commit_and_the_subfolder():
    s = parse_source("org/name@main", nothing_exists)
    assert s.pinned("c0ffee") == "hf://org/name@c0ffee"
    assert s.pinned("c0ffee", "a/b") == "hf://org/name/a/b@c0ffee"
    assert parse_source(s.pinned("c0ffee", "a"), nothing_exists).revision == "c0ffee"


@pytest.mark.parametrize("text, url, name", [
    ("s3://bucket/adapters/sql/", "s3://bucket/adapters/sql", "sql"),
    ("memory://zoo/a", "memory://zoo/a", "a"),
    ("x=file:///tmp/zoo/a", "file:///tmp/zoo/a", "x"),
    ("https://host/a?sig=1", "https://host/a?sig=1", "a"),
])
def test_urls(text, url, name):
    s = parse_source(text, nothing_exists)
    assert (s.kind, s.url, s.default_name) == ("url", url, name)


def test_recorded_urls_carry_no_credentials():
    s = parse_source("https://user:secret@host/zoo/a/?X-Amz-Signature=abc#f", nothing_exists)
    assert s.public == "https://host/zoo/a" and s.default_name == "a"
    assert s.url.startswith("https://user:secret@")  # still fetched with them


@pytest.mark.parametrize("text", ["~nosuchuser_xyz/adapters", "n" * 256 + "=acme/one", "a" * 5000])
def test_odd_paths_parse_without_os_errors(text):
    try:  # no RuntimeError (unknown ~user) or OSError (name too long) escapes, only our ValueError
        parse_source(text)
    except ValueError as e:
        assert len(str(e)) < 400  # the text is shortened in the message


def test_an_existing_path_is_local_even_when_it_looks_like_a_hub_id(tmp_path):
    (tmp_path / "org" / "name").mkdir(parents=True)
    s = parse_source(str(tmp_path / "org" / "name"))
    assert s.kind == "local" and s.default_name == "name"
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert parse_source(str(odd)).kind == "local"  # '=' in an existing path is not NAME=


@pytest.mark.parametrize("text, says", [
    ("", "non-empty"),
    ("justaname", "no such file or folder"),
    ("org/../x", "no such file or folder"),
    ("org--x/name", "no such file or folder"),
    ("hf://name", "expected hf://org/name"),
    ("org/name@", "no such file or folder"),
    ("n=", "nothing after n="),
    ("s3://", "names no folder"),
])
def test_bad_sources_are_named(text, says):
    with pytest.raises(ValueError, match=says) as e:
        parse_source(text, nothing_exists)
    assert repr(text.strip()) in str(e.value) or not text


@pytest.mark.parametrize("text", ["/abs/missing", "./rel/missing", "../up/x", "~/adapters/a", "."])
def test_paths_that_look_like_paths_stay_local_even_when_missing(text):
    assert parse_source(text, nothing_exists).kind == "local"


def test_source_list_skips_comments_and_blank_lines(tmp_path):
    f = tmp_path / "list.txt"
    f.write_text("# my adapters\norg/a\n\n  s3://b/c  # the bucket one\nd=org/e@v1\n")
    assert read_source_list(f) == ["org/a", "s3://b/c", "d=org/e@v1"]
    f.write_bytes("\ufefforg/a\r\norg/b\r\n".encode())  # a BOM and CRLF, as some editors save
    assert read_source_list(f) == ["org/a", "org/b"]
    f.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="lists no adapter source"):
        read_source_list(f)
    with pytest.raises(ValueError, match="cannot read it"):
        read_source_list(Path(tmp_path / "absent.txt"))
