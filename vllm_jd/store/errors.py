"""Errors raised on bad input. Both are ``ValueError`` so callers can catch one type."""

from __future__ import annotations


class AdapterError(ValueError):
    """An input adapter is unusable; the message names the adapter and the problem."""

    def __init__(self, name: str, problem: str, path: object = None):
        where = f" ({path})" if path is not None else ""
        super().__init__(f"adapter '{name}'{where}: {problem}")
        self.adapter = name
        self.problem = problem


class StoreError(ValueError):
    """A store is missing, malformed, or incompatible with the request."""


class StoreBusy(StoreError):
    """Another writer held the store's lock for longer than the caller would wait; nothing changed."""
