"""A run's TensorBoard log (`vaelab train --tensorboard [DIR]`, `TrainConfig.tensorboard`).

The trainer tells the log what happened through its observer calls (train.py): the loss rows of
each host sync, each evaluated epoch, each coming checkpoint, the end. Tags, every one on the
run's optimizer-step axis (steps.csv's `step`, from 1):

    <term>/train_step          each loss term of each training step: the values of steps.csv
    <term>/<split>_epoch       each term of an epoch's history.csv rows (train, test, val), at
                               the epoch's last step
    schedule/lr                the learning rate at each step (schedule/lr_<name> per optimizer
                               for a model with several)
    schedule/kl_weight         the KL term's weight at each step, for a model with `kl_weight`
    samples, reconstructions   the images of figures/samples.png and reconstructions.png, after
                               each epoch (gallery.py picks them, for both)
    projector test_codes       after the last epoch: the posterior means of 2000 random test
                               images (all, if fewer), the images as its sprite, their labels
                               and class names as its metadata

One step axis for everything is what makes a resumed run's log coherent: its writer opens with
`purge_step` at the first step it trains, so TensorBoard drops what an earlier process logged
from there on (the steps after the checkpoint, which the resumed run trains again). The log is
flushed before every checkpoint, so it never holds less than the checkpoint does.

Logging changes nothing in training: the images and codes are drawn in eval mode with their own
random generators, so a run with the log trains to the same weights as one without. The folder
of a relative DIR is inside the run folder. torch.utils.tensorboard needs the optional
`tensorboard` package; it is imported only where a log is asked for, and `check_available` is
called before anything is written.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from .errors import ConfigError
from .gallery import grid_array, random_test_images, random_test_labels, reconstruction_rows, sample_rows
from .inference import batched
from .train_config import TrainConfig

PROJECTOR_IMAGES = 2000
PROJECTOR_TAG = "test_codes"


def summary_writer_class():
    """torch's SummaryWriter, or a ConfigError saying how to install what it needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package, which is not installed: "
                          "pip install 'vaelab[tensorboard]' (`make install` includes it)") from None
    return SummaryWriter


def check_available(config: TrainConfig, run_dir: Path) -> None:
    """Refuse a config that asks for a log this Python, or this place, cannot take."""
    if config.tensorboard is None:
        return
    summary_writer_class()
    logdir = Path(run_dir) / config.tensorboard
    if logdir.exists() and not logdir.is_dir():
        raise ConfigError(f"--tensorboard {logdir}: exists and is not a folder")


class TensorBoardLog:
    """The observer a trainer gets when its config asks for a TensorBoard log in `folder`."""

    def __init__(self, folder: str):
        self.folder = folder
        self.writer = None
        self.logdir: Path | None = None

    # --- the trainer's observer calls ---------------------------------------------------------

    def on_steps(self, trainer, rows: torch.Tensor, first_step: int) -> None:
        """`rows`: (steps, terms) loss rows on the host, of the steps `first_step`, `first_step + 1`, ..."""
        from tensorboard.compat.proto.summary_pb2 import Summary  # there: the writer is open
        from torch.utils.tensorboard.summary import scalar

        writer = self._writer(trainer)
        steps = range(first_step, first_step + len(rows))
        series = {f"{name}/train_step": values for name, values in zip(trainer.term_names, rows.T.tolist())}
        series.update(schedules(trainer, steps))
        # One event per step holding every tag's value: a tenth of the time of one event per
        # value (`add_scalar`), which took ~10 % of an MLP VAE epoch here.
        for i, step in enumerate(steps):
            values = [v for tag, column in series.items() for v in scalar(tag, column[i]).value]
            writer.file_writer.add_summary(Summary(value=values), step)

    def on_epoch(self, trainer) -> None:
        """The epoch `trainer.epoch` is evaluated (its history rows written) and not yet saved."""
        writer, step = self._writer(trainer), trainer.step
        for row in trainer.history:
            if row["epoch"] == trainer.epoch:
                for name in trainer.term_names:
                    if math.isfinite(row[name]):
                        writer.add_scalar(f"{name}/{row['split']}_epoch", row[name], step)
        model, data, seed = trainer.model, trainer.data, trainer.config.seed
        was_training = model.training
        model.eval()  # batch norm reads its running statistics instead of updating them
        try:
            for tag, rows in (("samples", sample_rows(model, len(data.classes), seed)),
                              ("reconstructions", reconstruction_rows(model, data.test_x, seed, test_y=data.test_y))):
                writer.add_image(tag, grid_array(torch.cat(rows), nrow=len(rows[0])), step, dataformats="HW")
            if trainer.epoch == trainer.config.epochs:
                self._projector(writer, model, data, seed, step)
        finally:
            model.train(was_training)

    def on_checkpoint(self, trainer) -> None:
        if self.writer is not None:
            self.writer.flush()

    def on_end(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # --- helpers ------------------------------------------------------------------------------

    def _writer(self, trainer):
        logdir = Path(trainer.run_dir) / self.folder  # an absolute folder stays itself
        if logdir != self.logdir:
            # The first call; or an --overwrite run was swapped in under the run's name, and the
            # writer must follow it: it appends to its event file by path, and writes the
            # projector's files where it thinks it is.
            self.on_end(trainer)
            self.writer = summary_writer_class()(str(logdir), purge_step=trainer.step + 1)
            self.logdir = logdir
        return self.writer

    def _projector(self, writer, model, data, seed: int, step: int) -> None:
        n = min(PROJECTOR_IMAGES, len(data.test_x))
        images = random_test_images(data.test_x, n, seed, "cpu")  # (n, 1, 28, 28)
        labels = random_test_labels(data.test_y, n, seed, "cpu")
        # A conditional model's codes are of q(z|x, y): each image goes with its label.
        codes = batched(lambda x, y: model.encode(x, y if model.conditional else None).mu.float(), images, labels,
                        batch_size=500, device=model.device, model=model)
        # A last epoch trained again (killed between this log and its checkpoint) replaces its
        # projector files; torch keeps them in STEP/TAG and would warn on stdout.
        shutil.rmtree(self.logdir / f"{step:05d}" / PROJECTOR_TAG, ignore_errors=True)
        writer.add_embedding(codes, metadata=[[k, data.classes[k]] for k in labels.tolist()], label_img=images,
                             global_step=step, tag=PROJECTOR_TAG, metadata_header=["label", "class"])


def schedules(trainer, steps: range) -> dict[str, list[float]]:
    """tag -> the value at each of `steps` (numbered from 1, as steps.csv) of what the loss is
    trained with besides the data: each optimizer's learning rate and the model's KL weight."""
    values = {}
    optimizers = trainer.optimizers
    for name, opt in optimizers.items():
        # Read at the sync: nothing changes a learning rate between two syncs (vaelab has no
        # learning-rate schedule; a model's optimizers keep the rate they were made with).
        tag = "schedule/lr" if len(optimizers) == 1 else f"schedule/lr_{name}"
        values[tag] = [opt.param_groups[0]["lr"]] * len(steps)
    kl_weight = getattr(trainer.model, "kl_weight", None)
    if kl_weight is not None:
        # Step s's state counts the s - 1 steps completed before it; the epoch is the one in training.
        values["schedule/kl_weight"] = [kl_weight(trainer.step_state(s - 1, trainer.epoch + 1)) for s in steps]
    return values
