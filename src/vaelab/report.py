"""One self-contained HTML report: headings, text, tables and PNG figures embedded as base64, so
the single file can be mailed or opened anywhere without its run folders."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import NamedTuple, Sequence

from .atomic import atomic_write
from .reading import read_bytes

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num, td.short { white-space: nowrap; }
.scroll { overflow-x: auto; margin: 1em 0; }
.scroll table { margin: 0; }
.scroll th { white-space: nowrap; }
caption { text-align: left; padding-bottom: .3em; }
.scroll td:first-child { position: sticky; left: 0; background: #fff; }
.scroll th:first-child { position: sticky; left: 0; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.92em; color: #444; margin-top: .3em; }
figcaption b { color: #222; }
.note { background: #fff8e0; border-left: 4px solid #e0b000; padding: .5em .8em; }
.answer { background: #eef5ff; border-left: 4px solid #3a78c2; padding: .5em .8em; }
"""


MAX_FIGURE_BYTES = 64 * 1024 * 1024  # a figure larger than this is not one vaelab drew
# A text cell this short (a name, a setting, "62.1% ± 1.1%") never wraps; a longer one (a sentence)
# does. A table too wide for the page scrolls sideways with its first column held in view,
# rather than squeezing its names into columns a word wide.
SHORT_CELL = 60


class Table(NamedTuple):
    """A table a recipe computed: column headers, rows of cells, and a caption."""

    headers: Sequence[str]
    rows: Sequence[Sequence[object]]
    caption: str | None = None


def table_html(table: Table) -> str:
    """The table as one HTML <table> in a sideways-scrolling box (cells escaped; floats
    right-aligned, 4 significant digits; short text cells on one line)."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f'<td class="num">{v:.4g}</td>'
        text = str(v)
        cls = ' class="short"' if len(text) <= SHORT_CELL else ""
        return f"<td{cls}>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in table.rows)
    cap = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def table_text(table: Table) -> str:
    """The table as plain text for a terminal: columns padded, floats with 4 significant digits
    (as `table_html` shows them), numbers right-aligned."""
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[cell(v) for v in row] for row in table.rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(table.headers)]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) or row[i] == "—"
                   for row in table.rows) for i in range(len(table.headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    lines = [table.caption] if table.caption else []
    lines += [line(table.headers), line(["-" * w for w in widths]), *(line(r) for r in cells)]
    return "\n".join(lines)


def caption_html(what: str, look_for: str | None = None) -> str:
    """A figure's caption: what it shows (bold), then what to look for."""
    caption = f"<b>{html.escape(what)}</b>"
    if look_for:
        caption += f" What to look for: {html.escape(look_for)}"
    return caption


class Report:
    """Build a report block by block; `write` renders it. Text arguments are plain text (escaped)."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, css_class: str | None = None) -> None:
        cls = f' class="{css_class}"' if css_class else ""
        self.blocks.append(f"<p{cls}>{html.escape(text)}</p>")

    def items(self, lead: str, items: Sequence[str]) -> None:
        """A sentence introducing a bulleted list."""
        lis = "".join(f"<li>{html.escape(i)}</li>" for i in items)
        self.blocks.append(f"<p>{html.escape(lead)}</p><ul>{lis}</ul>")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]], caption: str | None = None) -> None:
        self.blocks.append(table_html(Table(headers, rows, caption)))

    def figure(self, path: str | Path, what: str, look_for: str | None = None) -> None:
        """Embed a PNG with a caption saying what it shows and what to look for."""
        data = base64.b64encode(read_bytes(path, MAX_FIGURE_BYTES, "figure")).decode("ascii")
        self.blocks.append(f'<figure><img alt="{html.escape(what)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{caption_html(what, look_for)}</figcaption></figure>")

    def page(self, page_html: str, what: str, link: str | None = None, height: int = 1000) -> None:
        """Embed a whole HTML page (the explorer's export) in a frame, so that the report stays one
        file that works offline; `link` names a copy of the page beside the report for a window of
        its own."""
        caption = f"<b>{html.escape(what)}</b>"
        if link:
            caption += f' Also beside this file: <a href="{html.escape(link)}">{html.escape(link)}</a>.'
        self.blocks.append(f'<figure><iframe title="{html.escape(what)}" srcdoc="{html.escape(page_html)}" '
                           f'style="width: 100%; height: {height}px; border: 1px solid #ddd;"></iframe>'
                           f"<figcaption>{caption}</figcaption></figure>")

    def render(self) -> str:
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body>"
                f"<h1>{html.escape(self.title)}</h1>\n" + "\n".join(self.blocks) + "\n</body></html>\n")

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write(path, self.render().encode("utf-8"))
        return path
