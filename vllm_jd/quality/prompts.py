"""The prompts ``vllm-jd verify`` measures on: the user's file, or a generic default set.

A prompts file is JSON lines, each ``{"prompt": "..."}`` or a bare JSON string; a line with
``"adapters": ["name", ...]`` is measured on those adapters only (other keys are ignored). The default set covers code, prose, lists, questions and dialogue, so an adapter of any
task family gets prompts near and far from its training data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PROMPTS = (
    "def fibonacci(n):",
    "The capital of France is",
    "Translate to German: The weather is nice today.",
    "Q: What is 17 times 3?\nA:",
    "Write a haiku about the sea.",
    "SELECT name FROM users WHERE",
    "Once upon a time, in a small village,",
    "List three uses of copper:\n1.",
    "User: Can you recommend a book?\nAssistant:",
    "The main causes of inflation are",
    "import numpy as np\n\ndef normalize(x):",
    "Summary of the meeting:",
    "Dear customer, thank you for",
    "Step 1: Preheat the oven to",
    "In physics, energy is",
    "The following JSON describes a person: {",
)


@dataclass(frozen=True)
class PromptSet:
    """shared: prompts every adapter is measured on; own: prompts for named adapters only."""

    shared: list[str]
    own: dict[str, list[str]] = field(default_factory=dict)

    def for_adapter(self, name: str) -> list[str]:
        return self.shared + self.own.get(name, [])


def read_prompts(path: str | Path | None, flag: str = "--prompts") -> PromptSet:
    """The prompts in ``path`` (None: ``DEFAULT_PROMPTS``). A line's ``"adapters": [names]`` (or
    ``"adapter": name``) makes it a prompt of those adapters only: each adapter can be measured on
    its own traffic (a name given twice in a line counts once). ValueError naming ``flag``, the file
    and line when it is missing, unreadable, malformed or empty."""
    if path is None:
        return PromptSet(list(DEFAULT_PROMPTS))
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    out = PromptSet([])
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        prompt, names = _parse_line(line, f"{flag} {path}:{i}")
        for n in names or ():
            out.own.setdefault(n, []).append(prompt)
        if names is None:
            out.shared.append(prompt)
    if not out.shared and not out.own:
        raise ValueError(f"{flag} {path}: no prompts in it")
    return out


def _parse_line(line: str, where: str) -> tuple[str, list[str] | None]:
    """(prompt, the adapters it is for, or None for every adapter)."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg})") from None
    prompt = item.get("prompt") if isinstance(item, dict) else item
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: expected {{\"prompt\": \"...\"}} or a JSON string")
    if not isinstance(item, dict) or ("adapter" not in item and "adapters" not in item):
        return prompt, None
    if "adapter" in item and "adapters" in item:
        raise ValueError(f"{where}: give \"adapter\" or \"adapters\", not both")
    names = item.get("adapters", [item.get("adapter")])
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{where}: \"adapters\" must be a non-empty list of adapter names")
    return prompt, list(dict.fromkeys(names))
