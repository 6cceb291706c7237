"""Chapters are programs: run the python fences of tutorials/NN-*.md in order.

    python -m moe_np tutorial 1            run chapter 1, write its figures
    python -m moe_np tutorial 1 --update   ... and rewrite its output blocks

A python fence may be followed by a ```text fence: that is the output the
fence printed, written by `--update` from a real run, never by hand.
Chapter code reads `quick()` to pick small sizes (the test suite sets
MOE_NP_QUICK=1) and saves figures through `figure_path(name)`.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
FIGURES = ROOT / "figures"

FENCE = re.compile(r"```python\n(.*?)```\n(?:\n*```text\n.*?```\n)?", re.S)


def quick() -> bool:
    """True when MOE_NP_QUICK=1: chapters use small sizes (tests, smoke runs)."""
    return os.environ.get("MOE_NP_QUICK", "0") == "1"


def figure_path(name: str) -> Path:
    """Where a chapter writes figure `name`: figures/, or $MOE_NP_FIGURES if set."""
    folder = Path(os.environ.get("MOE_NP_FIGURES", FIGURES))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def chapter_path(number: int) -> Path:
    """tutorials/NN-*.md for chapter `number`."""
    found = sorted(TUTORIALS.glob(f"{number:02d}-*.md"))
    if not found:
        have = ", ".join(p.name for p in sorted(TUTORIALS.glob("[0-9][0-9]-*.md")))
        raise ValueError(f"tutorial: no chapter {number} in {TUTORIALS} (have: {have or 'none'})")
    return found[0]


def code_blocks(markdown: str) -> list[str]:
    """The python fences of a chapter, in order."""
    return [m.group(1) for m in FENCE.finditer(markdown)]


def has_output_block(markdown: str) -> list[bool]:
    """For each python fence: is it followed by a ```text output block?"""
    return ["```text\n" in m.group(0) for m in FENCE.finditer(markdown)]


def run_chapter(path: Path, update: bool = False, echo: bool = True) -> list[str]:
    """Execute a chapter's python fences in one fresh namespace, in order.

    Returns what each fence printed. With update=True, rewrites the chapter
    so each fence that printed is followed by a ```text block of that output.
    """
    if update and quick():
        raise ValueError("run_chapter: update=True with MOE_NP_QUICK=1 would write "
                         "small-size numbers into the chapter; unset MOE_NP_QUICK")
    import matplotlib
    matplotlib.use("Agg")
    markdown = Path(path).read_text()
    namespace = {"__name__": "__chapter__"}
    outputs = []
    for i, code in enumerate(code_blocks(markdown)):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(code, f"{Path(path).name}[fence {i + 1}]", "exec"), namespace)
        printed = buffer.getvalue()
        outputs.append(printed if printed.endswith("\n") or not printed else printed + "\n")
        if echo:
            print(outputs[-1], end="")
    if update:
        written = iter(outputs)

        def replace(match):
            out = next(written)
            block = f"```python\n{match.group(1)}```\n"
            return block + (f"\n```text\n{out}```\n" if out else "")

        Path(path).write_text(FENCE.sub(replace, markdown))
    return outputs
