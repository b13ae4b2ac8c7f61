import gzip
import os

import numpy as np
import pytest
import torch

from vaelab import data as data_mod
from vaelab.data import Batcher, DataError, fetch, load, read_idx, write_idx

from conftest import write_dataset_files


def test_idx_round_trip_raw_and_gzip():
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    raw = write_idx(arr)
    np.testing.assert_array_equal(read_idx(raw), arr)
    np.testing.assert_array_equal(read_idx(data_mod.decompress_if_gzip(gzip.compress(raw), "x")), arr)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:-1], "truncated or corrupt"),
    (lambda b: b[:6], "truncated IDX header"),
    (lambda b: b"\x01" + b[1:], "magic"),
    (lambda b: b[:2] + b"\x0d" + b[3:], "element type"),
    (lambda b: b[:3] + b"\x09" + b[4:], "dimensions"),
    (lambda b: b[:2], "too short"),
])
def test_idx_rejects_damaged_files(mutate, message):
    raw = write_idx(np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match=message):
        read_idx(mutate(raw))


def test_idx_header_claiming_huge_count_is_refused_without_allocating():
    header = bytes([0, 0, 8, 3]) + (10**12 // 784).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(header + b"\x00" * 100)


def test_corrupt_gzip_is_a_data_error():
    with pytest.raises(DataError, match="corrupt gzip"):
        data_mod.decompress_if_gzip(b"\x1f\x8b" + b"garbage" * 10, "f.gz")


def test_fetch_from_folder_verifies_and_caches(synthetic_mnist, tmp_path):
    cache = tmp_path / "cache" / "mnist"
    files = sorted(p.name for p in cache.iterdir())
    assert files == sorted(synthetic_mnist.stems.values())
    # A second fetch uses the verified cache without any source.
    assert fetch("mnist", quiet=True) == cache
    # but one from a folder reads that folder, full cache or not: an empty one is refused
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: no file "):
        fetch("mnist", from_dir=tmp_path / "empty", quiet=True)
    assert sorted(p.name for p in cache.iterdir()) == files  # the cache is as it was


def test_fetch_accepts_gzip_files(synthetic_mnist, tmp_path):
    gz_dir = tmp_path / "gz"
    write_dataset_files(gz_dir, gz=True)
    cache = tmp_path / "cache2"
    fetch("mnist", from_dir=gz_dir, cache_dir=cache, quiet=True)
    assert len(list((cache / "mnist").iterdir())) == 4


def test_checksum_mismatch_is_refused_naming_the_file(synthetic_mnist, tmp_path):
    bad = tmp_path / "bad"
    write_dataset_files(bad)
    target = bad / synthetic_mnist.stems["train-labels"]
    payload = bytearray(target.read_bytes())
    payload[-1] ^= 0xFF
    target.write_bytes(bytes(payload))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: SHA-256 mismatch"):
        fetch("mnist", from_dir=bad, cache_dir=tmp_path / "c3", quiet=True)
    assert not (tmp_path / "c3" / "mnist").exists() or not any((tmp_path / "c3" / "mnist").iterdir())


def test_damaged_cache_file_is_fetched_again(synthetic_mnist, tmp_path):
    cached = tmp_path / "cache" / "mnist" / synthetic_mnist.stems["test-images"]
    cached.write_bytes(b"broken")
    fetch("mnist", from_dir=tmp_path / "source", quiet=True)
    assert cached.read_bytes() != b"broken"


def test_all_sources_failing_says_what_was_tried_and_how_to_fix(synthetic_mnist, tmp_path):
    with pytest.raises(DataError) as e:
        fetch("mnist", cache_dir=tmp_path / "empty", quiet=True)
    assert "registry disabled" in str(e.value) and "--from DIR" in str(e.value)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        data_mod.get_spec("cifar")


def test_load_with_validation_split_and_static_binarization(synthetic_mnist):
    d = load("mnist", val_size=100, binarize="static", seed=3, quiet=True)
    assert d.train_x.shape == (412, 28, 28) and d.val_x.shape == (100, 28, 28)
    assert d.test_x.shape == (128, 28, 28) and d.train_x.dtype == torch.uint8
    assert set(torch.unique(d.train_x).tolist()) <= {0, 255}
    assert d.classes[3] == "3"


def test_subset_draws_images_with_their_labels_and_keeps_the_rest(synthetic_mnist):
    data = load("mnist", val_size=50, quiet=True)
    small = data_mod.subset(data, train=100, test=20, seed=3)
    assert (len(small.train_x), len(small.test_x)) == (100, 20) and small.classes == data.classes
    # each image is one of the split's, with its own label, in the split's order, none twice
    rows = {bytes(x.numpy().tobytes()): (i, int(y)) for i, (x, y) in enumerate(zip(data.train_x, data.train_y))}
    found = [rows[bytes(x.numpy().tobytes())] for x in small.train_x]
    assert [y for _, y in found] == small.train_y.tolist()
    assert [i for i, _ in found] == sorted({i for i, _ in found})
    assert small.val_x is data.val_x
    assert torch.equal(data_mod.subset(data, test=20, seed=3).test_x, small.test_x)  # whatever the train size
    assert torch.equal(data_mod.subset(data, train=100, test=20, seed=3).train_x, small.train_x)
    assert not torch.equal(data_mod.subset(data, train=100, seed=4).train_x, small.train_x)
    whole = data_mod.subset(data)
    assert whole.train_x is data.train_x and whole.test_x is data.test_x
    for bad in (0, len(data.train_x) + 1):
        with pytest.raises(DataError, match="subset of"):
            data_mod.subset(data, train=bad)


def test_batcher_shapes_order_and_determinism(tiny_data):
    b1 = Batcher(tiny_data.train_x, 100, shuffle=True, seed=5)
    b2 = Batcher(tiny_data.train_x, 100, shuffle=True, seed=5)
    batches1, batches2 = [b.x for b in b1], [b.x for b in b2]
    assert [len(x) for x in batches1] == [100, 100, 56] and len(b1) == 3
    assert batches1[0].shape == (100, 1, 28, 28) and batches1[0].dtype == torch.float32
    assert 0 <= batches1[0].min() and batches1[0].max() <= 1
    for x1, x2 in zip(batches1, batches2):
        torch.testing.assert_close(x1, x2)
    # Every image appears exactly once per epoch.
    assert torch.cat(batches1).sum().item() == pytest.approx(tiny_data.train_x.float().sum().item() / 255, rel=1e-5)


def test_batcher_dynamic_binarization_resamples_each_epoch(tiny_data):
    b = Batcher(tiny_data.train_x, 256, shuffle=False, binarize="dynamic", seed=0)
    first, second = next(iter(b)).x, next(iter(b)).x
    assert set(torch.unique(first).tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, second)


def test_batcher_state_restores_the_same_batches(tiny_data):
    b = Batcher(tiny_data.train_x, 64, seed=1)
    list(b)
    state = b.state_dict()
    expected = list(b)
    b.load_state_dict(state)
    for x, y in zip(list(b), expected):
        torch.testing.assert_close(x.x, y.x)


@pytest.mark.parametrize("binarize", ["none", "dynamic"])
def test_batcher_resumes_an_epoch_at_a_position_without_making_the_batches_before_it(tiny_data, monkeypatch,
                                                                                    binarize):
    """An epoch stopped after batch 2 continues from its start state and the generator as it
    stood: the same batches 3 and 4 as a straight epoch (the same binarization noise too), the
    next epoch alike, and only the batches from the position on are made."""
    b = Batcher(tiny_data.train_x, 50, seed=3, binarize=binarize, labels=tiny_data.train_y)
    epoch_start = b.state_dict()["generator"]
    straight = list(b) + list(b)  # two epochs of 6 batches
    b = Batcher(tiny_data.train_x, 50, seed=3, binarize=binarize, labels=tiny_data.train_y)
    batches = iter(b)
    [next(batches) for _ in range(2)]
    stopped = b.state_dict()  # what a checkpoint saved after batch 2 holds

    b = Batcher(tiny_data.train_x, 50, seed=99, binarize=binarize, labels=tiny_data.train_y)  # a new process
    b.load_state_dict(stopped)
    made = []
    monkeypatch.setattr(data_mod, "to_float", lambda x, f=data_mod.to_float: made.append(len(x)) or f(x))
    resumed = list(b.resume(epoch_start, 2))
    assert made == [50, 50, 50, 6]
    for got, want in zip(resumed + list(b), straight[2:], strict=True):
        assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)


@pytest.mark.parametrize("binarize", ["none", "dynamic"])
def test_batcher_carries_each_images_label_and_the_labels_change_no_draw(tiny_data, binarize):
    """Labels index with the images' order and take no randomness: the same seed gives the same
    images with or without them, and each image comes with its own label."""
    images, labels = tiny_data.train_x, tiny_data.train_y
    with_y = list(Batcher(images, 100, seed=5, binarize=binarize, labels=labels))
    without = list(Batcher(images, 100, seed=5, binarize=binarize))
    assert all(b.y is None for b in without) and [len(b.y) for b in with_y] == [100, 100, 56]
    for a, b in zip(with_y, without):
        assert torch.equal(a.x, b.x) and a.y.dtype == torch.int64
    # Each image's label: find each batch image among the (non-binarized) dataset by its pixels.
    plain = list(Batcher(images, 100, seed=5, labels=labels))
    flat = images.reshape(len(images), -1).float() / 255
    for b in plain:
        index = torch.cdist(b.x.reshape(len(b), -1), flat).argmin(1)
        assert torch.equal(b.y, labels[index])
    assert sorted(torch.cat([b.y for b in plain]).tolist()) == sorted(labels.tolist())
    with pytest.raises(ValueError, match="255 labels for 256 images"):
        Batcher(images, 100, labels=labels[1:])


def test_unwritable_cache_is_a_clear_error(synthetic_mnist, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(DataError, match="cannot write the cache"):
        fetch("mnist", from_dir=tmp_path / "source", cache_dir=locked, quiet=True)
