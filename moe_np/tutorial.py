"""Chapters are programs: run the python fences of tutorials/NN-*.md in order.

    python -m moe_np tutorial 1            run chapter 1, write its figures
    python -m moe_np tutorial 1 --update   ... and rewrite its output blocks
    python -m moe_np tutorial 1 --check    ... and compare them with the committed ones

A python fence may be followed by a ```text fence: that is the output the
fence printed, written by `--update` from a real run, never by hand.
A fence whose first line is `# mpiexec -n N` is a program of its own, run on N MPI
ranks by moe_np.parallel.launch.run_fence (or, without MPI, shown by its committed output).
Chapter code reads `quick()` to pick small sizes (the test suite sets
MOE_NP_QUICK=1; sizes are all it changes), draws random numbers from its own
`stream(name)` per cell, saves figures through `figure_path(name)` and prints
wall-clock times through `print_timing(...)`: those lines end in TIMING_MARK,
and `check_outputs` compares them by position only, every other line byte for byte.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
FIGURES = ROOT / "figures"

FENCE = re.compile(r"```python\n(.*?)```\n(?:\n*```text\n(.*?)```\n)?", re.S)
TIMING_MARK = "  [wall-clock]"      # ends every line print_timing writes
TIMING_MASKED = "<a wall-clock timing line>"
MPI_FENCE = "# mpiexec -n "        # a fence starting with this line runs as its own MPI program


def quick() -> bool:
    """True when MOE_NP_QUICK=1: chapters use small sizes (tests, smoke runs)."""
    return os.environ.get("MOE_NP_QUICK", "0") == "1"


def figure_path(name: str) -> Path:
    """Where a chapter writes figure `name`: figures/, or $MOE_NP_FIGURES if set."""
    folder = Path(os.environ.get("MOE_NP_FIGURES", FIGURES))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def stream(name: str) -> np.random.Generator:
    """A random stream of its own for one cell: seeded by `name` alone.

    A cell that draws from stream("z-loss example") prints the same numbers
    whatever the cells before it drew, and so in quick and full-size runs."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng(seed)


def print_timing(*args, **kwargs) -> None:
    """print(...) for a line that reports wall-clock time: the line ends in TIMING_MARK.

    `tutorial N --check` compares such lines by position only, since no two
    runs take the same time; every other line must match byte for byte."""
    sep = kwargs.pop("sep", " ")
    if "end" in kwargs:
        raise ValueError("print_timing: end= is not supported; a timing line is one whole line")
    text = sep.join(str(a) for a in args)
    if "\n" in text:
        raise ValueError(f"print_timing: one line at a time, got {text!r}")
    print(text + TIMING_MARK, **kwargs)


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


def output_blocks(markdown: str) -> list[str]:
    """For each python fence, its committed ```text output ("" when it has none)."""
    return [m.group(2) or "" for m in FENCE.finditer(markdown)]


def mask_timings(text: str) -> list[str]:
    """The lines of `text`, each line that ends in TIMING_MARK replaced by TIMING_MASKED."""
    return [TIMING_MASKED if line.endswith(TIMING_MARK) else line for line in text.splitlines()]


def check_outputs(path: Path, outputs: list[str], markdown: str | None = None) -> str:
    """A unified diff of the committed output blocks against `outputs`; "" when they agree.

    Byte for byte, except lines written by print_timing (masked on both sides).
    markdown: the chapter's text as it was when the run started (default: read it now)."""
    name = Path(path).name
    committed = output_blocks(Path(path).read_text() if markdown is None else markdown)
    if len(committed) != len(outputs):
        return (f"{name}: the chapter has {len(committed)} python fences, "
                f"the run printed {len(outputs)} outputs\n")
    diffs = []
    for i, (old, new) in enumerate(zip(committed, outputs)):
        a, b = mask_timings(old), mask_timings(new)
        if a != b:
            diffs.extend(difflib.unified_diff(
                a, b, f"{name} fence {i + 1} (committed)", f"{name} fence {i + 1} (this run)",
                lineterm=""))
    return "\n".join(diffs) + "\n" if diffs else ""


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
    outputs, committed = [], output_blocks(markdown)
    for i, code in enumerate(code_blocks(markdown)):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            if code.startswith(MPI_FENCE):       # its own program on N ranks (chapter 10)
                from moe_np.parallel.launch import run_fence
                run_fence(code, committed[i], f"{Path(path).name}[fence {i + 1}]")
            else:
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
