"""The model side of the explorer: the codes of some test images, the plane they are shown on,
and the decode / encode calls the page makes, each returning plain JSON-ready values.

The plane is z = origin + x * axes[0] + y * axes[1]. For a 2-D latent it is the latent plane
itself (origin 0, axes the unit vectors); for a higher-dimensional one it passes through the
codes' mean along their first two principal axes, and the sliders add an offset along single
latent axes, so the decoded point is the PCA back-projection plus the slider offsets. The page
computes z the same way from the numbers `page_data` gives it.

A conditional model (a `cvae`) decodes a class as well as a code: every decode and encode here
then takes the class as an index (`label`), and the codes shown are the posterior means of the
test images given their own labels. Its z holds the style the label leaves out, so one z decoded
as each class draws every class in one style.
"""

from __future__ import annotations

import base64
import io
import math
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..figures import encode_means, principal_axes
from ..inference import batched

# The drawing pad's heading: what the dataset's images are.
PAD_TITLES = {"mnist": "Draw a digit", "fashion-mnist": "Draw a garment, shoe or bag"}
MAX_SLIDERS = 10  # beyond this many a page of sliders is no longer something to play with
SLIDER_STDS = 3.0  # a slider spans +-3 standard deviations of the codes along its axis
EXPORT_GRID = 64  # decodes per side of the exported page's grid: 4096 images, about 1.5 MB of PNG
DECODE_CHUNK = 1024


@dataclass
class Plane:
    """Where the 2-D view lies in latent space; `axes` are orthonormal rows (2, D), the second
    one zero for a 1-D latent."""

    origin: torch.Tensor  # (D,) float64
    axes: torch.Tensor  # (2, D) float64
    labels: tuple[str, str]
    note: str

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, 2) plane coordinates."""
        return (z.double() - self.origin) @ self.axes.T

    def lift(self, xy: torch.Tensor) -> torch.Tensor:
        """(N, 2) plane coordinates -> (N, D) latent points on the plane."""
        return self.origin + xy.double() @ self.axes


def latent_plane(codes: torch.Tensor) -> Plane:
    d = codes.shape[1]
    if d == 2:
        return Plane(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), ("z1", "z2"),
                     "The 2-D latent plane itself: z1 across, z2 up.")
    if d == 1:
        return Plane(torch.zeros(1, dtype=torch.float64), torch.tensor([[1.0], [0.0]], dtype=torch.float64),
                     ("z", "jitter"), "A 1-D latent: z across; the points are spread vertically at random "
                     "so they do not hide each other (the vertical position means nothing).")
    mean, axes, share = principal_axes(codes, 2)
    return Plane(mean, axes, (f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%} of variance)"),
                 f"A plane through the {d}-D codes by PCA: their mean and first two principal axes, which "
                 f"explain {share[0]:.0%} and {share[1]:.0%} of the codes' variance. The decoded point is "
                 f"the point of the plane under the mouse plus the sliders' offsets.")


def export_grid(n_atlases: int) -> int:
    """Decodes per side of each atlas of an exported page holding `n_atlases` of them (a
    conditional model's page holds one per class). The 4096 decodes of one 64 x 64 atlas are
    shared among them: 64 / sqrt(n) per side, 20 for ten classes, so the page weighs about what
    an unconditional one does (1.6 MB for the 2-D MNIST cvae; 32 per class would be 3.9 MB, 64
    per class 15 MB). A cell is then 30 pixels of the 600-pixel plane: fine for a code that
    holds only the style, which changes slowly across the plane."""
    return max(8, round(EXPORT_GRID / math.sqrt(n_atlases)))


def view_box(points: torch.Tensor) -> list[float]:
    """[x0, x1, y0, y1]: a square around 99 % of the points (outliers would shrink the rest to a
    dot), with a margin, so distances look the same across and up."""
    lo = torch.quantile(points, 0.005, dim=0)
    hi = torch.quantile(points, 0.995, dim=0)
    centre = (lo + hi) / 2
    half = max(float((hi - lo).max()) / 2 * 1.15, 1e-3)
    return [float(centre[0]) - half, float(centre[0]) + half, float(centre[1]) - half, float(centre[1]) + half]


def to_bytes(images: torch.Tensor) -> np.ndarray:
    """(B, 1, 28, 28) intensities in [0, 1] -> (B, 784) uint8, as the page draws them."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).reshape(len(images), -1).cpu().numpy()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class LatentSpace:
    """A trained model and the codes of `n_points` test images, ready to answer the page."""

    def __init__(self, model, images: torch.Tensor, labels: torch.Tensor, classes, dataset: str,
                 run_name: str = "", n_points: int = 3000, seed: int = 0):
        self.model = model.eval()
        self.classes = [str(c) for c in classes]
        self.conditional = bool(model.conditional)
        n_labels = getattr(model.config, "n_classes", len(self.classes))
        if self.conditional and n_labels != len(self.classes):
            raise ConfigError(f"{model.name} takes {n_labels} classes, but {dataset} has {len(self.classes)}")
        self.dataset, self.run_name = dataset, run_name
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(images), generator=g)[:n_points]
        self.labels = labels[idx]
        # (N, D) posterior means; a conditional model's given each image's own label
        self.codes, logvar = encode_means(model, images[idx], self.labels if self.conditional else None)
        self.has_std = logvar is not None
        self.plane = latent_plane(self.codes)
        points = self.plane.project(self.codes).float()
        if self.latent_dim == 1:
            points[:, 1] = (torch.rand(len(points), generator=g) - 0.5) * float(points[:, 0].std() or 1.0)
        self.points = points
        self.box = view_box(points)
        self.sliders = self._sliders(logvar)
        # One decode at a time: the server answers on several threads, and torch's intra-op threads
        # are already sized for the machine.
        self._lock = threading.Lock()

    @classmethod
    def from_run(cls, run, data, n_points: int = 3000, seed: int = 0) -> "LatentSpace":
        return cls(run.model, data.test_x, data.test_y, data.classes, data.name, run_name=run.path.name,
                   n_points=n_points, seed=seed)

    @property
    def latent_dim(self) -> int:
        return self.codes.shape[1]

    @property
    def export_grid(self) -> int:
        """Decodes per side of each atlas `--export` embeds: one atlas, or one per class."""
        return export_grid(len(self.classes) if self.conditional else 1)

    def _sliders(self, logvar: torch.Tensor | None) -> list[dict]:
        d = self.latent_dim
        if d <= 2:
            return []
        mu = self.codes.double()
        if logvar is not None:  # mean KL(q(z_d|x) || N(0, 1)) per axis: the axes the model uses
            lv = logvar.double()
            score, what = (0.5 * (mu.pow(2) + lv.exp() - 1 - lv)).mean(0), "mean KL {:.2f} nats"
        else:
            score, what = mu.var(0), "variance {:.3g}"
        dims = sorted(range(d), key=lambda i: -float(score[i]))[:MAX_SLIDERS]
        std = mu.std(0)
        return [{"dim": i, "label": f"z{i + 1}", "about": what.format(float(score[i])),
                 "range": max(SLIDER_STDS * float(std[i]), 1e-3)} for i in dims]

    # --- what the page asks -------------------------------------------------------------------

    def condition(self, label: int | None, n: int) -> torch.Tensor | None:
        """The (n,) condition for `label`, None for an unconditional model. A label must be given
        exactly when the model is conditional: one ignored, or one missing, would draw something
        other than what was asked."""
        if not self.conditional:
            if label is not None:
                raise ConfigError(f"{self.model.name} is unconditional: it takes no class")
            return None
        if label is None or not 0 <= label < len(self.classes):
            raise ConfigError(f"{self.model.name} is conditional: pass a class in 0..{len(self.classes) - 1}, "
                              f"got {label}")
        return torch.full((n,), label, dtype=torch.long)

    def decode(self, z: torch.Tensor, label: int | None = None) -> np.ndarray:
        """(B, D) latent points, decoded as class `label` for a conditional model -> (B, 784) uint8 images."""
        y = self.condition(label, len(z))
        inputs = (z.float(),) if y is None else (z.float(), y)
        with self._lock:
            images = batched(self.model.decode, *inputs, batch_size=DECODE_CHUNK, device=self.model.device)
        return to_bytes(images)

    @torch.inference_mode()
    def encode(self, image: torch.Tensor, label: int | None = None) -> dict:
        """A (784,) image in [0, 1] (given class `label` for a conditional model) -> its posterior
        mean, std (None for an autoencoder), its place on the plane, the 1-std ellipse of q(z|x)
        projected on the plane, and its reconstruction (decoded as the same class)."""
        y = self.condition(label, 1)
        x = image.float().reshape(1, 1, 28, 28).to(self.model.device)
        with self._lock:
            post = self.model.encode(x, None if y is None else y.to(self.model.device))
        mu = post.mu[0].double().cpu()
        out = {"mu": mu.tolist(), "std": None, "point": self.plane.project(mu[None])[0].tolist(),
               "ellipse": None, "reconstruction": b64(self.decode(mu[None], label).tobytes())}
        if post.logvar is not None:
            std = post.logvar[0].double().cpu().mul(0.5).exp()
            out["std"] = std.tolist()
            out["ellipse"] = self.ellipse(std)
        return out

    def ellipse(self, std: torch.Tensor) -> dict:
        """The 1-std ellipse of N(mu, diag(std^2)) projected on the plane: its covariance there is
        A diag(std^2) A^T with A the plane's axes (2, D); radii and angle from its eigenvectors."""
        a = self.plane.axes
        cov = (a * std.pow(2)) @ a.T  # (2, 2)
        values, vectors = torch.linalg.eigh(cov)  # ascending
        major = vectors[:, 1]
        return {"radii": [math.sqrt(max(float(values[1]), 0.0)), math.sqrt(max(float(values[0]), 0.0))],
                "angle": math.atan2(float(major[1]), float(major[0]))}

    def grid_points(self, n: int) -> torch.Tensor:
        """(n * n, D): the centres of an n x n grid over the view box, row by row from the top
        (largest y) down, as the page draws them."""
        x0, x1, y0, y1 = self.box
        xs = x0 + (torch.arange(n, dtype=torch.float64) + 0.5) * (x1 - x0) / n
        ys = y1 - (torch.arange(n, dtype=torch.float64) + 0.5) * (y1 - y0) / n
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return self.plane.lift(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))

    def atlas_png(self, n: int = EXPORT_GRID, label: int | None = None) -> bytes:
        """The decodes of `grid_points(n)` (as class `label` for a conditional model) as one
        greyscale PNG of n x n tiles of 28 x 28."""
        from PIL import Image

        tiles = self.decode(self.grid_points(n), label).reshape(n, n, 28, 28)
        sheet = tiles.transpose(0, 2, 1, 3).reshape(n * 28, n * 28)  # (row, y, col, x) -> rows of pixels
        buf = io.BytesIO()
        Image.fromarray(sheet, mode="L").save(buf, format="PNG", optimize=True)
        return buf.getvalue()

    def page_data(self, atlas: int | None = None) -> dict:
        """Everything the page needs, as JSON-ready values; with `atlas`, an atlas x atlas grid of
        decodes for a page with no server behind it (one per class for a conditional model, in
        the order of `classes`)."""
        kind = "VAE" if self.has_std else "autoencoder"
        d = self.latent_dim
        data = {
            "mode": "static" if atlas else "server",
            "title": f"{self.model.name} ({d}-D latent) on {self.dataset}",
            "model": self.model.name, "kind": kind, "has_std": self.has_std, "latent_dim": d,
            "dataset": self.dataset, "classes": self.classes, "run": self.run_name,
            "conditional": self.conditional,
            "pad_title": PAD_TITLES.get(self.dataset, "Draw an image"),
            "class_note": ("Every image on this page is decoded as the selected class (the drawing is "
                           "encoded given it too): the same z keeps its style while the class changes."
                           if self.conditional else ""),
            "plane": {"origin": self.plane.origin.tolist(), "axes": self.plane.axes.tolist(),
                      "box": self.box, "labels": list(self.plane.labels), "note": self.plane.note},
            "points": {"xy": [round(v, 4) for v in self.points.reshape(-1).tolist()],
                       "labels": self.labels.tolist()},
            "sliders": self.sliders,
            "slider_note": (f"All {d} latent axes." if d <= MAX_SLIDERS else
                            f"The {MAX_SLIDERS} of {d} latent axes the model uses most "
                            f"({'by mean KL to the prior' if self.has_std else 'by variance of the codes'}).")
                           if self.sliders else "",
            "atlas": None,
        }
        if atlas:
            labels = range(len(self.classes)) if self.conditional else [None]
            data["atlas"] = {"n": atlas, "pngs": [b64(self.atlas_png(atlas, label)) for label in labels]}
        return data
