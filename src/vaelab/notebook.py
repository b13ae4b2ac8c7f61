"""Results shown inline in a Jupyter notebook: a run's figures with the captions the recipe
reports give them, tables, and answers, as the example notebooks (examples/) show them.

Each call displays rich output (the PNG, or HTML) beside a plain-text twin, so a notebook reads
the same in JupyterLab, in a terminal front end and in the executed file a test inspects. The
figures are the PNGs vaelab writes into a run's figures/ (plots.py draws them once, for the CLI,
the report and the notebook alike). IPython is imported where something is shown: every Jupyter
kernel has it, and vaelab does not depend on it.
"""

from __future__ import annotations

import html
from pathlib import Path

from .recipes import ITEMS, StepResult, caption
from .report import Table, caption_html, table_html


def _display(plain: str, rich: dict[str, object]) -> None:
    from IPython.display import display

    display({"text/plain": plain, **rich}, raw=True)


def show_figure(path: str | Path, what: str | None = None, look_for: str | None = None) -> None:
    """The PNG at `path`, then its caption: what it shows and what to look for."""
    from IPython.display import Image, display

    display(Image(filename=str(path)))
    if what:
        plain = what + (f" What to look for: {look_for}" if look_for else "")
        _display(plain, {"text/html": f"<p style='font-size: 0.92em'>{caption_html(what, look_for)}</p>"})


def show_figures(result: StepResult, *keys: str) -> None:
    """Figures of a recipe step (keys of `result.figures`: "loss_curves", "samples", ...; all of
    them if none is named), each with the caption the recipe's report gives it, computed from the
    step's measurements, and the comments a discussion attached to it."""
    item = ITEMS.get(result.step.dataset, "image")
    for key in keys or tuple(result.figures):
        if key not in result.figures:
            raise KeyError(f"{result.step.key} has no figure {key!r}; it has {', '.join(result.figures)}")
        text = caption(result, key, item)
        show_figure(result.figures[key], *(text or ()))
        for note in result.notes.get(key, []):
            show_answer(note)


def show_table(table: Table) -> None:
    """A table as HTML, with an aligned plain-text twin."""
    cells = [[str(h) for h in table.headers]] + [[str(v) for v in row] for row in table.rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(len(cells[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    plain = "\n".join(([table.caption] if table.caption else []) + lines)
    _display(plain, {"text/html": table_html(table)})


def show_answer(text: str) -> None:
    """A sentence computed from measurements, set off as an answer."""
    _display(text, {"text/html": "<p style='background: #eef5ff; border-left: 4px solid #3a78c2; "
                                 f"padding: .5em .8em'>{html.escape(text)}</p>"})
