"""What a source string names, decided without touching the disk or the network (except the one
``exists`` check the caller passes in).

Forms, tried in this order:

- ``NAME=SOURCE``: any source below, served as ``NAME`` (NAME has no ``/``, ``:`` or ``=``);
- ``hf://org/name[/sub/dirs][@revision]``: a Hugging Face Hub model repo, or a folder of it;
- ``scheme://…`` (``s3``, ``gs``, ``gcs``, ``az``, ``abfs``, ``file``, ``memory``, ``http(s)``, …):
  an fsspec URL of an adapter folder, or of a folder of adapter folders;
- a local path that exists, or one starting with ``/``, ``./``, ``../`` or ``~``: an adapter
  folder, or a folder of them (as before);
- ``org/name[/sub/dirs][@revision]`` that is not a local path: a Hub repo (the revision is the
  text after the first ``@`` and may hold ``/``, as in ``refs/pr/1``).

The default name of a Hub source is its id without the revision (``org/name/sub``), so a request
for model ``org/name`` finds it; of a URL or a folder, its last path component.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

HUB_PREFIX = "hf://"
_URL = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<rest>.*)$")
_REPO_PART = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")
"""One part of a Hub repo id (huggingface_hub's rule: letters, digits, ``-``, ``_``, ``.``)."""
_NAME = re.compile(r"^[^/:=\s]+$")
FSSPEC_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
                 "abfss": "azure", "adl": "azure"}
"""fsspec scheme → the vllm-jd extra that installs its backend (``pip install 'vllm-jd[s3]'``)."""


@dataclass(frozen=True)
class Source:
    """One parsed source. kind: ``local`` | ``hub`` | ``url``.

    local: ``path``. hub: ``repo_id``, ``subfolder`` ('' for the repo's root), ``revision``
    (None: the default branch). url: ``url`` (no trailing slash). ``name``: the adapter name
    the user gave (``NAME=``), else None (the default name is ``default_name``)."""

    text: str
    kind: str
    name: str | None = None
    path: Path | None = None
    repo_id: str = ""
    subfolder: str = ""
    revision: str | None = None
    url: str = ""
    guessed: bool = False
    """A Hub id read from text that was not an existing path (errors then say both)."""

    @property
    def default_name(self) -> str:
        if self.name is not None:
            return self.name
        if self.kind == "hub":
            return "/".join(p for p in (self.repo_id, self.subfolder) if p)
        if self.kind == "url":
            return self.public.rsplit("/", 1)[-1]
        return Path(self.path).resolve().name if Path(self.path).name in ("", ".", "..") else Path(self.path).name

    @property
    def public(self) -> str:
        """The URL without credentials, query or fragment: what a store records and logs show
        (a signed URL's signature, or ``user:password@``, must not end up in a manifest)."""
        parts = urlsplit(self.url)
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme, host, parts.path, "", "")).rstrip("/")

    def pinned(self, revision: str, subfolder: str | None = None) -> str:
        """What a store records for this Hub source at commit ``revision`` (optionally one of its
        subfolders): ``hf://org/name[/sub]@<commit>``, which fetches the same bytes forever."""
        sub = self.subfolder if subfolder is None else subfolder
        return f"{HUB_PREFIX}{'/'.join(p for p in (self.repo_id, sub) if p)}@{revision}"


def path_exists(text: str) -> bool:
    """Whether ``text`` is an existing path (False for text no path can be: too long, NUL, …)."""
    try:
        return Path(text).exists()
    except (OSError, ValueError):
        return False


def parse_source(text: str, exists: Callable[[str], bool] = path_exists) -> Source:
    """``text`` as a Source; ValueError naming it when it is none of the forms above."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"an adapter source must be a non-empty string, got {text!r}")
    text = text.strip()
    name, body = _split_name(text, exists)
    if body.startswith(HUB_PREFIX):
        return _hub(text, name, body[len(HUB_PREFIX):], explicit=True)
    if (m := _URL.match(body)) is not None:
        if not m["rest"].strip("/"):
            raise ValueError(f"adapter source {_shown(text)}: the URL names no folder")
        return Source(text, "url", name, url=body.rstrip("/"))
    if exists(body) or body.startswith(("/", "./", "../", "~", "\\")) or body in (".", ".."):
        return Source(text, "local", name, path=_expand(body))  # a missing path: the reader says so
    return _hub(text, name, body, explicit=False)


def _shown(text: str) -> str:
    """``text`` for an error line: quoted, at most 200 characters."""
    return repr(text if len(text) <= 200 else text[:200] + "…")


def _expand(body: str) -> Path:
    try:
        return Path(body).expanduser()
    except RuntimeError:  # ~user of no such user: the path, as typed, does not exist
        return Path(body)


def _split_name(text: str, exists: Callable[[str], bool]) -> tuple[str | None, str]:
    head, sep, rest = text.partition("=")
    if not sep or not _NAME.match(head) or exists(text):
        return None, text
    if not rest:
        raise ValueError(f"adapter source {_shown(text)}: nothing after {head}=")
    return head, rest


def _hub(text: str, name: str | None, body: str, explicit: bool) -> Source:
    ident, at, revision = body.partition("@")
    parts = ident.strip("/").split("/")
    ok = len(parts) >= 2 and all(_REPO_PART.match(p) and "--" not in p and ".." not in p for p in parts[:2])
    if not ok or any(p in ("", ".", "..") for p in parts[2:]) or (at and not revision):
        if explicit:
            raise ValueError(f"adapter source {_shown(text)}: expected hf://org/name[/subfolder][@revision]")
        raise ValueError(f"adapter source {_shown(text)}: no such file or folder, and not a Hugging Face Hub id "
                         "(org/name[/subfolder][@revision]) or a URL (s3://, gs://, az://, file://, …)")
    return Source(text, "hub", name, repo_id="/".join(parts[:2]), subfolder="/".join(parts[2:]),
                  revision=revision or None, guessed=not explicit)


def read_source_list(path: str | Path) -> list[str]:
    """The sources of a text file, one a line; blank lines and ``#`` comments skipped.
    ValueError naming the file when it is missing, unreadable or lists nothing."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM some editors write is no source
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--sources {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    out = [s for line in lines if (s := line.split(" #", 1)[0].strip()) and not s.startswith("#")]
    if not out:
        raise ValueError(f"--sources {path}: lists no adapter source (one a line; # starts a comment)")
    return out
