"""Data-parallel training: two real processes on the loopback interface (gloo), started by
`vaelab train --nproc 2` (torchrun inside), compared with one process at the same global batch.

Each process is `tests/_synthetic_cli.py`, the real CLI on a synthetic "mnist"; `--nproc 2` has
torchrun start that script twice. The helpers of distributed.py and the sharded batches are
checked in this process, where there is no group and everything must be the identity.

Tolerances. A plain autoencoder draws no noise and has no batch norm: two processes compute the
same updates as one up to the order of the additions in the gradients, so its losses agree to
1e-6 (relative; measured: 4e-8). The VAE and the VAE-GAN draw their reparameterization noise per process (process
1 from its own seed), and the VAE-GAN's batch norm normalises each process's half-batch, so their
curves agree within noise only: 1% of the loss. Measured on this synthetic set (192 images,
batch 16, 2 epochs): the final train and test losses of 2 processes and of 1 differ by 0.06-0.5%,
while the same single-process run with seeds 1 and 2 differs by 1.7-2.4% (VAE) and 5-10%
(VAE-GAN).
"""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from vaelab import checkpoint as ckpt
from vaelab import distributed as dist
from vaelab.batch import Batch, StepState
from vaelab.data import Batcher
from vaelab.errors import ConfigError
from vaelab.models import build_model, make_config, vae_step

from _forkserver import Process, spawn
from conftest import synthetic_data, write_dataset_files

SCRIPT = Path(__file__).resolve().parent / "_synthetic_cli.py"
N_TRAIN, BATCH, EPOCHS = 192, 16, 2
STEPS_PER_EPOCH = N_TRAIN // BATCH  # 12
MODELS = {  # tiny versions of each kind: no noise, an MLP VAE, the conv VAE-GAN with batch norm
    "ae": ["--set", "hidden_dims=[16]", "--latent-dim", "2"],
    "vae": ["--set", "hidden_dims=[16]"],
    "vae-gan": ["--set", "arch=conv", "--set", "channels=[4,4]", "--set", "fc_dim=16", "--set", "dec_hidden=0",
                "--set", "latent_dim=2"],
}
TOLERANCE = {"ae": 1e-6, "vae": 0.01, "vae-gan": 0.01}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_dataset_files(root / "data", n_train=N_TRAIN, n_test=32)
    env = {**os.environ, "VAELAB_DATA": str(root / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(SCRIPT.parents[1] / "src"), "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    return root, env


def cli(workspace, *args, pause: list[str] = ()) -> Process:
    root, env = workspace
    return spawn([sys.executable, SCRIPT, "--data", root / "data", "--n-train", N_TRAIN, "--no-figures", *pause,
                  "--", *args], env=env)


def finish(proc: Process) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def train_args(model: str, run: Path, nproc: int) -> list[str]:
    return ["train", model, "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--device", "cpu", "--quiet",
            "--log-every", "2", "--out", str(run), *MODELS[model], *(["--nproc", str(nproc)] if nproc > 1 else [])]


def history(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "history.csv").open()))


@pytest.fixture(scope="module")
def runs(workspace):
    """Every model trained in 1 and in 2 processes: {(model, nproc): run folder}. The runs start
    side by side, two at a time (the machine has two cores)."""
    root, _ = workspace
    folders = {(m, n): root / f"{m}-{n}" for m in MODELS for n in (1, 2)}
    pending = list(folders.items())
    while pending:
        batch, pending = pending[:2], pending[2:]
        procs = [(key, cli(workspace, *train_args(key[0], run, key[1]))) for key, run in batch]
        for key, proc in procs:
            code, _, err = finish(proc)
            assert code == 0, f"{key}: {err[-3000:]}"
            assert err == "", f"{key}: --quiet prints nothing on stderr, got {err[-2000:]}"
    return folders


# --- two processes against one -----------------------------------------------------------------


@pytest.mark.parametrize("model", list(MODELS))
def test_two_processes_train_to_the_loss_of_one_at_the_same_global_batch(runs, model):
    one, two = history(runs[model, 1]), history(runs[model, 2])
    assert [(r["epoch"], r["split"]) for r in one] == [(r["epoch"], r["split"]) for r in two]
    for a, b in zip(one, two):
        for term in ("loss",):
            x, y = float(a[term]), float(b[term])
            assert abs(x - y) <= TOLERANCE[model] * abs(x), (model, a["epoch"], a["split"], term, x, y)
    steps_one = (runs[model, 1] / "steps.csv").read_text().splitlines()
    steps_two = (runs[model, 2] / "steps.csv").read_text().splitlines()
    assert len(steps_one) == len(steps_two) == 1 + EPOCHS * STEPS_PER_EPOCH  # global steps, once each


def test_only_the_main_process_writes_and_the_checkpoint_knows_the_world_size(runs):
    for model in MODELS:
        run = runs[model, 2]
        names = sorted(p.name for p in run.iterdir())
        assert names == sorted(p.name for p in runs[model, 1].iterdir()), names  # no file per process
        assert [(r["epoch"], r["split"]) for r in history(run)] == [
            (str(e), s) for e in range(1, EPOCHS + 1) for s in ("train", "test")]
        state = ckpt.load_checkpoint(run)
        assert state["world_size"] == 2 and len(state["rank_rng"]) == 1
        # the two processes drew different noise after the model was built
        assert not torch.equal(state["rng"]["torch"], state["rank_rng"][0]["torch"])
        assert "world_size" not in ckpt.load_checkpoint(runs[model, 1])  # one process: as before


def test_resuming_with_another_number_of_processes_is_one_line(runs, workspace):
    run = runs["vae", 2]
    files = lambda: {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != ".lock"}  # noqa: E731
    before = files()
    code, out, err = finish(cli(workspace, "train", "--resume", str(run), "--epochs", "3"))
    assert code == 2 and out == ""
    assert err == (f"vaelab: error: {run} was trained on 2 processes; resume it with --nproc 2 "
                   f"(or torchrun --nproc-per-node 2)\n")
    assert files() == before  # nothing written (the lock file, as always, takes the PID of its holder)


def wait_for(proc: Process, marker: Path) -> int:
    """The PID the paused process wrote into `marker`, once it is there."""
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no process reached its pause point"
        time.sleep(0.02)
    return int(marker.read_text())


@pytest.fixture(scope="module")
def interrupted(runs, workspace):
    """Two 2-process VAE-GAN runs stopped in epoch 2, side by side: "killed", process 1 SIGKILLed
    after step 4 of the epoch (torchrun then ends process 0); "terminated", process 0 alone sent
    SIGTERM after step 3. Returns {name: (exit status, stderr, run folder)} and each run's
    checkpoint epoch, then resumes both with `--resume --nproc 2`."""
    root, _ = workspace
    plans = {"killed": (STEPS_PER_EPOCH + 4, 1, 9), "terminated": (STEPS_PER_EPOCH + 3, 0, 15)}
    procs = {}
    for name, (step, rank, _) in plans.items():
        marker = root / f"{name}.marker"
        procs[name] = (cli(workspace, *train_args("vae-gan", root / name, 2),
                           pause=["--pause-at-step", str(step), "--pause-rank", str(rank), "--marker", str(marker)]),
                       marker)
    for name, (proc, marker) in procs.items():
        os.kill(wait_for(proc, marker), plans[name][2])
        time.sleep(0.1)  # a SIGTERM's handler runs in the paused process's wait loop
        marker.unlink(missing_ok=True)
    stopped = {name: (*finish(proc)[::2], ckpt.load_checkpoint(root / name)) for name, (proc, _) in procs.items()}
    resumed = {name: cli(workspace, "train", "--resume", str(root / name), "--nproc", "2", "--quiet") for name in plans}
    for name, proc in resumed.items():
        code, _, err = finish(proc)
        assert code == 0, f"{name}: {err[-3000:]}"
    return {name: (code, err, state, root / name) for name, (code, err, state) in stopped.items()}


def same_as_straight(runs, run: Path) -> None:
    straight = runs["vae-gan", 2]
    a, b = ckpt.load_tensors(straight / ckpt.CHECKPOINT_FILE)[0], ckpt.load_tensors(run / ckpt.CHECKPOINT_FILE)[0]
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # weights, optimizers, every RNG state
    assert (run / "steps.csv").read_text() == (straight / "steps.csv").read_text()


def test_a_process_killed_mid_epoch_resumes_to_the_weights_of_a_straight_run(interrupted, runs):
    """SIGKILL of process 1 in epoch 2, then `--resume --nproc 2` from the epoch-1 checkpoint:
    bit-identical weights, optimizer states, RNG states and steps."""
    code, err, state, run = interrupted["killed"]
    assert code != 0, err[-2000:]  # torchrun ended the job
    assert state["epoch"] == 1 and state["partial"] is None
    same_as_straight(runs, run)


def test_a_signal_to_one_process_stops_both_after_the_same_step_and_resumes_exactly(interrupted, runs):
    """SIGTERM to process 0 alone in epoch 2: both stop at the next sync (--log-every 2: after
    step 4 of the epoch) with one checkpoint, one line, exit 130; the resumed run ends
    bit-identical to the straight one."""
    code, err, state, run = interrupted["terminated"]
    assert (code, err) == (130, f"vaelab: SIGTERM: saved {run} in epoch 2 after 4/{STEPS_PER_EPOCH} batches; "
                                f"continue with `vaelab train --resume {run} --nproc 2`\n")
    assert state["partial"]["batches_done"] == 4
    same_as_straight(runs, run)


# --- in this process: no group, so everything is the identity ----------------------------------


def test_without_a_group_every_helper_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not dist.launched() and not dist.active()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    t = torch.tensor([1.5, -2.0])
    assert dist.global_mean(t) is t and dist.all_sum(t) is t and torch.equal(t, torch.tensor([1.5, -2.0]))
    assert dist.agree_stop(None) is None and dist.agree_stop("SIGINT") == "SIGINT"
    assert dist.all_gather({"a": 1}) == [{"a": 1}]
    assert dist.on_main(lambda: 42) == 42
    dist.barrier()
    model = build_model("vae", make_config("vae", hidden_dims=[8]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dist.broadcast_module(model)
    dist.broadcast_buffers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert dist.rank_seed(7) == 7
    dist.check_batches(10, 3)  # a last batch of 1 is fine for one process
    assert dist.init(torch.device("cpu")) == torch.device("cpu") and not dist.active()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.launched()


def test_shares_split_each_global_batch_as_one_process_draws_it():
    data = synthetic_data(n_train=37)
    world = 3
    one = Batcher(data.train_x, 8, binarize="dynamic", seed=5, labels=data.train_y)
    parts = [Batcher(data.train_x, 8, binarize="dynamic", seed=5, labels=data.train_y, part=(r, world))
             for r in range(world)]
    shares = [list(p) for p in parts]
    for i, batch in enumerate(one):  # 5 batches, the last of 5 images
        x = torch.cat([s[i].x for s in shares])
        y = torch.cat([s[i].y for s in shares])
        assert torch.equal(x, batch.x) and torch.equal(y, batch.y)
        assert [len(s[i]) for s in shares] == [len(t) for t in torch.tensor_split(batch.x, world)]
        assert sum(len(s[i]) for s in shares) == one.global_size(i)
    for p in parts:  # every process's generator stands where one process's does
        assert torch.equal(p.generator.get_state(), one.generator.get_state())
    # an evaluation batch too small for every process: the empty share is skipped
    tiny = [list(Batcher(data.train_x[:2], 8, shuffle=False, part=(r, world))) for r in range(world)]
    assert [len(t) for t in tiny] == [1, 1, 0]


def test_too_small_a_last_batch_for_the_processes_is_refused(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="makes a batch of 1, too few to split across 2 processes"):
        dist.check_batches(17, 8)
    dist.check_batches(18, 8)


def test_the_mlp_vae_hand_step_yields_to_an_optimizer_step_hook():
    """The hand-derived step updates through `PackedAdam.update`, not `step()`: with a step hook
    (the gradient averaging of data-parallel training) it would skip the hook, so it is not taken."""
    torch.manual_seed(0)
    model = build_model("vae", make_config("vae", hidden_dims=[16]))
    opt = model.configure_optimizers(1e-3)
    x = synthetic_data(n_train=8).train_x[:8].unsqueeze(1).float() / 255
    assert vae_step.applies(model, x, opt["model"], model._derivation)
    calls = []
    handle = opt["model"].register_step_pre_hook(lambda o, args, kwargs: calls.append(o))
    assert not vae_step.applies(model, x, opt["model"], model._derivation)
    model.training_step(Batch(x), opt, StepState())
    assert calls == [opt["model"]]
    handle.remove()


def test_the_launch_hands_the_whole_command_to_each_process(monkeypatch):
    """`vaelab train --nproc 2 ...` as typed: torchrun's own parser must not read the command's
    `--nproc` as an abbreviation of its `--nproc-per-node` (it did, and every launch failed)."""
    import torch.distributed.run as torchrun

    from vaelab import cli

    seen = []
    monkeypatch.setattr(torchrun, "run", seen.append)
    argv = ["train", "vae", "--batch-size", "256", "--nproc", "2", "--epochs", "1", "--out", "runs/vae-dp"]
    assert cli._launch(2, argv) == 0
    (args,) = seen
    assert (args.module, args.training_script, args.training_script_args) == (True, "vaelab", argv)
    assert args.nproc_per_node == "2" and args.standalone
