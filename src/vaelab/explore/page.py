"""The explorer's page: one HTML file with its style, script and data inlined, the same for the
server (which answers its decode and encode requests) and for `--export` (which embeds a grid of
decodes instead, one per class for a conditional model). Plain HTML, CSS and a <canvas>: a scatter, a few images and sliders need no web
library, and nothing is fetched from anywhere at run time.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path

from ..atomic import atomic_write
from .space import LatentSpace


def _static(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def render_page(data: dict) -> str:
    """The page for `data` (see `LatentSpace.page_data`)."""
    # Inside <script> only "</" can end the element early; "<\/" is the same JSON string.
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    page = _static("explore.html")
    for key, value in (("title", html.escape(f"vaelab explore: {data['title']}")), ("style", _static("explore.css")),
                       ("script", _static("explore.js")), ("data", payload)):
        page = page.replace("{{" + key + "}}", value, 1)
    return page


def export_page(space: LatentSpace, path: str | Path, grid: int | None = None) -> Path:
    """Write the page with a grid x grid atlas of decodes (one per class for a conditional model;
    grid: `space.export_grid` unless given) and no server behind it, atomically."""
    path = Path(path)
    atlas = space.export_grid if grid is None else grid
    atomic_write(path, render_page(space.page_data(atlas=atlas)).encode("utf-8"))
    return path
