"""The prompts ``vllm-jd verify`` measures on: the user's file, or a generic default set.

A prompts file is JSON lines, each ``{"prompt": "..."}`` (other keys ignored) or a bare JSON
string. The default set covers code, prose, lists, questions and dialogue, so an adapter of any
task family gets prompts near and far from its training data.
"""

from __future__ import annotations

import json
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


def read_prompts(path: str | Path | None) -> list[str]:
    """The prompts of ``path`` (None: ``DEFAULT_PROMPTS``). ValueError naming the file and line
    when it is missing, unreadable, malformed or empty."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--prompts {path}:{i}: not JSON ({e.msg})") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"--prompts {path}:{i}: expected {{\"prompt\": \"...\"}} or a JSON string")
        out.append(prompt)
    if not out:
        raise ValueError(f"--prompts {path}: no prompts in it")
    return out
