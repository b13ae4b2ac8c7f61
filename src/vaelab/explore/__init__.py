"""`vaelab explore`: a page in the browser to move through a trained model's latent space.

    space.py    the model side: codes, the plane they are shown on, decode and encode
    page.py     the one HTML page (static/ holds its HTML, CSS and JS), and --export
    server.py   the local HTTP server: the page and a small JSON API
"""

from .page import export_page, render_page
from .server import make_server
from .space import LatentSpace

__all__ = ["LatentSpace", "export_page", "make_server", "render_page"]
