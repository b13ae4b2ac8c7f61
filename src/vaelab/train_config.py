"""How a model is trained and on what data: `TrainConfig`, the one list of the training options.

A leaf module (it imports no torch and nothing of vaelab but `config` and `errors`), so the
trainer, the run-folder code, the recipes and the CLI all read the options from here without
importing each other. Each field's `help` metadata is its command-line help: `vaelab train` makes
one flag per field (`batch_size` -> `--batch-size`), so a new option is one new field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import option, require

PRECISIONS = ("fp32", "bf16")
BINARIZE_CHOICES = ("none", "dynamic", "static")
# Seeds go to NumPy's legacy generator, which takes 32 bits; counts to torch's int64 indexing.
MAX_SEED = 2**32 - 1
MAX_COUNT = 2**31 - 1
# What `--resume` may change in a stored training config: the length and the place of the run.
# Every other field changes the batches, the updates or their rounding, so a resumed run would no
# longer equal a straight one.
RESUMABLE_FIELDS = ("epochs", "device")
# Where `--tensorboard` alone logs: a relative folder is inside the run folder (it moves with the
# run, and `tensorboard --logdir runs` finds every run's log).
TENSORBOARD_DIR = "tb"


@dataclass
class TrainConfig:
    """How a model is trained and on what data (the model's own config is separate)."""

    dataset: str = option("mnist", "mnist (default) or fashion-mnist")
    epochs: int = option(10, "epochs to train (default 10)")
    batch_size: int = option(128, "default 128")
    lr: float = option(1e-3, "Adam learning rate (default 1e-3)")
    lr_decay: float = option(1.0, "multiply the learning rate by this after every epoch: epoch e trains at "
                                  "lr * lr_decay^(e-1) (default 1, constant)")
    seed: int = option(0, "random seed (default 0)")
    device: str = option("auto", "auto (default), cpu or cuda")
    val_size: int = option(0, "training images held out as validation")
    binarize: str = option("none", "none (default), dynamic or static")
    precision: str = option("fp32", "fp32 (default) or bf16 autocast")
    clip_grad: float | None = option(None, "clip the gradient norm to this value")
    eval_batch_size: int = option(1000, "images per batch when the loss terms are evaluated after each "
                                        "epoch (default 1000)")
    log_every: int = option(50, "steps between the host syncs that update the progress bar and check for "
                                "divergence (default 50)")
    compile: bool = option(False, "torch.compile the model (opt-in; benchmarks/RESULTS.md says when it pays)")
    # compile: the same math, but other random draws (inductor's RNG) and a slow start.
    tensorboard: str | None = option(None, "log every loss term per step and per epoch, the learning rate, the KL "
                                           "weight, sample and reconstruction grids and the test codes' embedding "
                                           "to TensorBoard in DIR (alone: the run folder's tb/; needs the "
                                           "tensorboard package)", const=TENSORBOARD_DIR, metavar="DIR")

    def validate(self) -> None:
        require(self.epochs >= 1, "epochs must be at least 1")
        require(self.batch_size >= 1, "batch size must be at least 1")
        require(max(self.epochs, self.batch_size, self.val_size, self.eval_batch_size, self.log_every) <= MAX_COUNT,
                f"epochs, batch sizes, val size and log_every must be at most {MAX_COUNT}")
        require(math.isfinite(self.lr) and self.lr > 0, "learning rate must be positive and finite")
        require(0 < self.lr_decay <= 1, "lr-decay must be in (0, 1]")
        require(0 <= self.seed <= MAX_SEED, f"seed must be between 0 and {MAX_SEED}")
        require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                f"device must be auto, cpu or cuda, not {self.device!r}")
        require(self.val_size >= 0, "val size must be non-negative")
        require(self.binarize in BINARIZE_CHOICES, f"binarize must be one of {', '.join(BINARIZE_CHOICES)}")
        require(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}")
        require(self.clip_grad is None or (math.isfinite(self.clip_grad) and self.clip_grad > 0),
                "clip-grad must be positive and finite")
        require(self.eval_batch_size >= 1 and self.log_every >= 1, "batch sizes must be positive")
        require(self.tensorboard is None or (self.tensorboard.strip() != "" and "\0" not in self.tensorboard),
                "tensorboard must name a folder")
