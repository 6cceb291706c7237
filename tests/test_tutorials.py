"""Every chapter is a program: run its python fences in order, at quick sizes.

Figures go to a temporary folder, so the committed figures/ stay the ones
the full-size run produced.
"""
import re
from pathlib import Path

import pytest

from moe_np.tutorial import TUTORIALS, code_blocks, has_output_block, output_blocks, run_chapter

CHAPTERS = sorted(TUTORIALS.glob("[0-9][0-9]-*.md"))

# Lines of worked examples that do not depend on the run's size: each cell that prints
# them draws from its own stream, so --quick must print them exactly as the chapter shows.
ILLUSTRATIVE = {
    "04-sparse-routing.md": ("z-loss ", "gradient check wrt logits", "zero logits", "capacity C = ",
                             "their output == the shared", "shared gradients vs", "K = E, dropless"),
    "06-mixed-precision.md": ("bf16 :", "fp16 :", "e4m3 :", "e5m2 :", "top-2 flips", "z-loss of 4 rows"),
}


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
    prefixes = ILLUSTRATIVE.get(path.name, ())
    if prefixes:
        shown = [line for block in output_blocks(path.read_text()) for line in block.splitlines()
                 if line.startswith(prefixes)]
        quick_lines = [line for out in outputs for line in out.splitlines() if line.startswith(prefixes)]
        assert shown and quick_lines == shown, f"{path.name}: --quick changed an illustrative line"
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


# -- tutorial N --check: byte for byte, wall-clock lines masked ------------------------

SYNTHETIC = '''# 1. A synthetic chapter

```python
import numpy as np
from moe_np.tutorial import print_timing, stream
print("sum", int(stream("cell one").integers(0, 100, 5).sum()))
print_timing(f"took {np.random.default_rng().random():.6f} s")
print("last line")
```

Prose between fences.

```python
x = 2 + 2
```
'''


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """A two-fence chapter 1 in a temporary tutorials/ folder, its output block written by a run."""
    import moe_np.tutorial as tutorial
    folder = tmp_path / "tutorials"
    folder.mkdir()
    path = folder / "01-synthetic.md"
    path.write_text(SYNTHETIC)
    monkeypatch.delenv("MOE_NP_QUICK", raising=False)
    monkeypatch.setenv("MOE_NP_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setattr(tutorial, "TUTORIALS", folder)
    run_chapter(path, update=True, echo=False)
    return path


def test_check_passes_on_a_fresh_run_though_the_timing_differs(synthetic):
    from moe_np.tutorial import TIMING_MARK, check_outputs, output_blocks
    block = output_blocks(synthetic.read_text())[0]
    assert block.splitlines()[1].endswith(TIMING_MARK)          # the timing line is marked
    outputs = run_chapter(synthetic, echo=False)
    assert outputs[0] != block                                   # a new time was printed ...
    assert check_outputs(synthetic, outputs) == ""               # ... and masked


def test_check_fails_with_a_diff_when_an_output_line_changes(synthetic, capsys):
    from moe_np.__main__ import main
    from moe_np.tutorial import check_outputs
    assert main(["tutorial", "1", "--check"]) == 0
    synthetic.write_text(synthetic.read_text().replace("\nlast line\n", "\nlast lime\n"))
    diff = check_outputs(synthetic, run_chapter(synthetic, echo=False))
    assert "-last lime" in diff and "+last line" in diff and "fence 1 (committed)" in diff
    capsys.readouterr()
    assert main(["tutorial", "1", "--check"]) == 1
    assert "-last lime" in capsys.readouterr().out


def test_check_fails_when_a_timing_line_becomes_an_ordinary_one(synthetic):
    """Masking is by the marker only: drop it from the committed line and the line must match."""
    from moe_np.tutorial import TIMING_MARK, check_outputs
    synthetic.write_text(synthetic.read_text().replace(TIMING_MARK, ""))
    assert check_outputs(synthetic, run_chapter(synthetic, echo=False)) != ""


def test_check_refuses_quick_and_update(synthetic, capsys):
    from moe_np.__main__ import main
    assert main(["tutorial", "1", "--check", "--quick"]) == 2
    assert main(["tutorial", "1", "--check", "--update"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "cannot be combined" in err


def test_print_timing_is_one_marked_line(capsys):
    from moe_np.tutorial import TIMING_MARK, print_timing
    print_timing("a", 1.5, "s")
    assert capsys.readouterr().out == f"a 1.5 s{TIMING_MARK}\n"
    with pytest.raises(ValueError, match="one line"):
        print_timing("two\nlines")


def test_stream_depends_on_its_name_only():
    from moe_np.tutorial import stream
    assert stream("a").random() == stream("a").random() != stream("b").random()


def test_quick_sizes_from_the_environment_leave_the_tracked_figures_alone(synthetic, monkeypatch, capsys):
    """MOE_NP_QUICK=1 in the environment runs small sizes as --quick does, so its figures go
    to a temporary folder too, not over the committed full-size ones."""
    from moe_np.__main__ import main
    from moe_np.tutorial import FIGURES, figure_path
    monkeypatch.delenv("MOE_NP_FIGURES")
    monkeypatch.setenv("MOE_NP_QUICK", "1")
    assert main(["tutorial", "1"]) == 0
    assert figure_path("").resolve() != FIGURES.resolve()
    header = capsys.readouterr().out
    assert "(quick sizes); figures go to" in header and "figures/ is left as it is" in header
