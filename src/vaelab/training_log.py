"""What a run records as it trains, and the progress it shows: one object, `TrainingLog`.

Per step, a row of (loss, terms...) that stays on the device; the rows go to the host once every
`log_every` steps (the loop's only host sync), where the progress bar shows the latest loss and
the trainer checks them for divergence. Per epoch, the image-weighted mean of each term and the
seconds spent become the "train" row of the history, beside one row per evaluated split. An
epoch interrupted by a signal keeps its sums, counts, seconds and step rows in `partial`, saved
with the checkpoint, so the resumed epoch's history row equals a straight run's.

Its state (`step`, `history`, `steps`, `partial`) is part of the trainer's checkpoint under
those names; history.csv and steps.csv are written from it (history_files.py).
"""

from __future__ import annotations

import math
import sys
import time

import torch
# Plain text bars, which terminals and notebooks both show: tqdm.auto would choose the notebook
# widget inside Jupyter, which needs ipywidgets (not a dependency) and warns on import without it.
from tqdm import tqdm

from . import distributed as dist


class TrainingLog:
    """`distributed`: one of the processes of a data-parallel run, each recording its share of
    every global batch. Each row is then weighted by the share's fraction of the global batch
    and the rows are summed across processes at each sync, so every process holds the global
    batch means (the divergence check decides alike everywhere) and the epoch's sums are taken
    from them; `sync` is then a collective, called at the same steps by every process."""

    def __init__(self, term_names: tuple[str, ...], progress: bool = True, distributed: bool = False):
        self.term_names = term_names  # ("loss", *the model's term names): the columns
        self.progress = progress
        self.distributed = distributed
        self.step = 0  # completed optimizer steps, those of an interrupted epoch included
        self.history: list[dict] = []  # rows of complete epochs: epoch, split, terms..., seconds
        self.steps = torch.zeros(0, len(term_names) + 2)  # rows of complete epochs: step, epoch, terms...
        self.partial: dict | None = None  # an interrupted epoch's progress (see `interrupt`)

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "steps": self.steps, "partial": self.partial}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history, self.steps, self.partial = (state["step"], state["history"], state["steps"],
                                                             state["partial"])

    @property
    def batches_done(self) -> int:
        """Batches of the current epoch done before this process took it up (an interrupted one's)."""
        return (self.partial or {}).get("batches_done", 0)

    # --- one epoch ----------------------------------------------------------------------------

    def begin_epoch(self, epoch: int, epochs: int, batches: int, device: torch.device) -> None:
        """Start (or, after an interruption, continue) epoch `epoch` of `epochs`, of `batches` batches."""
        partial = self.partial or {}
        self.epoch = epoch
        self._sums = partial.get("sums", torch.zeros(len(self.term_names), dtype=torch.float64)).to(device)
        self._seen = partial.get("seen", 0)
        self._seconds = partial.get("seconds", 0.0)
        self._earlier = partial.get("steps", torch.zeros(0, self.steps.shape[1]))  # before the interruption
        self._rows: list[torch.Tensor] = []  # this process's steps of the epoch, on the device
        self._images: list[int] = []  # distributed: the global batch size of each row
        self._synced = 0  # how many of `_rows` the host has seen
        self._start = time.perf_counter()
        self._bar = tqdm(total=batches, initial=self.batches_done, desc=f"epoch {epoch}/{epochs}",
                         disable=not self.progress, leave=False, unit="batch", file=sys.stderr)

    @property
    def next_step(self) -> int:
        """The steps completed before the next one (the `step` of its `StepState`)."""
        return self.step + len(self._rows)

    def record(self, out, n: int, share: float = 1.0) -> None:
        """One step's output (a `ModelOutput`) on a batch of `n` images; nothing leaves the device.
        Distributed: `n` is the global batch's size, and this process's `share` of it was trained."""
        row = torch.stack([out.loss.detach(), *(out.terms[name] for name in self.term_names[1:])]).float()
        if self.distributed:
            self._rows.append(row * share)  # summed over the processes at the next sync
            self._images.append(n)
            return
        self._rows.append(row)
        self._sums += row.double() * n
        self._seen += n

    def unsynced(self) -> int:
        return len(self._rows) - self._synced

    def sync(self) -> tuple[torch.Tensor, int]:
        """The rows recorded since the last sync, copied to the host, and the run's step number
        (from 1) of the first of them; the progress bar moves on and shows the latest loss."""
        recent = torch.stack(self._rows[self._synced:])
        if self.distributed:
            dist.all_sum(recent)  # (steps, terms): the global batches' means
            self._rows[self._synced:] = list(recent)
            images = torch.tensor(self._images[self._synced:], dtype=torch.float64, device=recent.device)
            self._sums += (recent.double() * images[:, None]).sum(0)
            self._seen += int(images.sum())
        recent = recent.cpu()  # the only host sync in the loop
        first = self.step + self._synced + 1
        self._synced = len(self._rows)
        self._bar.set_postfix(loss=f"{recent[-1, 0]:.2f}")
        self._bar.update(len(recent))
        return recent, first

    def interrupt(self, batches_done: int, batches_at_start: dict) -> None:
        """Stopped after `batches_done` batches of the epoch, which began with the batcher's state
        `batches_at_start`: the epoch's progress goes into `partial`. Its steps count, but join
        `steps` (and steps.csv) only once the epoch completes."""
        self._stop_clock()
        new = self._step_rows()
        self.step += len(new)
        self.partial = {
            "batches_done": batches_done,
            "batches_at_start": batches_at_start,
            "sums": self._sums.cpu(),
            "seen": self._seen,
            "seconds": self._seconds,
            "steps": torch.cat([self._earlier, new]),
        }

    def end_epoch(self) -> None:
        """The epoch's steps join `steps`, its mean terms and seconds the history as the train row."""
        self._stop_clock()
        new = self._step_rows()
        self.steps = torch.cat([self.steps, self._earlier, new])
        self.step += len(new)
        self.partial = None
        terms = dict(zip(self.term_names, (self._sums / self._seen).tolist()))
        self.history.append({"epoch": self.epoch, "split": "train", **terms, "seconds": round(self._seconds, 3)})

    def add_evaluation(self, split: str, terms: dict[str, float], seconds: float) -> None:
        self.history.append({"epoch": self.epoch, "split": split, **terms, "seconds": round(seconds, 3)})

    def summary(self, epochs: int) -> str:
        """The line printed after each epoch: every split's finite terms."""
        parts = []
        for r in (r for r in self.history if r["epoch"] == self.epoch):
            terms = " ".join(f"{n} {r[n]:.3f}" for n in self.term_names if isinstance(r[n], float) and math.isfinite(r[n]))
            parts.append(f"{r['split']}: {terms}")
        return f"epoch {self.epoch}/{epochs}  " + "  |  ".join(parts)

    def _stop_clock(self) -> None:
        self._bar.close()
        self._seconds += time.perf_counter() - self._start

    def _step_rows(self) -> torch.Tensor:
        """This process's steps of the epoch as (steps, 2 + terms) rows: step, epoch, terms."""
        if not self._rows:
            return torch.zeros(0, self.steps.shape[1])
        values = torch.stack(self._rows).cpu()
        index = torch.arange(self.step + 1, self.step + 1 + len(values), dtype=torch.float32)
        return torch.cat([index[:, None], torch.full_like(index, self.epoch)[:, None], values], dim=1)
