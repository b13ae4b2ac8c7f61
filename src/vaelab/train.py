"""The generic training loop: epochs, logging, evaluation, checkpoints, resume, interruption.

Nothing here knows which model it trains: a model brings its optimizers and its update step
(`GenerativeModel.training_step`), and reports named loss terms that become history columns. The
loop hands each step a `Batch` (images and labels) and a `StepState` (where the step stands in
the run, and the gradient-norm limit).

Speed notes (see benchmarks/): batches are indexed out of a uint8 tensor on the device, the
per-step loss terms stay on the device and are copied to the host once every `log_every` steps,
and evaluation runs in large batches under inference mode. Fused Adam (models/base.py), fp32
linear layers through oneDNN on the CPU (fastpath.py), the MLP VAE's hand-derived step with
PackedAdam (models/vae_step.py, optim.py), channels-last weights for convolutional models, and an
optional `compile` (torch.compile of the model's forward and backward). Process-wide settings
(threads, denormals, the allocator) are not changed here: see runtime.py.
"""

from __future__ import annotations

import csv
import io
import math
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .atomic import atomic_write, exchange, temp_path
from .batch import StepState
from .config import config_from_dict, config_to_dict
from .data import Batcher, ImageData, load
from .errors import CheckpointError, ConfigError, DivergenceError, RunExistsError, RunInUseError, VaelabError
from .fastpath import onednn_linear
from .train_config import MAX_COUNT, MAX_SEED, PRECISIONS, TrainConfig  # noqa: F401  (re-exported)

class TrainingInterrupted(VaelabError):
    """Ctrl-C or SIGTERM: the state was saved; the message says how to resume."""

    def __init__(self, message: str, signal_name: str = ""):
        super().__init__(message)
        self.signal_name = signal_name


# ---------------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but no CUDA device is available")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def wants_channels_last(model: torch.nn.Module) -> bool:
    """A model's `channels_last` attribute if it declares one, else: does it hold 2-D convolutions?
    oneDNN (CPU) and cuDNN (GPU) run NHWC convolutions without the layout reorders NCHW needs."""
    declared = getattr(model, "channels_last", None)
    if declared is not None:
        return bool(declared)
    return any(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in model.modules())


@contextmanager
def channels_last(model: torch.nn.Module, enabled: bool = True):
    """Channels-last weights inside the block only. A (B, 1, 28, 28) batch is already
    channels-last (one channel), so the layout then carries through every convolution. Restored
    afterwards: a model handed back computes exactly as one rebuilt from its run folder (the two
    layouts differ in the last bit)."""
    if not enabled:
        yield
        return
    model.to(memory_format=torch.channels_last)  # in place: optimizers keep their parameters
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),  # its key array is stored as a tensor
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {k: (v.numpy() if isinstance(v, torch.Tensor) else v)
                         for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def stop_on_signals():
    """Turn SIGINT/SIGTERM into a flag checked between steps, so a step is never cut in half.
    A second Ctrl-C interrupts at once."""
    flag = {"stop": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------
# Evaluation of the loss terms
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate_terms(model, images: torch.Tensor, config: TrainConfig, device: torch.device,
                   seed: int = 1234, labels: torch.Tensor | None = None) -> dict[str, float]:
    """Mean loss and terms over a whole split (its `labels` go into the batches where given). Own
    RNG stream, so evaluating neither depends on nor disturbs the training randomness, and every
    epoch is scored on the same noise."""
    was_training = model.training
    model.eval()
    batches = Batcher(images, config.eval_batch_size, device, shuffle=False,
                      binarize="dynamic" if config.binarize == "dynamic" else "none", seed=seed,
                      labels=labels)
    names = ("loss", *model.term_names)
    totals = torch.zeros(len(names), dtype=torch.float64, device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for batch in batches:
            with autocast(device, config.precision):
                out = model(batch)
            row = torch.stack([out.loss.detach(), *(out.terms[n] for n in model.term_names)])
            totals += row.double() * len(batch)
    model.train(was_training)
    return dict(zip(names, (totals / len(images)).tolist()))


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Trains `model` into `run_dir`, saving a full checkpoint after each epoch and on a signal."""

    def __init__(self, run_dir: Path, model, data: ImageData, config: TrainConfig, progress: bool = True):
        self.run_dir = Path(run_dir)
        self.config = config
        self.progress = progress
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        if config.compile:
            self.model.compile()  # in place: state_dict keys and checkpoints are unchanged
        self.data = data
        self.optimizers = model.configure_optimizers(config.lr)
        self.batches = Batcher(data.train_x, config.batch_size, self.device, shuffle=True,
                               binarize="dynamic" if config.binarize == "dynamic" else "none",
                               seed=config.seed, labels=data.train_y)
        self.eval_splits = {"test": (data.test_x, data.test_y)}  # split -> (images, labels)
        if data.val_x is not None:
            self.eval_splits["val"] = (data.val_x, data.val_y)
        self.term_names = ("loss", *model.term_names)
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps
        self.history: list[dict] = []
        self.steps = torch.zeros(0, len(self.term_names) + 2)  # step, epoch, loss, terms...
        self.partial: dict | None = None  # progress inside an interrupted epoch
        self.stored_config = ckpt.run_config(model, config)  # carried by every checkpoint and weights file
        # Called after each end-of-epoch save (`train --overwrite` swaps the new run in there).
        self.after_save: Callable[["Trainer"], None] | None = None
        self.nothing_saved = "no epoch had completed, so nothing was saved"  # for messages

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "model": dict(self.model.state_dict()),
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "batches": self.batches.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "steps": self.steps,
            "partial": self.partial,
        }

    def load_state_dict(self, state: dict) -> None:
        ckpt.load_state_into(self.model, state["model"], self.run_dir / ckpt.CHECKPOINT_FILE)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        self.batches.load_state_dict(state["batches"])
        set_rng_state(state["rng"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.steps, self.partial = state["history"], state["steps"], state["partial"]

    def save(self) -> None:
        ckpt.save_checkpoint(self.run_dir, self.state_dict(), self.stored_config)
        ckpt.save_model(self.run_dir, self.model, self.stored_config)
        self.write_history_files()

    def write_history_files(self) -> None:
        """history.csv and steps.csv, rewritten from the checkpointed state: they only ever hold
        rows of epochs that are complete and saved."""
        columns = ["epoch", "split", *self.term_names, "seconds"]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write(self.run_dir / "history.csv", buf.getvalue().encode())

        buf = io.StringIO()
        buf.write(",".join(["step", "epoch", *self.term_names]) + "\n")
        for row in self.steps.tolist():
            buf.write(f"{int(row[0])},{int(row[1])}," + ",".join(f"{v:.6g}" for v in row[2:]) + "\n")
        atomic_write(self.run_dir / "steps.csv", buf.getvalue().encode())

    # --- the loop -----------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        self.model.train()
        # fp32 linear layers through oneDNN while training on the CPU (see fastpath.py); inductor
        # has its own kernels, so not with compile.
        fast = self.device.type == "cpu" and not self.config.compile
        with (stop_on_signals() as signals, onednn_linear(self.model, enabled=fast),
              channels_last(self.model, enabled=wants_channels_last(self.model))):
            while self.epoch < self.config.epochs:
                self._run_epoch(self.epoch + 1, signals)
        return self.history

    def _run_epoch(self, epoch: int, signals: dict) -> None:
        cfg, model = self.config, self.model
        partial = self.partial or {}
        done = partial.get("batches_done", 0)
        if done:
            self.batches.load_state_dict(partial["batches_at_start"])
        batches_at_start = self.batches.state_dict()
        sums = partial.get("sums", torch.zeros(len(self.term_names), dtype=torch.float64)).to(self.device)
        seen = partial.get("seen", 0)
        seconds = partial.get("seconds", 0.0)
        rows: list[torch.Tensor] = []  # per-step (loss, terms...) kept on the device
        checked = 0
        start = time.perf_counter()
        bar = tqdm(total=len(self.batches), initial=done, desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not self.progress, leave=False, unit="batch", file=sys.stderr)

        for i, batch in enumerate(self.batches):
            if i < done:
                continue  # replaying the interrupted epoch's batches up to where it stopped
            # self.step: the steps completed before this loop began (a resumed epoch's included).
            state = StepState(step=self.step + len(rows), epoch=epoch, epochs=cfg.epochs,
                              steps_per_epoch=len(self.batches), clip_grad=cfg.clip_grad)
            with autocast(self.device, cfg.precision):
                out = model.training_step(batch, self.optimizers, state)
            row = torch.stack([out.loss.detach(), *(out.terms[n] for n in model.term_names)]).float()
            rows.append(row)
            sums += row.double() * len(batch)
            seen += len(batch)
            last = i + 1 == len(self.batches)
            if len(rows) - checked >= cfg.log_every or last or signals["stop"]:
                recent = torch.stack(rows[checked:]).cpu()  # the only host sync in the loop
                self._check_finite(recent, epoch, self.step + checked + 1)
                self._check_weights(epoch, self.step + len(rows))
                checked = len(rows)
                bar.set_postfix(loss=f"{recent[-1, 0]:.2f}")
                bar.update(len(recent))
            if signals["stop"] and not last:
                seconds += time.perf_counter() - start
                self._save_interrupted(epoch, i + 1, batches_at_start, sums, seen, seconds, rows)
                bar.close()
                raise TrainingInterrupted(
                    f"{signals['stop']}: saved {self.run_dir} in epoch {epoch} after "
                    f"{i + 1}/{len(self.batches)} batches; continue with "
                    f"`vaelab train --resume {self.run_dir}`", signals["stop"]
                )
        bar.close()
        seconds += time.perf_counter() - start
        self._finish_epoch(epoch, rows, sums, seen, seconds)
        if signals["stop"] and epoch < self.config.epochs:  # after the last epoch there is nothing to resume
            raise TrainingInterrupted(
                f"{signals['stop']}: saved {self.run_dir} after epoch {epoch}; continue with "
                f"`vaelab train --resume {self.run_dir}`", signals["stop"]
            )

    def _step_rows(self, epoch: int, rows: list[torch.Tensor]) -> torch.Tensor:
        if not rows:
            return torch.zeros(0, self.steps.shape[1])
        values = torch.stack(rows).cpu()
        index = torch.arange(self.step + 1, self.step + 1 + len(values), dtype=torch.float32)
        return torch.cat([index[:, None], torch.full_like(index, epoch)[:, None], values], dim=1)

    def _finish_epoch(self, epoch, rows, sums, seen, seconds) -> None:
        partial_steps = self.partial["steps"] if self.partial else torch.zeros(0, self.steps.shape[1])
        new_steps = self._step_rows(epoch, rows)
        self.steps = torch.cat([self.steps, partial_steps, new_steps])
        self.step += len(new_steps)
        self.partial = None
        train_terms = dict(zip(self.term_names, (sums / seen).tolist()))
        self.history.append({"epoch": epoch, "split": "train", **train_terms, "seconds": round(seconds, 3)})
        eval_start = time.perf_counter()
        for split, (images, labels) in self.eval_splits.items():
            terms = evaluate_terms(self.model, images, self.config, self.device, labels=labels)
            self.history.append({"epoch": epoch, "split": split, **terms,
                                 "seconds": round(time.perf_counter() - eval_start, 3)})
        self.epoch = epoch
        self.model.end_of_epoch(self.batches.images)
        self.save()
        if self.after_save is not None:
            self.after_save(self)
        if self.progress:
            print(self._summary_line(epoch), file=sys.stderr, flush=True)

    def _save_interrupted(self, epoch, batches_done, batches_at_start, sums, seen, seconds, rows) -> None:
        new_steps = self._step_rows(epoch, rows)
        old = self.partial["steps"] if self.partial else torch.zeros(0, self.steps.shape[1])
        self.step += len(new_steps)
        self.partial = {
            "batches_done": batches_done,
            "batches_at_start": batches_at_start,
            "sums": sums.cpu(),
            "seen": seen,
            "seconds": seconds,
            "steps": torch.cat([old, new_steps]),
        }
        # Steps of the unfinished epoch live only in the checkpoint until the epoch completes.
        ckpt.save_checkpoint(self.run_dir, self.state_dict(), self.stored_config)

    def _check_finite(self, recent: torch.Tensor, epoch: int, first_step: int) -> None:
        bad = ~torch.isfinite(recent)
        if bad.any():
            row = int(bad.any(dim=1).nonzero()[0])
            cols = bad[row].nonzero()[:, 0].tolist()
            if len(cols) > 1 and cols[0] == 0:
                cols = cols[1:]  # the named terms say which part (for a GAN: which network) diverged
            what = ", ".join(f"{self.term_names[c]} is {recent[row, c].item()}" for c in cols)
            self._diverged(epoch, first_step + row, what)

    def _check_weights(self, epoch: int, step: int) -> None:
        """A non-finite gradient with a finite loss shows up here: the update made weights
        non-finite. Checked at the loop's host syncs only, so no step waits for it, and always
        before a save, so non-finite weights are never checkpointed."""
        flags = torch.stack([torch.stack([p.isfinite().all() for g in opt.param_groups for p in g["params"]]).all()
                             for opt in self.optimizers.values()]).tolist()
        for name, ok in zip(self.optimizers, flags):
            if not ok:
                whose = "the weights" if len(self.optimizers) == 1 else f"the {name} weights"
                self._diverged(epoch, step, f"{whose} became non-finite (a non-finite gradient)")

    def _diverged(self, epoch: int, step: int, what: str):
        kept = (f"the last good checkpoint (epoch {self.epoch}) is intact in {self.run_dir}" if self.epoch
                else self.nothing_saved)
        raise DivergenceError(f"training diverged at epoch {epoch}, step {step}: {what}; {kept}. "
                              f"Try a lower --lr or --clip-grad")

    def _summary_line(self, epoch: int) -> str:
        rows = [r for r in self.history if r["epoch"] == epoch]
        parts = []
        for r in rows:
            terms = " ".join(f"{n} {r[n]:.3f}" for n in self.term_names if isinstance(r[n], float) and math.isfinite(r[n]))
            parts.append(f"{r['split']}: {terms}")
        return f"epoch {epoch}/{self.config.epochs}  " + "  |  ".join(parts)


# ---------------------------------------------------------------------------------------------
# Entry points used by the CLI and the recipes
# ---------------------------------------------------------------------------------------------


def prepare_folder(folder: Path, overwrite: bool, is_ours: Callable[[Path], bool], what: str) -> None:
    """Create an empty output folder. A non-empty one needs `overwrite`, and even then is only
    replaced if `is_ours` recognises it (so `--out ~ --overwrite` cannot delete a home folder,
    nor a folder that merely holds a file called config.json), and no process trains in it."""
    folder = Path(folder)
    check_target(folder, overwrite, is_ours, what)
    if folder.is_dir() and any(folder.iterdir()):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


def check_target(folder: Path, overwrite: bool, is_ours: Callable[[Path], bool], what: str) -> bool:
    """The checks of `prepare_folder`, touching nothing; True if `folder` holds something that
    `overwrite` would replace."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunExistsError(f"{folder} exists and is not a folder")
    try:
        occupied = folder.is_dir() and any(folder.iterdir())
    except OSError as e:
        raise RunExistsError(f"{folder}: cannot list ({e.strerror or e})") from None
    if not occupied:
        return False
    for inner in (folder, *(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())):
        holder = ckpt.lock_holder(inner)
        if holder is not None:
            raise RunInUseError(ckpt.in_use_message(inner, holder))
    if not overwrite:
        raise RunExistsError(f"{folder} already exists and is not empty (use --overwrite to replace it"
                             f"{', or --resume to continue it' if what == 'run' else ''})")
    if not is_ours(folder):
        raise RunExistsError(f"{folder} is not a vaelab {what} folder; refusing to overwrite it")
    return True


def is_run_folder(folder: Path) -> bool:
    """True if `folder` holds a readable vaelab run config (not just a file of that name)."""
    try:
        ckpt.read_run_config(folder)
    except VaelabError:
        return False
    return True


def load_training_data(config: TrainConfig, quiet: bool = False) -> ImageData:
    return load(config.dataset, val_size=config.val_size,
                binarize="static" if config.binarize == "static" else "none",
                seed=config.seed, quiet=quiet)


class NewRun:
    """Where a new run trains. In place when the folder is new (or empty): it is resumable from
    the moment it exists, its config.json written first. With `--overwrite` of an existing run,
    in a hidden sibling folder, swapped in for the old run once the new one's first epoch is
    saved; until then the old run is untouched and loadable, and a failure removes the sibling.
    Both folders are locked meanwhile, so nothing else trains in (or overwrites) either."""

    def __init__(self, run_dir: Path, overwrite: bool):
        self.run_dir = Path(run_dir)
        self.replacing = check_target(self.run_dir, overwrite, is_run_folder, "run")
        self.created = not self.run_dir.exists()
        self.locks: list[ckpt.RunLock] = []
        self.workdir = self.run_dir
        self.owned = False  # whether this process holds the lock of the folder it trains in

    def open(self, model, config: TrainConfig) -> Path:
        """Create the folder the run trains in, lock it, write config.json; returns it."""
        try:
            if self.replacing:
                self.locks.append(ckpt.RunLock(self.run_dir).acquire())
                ckpt.clean_run_folder(self.run_dir)
                self.workdir = temp_path(self.run_dir, ".new")
                self.workdir.mkdir()
            else:
                # A folder that appeared since the checks is someone else's: mkdir refuses it.
                self.run_dir.mkdir(parents=True, exist_ok=not self.created)
            self.locks.append(ckpt.RunLock(self.workdir).acquire())
            self.owned = True
            if not self.replacing:
                ckpt.clean_run_folder(self.run_dir)
            (self.workdir / "figures").mkdir(exist_ok=True)
        except OSError as e:
            self.close(failed=True)
            raise CheckpointError(f"{e.filename or self.run_dir}: cannot create ({e.strerror or e})") from None
        except VaelabError:
            self.close(failed=True)
            raise
        ckpt.write_run_config(self.workdir, model, config)
        return self.workdir

    def swap_in(self, trainer: "Trainer") -> None:
        """After the new run's first saved epoch: the new folder takes the run's name in one
        atomic step, and the old run (now under the hidden name) is removed."""
        trainer.after_save = None
        try:
            exchange(self.run_dir, self.workdir)
        except OSError as e:
            raise CheckpointError(f"{self.run_dir}: cannot replace it with the new run in {self.workdir} "
                                  f"({e.strerror or e}); the previous run is unchanged") from None
        old, self.workdir = self.workdir, self.run_dir
        self.locks.pop(0).release()  # the old run's lock, which moved with it
        shutil.rmtree(old, ignore_errors=True)
        trainer.run_dir = self.run_dir
        self.replacing = False

    def close(self, failed: bool) -> None:
        """Release the locks; after a failure before anything was saved, remove what this run
        created (the sibling of an --overwrite, or a folder that did not exist before)."""
        if failed and self.owned:
            nothing_saved = not (self.workdir / ckpt.CHECKPOINT_FILE).exists()
            if self.replacing and self.workdir != self.run_dir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            elif self.created and nothing_saved and self.run_dir.is_dir():
                shutil.rmtree(self.run_dir, ignore_errors=True)
        for lock in self.locks:
            lock.release()
        self.locks = []


def check_model_fits(model, config: TrainConfig, device: torch.device) -> None:
    """Refuse a model whose training state cannot fit in memory (`model` built on the meta device)."""
    from .memory import device_memory, parameter_count, require_memory

    n = parameter_count(model)
    require_memory(16 * n, f"training a {model.name} of {n:,} parameters (weights, gradients, Adam's moments)",
                   available=device_memory(device))


def train(model_name: str, model_config, config: TrainConfig, run_dir: str | Path,
          overwrite: bool = False, progress: bool = True, data: ImageData | None = None):
    """Train a new model into `run_dir`; returns the Trainer (its model and history)."""
    from .memory import meta_model
    from .models import build_model

    run_dir = Path(run_dir)
    config.validate()
    device = resolve_device(config.device)
    check_model_fits(meta_model(model_name, model_config), config, device)
    # Everything that can fail on a bad option happens before a folder is touched, so a mistake
    # never leaves a half-made folder, nor deletes the run --overwrite would replace.
    target = NewRun(run_dir, overwrite)
    if data is None:
        data = load_training_data(config, quiet=not progress)
    seed_everything(config.seed)
    model = build_model(model_name, model_config)
    workdir = target.open(model, config)
    try:
        trainer = Trainer(workdir, model, data, config, progress=progress)
        if target.replacing:
            trainer.after_save = target.swap_in
            trainer.nothing_saved = f"no epoch had completed, so {run_dir} still holds the previous run"
        elif target.created:
            trainer.nothing_saved = f"no epoch had completed, so nothing was saved ({run_dir} was removed)"
        trainer.fit()
    except TrainingInterrupted as e:
        if target.replacing:
            target.close(failed=True)
            raise TrainingInterrupted(f"{e.signal_name}: stopped before the new run's first epoch was saved; "
                                      f"{run_dir} still holds the previous run", e.signal_name) from None
        target.close(failed=False)  # the interrupted run was saved: resumable
        raise
    except BaseException:
        target.close(failed=True)
        raise
    target.close(failed=False)
    return trainer


def resume(run_dir: str | Path, epochs: int | None = None, device: str | None = None,
           progress: bool = True, data: ImageData | None = None):
    """Continue a run from its last checkpoint with its stored configuration (`epochs` may
    extend it). A run killed before its first checkpoint starts from step 0 with the config in
    its config.json, exactly as it would have trained."""
    run_dir = Path(run_dir)
    ckpt.read_run_config(run_dir)  # a folder that is not a run gets no lock file
    with ckpt.RunLock(run_dir):
        ckpt.clean_run_folder(run_dir)
        return _resume_locked(run_dir, epochs, device, progress, data)


def _resume_locked(run_dir: Path, epochs: int | None, device: str | None, progress: bool,
                   data: ImageData | None):
    config_path = run_dir / ckpt.CONFIG_FILE
    spec = ckpt.parse_spec(ckpt.read_run_config(run_dir), config_path)
    fresh = not any((run_dir / name).exists() for name in (ckpt.CHECKPOINT_FILE, ckpt.MODEL_FILE, "history.csv"))
    state, meta = None, {}
    if not fresh:
        state, meta = ckpt.load_checkpoint(run_dir, with_meta=True)
        ckpt.check_unchanged(spec, meta, config_path, run_dir / ckpt.CHECKPOINT_FILE)
    done = state["epoch"] if state else 0
    changes = {}
    if epochs is not None:
        if epochs < done or (epochs == done and not (state or {}).get("partial")):
            raise ConfigError(f"--epochs {epochs}: the run already has {done} epochs")
        changes["epochs"] = epochs
    if device is not None:
        changes["device"] = device
    config = spec.train
    if changes:
        config = config_from_dict(TrainConfig, {**config_to_dict(config), **changes}, where="train")
    # Options, device, model size and data are all resolved before anything is written.
    torch_device = resolve_device(config.device)
    if data is None:
        data = load_training_data(config, quiet=not progress)
    if fresh:
        seed_everything(config.seed)  # as `train` does right before building the model
    model = ckpt.build_spec(spec, config_path, training=True, device=torch_device)
    trainer = Trainer(run_dir, model, data, config, progress=progress)
    if state is not None:
        try:
            trainer.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{run_dir / ckpt.CHECKPOINT_FILE}: inconsistent training state ({e})") from None
    # Started: only now is anything written.
    if changes:
        ckpt.write_run_config(run_dir, model, config)
    if state is not None and not trainer.partial:
        # A kill between the checkpoint's rename and theirs leaves these an epoch behind it;
        # otherwise this rewrites the same bytes.
        ckpt.save_model(run_dir, trainer.model, meta.get("config"))
        trainer.write_history_files()
    if trainer.epoch >= config.epochs and not trainer.partial:
        raise ConfigError(f"{run_dir} already finished its {config.epochs} epochs (its weights and history files "
                          f"now match its checkpoint); pass --epochs N to extend it")
    trainer.fit()
    return trainer
