"""The command line: `main(argv=None)`, one small function per subcommand.

Errors a user can fix are one line on stderr and a non-zero exit; nothing runs at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import typing
from pathlib import Path

from .train_config import MAX_SEED, RESUMABLE_FIELDS, TrainConfig

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
MAX_RECONSTRUCT = 100  # one column per image: more would not fit a readable figure
# A manifold cell is drawn 50 pixels wide: 100 x 100 cells make a 5000-pixel figure, and the
# renderer refuses images past 65536 pixels a side long before memory would.
MAX_GRID = 100


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print the error alone, with a pointer to --help."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _path_ending(suffix: str, written_as: str):
    """An argparse type: a path that must end in `suffix`, the format the file is written in."""

    def parse(text: str) -> Path:
        path = Path(text)
        if path.suffix.lower() != suffix:
            raise argparse.ArgumentTypeError(f"{text!r}: the {written_as}, so name it *{suffix}")
        return path

    return parse


_png_path = _path_ending(".png", "image is written as PNG")
_npy_path = _path_ending(".npy", "array is written as NumPy .npy")
_html_path = _path_ending(".html", "page is written as HTML")


def _reconstruct_count(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_RECONSTRUCT:
        raise argparse.ArgumentTypeError(f"at most {MAX_RECONSTRUCT} images fit one figure, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _point_count(text: str) -> int:
    value = int(text)
    if value < 3:  # a PCA plane through fewer codes has no second axis
        raise argparse.ArgumentTypeError(f"must be at least 3, got {value}")
    return value


def _thread_count(text: str) -> int:
    try:
        return _positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of threads, got {text!r}") from None


def _add_threads(p) -> None:
    p.add_argument("--threads", type=_thread_count, default=None, metavar="N",
                   help="intra-op CPU threads (default: OMP_NUM_THREADS if set, else what a short probe "
                        "finds fastest now: 1 on a machine whose other cores are busy)")


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed is between 0 and {MAX_SEED}, got {value}")
    return value


def _grid_size(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_GRID:
        raise argparse.ArgumentTypeError(f"at most {MAX_GRID} (a {value}x{value} manifold would be "
                                         f"{50 * value} pixels wide), got {value}")
    return value


def _output_file(path: Path) -> Path:
    """An output the command will write: refused before any work if a folder is in the way, or if
    it could not be written where it goes (a file where a folder should be, no permission, a
    read-only file system): `vaelab score --json` computed for 18 s before finding out."""
    import tempfile

    from .errors import ConfigError, WriteError

    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; name a file to write")
    existing = path.absolute().parent
    while not existing.exists():  # the folders still to be made are made when it is written
        existing = existing.parent
    if not existing.is_dir():
        raise WriteError(path, f"{existing} is a file, not a folder", existed=False)
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".vaelab-write-check-"):
            pass
    except OSError as e:
        raise WriteError(path, f"creating a file in {existing}: {e.strerror or e}", existed=path.exists()) from None
    return path


def _folder_here(text: str) -> str:
    """A folder named on the command line, made absolute: relative to the current folder as the
    user meant it, where a relative folder in a stored config is inside the run folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("name a folder, or give the flag alone")
    return os.path.abspath(os.path.expanduser(text))


# Training options whose values argparse checks itself (a usage error naming the flag); the
# others are checked by TrainConfig.validate.
FLAG_TYPES = {"seed": _seed, "tensorboard": _folder_here}


def _train_flags() -> list[tuple[str, str, type, str]]:
    """(field, flag, type, help) for each TrainConfig field, in its order: `batch_size` -> `--batch-size`."""
    hints = typing.get_type_hints(TrainConfig)
    return [(f.name, "--" + f.name.replace("_", "-"), hints[f.name], f.metadata["help"])
            for f in dataclasses.fields(TrainConfig)]


def _flag_type(hint):
    """argparse's type for a field annotated int, float or str (None: argparse keeps the text);
    `X | None` as X."""
    kind = next(a for a in (*typing.get_args(hint), hint) if a is not type(None))
    return None if kind is str else kind


class _OptionalValue(argparse.Action):
    """`--flag [VALUE]`: alone, the flag stores `alone` as it is; a VALUE goes through `parse`.
    (argparse's own nargs="?" would pass a text const through the flag's type as well.)"""

    def __init__(self, option_strings, dest, alone=None, parse=None, **kwargs):
        super().__init__(option_strings, dest, nargs="?", **kwargs)
        self.alone, self.parse = alone, parse

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            value = self.alone
        else:
            try:
                value = values if self.parse is None else self.parse(values)
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise argparse.ArgumentError(self, str(e)) from None
        setattr(namespace, self.dest, value)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model into a run folder",
                       description="Train MODEL (see `vaelab models`) and write a run folder with "
                                   "config.json, model.safetensors, history.csv, steps.csv and figures/.")
    p.add_argument("model", nargs="?", help="registered model name, e.g. vae")
    metadata = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    for name, flag, hint, text in _train_flags():
        if hint is bool:
            p.add_argument(flag, action="store_true", default=None, help=text)
            continue
        parse = FLAG_TYPES.get(name, _flag_type(hint))
        if "const" in metadata[name]:  # an optional value: the flag alone stands for the const
            p.add_argument(flag, action=_OptionalValue, alone=metadata[name]["const"], parse=parse, default=None,
                           metavar=metadata[name].get("metavar"), help=text)
        else:
            p.add_argument(flag, type=parse, default=None, metavar=metadata[name].get("metavar"), help=text)
    p.add_argument("--latent-dim", type=int, default=None, help="latent size (model default if omitted)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set a field of the model's config, e.g. --set 'hidden_dims=[400]'")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/MODEL-DATASET)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue RUN from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--nproc", type=_positive_int, default=None, metavar="N",
                   help="train data-parallel in N processes on this machine (through torchrun; on GPUs one "
                        "per GPU): each takes its share of every batch of --batch-size")
    _add_threads(p)
    p.set_defaults(func=cmd_train)


# What `train --nproc N` has torchrun start N times, followed by the command's own arguments
# (tests/_synthetic_cli.py points it at itself). The "--" ends torchrun's own options: without it
# torchrun's parser reads the command's `--nproc` as an abbreviation of its `--nproc-per-node`.
LAUNCH_ENTRY = ["-m", "vaelab", "--"]


def cmd_train(args) -> int:
    from . import distributed
    from .errors import ConfigError

    if distributed.launched():
        world = int(os.environ["WORLD_SIZE"])
        if args.nproc is not None and args.nproc != world:
            raise ConfigError(f"--nproc {args.nproc}, but torchrun started {world} processes; under torchrun "
                              "leave --nproc out")
    elif args.nproc is not None and args.nproc > 1:
        return _launch(args.nproc, args.argv)
    try:
        if distributed.launched():  # one of torchrun's processes: join the others first
            distributed.init(_training_device(args))
        return _train(args)
    finally:
        distributed.shutdown()


def _training_device(args):
    """The device the run will train on (as asked, or as stored by the run resumed), resolved."""
    from .checkpoint import read_run_config
    from .devices import resolve_device

    name = args.device
    if name is None and args.resume is not None:
        stored = read_run_config(args.resume)["train"].get("device", "auto")
        name = stored if isinstance(stored, str) else "auto"
    return resolve_device(name or "auto")


def _launch(nproc: int, argv: list[str]) -> int:
    """`vaelab train --nproc N ...`: torchrun on this machine starts N processes of the same
    command (each checks --nproc against the number started); returns the job's exit status.
    The processes print their own errors; torchrun's report of a failed process is left out."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun's agent logs each event (at warning level, per module); the processes say what matters.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), *LAUNCH_ENTRY, *argv]))
    except SignalException:  # Ctrl-C or SIGTERM: the agent passed it on and the processes have stopped
        return EXIT_INTERRUPTED
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -9: killed by SIGKILL
    return 0


def _train(args) -> int:
    from .atomic import together
    from . import distributed
    from .checkpoint import load_run
    from .config import config_from_dict
    from .errors import ConfigError
    from .models import make_config
    from .train import resume, train

    progress = not args.quiet and distributed.is_main()
    flags = _train_flags()
    if args.resume is not None:
        # Only --epochs, --device, --threads and --quiet go with --resume: anything else would
        # either be ignored silently or break the promise that a resumed run equals a straight one.
        # "Given" is anything but the unset defaults (None, False, []): 0 is a value (--seed 0).
        stored = [flag for flag, value in (
            ("MODEL", args.model), ("--out", args.out), ("--set", args.overrides), ("--latent-dim", args.latent_dim),
            *((flag, getattr(args, name)) for name, flag, _, _ in flags if name not in RESUMABLE_FIELDS),
            ("--overwrite", args.overwrite)) if not (value is None or value is False or value == [])]
        if stored:
            raise ConfigError(f"--resume continues the run with its stored configuration (only --epochs and "
                              f"--device may change); drop {', '.join(stored)}")
        trainer = resume(args.resume, epochs=args.epochs, device=args.device, progress=progress)
        run_dir = args.resume
    else:
        if args.model is None:
            raise ConfigError("name a model to train (see `vaelab models`) or pass --resume RUN")
        given = {name: getattr(args, name) for name, _, _, _ in flags if getattr(args, name) is not None}
        config = config_from_dict(TrainConfig, given, where="train")
        from .data import get_spec

        get_spec(config.dataset)  # an unknown dataset fails before anything is written
        model_config = make_config(args.model, args.overrides, latent_dim=args.latent_dim)
        run_dir = args.out or Path("runs") / f"{args.model}-{config.dataset}"
        trainer = train(args.model, model_config, config, run_dir, overwrite=args.overwrite, progress=progress)
    if not distributed.is_main():
        return 0  # the main process draws the figures and prints what was written
    from .figures import write_training_figures  # matplotlib: only in the process that draws

    run = load_run(run_dir, device=trainer.device)
    with together():  # every figure or none
        written = write_training_figures(run_dir, run.model, trainer.data.test_x, seed=trainer.config.seed,
                                         test_y=trainer.data.test_y, classes=trainer.data.classes)
    _print_summary(run_dir, written, trainer.config.tensorboard)
    return 0


def _print_summary(run_dir: Path, figures: list[Path], tensorboard: str | None = None) -> None:
    run_dir = Path(run_dir)
    print(f"wrote {run_dir}/")
    for name, what in (("config.json", "model and training configuration"),
                       ("model.safetensors", "trained weights"),
                       ("checkpoint.safetensors", "full training state (for --resume)"),
                       ("history.csv", "per-epoch loss terms, train and test"),
                       ("steps.csv", "per-iteration training loss terms")):
        print(f"  {name:<24} {what}")
    for path in figures:
        print(f"  {str(Path(path).relative_to(run_dir)):<24} figure")
    if tensorboard is not None:
        logdir = run_dir / tensorboard  # a relative folder is inside the run folder
        print(f"  {str(tensorboard) + '/':<24} TensorBoard log (`tensorboard --logdir {logdir}`)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="decode n samples from the prior into a PNG grid (and .npy)")
    p.add_argument("run", type=Path)
    p.add_argument("-n", type=_positive_int, default=100, help="number of samples (default 100)")
    p.add_argument("--out", type=_png_path, default=None, help="PNG grid (default RUN/figures/generated.png)")
    p.add_argument("--npy", type=_npy_path, default=None, help="also write a float32 array (n, 28, 28) in [0, 1]")
    p.add_argument("--class", dest="class_name", default=None, metavar="CLASS",
                   help="a conditional model (cvae) draws only this class: its number (3) or its name, "
                        "case-insensitive (sneaker); without it, the classes in turn")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)


def parse_class(text: str, dataset: str) -> int:
    """The index of a class of `dataset` named on the command line: its name, case-insensitive,
    ignoring spaces, hyphens and underscores ("ankle-boot"), a name with alternatives answering to
    each ("T-shirt/top": "t-shirt", "top"); or its number."""
    from .data import get_spec
    from .errors import ConfigError

    classes = get_spec(dataset).classes
    number = text.strip().lstrip("+-")
    if number.isdigit():  # a number is a class's number, never a name with its sign dropped
        if text.strip()[0] != "-" and int(number) < len(classes):
            return int(number)
    else:
        key = lambda name: "".join(ch for ch in name.lower() if ch not in " -_")  # noqa: E731
        for index, name in enumerate(classes):
            if key(text) in {key(name), *(key(part) for part in name.split("/"))}:
                return index
    raise ConfigError(f"--class {text!r}: not a class of {dataset}; choose 0-{len(classes) - 1} or one of "
                      + ", ".join(name.lower() for name in classes))


def _generation_labels(run, n: int, asked: str | None):
    """The labels a conditional run's n samples are drawn with: the asked class, or every class in
    turn (blocks of about n / classes, in order); None for an unconditional model."""
    import torch

    from .errors import ConfigError
    from .evaluate import balanced_labels

    if not run.model.conditional:
        if asked is not None:
            raise ConfigError(f"--class: {run.path} holds a {run.model.name}, which is unconditional; "
                              "train a conditional model (cvae) to draw a chosen class")
        return None
    if asked is not None:
        return torch.full((n,), parse_class(asked, run.train_config.dataset), dtype=torch.long)
    return balanced_labels(n, run.model.config.n_classes)


def cmd_generate(args) -> int:
    import numpy as np

    from .atomic import atomic_file, together
    from .checkpoint import load_run
    from .evaluate import generate
    from .memory import require_memory
    from .plots import save_image_grid
    from .devices import resolve_device

    nrow = max(1, round(args.n ** 0.5))
    scale = 2 if args.n <= 400 else 1
    grid_pixels = (-(-args.n // nrow) * 30 + 2) * (nrow * 30 + 2) * scale * scale
    # The samples in float32 (their chunks, the joined tensor and the uint8 copy for the grid) and the grid.
    require_memory(args.n * 784 * (4 * 3 + 1) + 2 * grid_pixels, f"generate -n {args.n} ({args.n} images and a "
                   f"{nrow * 30 * scale}-pixel-wide grid)")
    for path in (args.out, args.npy):
        if path is not None:
            _output_file(path)
    run = load_run(args.run, device=resolve_device(args.device))
    labels = _generation_labels(run, args.n, args.class_name)
    out = _output_file(args.out or run.path / "figures" / "generated.png")
    images = generate(run.model, args.n, seed=args.seed, labels=labels)  # (n, 1, 28, 28)
    with together():  # both files or neither
        save_image_grid(images, out, nrow=nrow, scale=scale)
        if args.npy is not None:
            with atomic_file(args.npy) as f:
                np.save(f, np.ascontiguousarray(images[:, 0].numpy(), dtype=np.float32))
    which = "" if args.class_name is None else f" of class {int(labels[0])} ({args.class_name})"
    print(f"wrote {out}: {args.n} samples{which} from {run.path}")
    if args.npy is not None:
        print(f"wrote {args.npy}: float32 array {tuple(images[:, 0].shape)} in [0, 1]")
    return 0


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="random test images above their reconstructions")
    p.add_argument("run", type=Path)
    p.add_argument("-n", type=_reconstruct_count, default=10, metavar="N",
                   help=f"number of test images, at most {MAX_RECONSTRUCT} (default 10)")
    p.add_argument("--out", type=_png_path, default=None, help="PNG (default RUN/figures/reconstructed.png)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_reconstruct)


def _run_and_data(args):
    """The run named on the command line, on the asked device, and its data as it was trained
    on (static binarization and validation split included)."""
    from .checkpoint import load_run
    from .data import load_training_data
    from .devices import resolve_device

    run = load_run(args.run, device=resolve_device(args.device))
    return run, load_training_data(run.train_config, quiet=True)


def cmd_reconstruct(args) -> int:
    from .figures import reconstructions_figure

    if args.out is not None:
        _output_file(args.out)
    run, data = _run_and_data(args)
    out = _output_file(args.out or run.path / "figures" / "reconstructed.png")
    reconstructions_figure(run.model, data.test_x, out, seed=args.seed, n=args.n, test_y=data.test_y)
    print(f"wrote {out}: {args.n} test images of {data.name} and their reconstructions")
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="draw every figure of a run into RUN/figures/",
                       description="Loss curves, latent scatter, manifold (2-D latents), per-class grid, "
                                   "samples, reconstructions and interpolations, as PNGs in RUN/figures/.")
    p.add_argument("run", type=Path)
    p.add_argument("--grid", type=_grid_size, default=None,
                   help=f"manifold grid side (default 15, at most {MAX_GRID}; 2-D latents only)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from .atomic import together
    from .figures import write_run_figures
    from .history_files import missing_history

    run, data = _run_and_data(args)
    with together():  # every figure or none
        written = write_run_figures(run.path, run.model, data, seed=args.seed, grid_size=args.grid or 15)
    print(f"wrote {len(written)} figures into {run.path / 'figures'}/")
    missing = None if "loss_curves" in written else missing_history(run.path)
    if missing:
        print(f"  (no loss curves: {missing})")
    if args.grid is not None and "manifold" not in written:
        print(f"  (--grid {args.grid} not used: the manifold is drawn for 2-D latents only, and this run's "
              f"latent is {run.model.latent_dim}-D)")
    for name, path in written.items():
        print(f"  {path.name:<24} {name.replace('_', ' ')}")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="measure a run: loss terms, IWAE NLL, sample quality -> RUN/metrics.json",
                       description="Test loss terms, the importance-weighted NLL with its standard error, "
                                   "sample quality with a domain classifier (trained once per dataset and "
                                   "cached beside the data), active units and KL per latent dimension.")
    p.add_argument("run", type=Path)
    p.add_argument("--iw-samples", type=int, default=5000, metavar="K",
                   help="importance samples per image for the IWAE NLL (default 5000; 0 skips it)")
    p.add_argument("--iw-images", type=_positive_int, default=10000, metavar="N",
                   help="the first N test images the NLL is averaged over (default 10000 = all)")
    p.add_argument("--samples", type=int, default=10000, metavar="N",
                   help="generated and real images for the sample-quality figures (default 10000; 0 skips)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from .errors import ConfigError
    from .evaluate import METRICS_FILE, EvalSettings, evaluate_run, format_table

    if args.iw_samples < 0 or args.samples < 0:
        raise ConfigError("--iw-samples and --samples must be non-negative")
    run, data = _run_and_data(args)
    settings = EvalSettings(iw_samples=args.iw_samples, iw_images=args.iw_images,
                            n_samples=args.samples, seed=args.seed)
    metrics = evaluate_run(run, data, settings, progress=not args.quiet)
    print(format_table(metrics))
    print(f"wrote {run.path / METRICS_FILE}")
    return 0


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="score any array of images: FD, KID, precision, recall, beside the real floor",
                       description="Sample-quality metrics of the images in FILE (.npy, or .npz holding one "
                                   "array or one named images, x or arr_0; shape (n, 28, 28) or (n, 1, 28, 28); "
                                   "uint8 0-255 or floats in [0, 1]) against the dataset's test set, in its domain "
                                   "classifier's features, beside the same metrics for n real training images.")
    p.add_argument("file", type=Path)
    p.add_argument("--dataset", required=True, help="mnist or fashion-mnist: whose test set and classifier")
    p.add_argument("--json", dest="json_out", type=Path, default=None, metavar="OUT",
                   help="also write the numbers (and the floor under real_floor) as JSON")
    p.add_argument("--seed", type=_seed, default=0, help="the floor's real images and the metrics' subsets")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_score)


def cmd_score(args) -> int:
    from .checkpoint import write_json
    from .metrics import format_score, score_file
    from .devices import resolve_device

    if args.json_out is not None:
        _output_file(args.json_out)
    result = score_file(args.file, args.dataset, device=resolve_device(args.device), seed=args.seed,
                        progress=not args.quiet)
    print(format_score(result))
    if args.json_out is not None:
        write_json(args.json_out, result)
        print(f"wrote {args.json_out}")
    return 0


def _add_recipe(sub) -> None:
    from .recipes import describe_recipes

    p = sub.add_parser("recipe", help="reproduce a whole assignment and write report.html",
                       description="Train, draw and measure every model of an assignment, then write one "
                                   "self-contained DIR/report.html.",
                       epilog="recipes:\n" + describe_recipes(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="a recipe from the list below")
    p.add_argument("--out", type=Path, required=True, help="output folder (run folders and report.html)")
    p.add_argument("--quick", action="store_true", help="minutes on 2 cores: short training, cheap metrics")
    p.add_argument("--overwrite", action="store_true", help="replace an existing recipe folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of this recipe in --out: finished models are kept, an "
                        "unfinished one resumes from its last checkpoint")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads(p)
    p.set_defaults(func=cmd_recipe)


def cmd_recipe(args) -> int:
    from .recipes import run_recipe

    result = run_recipe(args.name, args.out, quick=args.quick, overwrite=args.overwrite,
                        progress=not args.quiet, device=args.device, resume=args.resume)
    print(f"wrote {result.out / 'report.html'} ({result.seconds / 60:.1f} min); run folders: "
          + ", ".join(f"{r.run_dir.name}/" for r in result.steps))
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="several runs side by side: one table, the test loss curves overlaid",
                       description="A table of the runs (model, the settings that differ, the last epoch's train "
                                   "and test loss terms, the best epoch, NLL and sample metrics where metrics.json "
                                   "has them, seconds), printed and written with the test loss per epoch of every "
                                   "run to DIR/compare.html (self-contained) and DIR/curves.png. A study folder "
                                   "(vaelab sweep) stands for its trials.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders or study folders")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where compare.html and curves.png go (default: compare/ in the runs' nearest common "
                        "folder, e.g. STUDY/compare/ or runs/compare/)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from .compare import CURVES, PAGE, write_comparison

    out, text = write_comparison(args.runs, args.out)
    print(text)
    print(f"wrote {out / PAGE} and {out / CURVES}")
    return 0


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="a hyperparameter search on Optuna, each trial a run folder",
                       description="Run the trials of SPEC.yaml (model, fixed settings, search space, sampler, "
                                   "metric: see the README's Scaling out) into STUDY/trial-NNNN/ run folders. The "
                                   "study lives in Optuna storage, so re-running the command continues it and "
                                   "workers on several machines can share a database.")
    p.add_argument("spec", type=Path, metavar="SPEC.yaml")
    p.add_argument("--study", default=None, metavar="NAME", help="the study's name (default: the spec's file name)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="the study folder: trial run folders, trials.csv, the default storage (default runs/NAME)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage: a database URL (sqlite:///sweep.db, postgresql://user@host/db) or a "
                        "journal file (default DIR/study.journal)")
    p.add_argument("--trials", type=_positive_int, default=None, metavar="N",
                   help="trials in the study (default: the spec's trials; a grid: all its points)")
    p.add_argument("--workers", type=_positive_int, default=1, metavar="K",
                   help="worker processes on this machine, sharing the storage (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_threads(p)
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    from tqdm import tqdm

    from .sweep import (TRIALS_FILE, counted, finished_count, prepare, run_workers, summary, work,
                        write_trials_csv)

    study = prepare(args.spec, args.study, args.out, args.storage, args.trials)
    if args.workers == 1:
        optuna_study = study.load()
        bar = tqdm(total=len(counted(optuna_study.get_trials(deepcopy=False))), initial=finished_count(optuna_study),
                   desc=f"sweep {study.name}", unit="trial", disable=args.quiet, file=sys.stderr)
        try:
            work(study, say=lambda text: bar.write(text, file=sys.stderr),
                 on_trial=lambda: bar.update(finished_count(optuna_study) - bar.n))
        finally:
            bar.close()
        codes = [0]
    else:
        codes = run_workers(study, args.workers, args.threads, progress=not args.quiet)
    optuna_study = study.load()
    write_trials_csv(study, optuna_study)  # the whole study as it stands now, other workers' trials too
    print(summary(study, optuna_study))
    print(f"wrote {study.folder}/: trial-NNNN/ run folders, {TRIALS_FILE}; compare them with "
          f"`vaelab compare {study.folder}`")
    bad = [c for c in codes if c != 0]
    return 0 if not bad else (EXIT_INTERRUPTED if EXIT_INTERRUPTED in bad else EXIT_ERROR)


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 0 (any free one) and 65535, got {value}")
    return value


def _add_explore(sub) -> None:
    p = sub.add_parser("explore", help="move through a run's latent space in the browser",
                       description="Serve a page (on 127.0.0.1 unless --host says otherwise) with the latent "
                                   "scatter of test codes, the decoded image of the point under the mouse, "
                                   "interpolations and a drawing pad; or, with --export, write the page as one "
                                   "self-contained HTML file that needs no server.")
    p.add_argument("run", type=Path)
    p.add_argument("--port", type=_port, default=8765, help="default 8765; 0 picks a free port")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--no-browser", action="store_true", help="print the URL without opening a browser")
    p.add_argument("--export", type=_html_path, default=None, metavar="PAGE.html",
                   help="write the page with a grid of precomputed decodes to PAGE.html and exit")
    p.add_argument("--points", type=_point_count, default=3000,
                   help="test images whose codes are shown (default 3000; at least 3, for the PCA plane)")
    p.add_argument("--seed", type=_seed, default=0, help="which test images (default 0)")
    p.add_argument("--device", default="auto")
    _add_threads(p)
    p.set_defaults(func=cmd_explore)


def cmd_explore(args) -> int:
    from .explore import LatentSpace, export_page, make_server

    if args.export is not None:
        _output_file(args.export)
    run, data = _run_and_data(args)
    space = LatentSpace.from_run(run, data, n_points=args.points, seed=args.seed)
    if args.export is not None:
        export_page(space, args.export)
        print(f"wrote {args.export}: the {run.model.name}'s latent space over {len(space.points)} test codes"
              f"{', one atlas per class' if space.conditional else ''}, self-contained (open it in any browser; "
              f"no server)")
        return 0
    server = make_server(space, args.host, args.port)
    # Ctrl-C stops the server even where SIGINT came in ignored (a job a non-interactive shell
    # started with `&` inherits it so, and Python then never turns it into KeyboardInterrupt).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print(f"serving {run.path} at {server.url} (Ctrl-C stops)", flush=True)
        if not args.no_browser:
            import webbrowser

            webbrowser.open(server.url)
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        signal.signal(signal.SIGINT, previous)
        server.server_close()
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("--fields", action="store_true", help="also each model's config fields and defaults (for --set)")
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    import dataclasses

    from .models import MODELS

    for name, cls in sorted(MODELS.items()):
        print(f"{name:<10} {cls.description}")
        if args.fields:
            defaults = cls.config_class()
            fields = dataclasses.fields(defaults)
            print(f"{'':<10} --set fields: " + ", ".join(f"{f.name}={getattr(defaults, f.name)!r}" for f in fields))
            # Fields documented by `config.option` (their `help` metadata), one line each.
            for f in fields:
                if "help" in f.metadata:
                    print(f"{'':<12} {f.name}: {f.metadata['help']}")
    return 0


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="show or change a trained run's generation-only settings",
                       description="Settings that only affect generation (the AE's and the VAE-GAN's "
                                   "gen_prior) may change after training; everything else is fixed by the "
                                   "weights. Without "
                                   "KEY=VALUE, lists the settings that may change and their values.")
    p.add_argument("run", type=Path)
    p.add_argument("assignments", nargs="*", metavar="KEY=VALUE", help="e.g. gen_prior=normal")
    p.set_defaults(func=cmd_config)


def cmd_config(args) -> int:
    from .checkpoint import CONFIG_FILE, generation_fields, parse_spec, read_run_config, resolve_run_dir, update_config

    run_dir = resolve_run_dir(args.run)
    if args.assignments:
        for name, old, new in update_config(run_dir, args.assignments):
            print(f"{run_dir / CONFIG_FILE}: {name} {old!r} -> {new!r}")
        return 0
    spec = parse_spec(read_run_config(run_dir), run_dir / CONFIG_FILE)
    free = generation_fields(spec.model)
    if not free:
        print(f"{run_dir}: a {spec.model}; no setting changes after training")
    for name in free:
        print(f"{name}={getattr(spec.model_config, name)!r}")
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="fetch and verify datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=OneLineParser)
    f = data_sub.add_parser("fetch", help="download (or copy) and verify a dataset into the cache")
    f.add_argument("dataset", help="mnist or fashion-mnist")
    f.add_argument("--from", dest="from_dir", type=Path, default=None,
                   help="use only the four files in this folder (raw or .gz)")
    f.set_defaults(func=cmd_data_fetch)


def cmd_data_fetch(args) -> int:
    from .data import fetch, get_spec

    get_spec(args.dataset)
    if args.from_dir is not None and not args.from_dir.is_dir():
        from .errors import DataError

        raise DataError(f"--from {args.from_dir}: no such folder")
    path = fetch(args.dataset, from_dir=args.from_dir)
    print(f"{args.dataset}: 4 files verified in {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="vaelab", description="Autoencoder-family generative models on MNIST-like images.")
    from .version import __version__

    parser.add_argument("--version", action="version", version=f"vaelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add in (_add_train, _add_generate, _add_reconstruct, _add_plot, _add_evaluate, _add_score, _add_recipe,
                _add_compare, _add_sweep, _add_explore, _add_models, _add_config, _add_data):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from . import runtime
    from .errors import PeerLost, TrainingInterrupted, VaelabError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `train --nproc`, which runs it again
    # Every command tunes the process alike (threads, denormals, allocator): evaluate, generate and
    # plot then compute as the evaluation inside `vaelab train` did, and as fast.
    runtime.configure(threads=getattr(args, "threads", None))
    # In a data-parallel job the processes meet the same errors (distributed.py raises a refusal
    # of the main process in all of them): process 0 says it, once. A lost peer each says.
    rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    try:
        return args.func(args)
    except TrainingInterrupted as e:
        if rank == 0:
            print(f"vaelab: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except VaelabError as e:
        if rank == 0 or isinstance(e, PeerLost):
            print(f"vaelab: error: {e}" if rank == 0 else f"vaelab: error (process {rank}): {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if rank == 0:
            print("vaelab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # an output path that cannot be written: a read-only or missing place
        print(f"vaelab: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError:  # what the up-front estimates did not foresee
        print("vaelab: error: out of memory (try a smaller model, batch or -n)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
