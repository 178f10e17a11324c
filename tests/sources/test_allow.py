"""Which unknown model names the server may fetch (pure)."""

from __future__ import annotations

import pytest

from vllm_jd.sources.allow import check_patterns, parse_kinds, resolvable

BOTH = parse_kinds("hf,fs")


@pytest.mark.parametrize("name, kinds, patterns, kind", [
    ("myorg/sql", BOTH, ["myorg/*"], "hub"),
    ("myorg/zoo/sql@v2", BOTH, ["myorg/*"], "hub"),
    ("other/sql", BOTH, ["myorg/*"], None),
    ("myorg/sql", parse_kinds("fs"), ["myorg/*"], None),
    ("s3://bucket/adapters/a", BOTH, ["s3://bucket/adapters/*"], "url"),
    ("s3://bucket/secret/a", BOTH, ["s3://bucket/adapters/*"], None),
    ("s3://bucket/adapters/a", parse_kinds("hf"), ["s3://bucket/adapters/*"], None),
    ("/etc/passwd", BOTH, ["/*"], None),  # a request never reads the server's own disk
    ("../x/y", BOTH, ["*/*"], None),
    ("x=myorg/sql", BOTH, ["*myorg/*"], None),
    ("MyOrg/sql", BOTH, ["myorg/*"], None),  # case matters, as on the Hub
])
def test_resolvable(name, kinds, patterns, kind):
    s = resolvable(name, kinds, patterns)
    assert (s and s.kind) == kind or (s is None and kind is None)


def test_kinds_and_patterns_are_checked():
    assert parse_kinds(" hf ") == {"hub"} and parse_kinds("fs,hf") == {"hub", "url"}
    for bad in ("", "hf,s3", "git"):
        with pytest.raises(ValueError, match="--jd-resolve"):
            parse_kinds(bad)
    with pytest.raises(ValueError, match="needs --jd-resolve-allow"):
        check_patterns([], BOTH)
    for everything in ("*", "*/*", " "):
        with pytest.raises(ValueError, match="allows every name"):
            check_patterns([everything], BOTH)
    check_patterns(["myorg/*"], BOTH)
