"""A chapter as a Jupyter notebook: nbformat v4, written as plain JSON (no extra dependency).

    python -m moe_np notebook 4 [--out DIR]      writes DIR/04-sparse-routing.ipynb

Cells follow the chapter: the prose between two python fences is one
markdown cell, each python fence one code cell, and the fence's committed
```text block (what `tutorial N --update` recorded) that cell's output. A
figure the prose embeds (![...](../figures/NN-name.png)) travels inside the
notebook as a markdown attachment (image/png, base64), so the file stands
alone. Running the cells needs moe_np importable: open the notebook from the
repository's root, or after `pip install -e .`.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from moe_np.tutorial import FENCE, FIGURES, chapter_path

NBFORMAT, NBFORMAT_MINOR = 4, 5
FIGURE_LINK = re.compile(r"!\[([^\]]*)\]\(\.\./figures/([^)]+\.png)\)")
METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def _lines(text: str) -> list[str]:
    """nbformat's multiline string: a list of lines, each but the last ending in a newline."""
    return text.splitlines(keepends=True)


def markdown_cell(text: str, figures: Path = FIGURES) -> dict:
    """A markdown cell; each embedded figure that exists becomes an image/png attachment."""
    attachments = {}

    def attach(match):
        alt, name = match.groups()
        png = figures / name
        if not png.exists():
            return match.group(0)
        attachments[name] = {"image/png": base64.b64encode(png.read_bytes()).decode("ascii")}
        return f"![{alt}](attachment:{name})"

    cell = {"cell_type": "markdown", "metadata": {}, "source": _lines(FIGURE_LINK.sub(attach, text))}
    if attachments:
        cell["attachments"] = attachments
    return cell


def code_cell(code: str, output: str, count: int) -> dict:
    """A code cell holding one fence (its final newline dropped) and its committed output."""
    outputs = [{"output_type": "stream", "name": "stdout", "text": _lines(output)}] if output else []
    return {"cell_type": "code", "execution_count": count, "metadata": {},
            "outputs": outputs, "source": _lines(code.removesuffix("\n"))}


def chapter_notebook(markdown: str, source: str = "", figures: Path = FIGURES) -> dict:
    """The notebook (a dict in nbformat v4.5) of one chapter's markdown."""
    cells, start, count = [], 0, 0
    if source:
        cells.append(markdown_cell(
            f"*Exported from `{source}` by `python -m moe_np notebook`; the outputs are the "
            f"committed ones. Run it from the repository's root (or after `pip install -e .`).*\n",
            figures))
    for match in FENCE.finditer(markdown):
        prose = markdown[start:match.start()].strip("\n")
        if prose:
            cells.append(markdown_cell(prose + "\n", figures))
        count += 1
        cells.append(code_cell(match.group(1), match.group(2) or "", count))
        start = match.end()
    rest = markdown[start:].strip("\n")
    if rest:
        cells.append(markdown_cell(rest + "\n", figures))
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i + 1}"
    return {"cells": cells, "metadata": METADATA, "nbformat": NBFORMAT,
            "nbformat_minor": NBFORMAT_MINOR}


def write_notebook(number: int, out: str | Path = ".") -> Path:
    """Write chapter `number` as out/NN-slug.ipynb; returns the path written."""
    path = chapter_path(number)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"notebook: --out {str(out)!r} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    notebook = chapter_notebook(path.read_text(), f"tutorials/{path.name}")
    target = folder / (path.stem + ".ipynb")
    target.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    return target
