"""Every chapter is a program: run its python fences in order, at quick sizes.

Figures go to a temporary folder, so the committed figures/ stay the ones
the full-size run produced.
"""
import re
from pathlib import Path

import pytest

from moe_np.tutorial import TUTORIALS, code_blocks, has_output_block, run_chapter

CHAPTERS = sorted(TUTORIALS.glob("[0-9][0-9]-*.md"))


def test_there_are_chapters():
    assert CHAPTERS, f"no chapters found in {TUTORIALS}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_NP_QUICK", "1")
    monkeypatch.setenv("MOE_NP_FIGURES", str(tmp_path))
    outputs = run_chapter(path, echo=False)
    assert len(outputs) == len(code_blocks(path.read_text())) > 0
    # a fence that prints must show its output (written by `tutorial N --update`), and only then
    for i, (printed, shown) in enumerate(zip(outputs, has_output_block(path.read_text()))):
        assert bool(printed) == shown, f"{path.name} fence {i + 1}: printed={bool(printed)}, " \
            f"output block={shown}; run `python -m moe_np tutorial {int(path.name[:2])} --update`"
    embedded = re.findall(r"\]\(\.\./figures/([^)]+)\)", path.read_text())
    for name in embedded:
        assert (tmp_path / name).exists(), f"{path.name} embeds {name} but did not write it"
        assert (TUTORIALS.parent / "figures" / name).exists(), f"figures/{name} is not committed"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_has_paired_tests(path):
    number = path.name[:2]
    assert list(Path(__file__).parent.glob(f"test_{number}_*.py")), f"no tests/test_{number}_*.py"


def test_readme_python_examples_run():
    """The README's python blocks are programs too."""
    readme = (TUTORIALS.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "the README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
