"""Every chapter as a Jupyter notebook: valid nbformat v4, its code cells exactly the fences.

nbformat is a test-only oracle (the export writes plain JSON without it)."""
import base64
import json
import re

import pytest

from moe_np.__main__ import main
from moe_np.notebook import chapter_notebook
from moe_np.tutorial import FENCE, FIGURES, TUTORIALS, code_blocks, output_blocks

nbformat = pytest.importorskip("nbformat")

CHAPTERS = sorted(TUTORIALS.glob("[0-9][0-9]-*.md"))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every chapter exported through the command line, read back by nbformat."""
    out = tmp_path_factory.mktemp("notebooks")
    assert main(["notebook", *[str(int(p.name[:2])) for p in CHAPTERS], "--out", str(out)]) == 0
    return {p.name: nbformat.read(out / (p.stem + ".ipynb"), as_version=4) for p in CHAPTERS}


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_notebook_is_valid_and_its_code_cells_are_the_fences(path, exported):
    notebook = exported[path.name]
    nbformat.validate(notebook)
    markdown = path.read_text()
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert [c.source + "\n" for c in code] == code_blocks(markdown)
    printed = ["".join(o.text for o in c.outputs if o.output_type == "stream") for c in code]
    assert printed == output_blocks(markdown)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_notebook_embeds_every_figure_and_keeps_the_prose(path, exported):
    notebook = exported[path.name]
    prose = "".join(c.source for c in notebook.cells[1:] if c.cell_type == "markdown")
    restored = re.sub(r"\(attachment:", "(../figures/", prose)
    assert nonblank(restored) == nonblank(FENCE.sub("\n", path.read_text()))
    # every figure that exists travels inside the notebook (test_tutorials checks they exist)
    wanted = [name for name in re.findall(r"\]\(\.\./figures/([^)]+\.png)\)", path.read_text())
              if (FIGURES / name).exists()]
    attached = {name: data for c in notebook.cells for name, data in c.get("attachments", {}).items()}
    assert set(wanted) == set(attached)
    for name in wanted:
        assert f"(attachment:{name})" in prose
        assert base64.b64decode(attached[name]["image/png"]).startswith(PNG)


def nonblank(text):
    return [line for line in text.splitlines() if line.strip()]


def test_a_missing_figure_stays_a_link():
    notebook = chapter_notebook("Text ![gone](../figures/99-none.png)\n")
    assert notebook["cells"][0]["source"] == ["Text ![gone](../figures/99-none.png)\n"]
    assert "attachments" not in notebook["cells"][0]


def test_notebook_command_rejects_an_unknown_chapter(tmp_path, capsys):
    assert main(["notebook", "99", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no chapter 99" in err
    assert json.loads(json.dumps(chapter_notebook("")))["nbformat"] == 4
