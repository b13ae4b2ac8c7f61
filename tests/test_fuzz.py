"""Fuzzing (hypothesis) of the two parsers that read files from outside: the IDX reader and the
checkpoint loader. Random, truncated and bit-flipped bytes must give a result or one of the
project's own errors -- never another exception, a hang or an allocation the input does not
justify."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaelab import checkpoint as ckpt
from vaelab.data import MAX_IDX_BYTES, decompress_if_gzip, read_idx, write_idx
from vaelab.errors import CheckpointError, DataError, VaelabError
from vaelab.models import make_config
from vaelab.train import train

from conftest import quick_config

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

VALID_IDX = write_idx(np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28))


def flip_bits(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for p in positions:
        out[(p // 8) % len(out)] ^= 1 << (p % 8)
    return bytes(out)


def damaged(base: bytes):
    """Strategy: `base` truncated, bit-flipped, or with random bytes spliced in."""
    n = len(base)
    return st.one_of(
        st.integers(0, n - 1).map(lambda k: base[:k]),
        st.lists(st.integers(0, 8 * n - 1), min_size=1, max_size=8).map(lambda ps: flip_bits(base, ps)),
        st.tuples(st.integers(0, n), st.binary(max_size=64)).map(lambda t: base[: t[0]] + t[1] + base[t[0]:]),
    )


def parse_idx(data: bytes):
    return read_idx(decompress_if_gzip(data, "fuzz"), "fuzz")


# ---------------------------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------------------------


@FUZZ
@given(st.one_of(
    st.binary(max_size=2048),
    damaged(VALID_IDX),
    damaged(gzip.compress(VALID_IDX)),
    st.binary(max_size=512).map(gzip.compress),
    # plausible headers with arbitrary dimensions, up to 4 x (2^32 - 1)
    st.tuples(st.integers(1, 4).flatmap(lambda d: st.lists(st.integers(0, 2**32 - 1), min_size=d, max_size=d)),
              st.binary(max_size=256))
      .map(lambda t: bytes([0, 0, 8, len(t[0])]) + b"".join(d.to_bytes(4, "big") for d in t[0]) + t[1]),
))
def test_idx_reader_only_raises_data_error(data):
    tracemalloc.start()
    try:
        array = parse_idx(data)
    except DataError:
        pass
    else:
        assert array.dtype == np.uint8 and array.size == len(decompress_if_gzip(data, "x")) - 4 - 4 * array.ndim
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # gzip expands at most ~1032:1; the reader's own chunk is 1 MB
    assert peak < 3_000_000 + 2 * 1032 * len(data), f"{peak} bytes allocated for a {len(data)}-byte input"


def test_idx_header_claiming_10_to_12_images_allocates_nothing():
    header = bytes([0, 0, 8, 3]) + (10**12 // 784).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="truncated or corrupt"):
            parse_idx(header + b"\x00" * 784)
        with pytest.raises(DataError, match="truncated or corrupt"):
            parse_idx(gzip.compress(header + b"\x00" * 784))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000  # the gzip reader's 1 MB chunk (2.15 MB in all with Python 3.12's); nothing near 10^12


def test_gzip_bomb_stops_at_the_bound():
    """200 MB of zeros in 200 kB: decompression stops just past MAX_IDX_BYTES."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip container
    chunk = b"\x00" * (1 << 20)
    bomb = b"".join(comp.compress(chunk) for _ in range(200)) + comp.flush()
    assert len(bomb) < 1_000_000
    with pytest.raises(DataError, match=f"decompresses to more than {MAX_IDX_BYTES} bytes"):
        decompress_if_gzip(bomb, "bomb.gz")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from conftest import synthetic_data

    run = tmp_path_factory.mktemp("fuzz") / "run"
    config = quick_config()
    train("vae", make_config("vae", hidden_dims=[8], latent_dim=2), config, run, progress=False,
          data=synthetic_data(n_train=128, n_test=32))
    return run, (run / ckpt.CHECKPOINT_FILE).read_bytes(), (run / ckpt.MODEL_FILE).read_bytes()


def header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("which", [ckpt.CHECKPOINT_FILE, ckpt.MODEL_FILE])
def test_every_single_bit_flip_region_is_detected(real_run, tmp_path, which):
    """Flips in the length field, the JSON header and the tensor data are all refused (the data
    and metadata by their SHA-256) -- a damaged file never loads as different numbers."""
    run, checkpoint, weights = real_run
    base = checkpoint if which == ckpt.CHECKPOINT_FILE else weights
    end = header_end(base)
    path = tmp_path / which
    for offset in (0, 3, 9, 30, end // 2, end - 2, end, (end + len(base)) // 2, len(base) - 1):
        for bit in (0, 7):
            path.write_bytes(flip_bits(base, [8 * offset + bit]))
            with pytest.raises(CheckpointError, match=str(path)):
                ckpt.load_tensors(path)


@FUZZ
@given(data=st.data())
def test_checkpoint_loader_only_raises_checkpoint_error(real_run, tmp_path, data):
    run, checkpoint, weights = real_run
    which = data.draw(st.sampled_from([ckpt.CHECKPOINT_FILE, ckpt.MODEL_FILE]))
    base = checkpoint if which == ckpt.CHECKPOINT_FILE else weights
    blob = data.draw(st.one_of(
        damaged(base),
        # damage confined to the JSON header, where parsing is most intricate
        st.lists(st.integers(64, 8 * header_end(base) - 1), min_size=1, max_size=4).map(lambda ps: flip_bits(base, ps)),
        st.binary(max_size=1024),
        st.binary(max_size=64).map(lambda b: len(b).to_bytes(8, "little") + b),
    ))
    path = tmp_path / which
    path.write_bytes(blob)
    tracemalloc.start()
    try:
        if which == ckpt.CHECKPOINT_FILE:
            ckpt.load_checkpoint(tmp_path)
        else:
            tensors, meta = ckpt.load_tensors(path)
            ckpt.check_format(meta, path)
    except CheckpointError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 4 * len(blob) + 2_000_000, f"{peak} bytes allocated for a {len(blob)}-byte file"


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_load_run_on_damaged_files_only_raises_vaelab_errors(real_run, tmp_path_factory, data):
    import shutil

    run, checkpoint, weights = real_run
    target = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(run, target)
    config = (run / ckpt.CONFIG_FILE).read_bytes()
    name, base = data.draw(st.sampled_from([(ckpt.MODEL_FILE, weights), (ckpt.CONFIG_FILE, config)]))
    (target / name).write_bytes(data.draw(damaged(base)))
    try:
        ckpt.load_run(target)
    except VaelabError as e:
        assert str(target) in str(e) and "\n" not in str(e)
