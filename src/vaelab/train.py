"""The generic training loop (`Trainer`) and its entry points, `train` (a new run) and `resume`.

Nothing here knows which model it trains: a model brings its optimizers and its update step
(`GenerativeModel.training_step`), and reports named loss terms that become history columns. The
loop hands each step a `Batch` (images and labels) and a `StepState` (where the step stands in
the run, and the gradient-norm limit), checks for divergence at its host syncs, evaluates and
saves after each epoch, and on a signal saves mid-epoch. The rest is in the pieces it calls:
the options (train_config.py), what it records and shows (training_log.py), the batches and
their resumable order (data.Batcher), the run folder (run_folder.py, checkpoint.py,
history_files.py), devices (devices.py), random states (rng.py) and signals (signals.py). The
optional TensorBoard log (tensorboard_log.py) is an observer the loop tells of its progress.

Data-parallel training (`vaelab train --nproc N`, torchrun) runs this same loop in every process
once the CLI has joined torchrun's group (distributed.py): each trains its share of every batch,
the gradients are averaged before each optimizer step, the logged rows and the evaluation are
summed across processes, a stop request is agreed on at the syncs, and the main process alone
makes and writes the run folder. Without a group none of this happens.

Speed notes (see benchmarks/): batches are indexed out of a uint8 tensor on the device, the
per-step loss terms stay on the device and are copied to the host once every `log_every` steps,
and evaluation runs in large batches under inference mode. Fused Adam (models/base.py), fp32
linear layers through oneDNN on the CPU (fastpath.py), the MLP VAE's hand-derived step with
PackedAdam (models/vae_step.py, optim.py), channels-last weights for convolutional models, and an
optional `compile` (torch.compile of the model's forward and backward). Process-wide settings
(threads, denormals, the allocator) are not changed here: see runtime.py; the loop only asks
`runtime.retune()` at its host syncs to measure the thread count again where `configure` chose it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import checkpoint as ckpt
from . import distributed as dist
from . import runtime
from .batch import StepState
from .config import config_from_dict, config_to_dict
from .data import Batcher, ImageData, load_training_data
from .devices import autocast, bf16_slow, channels_last, resolve_device, wants_channels_last
from .errors import CheckpointError, ConfigError, DivergenceError, TrainingInterrupted
from .evaluate import evaluate_terms
from .fastpath import onednn_faster, onednn_linear
from .history_files import HISTORY_FILE, write_history, write_steps
from .memory import device_memory, meta_model, parameter_count, require_memory
from .models import build_model
from .rng import rng_state, seed_everything, set_rng_state
from .run_folder import NewRun
from .signals import stop_on_signals
from .tensorboard_log import TensorBoardLog, check_available
from .train_config import TrainConfig
from .training_log import TrainingLog


class Trainer:
    """Trains `model` into `run_dir`, saving a full checkpoint after each epoch and on a signal."""

    def __init__(self, run_dir: Path, model, data: ImageData, config: TrainConfig, progress: bool = True):
        self.run_dir = Path(run_dir)
        self.config = config
        # Data-parallel (distributed.py): every process trains its share of each batch; the main
        # one alone prints, tells the observers and writes the run folder.
        self.distributed = dist.active()
        self.progress = progress and dist.is_main()
        self.device = resolve_device(config.device)
        if self.progress and config.precision == "bf16" and bf16_slow(self.device):
            print("vaelab: note: this CPU has no fast bf16 (oneDNN's bf16 kernels need AVX-512), so bf16 is "
                  "emulated here and several times slower than fp32; --precision fp32 trains faster",
                  file=sys.stderr, flush=True)
        self.model = model.to(self.device)
        dist.broadcast_module(self.model)  # every process starts from the main one's weights
        if config.compile:
            self.model.compile()  # in place: state_dict keys and checkpoints are unchanged
        self.data = data
        self.optimizers = model.configure_optimizers(config.lr)
        # Each optimizer's rates as the model set them: the schedule scales these (`_set_lr`).
        self.base_lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in self.optimizers.items()}
        self.batches = Batcher(data.train_x, config.batch_size, self.device, shuffle=True,
                               binarize="dynamic" if config.binarize == "dynamic" else "none",
                               seed=config.seed, labels=data.train_y, part=(dist.rank(), dist.world_size()))
        # Averages the gradients across processes before each optimizer step (and clips them there).
        self.grad_sync = dist.GradientSync(self.optimizers, config.clip_grad) if self.distributed else None
        self.eval_splits = {"test": (data.test_x, data.test_y)}  # split -> (images, labels)
        if data.val_x is not None:
            self.eval_splits["val"] = (data.val_x, data.val_y)
        self.term_names = ("loss", *model.term_names)
        self.epoch = 0  # completed epochs
        self.log = TrainingLog(self.term_names, progress=self.progress, distributed=self.distributed)
        self.stored_config = ckpt.run_config(model, config)  # carried by every checkpoint and weights file
        # Called after each end-of-epoch save (`train --overwrite` swaps the new run in there).
        self.after_save: Callable[["Trainer"], None] | None = None
        self.nothing_saved = "no epoch had completed, so nothing was saved"  # for messages
        # Told of the run's progress: on_steps(trainer, rows, first_step) after each host sync
        # (the rows checked finite), on_epoch(trainer) once an epoch is evaluated, before it is
        # saved, on_checkpoint(trainer) before each checkpoint, on_saved(trainer) once an epoch is
        # saved (an observer that raises there stops the run at a complete, resumable epoch: a
        # sweep's pruner), on_end(trainer) when fit ends. An observer implements the calls it needs.
        # With several processes, the main one alone has observers.
        self.observers = ([TensorBoardLog(config.tensorboard)] if config.tensorboard is not None and dist.is_main()
                          else [])

    # The log's record, under the names the trainer has always had.
    step = property(lambda self: self.log.step, doc="completed optimizer steps")
    history = property(lambda self: self.log.history, doc="history.csv's rows")
    steps = property(lambda self: self.log.steps, doc="steps.csv's rows")
    partial = property(lambda self: self.log.partial, doc="progress inside an interrupted epoch")

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The training state; with several processes, a collective (every process's RNG states
        are gathered), called by all of them at the same point."""
        log = self.log.state_dict()
        rngs = dist.all_gather(rng_state())
        state = {
            "epoch": self.epoch,
            "step": log["step"],
            "model": dict(self.model.state_dict()),
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "batches": self.batches.state_dict(),
            "rng": rngs[0],
            "history": log["history"],
            "steps": log["steps"],
            "partial": log["partial"],
        }
        if self.distributed:  # the other processes' RNG states, and how many there were
            state.update(world_size=len(rngs), rank_rng=rngs[1:])
        return state

    def load_state_dict(self, state: dict) -> None:
        ckpt.load_state_into(self.model, state["model"], self.run_dir / ckpt.CHECKPOINT_FILE)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        self.batches.load_state_dict(state["batches"])
        rank = dist.rank()
        set_rng_state(state["rng"] if rank == 0 else state["rank_rng"][rank - 1])
        self.epoch = state["epoch"]
        self.log.load_state_dict(state)

    def step_state(self, step: int, epoch: int) -> StepState:
        """The state of the step taken after `step` completed steps, in epoch `epoch`."""
        # Data-parallel: the gradients are clipped after their averaging, by `grad_sync`.
        return StepState(step=step, epoch=epoch, epochs=self.config.epochs, steps_per_epoch=len(self.batches),
                         clip_grad=None if self.distributed else self.config.clip_grad)

    def resume_command(self) -> str:
        """How to continue this run: with as many processes as it trains on."""
        nproc = f" --nproc {dist.world_size()}" if self.distributed else ""
        return f"vaelab train --resume {self.run_dir}{nproc}"

    def tell(self, event: str, *args) -> None:
        for observer in self.observers:
            call = getattr(observer, event, None)
            if call is not None:
                call(self, *args)

    def save(self) -> None:
        """The checkpoint, weights and history files (called by every process; the main one writes)."""
        self.tell("on_checkpoint")
        state = self.state_dict()
        if dist.is_main():
            ckpt.save_checkpoint(self.run_dir, state, self.stored_config)
            ckpt.save_model(self.run_dir, self.model, self.stored_config)
            self.write_history_files()

    def write_history_files(self) -> None:
        """history.csv and steps.csv, rewritten from the checkpointed state: they only ever hold
        rows of epochs that are complete and saved."""
        write_history(self.run_dir, self.log.history, self.term_names)
        write_steps(self.run_dir, self.log.steps, self.term_names)

    # --- the loop -----------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        self.model.train()
        # fp32 linear layers through oneDNN while training on a CPU where it is the faster library
        # (see fastpath.py); inductor has its own kernels, so not with compile.
        fast = self.device.type == "cpu" and not self.config.compile and onednn_faster()
        try:
            with (stop_on_signals() as signals, onednn_linear(self.model, enabled=fast),
                  channels_last(self.model, enabled=wants_channels_last(self.model))):
                match_state_layout(self.optimizers)
                while self.epoch < self.config.epochs:
                    self._run_epoch(self.epoch + 1, signals)
        finally:
            self.tell("on_end")
        return self.history

    def _run_epoch(self, epoch: int, signals: dict) -> None:
        cfg, model, log = self.config, self.model, self.log
        done = log.batches_done
        if done:
            # An interrupted epoch: its order is drawn again from the state it began with, and the
            # batcher's generator (restored from the checkpoint) stands after batch `done`.
            batches_at_start = log.partial["batches_at_start"]
            batches = self.batches.resume(batches_at_start["generator"], done)
        else:
            batches_at_start = self.batches.state_dict()
            batches = iter(self.batches)
        self._set_lr(epoch)
        log.begin_epoch(epoch, cfg.epochs, len(self.batches), self.device)

        for i, batch in enumerate(batches, start=done):
            state = self.step_state(log.next_step, epoch)
            if self.distributed:
                images = self.batches.global_size(i)
                self.grad_sync.share = len(batch) / images
            with autocast(self.device, cfg.precision):
                out = model.training_step(batch, self.optimizers, state)
            if self.distributed:
                log.record(out, images, self.grad_sync.share)
            else:
                log.record(out, len(batch))
            last = i + 1 == len(self.batches)
            # With several processes a signal is acted on at the syncs only, where they agree on
            # it, so that all stop after the same step.
            stop = None if self.distributed else signals["stop"]
            if log.unsynced() >= cfg.log_every or last or stop:
                recent, first_step = log.sync()
                stop = dist.agree_stop(signals["stop"])
                self._check_finite(recent, epoch, first_step)
                self._check_weights(epoch, log.next_step)
                if self.device.type == "cpu":
                    runtime.retune()
                self.tell("on_steps", recent, first_step)
            if stop and not last:
                log.interrupt(i + 1, batches_at_start)
                # Steps of the unfinished epoch live only in the checkpoint until the epoch completes.
                self.tell("on_checkpoint")
                state = self.state_dict()
                if dist.is_main():
                    ckpt.save_checkpoint(self.run_dir, state, self.stored_config)
                signals["outlive_sigterm"] = self.distributed
                raise TrainingInterrupted(
                    f"{stop}: saved {self.run_dir} in epoch {epoch} after "
                    f"{i + 1}/{len(self.batches)} batches; continue with "
                    f"`{self.resume_command()}`", stop
                )
        log.end_epoch()
        self._finish_epoch(epoch)
        stop = dist.agree_stop(signals["stop"])
        if stop and epoch < self.config.epochs:  # after the last epoch there is nothing to resume
            signals["outlive_sigterm"] = self.distributed
            raise TrainingInterrupted(
                f"{stop}: saved {self.run_dir} after epoch {epoch}; continue with "
                f"`{self.resume_command()}`", stop
            )

    def _set_lr(self, epoch: int) -> None:
        """Epoch `epoch` (from 1) trains at each optimizer's initial rates times
        lr_decay^(epoch - 1): a function of the epoch alone, so a resumed run (whose optimizers
        come back with the rates they were saved with) trains at the rates of a straight one."""
        if self.config.lr_decay == 1.0:
            return
        factor = self.config.lr_decay ** (epoch - 1)
        for name, opt in self.optimizers.items():
            for group, base in zip(opt.param_groups, self.base_lrs[name]):
                group["lr"] = base * factor

    def _finish_epoch(self, epoch: int) -> None:
        """Evaluate, then save: the epoch's checkpoint, weights and history files."""
        eval_start = time.perf_counter()
        dist.broadcast_buffers(self.model)  # all processes evaluate and save the main one's model
        for split, (images, labels) in self.eval_splits.items():
            terms = evaluate_terms(self.model, images, self.config, self.device, labels=labels,
                                   distributed=self.distributed)
            self.log.add_evaluation(split, terms, time.perf_counter() - eval_start)
        self.epoch = epoch
        self.model.end_of_epoch(self.batches.images)
        self.tell("on_epoch")
        self.save()
        if self.after_save is not None:
            self.after_save(self)
        if self.progress:
            print(self.log.summary(self.config.epochs), file=sys.stderr, flush=True)
        self.tell("on_saved")

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


def match_state_layout(optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Give every optimizer state tensor shaped like its parameter the parameter's memory layout.
    A resumed run loads its Adam moments contiguous, then `channels_last` turns the convolution
    weights channels-last; fused Adam walks the parameter, gradient and moments as flat memory,
    so mismatched layouts would pair each weight with another weight's moments (a straight run's
    moments are created in the weights' layout)."""
    for opt in optimizers.values():
        for p, state in opt.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p).copy_(value)


# ---------------------------------------------------------------------------------------------
# Entry points used by the CLI and the recipes
# ---------------------------------------------------------------------------------------------


def check_model_fits(model, config: TrainConfig, device: torch.device) -> None:
    """Refuse a model whose training state cannot fit in memory (`model` built on the meta device)."""
    n = parameter_count(model)
    require_memory(16 * n, f"training a {model.name} of {n:,} parameters (weights, gradients, Adam's moments)",
                   available=device_memory(device))


def train(model_name: str, model_config, config: TrainConfig, run_dir: str | Path,
          overwrite: bool = False, progress: bool = True, data: ImageData | None = None,
          observers: Sequence[object] = ()):
    """Train a new model into `run_dir`; returns the Trainer (its model and history). `observers`
    join the trainer's (see `Trainer.observers`): a sweep's pruner watches the epochs so."""
    run_dir = Path(run_dir)
    config.validate()
    check_available(config, run_dir)
    device = resolve_device(config.device)
    check_model_fits(meta_model(model_name, model_config), config, device)
    # Everything that can fail on a bad option happens before a folder is touched, so a mistake
    # never leaves a half-made folder, nor deletes the run --overwrite would replace. With several
    # processes the main one alone makes the folder (`target` is None on the others); a refusal
    # there is raised by every process.
    target = dist.on_main(lambda: NewRun(run_dir, overwrite))
    if data is None:
        data = load_training_data(config, quiet=not progress)
    dist.check_batches(len(data.train_x), config.batch_size)
    seed_everything(config.seed)
    model = build_model(model_name, model_config)
    seed_process(config.seed)
    classes = getattr(model.config, "n_classes", None)
    if model.conditional and classes is not None and classes != len(data.classes):
        raise ConfigError(f"{model_name}: n_classes={classes}, but {data.name} has {len(data.classes)} "
                          f"classes; set n_classes={len(data.classes)} or leave it out")
    workdir = dist.on_main(lambda: target.open(model, config))
    try:
        trainer = Trainer(workdir, model, data, config, progress=progress)
        if dist.is_main():
            trainer.observers += list(observers)
        if target is not None and target.replacing:
            trainer.after_save = target.swap_in
            trainer.nothing_saved = f"no epoch had completed, so {run_dir} still holds the previous run"
        elif target is not None and target.created:
            trainer.nothing_saved = f"no epoch had completed, so nothing was saved ({run_dir} was removed)"
        trainer.fit()
    except TrainingInterrupted as e:
        if target is None:
            raise
        if target.replacing:
            target.close(failed=True)
            raise TrainingInterrupted(f"{e.signal_name}: stopped before the new run's first epoch was saved; "
                                      f"{run_dir} still holds the previous run", e.signal_name) from None
        target.close(failed=False)  # the interrupted run was saved: resumable
        raise
    except BaseException:
        if target is not None:
            target.close(failed=True)
        raise
    if target is not None:
        target.close(failed=False)
    return trainer


def seed_process(seed: int) -> None:
    """After the model is built (alike in every process, from `seed`): each process but the main
    one draws its own noise from then on (distributed.rank_seed); a single process is untouched."""
    if dist.rank():
        seed_everything(dist.rank_seed(seed))


def world_size_message(run_dir: Path, trained_on: int) -> str:
    """Why a run cannot continue with another number of processes, and how it can."""
    if trained_on == 1:
        return (f"{run_dir} was trained in one process; resume it without --nproc (or torchrun), as "
                f"`vaelab train --resume {run_dir}`")
    return (f"{run_dir} was trained on {trained_on} processes; resume it with --nproc {trained_on} "
            f"(or torchrun --nproc-per-node {trained_on})")


def resume(run_dir: str | Path, epochs: int | None = None, device: str | None = None,
           progress: bool = True, data: ImageData | None = None):
    """Continue a run from its last checkpoint with its stored configuration (`epochs` may
    extend it). A run killed before its first checkpoint starts from step 0 with the config in
    its config.json, exactly as it would have trained."""
    run_dir = Path(run_dir)
    ckpt.read_run_config(run_dir)  # a folder that is not a run gets no lock file
    # With several processes the main one holds the lock and writes; all read the run folder.
    lock = dist.on_main(lambda: ckpt.RunLock(run_dir).acquire())
    try:
        if lock is not None:
            ckpt.clean_run_folder(run_dir)
        return _resume_locked(run_dir, epochs, device, progress, data)
    finally:
        if lock is not None:
            lock.release()


def _resume_locked(run_dir: Path, epochs: int | None, device: str | None, progress: bool,
                   data: ImageData | None):
    config_path = run_dir / ckpt.CONFIG_FILE
    spec = ckpt.parse_spec(ckpt.read_run_config(run_dir), config_path)
    fresh = not any((run_dir / name).exists() for name in (ckpt.CHECKPOINT_FILE, ckpt.MODEL_FILE, HISTORY_FILE))
    state, meta = None, {}
    if not fresh:
        state, meta = ckpt.load_checkpoint(run_dir, with_meta=True)
        ckpt.check_unchanged(spec, meta, config_path, run_dir / ckpt.CHECKPOINT_FILE)
        trained_on = state.get("world_size", 1)
        if trained_on != dist.world_size():  # its batches' shares and RNG streams are per process
            raise ConfigError(world_size_message(run_dir, trained_on))
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
    check_available(config, run_dir)
    torch_device = resolve_device(config.device)
    if data is None:
        data = load_training_data(config, quiet=not progress)
    dist.check_batches(len(data.train_x), config.batch_size)
    if fresh:
        seed_everything(config.seed)  # as `train` does right before building the model
    model = ckpt.build_spec(spec, config_path, training=True, device=torch_device)
    if fresh:
        seed_process(config.seed)
    trainer = Trainer(run_dir, model, data, config, progress=progress)
    if state is not None:
        try:
            trainer.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{run_dir / ckpt.CHECKPOINT_FILE}: inconsistent training state ({e})") from None
    # Started: only now is anything written.
    if changes and dist.is_main():
        ckpt.write_run_config(run_dir, model, config)
    if state is not None and not trainer.partial and dist.is_main():
        # A kill between the checkpoint's rename and theirs leaves these an epoch behind it;
        # otherwise this rewrites the same bytes.
        ckpt.save_model(run_dir, trainer.model, meta.get("config"))
        trainer.write_history_files()
    if trainer.epoch >= config.epochs and not trainer.partial:
        raise ConfigError(f"{run_dir} already finished its {config.epochs} epochs (its weights and history files "
                          f"now match its checkpoint); pass --epochs N to extend it")
    trainer.fit()
    return trainer
