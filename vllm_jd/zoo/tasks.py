"""Synthetic string tasks of the trained adapter zoo.

Each task maps a short input string to an answer and is marked by a prompt prefix, so one text
line is ``"<name>: <input> =" + " <answer>" + "\\n"``; a model answers after ``=`` and stops at the
newline. Inputs are lowercase letters (3–7 of them) or small numbers, so a character-level model
of a few hundred thousand parameters can learn every task, yet no task is trivial for it.

Generation is deterministic: ``examples(task, n, seed)`` depends only on its arguments.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
VOWELS = set("aeiou")


@dataclass(frozen=True)
class Task:
    """A named string transformation: ``make_input(rng) → x`` and ``solve(x) → answer``."""

    name: str
    make_input: Callable[[random.Random], str]
    solve: Callable[[str], str]
    description: str

    def prompt(self, x: str) -> str:
        """The text the model sees, e.g. ``"rev: abc ="``."""
        return f"{self.name}: {x} ="

    def example(self, rng: random.Random) -> tuple[str, str]:
        """One ``(prompt, answer)`` pair; the answer has no leading space and no newline."""
        x = self.make_input(rng)
        return self.prompt(x), self.solve(x)


def _word(lo: int = 3, hi: int = 7, alphabet: str = LETTERS) -> Callable[[random.Random], str]:
    return lambda rng: "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _pair(lo: int, hi: int, op: str) -> Callable[[random.Random], str]:
    def make(rng: random.Random) -> str:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if op == "-" and b > a:
            a, b = b, a
        return f"{a}{op}{b}"

    return make


def _arith(x: str) -> str:
    if "+" in x:
        a, b = x.split("+")
        return str(int(a) + int(b))
    a, b = x.split("-")
    return str(int(a) - int(b))


def _count_make(rng: random.Random) -> str:
    w = _word(4, 8, "abcde")(rng)
    return f"{rng.choice(w)} {w}"


def _count(x: str) -> str:
    ch, w = x.split(" ")
    return str(w.count(ch))


def _swap(x: str) -> str:
    pairs = [x[i:i + 2][::-1] for i in range(0, len(x), 2)]
    return "".join(pairs)


def _uniq(x: str) -> str:
    return "".join(dict.fromkeys(x))


_ALL = [
    Task("rev", _word(), lambda x: x[::-1], "reverse the letters"),
    Task("upper", _word(), str.upper, "uppercase"),
    Task("sort", _word(), lambda x: "".join(sorted(x)), "sort the letters"),
    Task("rot", _word(), lambda x: "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in x),
         "shift each letter by one"),
    Task("vow", _word(), lambda x: "".join("*" if c in VOWELS else c for c in x), "copy, vowels replaced by *"),
    Task("len", _word(1, 9), lambda x: str(len(x)), "count the characters"),
    Task("add", _pair(0, 49, "+"), _arith, "add two numbers below 50"),
    Task("dup", _word(2, 5), lambda x: "".join(c + c for c in x), "double each letter"),
    Task("sub", _pair(0, 49, "-"), _arith, "subtract the smaller number"),
    Task("cnt", _count_make, _count, "count one letter's occurrences"),
    Task("swap", _word(), _swap, "swap adjacent letter pairs"),
    Task("uniq", _word(4, 8, "abcdef"), _uniq, "drop repeated letters"),
]
TASKS: dict[str, Task] = {t.name: t for t in _ALL}
"""Every task, in the order ``select_tasks`` takes them."""


def select_tasks(k: int) -> list[Task]:
    """The first ``k`` tasks of ``TASKS`` (1 ≤ k ≤ len(TASKS))."""
    if not 1 <= k <= len(TASKS):
        raise ValueError(f"--tasks must be between 1 and {len(TASKS)}, got {k}")
    return _ALL[:k]


def examples(task: Task, n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """``n`` distinct ``(prompt, answer)`` pairs of ``task`` whose prompts are not in ``exclude``.

    Deterministic in ``(task.name, n, seed, exclude)``. Raises ValueError if the task cannot
    produce ``n`` distinct prompts (after 50·n draws).
    """
    rng = random.Random(f"{task.name}/{seed}")
    out: dict[str, str] = {}
    for _ in range(50 * n):
        if len(out) == n:
            break
        p, a = task.example(rng)
        if p not in exclude:
            out.setdefault(p, a)
    if len(out) < n:
        raise ValueError(f"task {task.name} produced only {len(out)} distinct prompts of {n}")
    return list(out.items())


def exact_match(output: str, answer: str) -> bool:
    """Whether a generated continuation answers correctly: text up to the first newline, stripped."""
    return output.split("\n", 1)[0].strip() == answer
