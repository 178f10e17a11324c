"""What may name an adapter. Names become vLLM model names, log lines, metric labels and export
folder names, and arrive from HTTP requests and folder names, so the rule is strict."""

from __future__ import annotations

import unicodedata

NAME_MAX = 256


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name an adapter, or None. Names become model names, log lines, metric
    labels and folder names (export), so: 1–256 printable characters, no whitespace, control,
    format (bidi overrides) or separator characters, no ``..`` segment, no leading ``/`` or ``\\``."""
    if not isinstance(name, str) or not name:
        return "an adapter name must be a non-empty string"
    if len(name) > NAME_MAX:
        return f"the name is {len(name)} characters long (at most {NAME_MAX})"
    for ch in name:
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"):
            return f"the name contains the character U+{ord(ch):04X} (no whitespace, control or format characters)"
    if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
        return "the name must not start with a slash or contain a '..' path segment"
    return None

