"""The example notebooks (examples/*.ipynb) run top to bottom in a real Jupyter kernel, and what
they print is what their runs measured; the stored notebooks carry no outputs.

Each notebook is executed with nbclient after a cell injected below its parameters cell (as
papermill does): the datasets become the small synthetic ones of the other tests
(`_synthetic_cli.use_synthetic`, in the kernel's process only, with VAELAB_DATA a scratch cache),
the domain classifiers small enough to train in a second or two, and the parameters small. The
production code and the stored notebooks have no test switch.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the test extra (pip install -e '.[test]')")
NotebookClient = pytest.importorskip("nbclient", reason="the notebook tests need the test extra "
                                     "(pip install -e '.[test]')").NotebookClient

from vaelab.prose import FD, with_uncertainty

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TESTS = Path(__file__).resolve().parent
NOTEBOOKS = ("vae_2d_mnist.ipynb", "lstm_vae_mnist.ipynb", "fashion_generative.ipynb")


def read(name: str):
    return nbformat.read(EXAMPLES / name, as_version=4)


def parameters_cell(nb) -> int:
    found = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(found) == 1, f"one cell tagged 'parameters', found {len(found)}"
    return found[0]


def execute(name: str, tmp_path: Path, monkeypatch, **parameters):
    """Run notebook `name` on synthetic data with `parameters` overriding its own; returns the
    executed notebook and the index of the injected cell."""
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "cache"))
    nb = read(name)
    at = parameters_cell(nb) + 1
    source = tmp_path / "source"
    setup = [
        "# Injected by tests/test_notebooks.py: synthetic datasets, fast classifiers, small parameters.",
        "import sys",
        "from pathlib import Path",
        f"sys.path.insert(0, {str(TESTS)!r})",
        "import _synthetic_cli",
        "for _name in ('mnist', 'fashion-mnist'):",
        f"    _synthetic_cli.use_synthetic(_name, Path({str(source)!r}), 512, 128)",
        "_synthetic_cli.use_fast_classifiers()",
        *(f"{key} = {value!r}" for key, value in parameters.items()),
    ]
    nb.cells.insert(at, nbformat.v4.new_code_cell("\n".join(setup), metadata={"tags": ["injected-parameters"]}))
    # nbclient waits 4 s by default for a cell's last outputs (figures) after its reply, then
    # drops them with a log line; a busy machine needs longer, and a drop must fail loudly.
    NotebookClient(nb, timeout=600, kernel_name="python3", startup_timeout=300, iopub_timeout=120,
                   raise_on_iopub_timeout=True, resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb, at


def outputs_after(nb, at: int) -> list[list[dict]]:
    """Each code cell's outputs, from the cell after index `at` on."""
    return [c.outputs for c in nb.cells[at + 1:] if c.cell_type == "code"]


def texts(outputs: list[dict]) -> list[str]:
    """The plain text of every displayed output and printed stream of one cell."""
    found = []
    for o in outputs:
        if o.output_type == "stream" and o.name == "stdout":
            found.append(o.text)
        elif o.output_type in ("display_data", "execute_result") and "text/plain" in o.data:
            found.append(o.data["text/plain"])
    return found


def images(outputs: list[dict]) -> int:
    return sum(1 for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data)


def stderr(nb) -> str:
    return "".join(o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.name == "stderr")


def all_text(nb, at: int) -> str:
    return "\n".join(t for outs in outputs_after(nb, at) for t in texts(outs))


def history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def training_sentence_matches(text: str, run_dir: Path) -> None:
    """The notebook's training comment gives the run's own first and last train loss and KL."""
    rows = [r for r in history(run_dir) if r["split"] == "train"]
    first, last = rows[0], rows[-1]
    sentence = re.search(rf"Over {len(rows)} epochs the training loss (.*?) nats, .* and the KL term (.*?)\. ",
                         text).groups()
    for key, words in zip(("loss", "kl"), sentence):
        numbers = [float(v) for v in re.findall(r"\d+\.\d+", words)]
        a, b = float(first[key]), float(last[key])
        assert numbers == pytest.approx([a] if a == b else [a, b], rel=0.01, abs=0.051), (key, words)


SMALL = dict(EPOCHS=2, EVAL={"iw_samples": 10, "iw_images": 64, "n_samples": 200}, DEVICE="cpu", PROGRESS=False)


# ---------------------------------------------------------------------------------------------
# Stored without outputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_notebooks_are_valid_and_carry_no_outputs(name):
    nb = read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert "widgets" not in nb.metadata  # no saved widget state either
    params = nb.cells[parameters_cell(nb)].source
    for key in ("QUICK", "EPOCHS", "TRAIN_IMAGES", "TEST_IMAGES", "EVAL", "OUT", "DEVICE", "PROGRESS"):
        assert re.search(rf"^{key} = ", params, flags=re.MULTILINE), key
    # written against the Python API: no shell escapes, no subprocesses, no `vaelab` command run
    for c in code:
        assert not re.search(r"^\s*[!%]", c.source, flags=re.MULTILINE), c.source
        assert "subprocess" not in c.source and "os.system" not in c.source


# ---------------------------------------------------------------------------------------------
# Executed
# ---------------------------------------------------------------------------------------------


def test_vae_2d_notebook_runs_and_answers_from_its_own_run(tmp_path, monkeypatch):
    nb, at = execute("vae_2d_mnist.ipynb", tmp_path, monkeypatch, OUT=str(tmp_path / "out"), TRAIN_IMAGES=384,
                     **SMALL)
    run_dir = tmp_path / "out" / "vae-2d"
    text = all_text(nb, at)
    # trained on the asked subset for the asked epochs, with the recipe's model
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "vae" and config["model_config"]["hidden_dims"] == [512]
    assert config["model_config"]["latent_dim"] == 2 and config["train"]["epochs"] == 2
    assert "mnist: 384 training and 128 test images" in text
    training_sentence_matches(text, run_dir)
    assert re.search(r"Of the 50 images of the per-digit grid, the domain classifier reads \d+ \(\d+%\) as their "
                     r"row's digit", text)
    assert "lie inside the circle that holds 95% of the prior's mass" in text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"{metrics['elbo']['neg_elbo']:.2f}" in text  # the metrics table is this run's
    per_cell = outputs_after(nb, at)
    # every figure of the assignment and the run, inline: (a) 1, (b) 1, (c) 1, (d) 1, then 3 more,
    # and the last cell's own matplotlib figure (the library left the inline backend alone)
    assert sum(images(o) for o in per_cell) == 8 and images(per_cell[-1]) == 1
    assert "Warning" not in stderr(nb)  # nothing the library imports warns inside a kernel (tqdm.auto did)


def test_lstm_vae_notebook_runs_and_comments_on_its_own_loss_and_samples(tmp_path, monkeypatch):
    nb, at = execute("lstm_vae_mnist.ipynb", tmp_path, monkeypatch, OUT=str(tmp_path / "out"), TRAIN_IMAGES=256,
                     **SMALL)
    run_dir = tmp_path / "out" / "lstm-vae"
    text = all_text(nb, at)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "lstm-vae" and config["model_config"]["latent_dim"] == 16
    training_sentence_matches(text, run_dir)
    assert "model.safetensors" in text and "config.json" in text  # the saved model, listed
    # the comment on the 100 generated images: its counts add up to 100
    comment = next(t for t in text.split("\n") if t.startswith("Of the 100 generated images above"))
    k, rest = re.search(r"recognizes (\d+) \(\d+%\) as a digit .*; the other (\d+) are", comment).groups()
    assert int(k) + int(rest) == 100
    counts = re.search(r"Confidently recognized, per digit: (.*?)\.", comment).group(1)
    assert sum(int(c.split(": ")[1]) for c in counts.split(", ")) == int(k)
    per_cell = outputs_after(nb, at)
    generation = next(o for o, c in zip(per_cell, [c for c in nb.cells[at + 1:] if c.cell_type == "code"])
                      if "generate(model, 100" in c.source)
    assert images(generation) == 1  # the 100 images, drawn by the notebook's own matplotlib code
    assert sum(images(o) for o in per_cell) == 5


def test_fashion_notebook_runs_every_model_and_answers_from_their_measurements(tmp_path, monkeypatch):
    nb, at = execute("fashion_generative.ipynb", tmp_path, monkeypatch, OUT=str(tmp_path / "out"),
                     TRAIN_IMAGES=256, **{**SMALL, "EPOCHS": 1})
    out = tmp_path / "out"
    keys = ["ae", "ae-normalized", "vae", "vae-gan-basic", "vae-gan", "vae-gan-feature", "vae-gan-conv-2d",
            "vae-gan-conv"]
    metrics = {k: json.loads((out / k / "metrics.json").read_text()) for k in keys}
    q = {k: m["sample_quality"]["samples"] for k, m in metrics.items()}
    shown = [t for outs in outputs_after(nb, at) for t in texts(outs)]
    # each question's answer, with this run's own numbers in it
    a_vs_b = next(t for t in shown if t.startswith("Measured: Fréchet distance ↓: A "))
    assert f"A {FD.fmt(q['ae']['fd'])}, B {FD.fmt(q['ae-normalized']['fd'])}" in a_vs_b
    assert re.search(r"[AB] measured better than [AB]|No clear difference between A and B|metrics disagree", a_vs_b)
    vae = next(t for t in shown if t.startswith("Against A: "))
    assert f"MSE {metrics['vae']['recon_mse']:.4f}" in vae
    basic = next(t for t in shown if t.startswith("basic VAE-GAN's reconstructions are"))
    assert f"Its average KL(q(z|x) || p(z)) is {metrics['vae-gan-basic']['elbo']['kl']:.2f} nats" in basic
    for name in ("pixel VAE-GAN", "feature VAE-GAN", "conv VAE-GAN (latent 2)", "conv VAE-GAN (latent 16)"):
        assert any(t.startswith(f"{name} against the VAE: ") for t in shown), name
    assert any(t.startswith("The convolutional VAE-GAN at two latent sizes: ") for t in shown)
    # the comparison table: a row per model, then the floor, each with its measured FD
    table = next(t for t in shown if t.startswith("Every model measured the same way")).split("\n")
    fd_cells = [with_uncertainty(FD, q[k]) for k in keys]
    assert [fd in row for fd, row in zip(fd_cells, table[2:])] == [True] * len(keys)
    assert table[2 + len(keys)].startswith("real training images (the floor)")
    per_cell = outputs_after(nb, at)
    # A: loss, reconstructions, scatter, samples; B: scatter, samples; VAE: samples; the four MLP and two
    # conv VAE-GANs: samples and reconstructions; the two side-by-side figures
    assert sum(images(o) for o in per_cell) == 4 + 2 + 1 + 2 * 5 + 2
