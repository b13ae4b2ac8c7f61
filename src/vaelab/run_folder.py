"""Where a new run (or a recipe's output) is made: the checks before a folder is touched, and a
new run's folder, created, locked and, with `--overwrite`, swapped in for the old run only once
the new one has saved its first epoch.

The files inside a run folder are checkpoint.py's (config.json, weights, checkpoint, the lock)
and history_files.py's (history.csv, steps.csv).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from . import checkpoint as ckpt
from .atomic import exchange, temp_path
from .errors import CheckpointError, RunExistsError, RunInUseError, VaelabError
from .train_config import TrainConfig


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
                             f"{', or --resume to continue it' if what in ('run', 'recipe') else ''})")
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

    def swap_in(self, trainer) -> None:
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
