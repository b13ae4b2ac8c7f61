"""`vaelab explore`: the latent space's numbers against the model, the JSON API and its refusals,
the exported page, the command line, and the page itself in headless Chromium.

The reference throughout is the model: whatever the page or the API shows for a code z must be
`model.decode(z)` (as 8-bit grey levels), and a drawn image's code `model.encode(x).mu`; for a
conditional model (`cvae`) `model.decode(z, condition=y)` and `model.encode(x, condition=y)`
with y the class the page has selected.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.cli import main
from vaelab.errors import ConfigError, WriteError
from vaelab.explore import LatentSpace, export_page, make_server
from vaelab.explore.space import MAX_SLIDERS, latent_plane
from vaelab.models import MODELS, build_model, make_config
from vaelab.train import train

from conftest import quick_config, synthetic_data

# One small case per registered model (random weights: a decode is a decode), plus the shapes of
# latent space the page treats differently: 2-D, a few dimensions, more than MAX_SLIDERS.
CASES = {
    "ae": ("ae", dict(hidden_dims=[16], latent_dim=2)),
    "ae-5d": ("ae", dict(hidden_dims=[16], latent_dim=5)),
    "vae": ("vae", dict(hidden_dims=[16], latent_dim=2)),
    "vae-12d": ("vae", dict(hidden_dims=[16], latent_dim=12)),
    "lstm-vae": ("lstm-vae", dict(lstm_hidden=16, latent_dim=3, channels=[8, 4])),
    "vae-gan": ("vae-gan", dict(latent_dim=16)),  # the convolutional default
    "vae-gan-mlp": ("vae-gan", dict(arch="mlp", hidden_dims=[16], dis_hidden_dims=[16, 8], latent_dim=2)),
    # conditional: every decode and encode takes the selected class
    "cvae": ("cvae", dict(hidden_dims=[16], latent_dim=2)),
    "cvae-4d": ("cvae", dict(encoder="lstm", decoder="conv", lstm_hidden=16, channels=[8, 4], latent_dim=4)),
}


def test_every_registered_model_has_a_case():
    assert {name for name, _ in CASES.values()} == set(MODELS)


@pytest.fixture(scope="module")
def data():
    return synthetic_data(n_train=16, n_test=300)


def make_space(case: str, data, **kwargs) -> LatentSpace:
    name, fields = CASES[case]
    torch.manual_seed(0)
    model = build_model(name, make_config(name, **fields)).eval()
    return LatentSpace(model, data.test_x, data.test_y, data.classes, data.name, run_name=case, **kwargs)


def as_bytes(images: torch.Tensor) -> np.ndarray:
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).reshape(len(images), -1).numpy()


def condition(label: int | None, n: int) -> torch.Tensor | None:
    return None if label is None else torch.full((n,), label)


@torch.inference_mode()
def reference_decode(model, z, label: int | None = None) -> np.ndarray:
    """(B, 784) uint8: what the decoder makes of the codes z (as class `label` for a conditional
    model), computed here, not by the explorer."""
    z = torch.as_tensor(z, dtype=torch.float32).reshape(-1, model.latent_dim)
    return as_bytes(model.decode(z, condition(label, len(z))))


def label_for(space) -> int | None:
    """The class a test asks a conditional space for (not 0, the page's default), else None."""
    return 3 if space.conditional else None


def with_class(body: dict, space) -> dict:
    return {**body, "class": label_for(space)} if space.conditional else body


def close(a, b, levels: int = 1) -> bool:
    """Equal images up to `levels` grey levels (float rounding can land either side of .5)."""
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) <= levels


# ---------------------------------------------------------------------------------------------
# The latent space
# ---------------------------------------------------------------------------------------------


def test_a_2d_latent_is_shown_as_itself(data):
    space = make_space("vae", data)
    assert torch.allclose(space.points, space.codes, atol=1e-6)
    assert space.sliders == [] and space.has_std
    x0, x1, y0, y1 = space.box
    inside = ((space.points[:, 0] >= x0) & (space.points[:, 0] <= x1) &
              (space.points[:, 1] >= y0) & (space.points[:, 1] <= y1)).float().mean()
    assert inside >= 0.98 and math.isclose(x1 - x0, y1 - y0)


def test_higher_dimensions_get_a_pca_plane_through_the_codes(data):
    space = make_space("vae-12d", data)
    plane = space.plane
    assert torch.allclose(plane.axes @ plane.axes.T, torch.eye(2, dtype=torch.float64), atol=1e-9)
    assert "PCA" in plane.note and plane.labels[0].startswith("PC 1")
    # A point of the plane goes there and back unchanged; the codes' mean is the origin.
    xy = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=torch.float64)
    assert torch.allclose(plane.project(plane.lift(xy)), xy, atol=1e-9)
    assert torch.allclose(plane.origin, space.codes.double().mean(0), atol=1e-6)
    # No other plane through the mean holds more of the codes' variance than the PCA one.
    centred = space.codes.double() - plane.origin
    kept = (centred @ plane.axes.T).pow(2).sum()
    q, _ = torch.linalg.qr(torch.randn(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert kept >= (centred @ q).pow(2).sum()


def test_sliders_are_the_axes_with_most_kl_or_variance(data):
    vae = make_space("vae-12d", data)
    assert len(vae.sliders) == MAX_SLIDERS
    mu, logvar = vae.codes.double(), None
    from vaelab.figures import encode_means

    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.test_x), generator=g)[:3000]
    mu, logvar = encode_means(vae.model, data.test_x[idx])
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu.double(), logvar.double().mul(0.5).exp()),
        torch.distributions.Normal(0.0, 1.0)).mean(0)
    assert [s["dim"] for s in vae.sliders] == kl.argsort(descending=True)[:MAX_SLIDERS].tolist()
    ae = make_space("ae-5d", data)
    assert sorted(s["dim"] for s in ae.sliders) == list(range(5))  # five axes: a slider each
    assert all("variance" in s["about"] for s in ae.sliders)
    assert make_space("ae", data).sliders == []


def test_ellipse_is_the_posterior_projected_on_the_plane():
    codes = torch.randn(200, 4, generator=torch.Generator().manual_seed(1)) * torch.tensor([3.0, 2.0, 1.0, 0.5])
    space = LatentSpace.__new__(LatentSpace)
    space.plane = latent_plane(codes)
    std = torch.tensor([0.5, 1.5, 0.2, 0.9], dtype=torch.float64)
    ell = space.ellipse(std)
    # Reference: the covariance of many samples of N(0, diag(std^2)) projected on the plane.
    samples = torch.randn(200_000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * std
    cov = np.cov(space.plane.project(samples + space.plane.origin).numpy().T)
    values, vectors = np.linalg.eigh(cov)
    assert np.allclose(ell["radii"], np.sqrt(values[::-1]), rtol=0.01)
    assert abs(abs(math.cos(ell["angle"] - math.atan2(vectors[1, 1], vectors[0, 1]))) - 1) < 1e-3


# ---------------------------------------------------------------------------------------------
# The JSON API over HTTP
# ---------------------------------------------------------------------------------------------


class Served:
    def __init__(self, space: LatentSpace):
        self.space = space
        self.server = make_server(space)
        # shutdown() waits for serve_forever's next poll: 0.5 s by default, per server.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = self.server.url

    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                headers: dict | None = None) -> tuple[int, dict | bytes]:
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            sent = {"Content-Type": "application/json"} if method == "POST" else {}
            conn.request(method, path, body=body, headers={**sent, **(headers or {})})
            response = conn.getresponse()
            raw = response.read()
            if response.getheader("Content-Type", "").startswith("application/json"):
                return response.status, json.loads(raw)
            return response.status, raw
        finally:
            conn.close()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module", params=sorted(CASES))
def served(request, data):
    s = Served(make_space(request.param, data, n_points=200))
    yield s
    s.close()


def test_page_and_info(served):
    status, page = served.request("GET", "/")
    assert status == 200 and b'id="vaelab-data"' in page and b"http" not in page.split(b"<script>", 1)[1]
    status, info = served.request("GET", "/api/info")
    model = served.space.model
    assert status == 200 and info["latent_dim"] == model.latent_dim and info["model"] == model.name
    assert info["has_std"] == (model.encode(torch.zeros(1, 1, 28, 28), condition(label_for(served.space), 1))
                               .logvar is not None)
    assert len(info["points"]["xy"]) == 2 * len(info["points"]["labels"]) == 400
    assert info["classes"] == [str(i) for i in range(10)] and info["mode"] == "server"
    assert info["conditional"] is model.conditional and bool(info["class_note"]) is model.conditional


def test_decode_answers_what_the_decoder_makes(served):
    d = served.space.latent_dim
    z = torch.randn(5, d, generator=torch.Generator().manual_seed(3)).tolist()
    status, answer = served.request("POST", "/api/decode", with_class({"z": z}, served.space))
    assert status == 200
    images = np.stack([np.frombuffer(base64.b64decode(s), np.uint8) for s in answer["images"]])
    assert images.shape == (5, 784)
    assert close(images, reference_decode(served.space.model, z, label_for(served.space)))


def test_encode_answers_the_posterior_and_its_reconstruction(served, data):
    x = data.test_x[7].float().div(255)
    status, answer = served.request("POST", "/api/encode", with_class({"image": x.reshape(-1).tolist()}, served.space))
    assert status == 200
    model, label = served.space.model, label_for(served.space)
    with torch.inference_mode():
        post = model.encode(x.reshape(1, 1, 28, 28), condition(label, 1))
    assert np.allclose(answer["mu"], post.mu[0].numpy(), atol=1e-5)
    assert np.allclose(answer["point"], served.space.plane.project(post.mu.double())[0].numpy(), atol=1e-5)
    if post.logvar is None:
        assert answer["std"] is None and answer["ellipse"] is None
    else:
        assert np.allclose(answer["std"], post.logvar[0].mul(0.5).exp().numpy(), rtol=1e-5)
        assert len(answer["ellipse"]["radii"]) == 2
    recon = np.frombuffer(base64.b64decode(answer["reconstruction"]), np.uint8)
    assert close(recon, reference_decode(model, post.mu, label)[0])


BAD_REQUESTS = [  # (method, path, body, headers, status, words in the message)
    ("POST", "/api/decode", "{bad", None, 400, "not JSON"),
    ("POST", "/api/decode", "[1, 2]", None, 400, "JSON object"),
    ("POST", "/api/decode", {"z": []}, None, 400, "list of latent points"),
    ("POST", "/api/decode", {"z": [[0.0] * 40]}, None, 400, "numbers, got a list of 40"),
    ("POST", "/api/decode", {"z": [["a"] * 2]}, None, 400, "not a number"),
    ("POST", "/api/decode", '{"z": [[NaN, 0]]}', None, 400, "non-finite"),
    ("POST", "/api/decode", '{"z": [[1e999, 0]]}', None, 400, "non-finite"),
    ("POST", "/api/decode", {"z": 3}, None, 400, "list of latent points"),
    ("POST", "/api/decode", {"z": [[0.0, 0.0]] * 1025}, None, 400, "at most 1024"),
    ("POST", "/api/encode", {"image": [0.5] * 783}, None, 400, "784 numbers"),
    ("POST", "/api/encode", {"image": [2.0] * 784}, None, 400, "[0, 1]"),
    ("POST", "/api/encode", {"image": [True] * 784}, None, 400, "not a number"),
    # The length alone decides: the server answers before reading (and never reads) the body.
    ("POST", "/api/decode", "{}", {"Content-Length": str(5 << 20)}, 413, "at most"),
    ("POST", "/api/nothing", "{}", None, 404, "not found"),
    ("POST", "/api/decode", '{"z": [[0, 0]]}', {"Content-Type": "text/plain"}, 415, "application/json"),
    ("POST", "/api/encode", "{}", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ("GET", "/etc/passwd", None, None, 404, "not found"),
    ("GET", "/../../etc/passwd", None, None, 404, "not found"),
    ("GET", "/%2e%2e/%2e%2e/etc/passwd", None, None, 404, "not found"),
    ("GET", "/static/explore.js", None, None, 404, "not found"),
    ("GET", "/api/", None, None, 404, "not found"),
    ("PUT", "/api/decode", "{}", None, 405, "not allowed"),
    ("DELETE", "/", None, None, 405, "not allowed"),
    ("GET", "/", None, {"Host": "attacker.example:80"}, 403, "refused"),
]


@pytest.fixture(scope="module")
def served_vae(data):
    s = Served(make_space("vae", data, n_points=100))
    yield s
    s.close()


@pytest.mark.parametrize("method, path, body, headers, status, words", BAD_REQUESTS,
                         ids=[f"{m} {p} {i}" for i, (m, p, *_) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_a_4xx_and_one_line(served_vae, method, path, body, headers, status, words):
    got, answer = served_vae.request(method, path, body, headers)
    assert got == status, answer
    assert isinstance(answer, dict) and words in answer["error"] and "\n" not in answer["error"]


def test_a_post_without_length_and_a_garbled_request_line(served_vae):
    import socket

    for raw, status in ((b"POST /api/decode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\r\n", 411),
                        (b"GARBLED\r\n\r\n", 400)):
        with socket.create_connection(("127.0.0.1", served_vae.server.port), timeout=10) as sock:
            sock.sendall(raw)
            reply = sock.makefile("rb").read()
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.split()[1] == str(status).encode(), reply
        assert "error" in json.loads(body)
    assert served_vae.request("GET", "/api/info")[0] == 200  # still serving


def test_server_binds_to_loopback_by_default(served_vae):
    assert served_vae.server.server_address[0] == "127.0.0.1"


# ---------------------------------------------------------------------------------------------
# --export
# ---------------------------------------------------------------------------------------------


def atlases_of(page: str) -> tuple[int, list[np.ndarray]]:
    """An exported page's grid size and its atlases (one, or one per class), as pixel sheets."""
    payload = json.loads(re.search(r'<script type="application/json" id="vaelab-data">(.*?)</script>',
                                   page, re.S).group(1))
    sheets = [np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in payload["atlas"]["pngs"]]
    return payload["atlas"]["n"], sheets


def tiles_of(sheet: np.ndarray, n: int) -> np.ndarray:
    """(n * 28, n * 28) -> (n * n, 784), row by row from the top, as `grid_points` orders them."""
    return sheet.reshape(n, 28, n, 28).transpose(0, 2, 1, 3).reshape(n * n, 784)


@pytest.mark.parametrize("case", ["vae", "ae-5d"])
def test_export_is_one_self_contained_file_of_the_decoder_s_images(tmp_path, data, case):
    space = make_space(case, data, n_points=200)
    page = export_page(space, tmp_path / "page.html", grid=8).read_text()
    # Nothing is fetched from anywhere: no URL in a src or href, no http(s) at all.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http:" not in page and "https:" not in page and "@import" not in page
    n, sheets = atlases_of(page)
    assert n == 8 and len(sheets) == 1 and sheets[0].shape == (8 * 28, 8 * 28)
    assert close(tiles_of(sheets[0], 8), reference_decode(space.model, space.grid_points(8)))


def test_export_failure_keeps_the_previous_file(tmp_path, data, monkeypatch):
    space = make_space("vae", data, n_points=50)
    out = tmp_path / "page.html"
    out.write_text("previous")
    monkeypatch.setattr(space, "atlas_png", lambda n, label=None: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):
        export_page(space, out, grid=4)
    assert out.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["page.html"]
    (tmp_path / "dir.html").mkdir()
    with pytest.raises(WriteError):
        export_page(make_space("vae", data, n_points=50), tmp_path / "dir.html", grid=4)


# ---------------------------------------------------------------------------------------------
# A conditional model: the class the page selects goes into every decode and encode
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cvae_data():
    return synthetic_data(n_train=256, n_test=300)


@pytest.fixture(scope="module")
def trained_cvae(cvae_data):
    """A 2-D cvae trained 160 steps on the synthetic bars (class k: a bar at its own angle), so
    its decoder draws the class it is given (as in test_cvae); the explorer's space over its 300
    test images."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = train("cvae", make_config("cvae", hidden_dims=[64], latent_dim=2),
                        quick_config(epochs=10, batch_size=16, lr=3e-3), Path(tmp) / "cvae", progress=False,
                        data=cvae_data)
    d = cvae_data
    return LatentSpace(trainer.model.eval(), d.test_x, d.test_y, d.classes, d.name, run_name="cvae", n_points=300)


def test_a_conditional_page_says_so_and_lists_the_classes(trained_cvae, data):
    page = trained_cvae.page_data()
    assert page["conditional"] is True and page["classes"] == [str(i) for i in range(10)]
    assert "selected class" in page["class_note"] and page["atlas"] is None
    plain = make_space("vae", data, n_points=50).page_data()
    assert plain["conditional"] is False and plain["class_note"] == ""


def test_the_drawing_pad_asks_for_what_the_dataset_holds(data):
    import dataclasses

    assert make_space("vae", data, n_points=50).page_data()["pad_title"] == "Draw a digit"
    fashion = dataclasses.replace(data, name="fashion-mnist")
    assert make_space("vae", fashion, n_points=50).page_data()["pad_title"] == "Draw a garment, shoe or bag"


def test_a_conditional_model_for_other_classes_than_the_data_s_is_refused(data):
    model = build_model("cvae", make_config("cvae", hidden_dims=[16], n_classes=12))
    with pytest.raises(ConfigError, match="cvae takes 12 classes, but mnist has 10"):
        LatentSpace(model, data.test_x, data.test_y, data.classes, data.name)


def test_conditional_codes_are_posterior_means_given_each_image_s_own_label(trained_cvae, cvae_data):
    from vaelab.data import to_float

    idx = torch.randperm(len(cvae_data.test_x), generator=torch.Generator().manual_seed(0))[:300]
    x, y = to_float(cvae_data.test_x[idx]), cvae_data.test_y[idx]
    model = trained_cvae.model
    with torch.inference_mode():
        own, other = model.encode(x, y).mu, model.encode(x, (y + 1) % 10).mu
    assert torch.equal(trained_cvae.labels, y)
    assert torch.allclose(trained_cvae.codes, own, atol=1e-5)
    assert not torch.allclose(trained_cvae.codes, other, atol=1e-3)  # the label matters to the codes


def test_conditional_decode_draws_the_same_z_as_each_class(trained_cvae, data):
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(4))
    model = trained_cvae.model
    two, seven = trained_cvae.decode(z, 2), trained_cvae.decode(z, 7)
    assert close(two, reference_decode(model, z, 2)) and close(seven, reference_decode(model, z, 7))
    # The synthetic classes are bars at different angles: the two classes' images differ widely.
    assert np.abs(two.astype(np.int16) - seven.astype(np.int16)).mean(1).min() > 10
    for bad in (None, 10, -1):
        with pytest.raises(ConfigError, match="is conditional: pass a class in 0..9"):
            trained_cvae.decode(z, bad)
    with pytest.raises(ConfigError, match="vae is unconditional: it takes no class"):
        make_space("vae", data, n_points=50).decode(z, 2)


def test_conditional_encode_is_given_the_class_and_reconstructs_as_it(trained_cvae, cvae_data):
    x = cvae_data.test_x[5].float().div(255)
    model, answers = trained_cvae.model, {}
    for label in (2, 7):
        answers[label] = answer = trained_cvae.encode(x.reshape(-1), label)
        with torch.inference_mode():
            post = model.encode(x.reshape(1, 1, 28, 28), torch.tensor([label]))
        assert np.allclose(answer["mu"], post.mu[0].numpy(), atol=1e-5)
        assert np.allclose(answer["std"], post.logvar[0].mul(0.5).exp().numpy(), rtol=1e-5)
        recon = np.frombuffer(base64.b64decode(answer["reconstruction"]), np.uint8)
        assert close(recon, reference_decode(model, post.mu, label)[0])
    assert not np.allclose(answers[2]["mu"], answers[7]["mu"], atol=1e-3)
    assert answers[2]["reconstruction"] != answers[7]["reconstruction"]


@pytest.fixture(scope="module")
def served_cvae(data):
    s = Served(make_space("cvae", data, n_points=100))
    yield s
    s.close()


MISSING = object()
CLASS_ERRORS = [  # (model, endpoint, the "class" field, words in the message)
    ("cvae", "decode", MISSING, 'decode: cvae is conditional: pass "class", an index in 0..9'),
    ("cvae", "encode", MISSING, 'encode: cvae is conditional: pass "class", an index in 0..9'),
    ("cvae", "decode", 10, '"class" 10 out of range: mnist has classes 0..9'),
    ("cvae", "encode", -1, '"class" -1 out of range'),
    ("cvae", "decode", "3", 'must be an index in 0..9, got "3"'),
    ("cvae", "decode", 3.0, "must be an index in 0..9, got 3.0"),
    ("cvae", "encode", True, "must be an index in 0..9, got true"),
    ("cvae", "decode", None, "must be an index in 0..9, got null"),
    ("vae", "decode", 3, 'decode: "class" given, but vae is unconditional: it takes no class'),
    ("vae", "encode", 0, 'encode: "class" given, but vae is unconditional'),
    ("vae", "decode", None, "unconditional"),  # even null: the field is not this model's
]


@pytest.mark.parametrize("model, endpoint, label, words", CLASS_ERRORS,
                         ids=[f"{m} {e} {i}" for i, (m, e, *_) in enumerate(CLASS_ERRORS)])
def test_a_missing_wrong_or_unexpected_class_is_a_400_in_one_line(served_vae, served_cvae, model, endpoint,
                                                                 label, words):
    served = served_cvae if model == "cvae" else served_vae
    body = {"z": [[0.0] * served.space.latent_dim]} if endpoint == "decode" else {"image": [0.5] * 784}
    if label is not MISSING:
        body["class"] = label
    got, answer = served.request("POST", f"/api/{endpoint}", body)
    assert got == 400 and words in answer["error"] and "\n" not in answer["error"], answer
    body["class"] = 1 if model == "cvae" else MISSING  # the same request with the class right: answered
    got, _ = served.request("POST", f"/api/{endpoint}", {k: v for k, v in body.items() if v is not MISSING})
    assert got == 200


def test_export_holds_an_atlas_per_class(tmp_path, trained_cvae, data):
    page = export_page(trained_cvae, tmp_path / "page.html").read_text()
    n, sheets = atlases_of(page)
    # By default the 64 x 64 decodes of an unconditional page, shared among the ten classes.
    assert n == trained_cvae.export_grid == 20 and make_space("vae", data, n_points=50).export_grid == 64
    assert len(sheets) == 10
    grid, model = trained_cvae.grid_points(n), trained_cvae.model
    for label, sheet in enumerate(sheets):
        assert close(tiles_of(sheet, n), reference_decode(model, grid, label)), label
    assert len({sheet.tobytes() for sheet in sheets}) == 10


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def trained_vae(tmp_path, synthetic_mnist):
    run = tmp_path / "run"
    train("vae", make_config("vae", hidden_dims=[32], latent_dim=2), quick_config(), run, progress=False)
    return run


def test_cli_export(tmp_path, trained_vae, capsys):
    out = tmp_path / "page.html"
    assert main(["explore", str(trained_vae), "--export", str(out), "--points", "100"]) == 0
    assert "wrote" in capsys.readouterr().out and out.stat().st_size > 10_000


@pytest.mark.parametrize("argv, words", [
    (["--export", "page.png"], "name it *.html"),
    (["--port", "70000"], "between 0"),
    (["--points", "2"], "at least 3"),
])
def test_cli_refuses_bad_options_in_one_line(trained_vae, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main(["explore", str(trained_vae), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and err.count("\n") == 1


def test_cli_missing_run_is_one_line(tmp_path, capsys):
    assert main(["explore", str(tmp_path / "nothing"), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert "no such run folder" in err and err.count("\n") == 1


def test_cli_port_in_use_is_one_line(trained_vae, capsys):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["explore", str(trained_vae), "--no-browser", "--port", str(port), "--points", "50"]) == 2
    err = capsys.readouterr().err
    assert "already in use" in err and err.count("\n") == 1


def test_cli_serves_until_ctrl_c_then_exits_0(tmp_path, trained_vae):
    script = Path(__file__).resolve().parent / "_synthetic_cli.py"
    source = tmp_path / "source"  # the files the synthetic_mnist fixture wrote
    proc = subprocess.Popen([sys.executable, str(script), "--data", str(source), "--", "explore", str(trained_vae),
                             "--no-browser", "--port", "0", "--points", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # started with SIGINT ignored, as `cmd &` in a script starts it: Ctrl-C must still stop it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert url, line + proc.stderr.read()
        conn = http.client.HTTPConnection("127.0.0.1", int(url.group(1)), timeout=30)
        conn.request("GET", "/api/info")
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGINT)
        # Generous: a loaded CI machine can take long to tear the interpreter down; a hang still fails.
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# In a real browser: headless Chromium through Selenium
# ---------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Debian's chromium-driver puts chromedriver in /usr/bin, which a venv's PATH may lack.
CHROMEDRIVER = shutil.which("chromedriver") or shutil.which("chromedriver", path="/usr/bin:/usr/lib/chromium")


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not CHROMIUM or not CHROMEDRIVER:
        return "no Chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)"
    return None


def browser_test(test):
    """Marked `browser`; skipped, saying why, where Chromium, chromedriver or Selenium is missing."""
    missing = _browser_missing()
    return pytest.mark.browser(pytest.mark.skipif(missing is not None, reason=missing or "")(test))


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1000",
                "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def trained_spaces(trained_cvae):
    """Small trained models, so that the decodes differ visibly across the plane."""
    import tempfile

    data = synthetic_data(n_train=512, n_test=300)
    spaces = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, name, fields in (("vae", "vae", dict(hidden_dims=[32], latent_dim=2)),
                                  ("ae-5d", "ae", dict(hidden_dims=[32], latent_dim=5))):
            trainer = train(name, make_config(name, **fields), quick_config(epochs=3), Path(tmp) / key,
                            progress=False, data=data)
            spaces[key] = LatentSpace(trainer.model.eval(), data.test_x, data.test_y, data.classes, data.name,
                                      run_name=key, n_points=300)
    spaces["cvae"] = trained_cvae
    return spaces


@pytest.fixture(scope="module", params=["vae", "ae-5d", "cvae"])
def page(request, trained_spaces):
    s = Served(trained_spaces[request.param])
    yield s
    s.close()


def wait_for(driver, script: str, timeout: float = 60, *args):
    """Poll a JS expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {script}")
        time.sleep(0.05)


def open_page(driver, url):
    driver.get(url)
    wait_for(driver, "return window.vaelab && window.vaelab.ready && window.vaelab.shown")
    driver.get_log("browser")  # start each test with an empty console


def console_errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def expected_z(space, fx: float, fy: float, offsets=None) -> np.ndarray:
    """The code under the mouse at fraction (fx, fy) of the plane canvas, as the page defines it."""
    x0, x1, y0, y1 = space.box
    z = space.plane.lift(torch.tensor([[x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)]], dtype=torch.float64))[0].numpy()
    return z + (offsets if offsets is not None else 0)


def hover(driver, fx: float, fy: float):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    overlay = driver.find_element(By.ID, "overlay")
    w, h = overlay.size["width"], overlay.size["height"]
    # Selenium 4 offsets are from the element's centre.
    ActionChains(driver).move_to_element_with_offset(overlay, int(fx * w - w / 2), int(fy * h - h / 2)).perform()
    return overlay


def shown_at(driver, space, fx, fy, offsets=None) -> dict:
    """Wait until the page shows the decode of the point at (fx, fy); return what it shows."""
    target = expected_z(space, fx, fy, offsets)
    tol = 1.5 * (space.box[1] - space.box[0]) / 600  # a pixel and a half of the 600-pixel canvas
    deadline = time.monotonic() + 60
    while True:
        shown = driver.execute_script("return window.vaelab.shown")
        if np.abs(np.asarray(shown["z"]) - target).max() <= tol:
            return shown
        assert time.monotonic() < deadline, f"page shows z={shown['z']}, mouse is at z={target.tolist()}"
        time.sleep(0.05)


def canvas_pixels(driver, element_id: str) -> list[int]:
    return driver.execute_script(
        "const d = document.getElementById(arguments[0]).getContext('2d').getImageData(0, 0, 28, 28).data;"
        "return Array.from({length: 784}, (_, i) => d[4 * i]);", element_id)


@browser_test
def test_browser_hover_shows_the_decoder_s_image_of_the_point_under_the_mouse(browser, page):
    space = page.space
    open_page(browser, page.url)
    seen = []
    for fx, fy in ((0.2, 0.3), (0.5, 0.5), (0.8, 0.75), (0.35, 0.9)):
        hover(browser, fx, fy)
        shown = shown_at(browser, space, fx, fy)
        assert shown["label"] == (0 if space.conditional else None)  # a cvae's page starts at the first class
        assert close(shown["image"], reference_decode(space.model, shown["z"], shown["label"])[0])
        assert canvas_pixels(browser, "decoded") == shown["image"]  # what is drawn is what came back
        seen.append(tuple(shown["image"]))
    assert len(set(seen)) == len(seen), "the decoded image did not change as the mouse moved"
    # The page measures its round trips (shown to the user); how fast they are is a benchmark's
    # question (benchmarks/explore_latency.py), not a unit test's: a loaded machine would fail it.
    rtts = browser.execute_script("return window.vaelab.rtts")
    assert rtts and all(0 < t < 60_000 for t in rtts), rtts
    if space.sliders:  # off the plane: the slider's offset is added to the point under the mouse
        s = space.sliders[0]
        browser.execute_script(
            "const el = document.querySelector(`#sliders input[data-dim='${arguments[0]}']`);"
            "el.value = arguments[1]; el.dispatchEvent(new Event('input'));", s["dim"], s["range"] / 2)
        offsets = np.zeros(space.latent_dim)
        offsets[s["dim"]] = s["range"] / 2
        shown = shown_at(browser, space, 0.35, 0.9, offsets)
        assert close(shown["image"], reference_decode(space.model, shown["z"], shown["label"])[0])
    # The grid of decodes behind the points.
    browser.execute_script("document.getElementById('show-grid').click()")
    tiles = wait_for(browser, "return window.vaelab.grid && window.vaelab.grid.tiles.length")
    assert tiles == 16 * 16
    assert console_errors(browser) == []


@browser_test
def test_browser_two_clicks_give_an_interpolation_strip(browser, page):
    from selenium.webdriver.common.action_chains import ActionChains

    open_page(browser, page.url)
    hover(browser, 0.25, 0.25)
    ActionChains(browser).click().perform()
    hover(browser, 0.75, 0.7)
    ActionChains(browser).click().perform()
    strip = wait_for(browser, "return window.vaelab.strip")
    zs = np.asarray(strip["zs"])
    assert len(zs) == 10 and close(strip["images"], reference_decode(page.space.model, zs, strip["label"]))
    tol = 1.5 * (page.space.box[1] - page.space.box[0]) / 600
    assert np.abs(zs[0] - expected_z(page.space, 0.25, 0.25)).max() <= tol
    assert np.abs(zs[-1] - expected_z(page.space, 0.75, 0.7)).max() <= tol
    assert console_errors(browser) == []


@browser_test
def test_browser_drawing_pad_encodes_what_was_drawn(browser, page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_page(browser, page.url)
    assert browser.find_element(By.ID, "pad-title").text == page.space.page_data()["pad_title"]
    pad = browser.find_element(By.ID, "pad")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", pad)
    ActionChains(browser).move_to_element_with_offset(pad, -30, -80).click_and_hold() \
        .move_by_offset(40, 0).move_by_offset(-10, 60).move_by_offset(-10, 60).release().perform()
    drawn = wait_for(browser, "return window.vaelab.drawn || window.vaelab.errors.length && window.vaelab.errors")
    assert isinstance(drawn, dict), drawn
    x = torch.tensor(drawn["input"], dtype=torch.float32)
    assert x.sum() > 5, "no ink reached the encoder"
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    img = x.reshape(28, 28)
    com = ((img * xs).sum() / img.sum(), (img * ys).sum() / img.sum())
    assert all(abs(c - 13.5) <= 1 for c in com), com  # centred by its centre of mass, as MNIST
    model, label = page.space.model, drawn["label"]
    assert label == (0 if page.space.conditional else None)
    with torch.inference_mode():
        post = model.encode(x.reshape(1, 1, 28, 28), condition(label, 1))
    assert np.allclose(drawn["mu"], post.mu[0].numpy(), atol=1e-5)
    assert np.allclose(drawn["point"], page.space.plane.project(post.mu.double())[0].numpy(), atol=1e-5)
    assert close(drawn["reconstruction"], reference_decode(model, post.mu, label)[0])
    assert canvas_pixels(browser, "pad-recon") == drawn["reconstruction"]
    assert (drawn["ellipse"] is not None) == page.space.has_std
    assert console_errors(browser) == []


@browser_test
def test_browser_bad_requests_are_refused_and_said(browser, page):
    open_page(browser, page.url)
    # The page's own decode request with a code of the wrong length: the server's message shows.
    browser.execute_script("window.vaelab.requestDecode([1, 2, 3, 4, 5, 6, 7])")
    status = wait_for(browser, "return document.getElementById('status').textContent")
    assert status.startswith("400: decode: z[0]: expected a list of") and "got a list of 7" in status
    answers = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const ask = (path, init) => fetch(path, init).then(async (r) => [r.status, (await r.json()).error]);
        const json = {'Content-Type': 'application/json'};
        Promise.all([
          ask('/api/decode', {method: 'POST', headers: json, body: '{not json'}),
          ask('/api/decode', {method: 'POST', headers: json, body: '{"z": [[NaN, 1]]}'}),
          ask('/..%2f..%2fetc/passwd'),
          ask('/api/info', {method: 'PUT', body: '{}'}),
          ask('/api/decode', {method: 'POST', body: '{"z": [[0, 1]]}'}),  // text/plain: a form could send it
        ]).then(done);
    """)
    assert [a[0] for a in answers] == [400, 400, 404, 405, 415], answers
    assert "not JSON" in answers[0][1] and "non-finite" in answers[1][1] and "application/json" in answers[4][1]


@browser_test
@pytest.mark.parametrize("key", ["vae", "ae-5d", "cvae"])
def test_browser_exported_page_works_from_a_file(browser, trained_spaces, tmp_path, key):
    space = trained_spaces[key]
    path = export_page(space, tmp_path / "page.html", grid=32)
    open_page(browser, path.resolve().as_uri())
    n, _ = atlases_of(path.read_text())
    x0, x1, y0, y1 = space.box
    for fx, fy in ((0.1, 0.2), (0.6, 0.4), (0.9, 0.95)):
        hover(browser, fx, fy)
        # The nearest precomputed decode: that of the grid cell under the mouse.
        col, row = min(int(fx * n), n - 1), min(int(fy * n), n - 1)
        centre = torch.tensor([[x0 + (col + 0.5) * (x1 - x0) / n, y1 - (row + 0.5) * (y1 - y0) / n]],
                              dtype=torch.float64)
        want = space.plane.lift(centre)[0].numpy()
        shown = wait_for(browser, "const s = window.vaelab.shown; return s.z.every((v, i) => "
                                  "Math.abs(v - arguments[0][i]) < 1e-9) && s;", 20, want.tolist())
        assert shown["label"] == (0 if space.conditional else None)
        assert close(shown["image"], reference_decode(space.model, shown["z"], shown["label"])[0], levels=2)
    # Hidden means not drawn (a CSS display rule must not bring it back).
    assert browser.execute_script("return getComputedStyle(document.querySelector('#pad-card .row')).display") == "none"
    browser.execute_script("document.getElementById('show-grid').click()")
    assert console_errors(browser) == []


def choose_class(driver, label: int):
    """Pick `label` in the page's class selector, as a user does (a change event follows)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    select = driver.find_element(By.ID, "class-select")
    assert select.is_displayed()
    Select(select).select_by_value(str(label))


def tile_pixels(driver) -> np.ndarray:
    """The server page's decoded grid behind the points: (n * n, 784), row by row from the top."""
    return np.asarray(driver.execute_script(
        "return window.vaelab.grid.tiles.map((t) => Array.from(t.getContext('2d').getImageData(0, 0, 28, 28).data)"
        ".filter((_, i) => i % 4 === 0))"), np.int16)


@pytest.fixture(scope="module")
def cvae_page(trained_cvae):
    s = Served(trained_cvae)
    yield s
    s.close()


@browser_test
def test_browser_choosing_a_class_redoes_every_decode_as_it(browser, cvae_page):
    """Under a fixed mouse position, with a strip, the decoded grid and a drawing on show: each
    class chosen in the selector redraws all of them as the decoder draws that class, for the same
    codes (the drawing's code is its encoding given the class)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    space, model = cvae_page.space, cvae_page.space.model
    open_page(browser, cvae_page.url)
    labels = browser.find_elements(By.CSS_SELECTOR, "#class-select option")
    assert [o.text for o in labels] == space.classes
    assert "selected class" in browser.find_element(By.ID, "class-note").text
    pad = browser.find_element(By.ID, "pad")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", pad)
    ActionChains(browser).move_to_element_with_offset(pad, -30, -80).click_and_hold() \
        .move_by_offset(40, 0).move_by_offset(-10, 60).release().perform()
    drawn0 = wait_for(browser, "return window.vaelab.drawn")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", browser.find_element(By.ID, "plane"))
    browser.execute_script("document.getElementById('show-grid').click()")
    wait_for(browser, "return window.vaelab.grid && window.vaelab.grid.tiles.length")
    for fx, fy in ((0.25, 0.25), (0.75, 0.7)):
        hover(browser, fx, fy)
        ActionChains(browser).click().perform()
    strip0 = wait_for(browser, "return window.vaelab.strip")
    hover(browser, 0.4, 0.6)
    z = shown_at(browser, space, 0.4, 0.6)["z"]
    shown_images = {}
    for label in (7, 2):
        choose_class(browser, label)
        shown = wait_for(browser, "const s = window.vaelab.shown; return s.label === arguments[0] && s", 20, label)
        assert np.allclose(shown["z"], z)  # the same code under the mouse, drawn as the new class
        assert close(shown["image"], reference_decode(model, z, label)[0])
        assert canvas_pixels(browser, "decoded") == shown["image"]
        shown_images[label] = shown["image"]
        strip = wait_for(browser, "const s = window.vaelab.strip; return s.label === arguments[0] && s", 20, label)
        assert np.allclose(strip["zs"], strip0["zs"])
        assert close(strip["images"], reference_decode(model, strip["zs"], label))
        wait_for(browser, "return window.vaelab.grid.label === arguments[0]", 20, label)
        assert close(tile_pixels(browser), reference_decode(model, space.grid_points(16), label))
        drawn = wait_for(browser, "const d = window.vaelab.drawn; return d.label === arguments[0] && d", 20, label)
        assert drawn["input"] == drawn0["input"]  # the same drawing, encoded given the new class
        with torch.inference_mode():
            post = model.encode(torch.tensor(drawn["input"], dtype=torch.float32).reshape(1, 1, 28, 28),
                                condition(label, 1))
        assert np.allclose(drawn["mu"], post.mu[0].numpy(), atol=1e-5)
        assert close(drawn["reconstruction"], reference_decode(model, post.mu, label)[0])
    assert not close(shown_images[7], shown_images[2], levels=20)
    assert console_errors(browser) == []


@browser_test
def test_browser_exported_page_s_class_selector_switches_atlases(browser, trained_cvae, tmp_path):
    space = trained_cvae
    path = export_page(space, tmp_path / "page.html")
    n, sheets = atlases_of(path.read_text())
    open_page(browser, path.resolve().as_uri())
    fx, fy = 0.43, 0.62  # inside a cell of the 20 x 20 grid, not on its edge
    hover(browser, fx, fy)
    col, row = min(int(fx * n), n - 1), min(int(fy * n), n - 1)  # the grid cell under the mouse
    x0, x1, y0, y1 = space.box
    want = space.plane.lift(torch.tensor([[x0 + (col + 0.5) * (x1 - x0) / n, y1 - (row + 0.5) * (y1 - y0) / n]],
                                         dtype=torch.float64))[0].numpy()
    seen = set()
    for label in (0, 5, 9):
        if label:
            choose_class(browser, label)
        shown = wait_for(browser, "const s = window.vaelab.shown; return s.label === arguments[1] && "
                                  "s.z.every((v, i) => Math.abs(v - arguments[0][i]) < 1e-9) && s;",
                         20, want.tolist(), label)
        # That class's atlas, its tile under the mouse: the decoder's image of the cell's centre.
        assert shown["image"] == tiles_of(sheets[label], n)[row * n + col].tolist()
        assert close(shown["image"], reference_decode(space.model, want, label)[0], levels=2)
        seen.add(tuple(shown["image"]))
    assert len(seen) == 3
    browser.execute_script("document.getElementById('show-grid').click()")
    assert console_errors(browser) == []


# ---------------------------------------------------------------------------------------------
# The vae-2d-mnist report embeds the exported page
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def report_with_explorer(tmp_path, trained_spaces):
    from vaelab import recipes

    from test_recipes import fake_result

    result = fake_result(tmp_path, recipes.get_recipe("vae-2d-mnist"), synthetic_data(), {})
    (step,) = result.steps
    assert step.step.explore
    step.explore_page = export_page(trained_spaces["vae"], result.out / "explore-vae-2d.html", grid=16)
    return recipes.write_report(result)


def test_vae_2d_report_embeds_and_links_the_explorer(report_with_explorer):
    page = report_with_explorer.read_text()
    assert '<iframe title="Move the mouse' in page and ' srcdoc="&lt;!DOCTYPE html&gt;' in page
    assert '<a href="explore-vae-2d.html">' in page
    assert "http:" not in page and "https:" not in page


@browser_test
def test_browser_explorer_works_inside_the_report(browser, report_with_explorer, trained_spaces):
    from selenium.webdriver.common.by import By

    browser.get(report_with_explorer.resolve().as_uri())
    frame = browser.find_element(By.TAG_NAME, "iframe")
    browser.execute_script("arguments[0].scrollIntoView()", frame)
    browser.switch_to.frame(frame)
    try:
        wait_for(browser, "return window.vaelab && window.vaelab.ready && window.vaelab.shown")
        before = browser.execute_script("return window.vaelab.shown.seq")
        hover(browser, 0.3, 0.3)
        shown = wait_for(browser, "const s = window.vaelab.shown; return s.seq > arguments[0] && s;", 20, before)
        assert close(shown["image"], reference_decode(trained_spaces["vae"].model, shown["z"])[0], levels=2)
    finally:
        browser.switch_to.default_content()
    assert console_errors(browser) == []


def test_closing_the_server_ends_open_connections_and_waits_for_their_threads(data):
    """Ctrl-C: a connection a client left open (sending nothing) is ended, and no handler thread
    outlives `server_close`: one still running at interpreter exit can free the model's tensors
    during finalization and abort the process instead of exiting 0."""
    import socket

    served = Served(make_space("vae", data, n_points=50))
    idle = socket.create_connection(("127.0.0.1", served.server.port), timeout=30)
    try:
        assert served.request("GET", "/api/info")[0] == 200
        handlers = [t for t, _ in served.server._connections]
        assert any(t.is_alive() for t in handlers)  # the idle connection's, waiting for a request
        start = time.monotonic()
        served.close()
        assert time.monotonic() - start < 10
        assert not any(t.is_alive() for t in handlers)
        assert idle.recv(1) == b""  # the server ended it
    finally:
        idle.close()


def test_a_client_gone_mid_answer_is_no_error(data, capsys):
    """A closed tab or a cancelled fetch breaks the pipe mid-answer: nothing is printed (no
    traceback in the user's terminal), while a real error still is."""
    served = Served(make_space("vae", data, n_points=50))
    try:
        for gone in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset")):
            try:
                raise gone
            except ConnectionError:
                served.server.handle_error(None, ("127.0.0.1", 1))
        assert capsys.readouterr().err == ""
        try:
            raise ValueError("a bug")
        except ValueError:
            served.server.handle_error(None, ("127.0.0.1", 1))
        assert "ValueError: a bug" in capsys.readouterr().err
    finally:
        served.close()


def test_server_listens_on_ipv6_loopback_and_checks_its_host_header(data):
    space = make_space("vae", data, n_points=50)
    server = make_server(space, host="::1")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        assert server.url == f"http://[::1]:{server.port}/"
        for host, status in ((f"[::1]:{server.port}", 200), ("attacker.example", 403)):
            conn = http.client.HTTPConnection("::1", server.port, timeout=30)
            conn.request("GET", "/api/info", headers={"Host": host})
            response = conn.getresponse()
            response.read()
            conn.close()
            assert response.status == status, host
    finally:
        server.shutdown()
        server.server_close()
