"""The registry of named gradient checks, each tagged with its chapter.

A check is a function seed -> list[CheckResult]. Chapters' check modules
register theirs on import; `moe_np.checks.run_checks` runs them (the
`gradcheck` command) and the tests select them by chapter.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from moe_np.gradcheck import CheckResult


class Check(NamedTuple):
    name: str
    chapter: int
    run: Callable[[int], list[CheckResult]]


REGISTRY: dict[str, Check] = {}


def register(name: str, chapter: int):
    """Decorator: register fn(seed) -> list[CheckResult] under name, for chapter."""
    def wrap(fn):
        if name in REGISTRY:
            raise ValueError(f"register: a check named {name!r} already exists")
        REGISTRY[name] = Check(name, chapter, fn)
        return fn
    return wrap


def checks_of(chapter: int) -> list[str]:
    """Names of the checks registered for a chapter, in registration order."""
    return [c.name for c in REGISTRY.values() if c.chapter == chapter]


def run_checks(seed: int = 0, name_filter: str | None = None,
               chapter: int | None = None) -> list[CheckResult]:
    """Run every registered check whose name contains name_filter (and of chapter, if given)."""
    rows = []
    for check in REGISTRY.values():
        if (name_filter is None or name_filter in check.name) and chapter in (None, check.chapter):
            rows.extend(check.run(seed))
    return rows
