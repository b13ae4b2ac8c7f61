"""Sample-quality metrics against straightforward references (loops and brute force on small
random data), `vaelab score`'s refusals, the classifier cache, and, on real MNIST, that the
metrics rank image sets as a person would: real < blurred < blobs < pixel-shuffled."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pickle
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from vaelab import metrics
from vaelab.cli import main
from vaelab.errors import DataError

QUALITY_KEYS = {"fd", "fd_std", "kid", "kid_std", "precision", "precision_se", "recall", "recall_se",
                "coverage", "coverage_se", "confident_share", "confident_share_se", "class_histogram", "n"}
assert set(metrics.QUALITY_KEYS) == QUALITY_KEYS  # the module's own list, which recipes check kept results by


def features(n: int, d: int = 8, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + shift).abs()  # ReLU-like, >= 0


# ---------------------------------------------------------------------------------------------
# References: the definitions written out, one pair at a time
# ---------------------------------------------------------------------------------------------


def mmd2_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Bińkowski et al. 2018, eq. 3, term by term with k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def precision_recall_brute(fake: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019, eqs. 1-2, with every distance computed as |a - b|."""

    def radius(points, i):
        return sorted(np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i)[k - 1]

    def inside(q, points, radii):
        return any(np.linalg.norm(q - p) <= r for p, r in zip(points, radii))

    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, i) for i in range(len(fake))]
    precision = np.mean([inside(q, real, r_real) for q in fake])
    recall = np.mean([inside(q, fake, r_fake) for q in real])
    return float(precision), float(recall)


def coverage_brute(fake: np.ndarray, real: np.ndarray, k: int) -> float:
    """Naeem et al. 2020, eq. 5: the share of real points with a fake point inside their ball
    of radius |real_i - its k-th nearest other real point|."""

    def radius(i):
        return sorted(np.linalg.norm(real[i] - real[j]) for j in range(len(real)) if j != i)[k - 1]

    return float(np.mean([any(np.linalg.norm(f - real[i]) <= radius(i) for f in fake) for i in range(len(real))]))


# ---------------------------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 12), n=st.integers(2, 12), d=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_unbiased_mmd_matches_the_sum_over_pairs(m, n, d, seed):
    x, y = features(m, d, seed=seed), features(n, d, shift=0.5, seed=seed + 1)
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(mmd2_loops(x.numpy(), y.numpy()), rel=1e-9, abs=1e-12)


def test_kid_with_whole_set_subsets_is_the_mmd_of_the_sets_with_no_spread():
    x, y = features(40, 5), features(40, 5, shift=0.3, seed=1)
    g = torch.Generator().manual_seed(0)
    kid, std = metrics.kernel_inception_distance(x, y, subsets=5, subset_size=1000, generator=g)
    assert kid == pytest.approx(mmd2_loops(x.numpy(), y.numpy()), rel=1e-9)
    assert std < 1e-9 * abs(kid)  # every subset is a permutation of the whole set


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    g = torch.Generator().manual_seed(0)
    same = metrics.kernel_inception_distance(features(3000, 16, seed=1), features(3000, 16, seed=2),
                                             subsets=20, subset_size=500, generator=g)
    assert abs(same[0]) < 2 * same[1] / math.sqrt(20) + 1e-3  # unbiased: zero within its noise
    kids = [metrics.kernel_inception_distance(features(3000, 16, seed=1), features(3000, 16, s, seed=2),
                                              subsets=20, subset_size=500, generator=g)[0]
            for s in (0.1, 0.3, 1.0)]
    assert same[0] < kids[0] < kids[1] < kids[2], kids


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_fake=st.integers(6, 25), n_real=st.integers(6, 25), d=st.integers(1, 5), k=st.integers(1, 5),
       chunk=st.integers(1, 30), seed=st.integers(0, 10**6))
def test_precision_recall_and_coverage_match_brute_force(n_fake, n_real, d, k, chunk, seed):
    fake, real = features(n_fake, d, shift=0.4, seed=seed), features(n_real, d, seed=seed + 1)
    got = metrics.precision_recall(fake, real, k=k, chunk=chunk)
    assert got == pytest.approx(precision_recall_brute(fake.numpy(), real.numpy(), k), abs=1e-12)
    got = metrics.coverage(fake, real, k=k, chunk=chunk)
    assert got == pytest.approx(coverage_brute(fake.numpy(), real.numpy(), k), abs=1e-12)


def test_stray_samples_raise_recall_but_not_coverage():
    """A generator that draws most samples like the real data and some far from anything real:
    the strays' large k-NN balls take in real points (recall rises), while coverage, with balls
    around real points only, stays exactly where the good samples put it."""
    real = features(400, 4, seed=1)
    good = features(300, 4, seed=2) * 0.6  # a narrower spread than the real data's: part of it covered
    directions = torch.randn(20, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    far = real.mean(0) + 6 * directions / directions.norm(dim=1, keepdim=True)  # 20 strays, 6 units out
    strays = torch.cat([good, far])
    assert metrics.precision_recall(strays, real)[1] > metrics.precision_recall(good, real)[1] + 0.2
    assert metrics.coverage(strays, real) == metrics.coverage(good, real) < 0.9
    assert metrics.coverage(real, real) == 1.0 and metrics.coverage(real + 100, real) == 0.0
    with pytest.raises(ValueError, match="more than 5"):
        metrics.coverage(real, real[:5])


def test_knn_radius_is_the_kth_other_point_and_duplicates_count():
    x = torch.tensor([[0.0], [1.0], [3.0], [3.0], [10.0]], dtype=torch.float64)
    # k = 1: the nearest other point (the duplicate 3.0 is at distance 0); squared distances.
    assert metrics.knn_radii(x, k=1, chunk=2).tolist() == [1.0, 1.0, 0.0, 0.0, 49.0]
    assert metrics.knn_radii(x, k=2, chunk=3).tolist() == [9.0, 4.0, 4.0, 4.0, 49.0]


def test_precision_and_recall_of_equal_and_of_far_apart_sets():
    x = features(200, 8)
    assert metrics.precision_recall(x, x) == (1.0, 1.0)
    assert metrics.precision_recall(x + 100, x) == (0.0, 0.0)
    # Samples collapsed onto a tenth of the real data: they look real (precision) but cover little (recall).
    p, r = metrics.precision_recall(x[:20].repeat(10, 1), x)
    assert p == 1.0 and r < 0.3
    with pytest.raises(ValueError, match="more than 3"):
        metrics.precision_recall(x[:3], x)


def test_frechet_distance_bootstrap_agrees_with_the_plain_distance_and_its_spread_shrinks_with_n():
    ref = features(4000, 6, seed=3)
    g = torch.Generator().manual_seed(0)
    stds = []
    for n in (100, 1000):
        x = features(n, 6, shift=0.2, seed=4)
        fd, std = metrics.frechet_distance_bootstrap(x, ref, resamples=30, generator=g)
        assert fd == pytest.approx(metrics.frechet_distance(x, ref), rel=1e-10)
        stds.append(std)
    assert 0 < stds[1] < stds[0]
    assert abs(metrics.frechet_distance(ref, ref)) < 1e-9


def test_quality_has_exactly_the_agreed_keys_and_binomial_errors():
    f, ref = features(300, 8, shift=0.2), features(500, 8, seed=1)
    probs = torch.softmax(torch.randn(300, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3, 1)
    q = metrics.quality(f, probs, ref)
    assert set(q) == QUALITY_KEYS and q["n"] == 300
    assert q["confident_share"] == pytest.approx((probs.max(1).values > 0.9).double().mean().item())
    for key, n in (("precision", 300), ("recall", 300), ("coverage", 300), ("confident_share", 300)):
        assert q[f"{key}_se"] == pytest.approx(math.sqrt(q[key] * (1 - q[key]) / n))
    assert sum(q["class_histogram"]) == pytest.approx(1.0) and len(q["class_histogram"]) == 10
    assert q == metrics.quality(f, probs, ref)  # seeded: the same numbers every time
    json.dumps(q, allow_nan=False)
    with pytest.raises(ValueError, match="at least 6"):  # coverage's k = 5 needs 5 other images
        metrics.quality(f[:5], probs[:5], ref)


def test_quality_rows_one_row_per_quantity():
    q = metrics.quality(features(100, 8), torch.full((100, 10), 0.1, dtype=torch.float64), features(100, 8, seed=1))
    rows = metrics.quality_rows(q, q)
    labels = [label for label, _ in rows]
    assert len(labels) == len(set(labels)) == 6
    assert all(" | " in value and " ± " in value for _, value in rows)
    # A result measured before coverage existed: its row is left out, not shown as a crash or a blank.
    old = {k: v for k, v in q.items() if not k.startswith("coverage")}
    assert [label for label, _ in metrics.quality_rows(old, old)] == [lab for lab in labels if "coverage" not in lab]
    assert "—" in dict(metrics.quality_rows(old, q))[next(lab for lab in labels if "coverage" in lab)].split(" | ")[0]


def test_augment_shifts_within_bounds_and_flips_only_when_asked():
    x = torch.zeros(64, 1, 28, 28)
    x[:, 0, 10:18, 5:9] = 1  # an off-centre bar
    g = torch.Generator().manual_seed(0)
    y = metrics.augment(x, 2, False, g)
    assert y.shape == x.shape and torch.equal(y.sum((1, 2, 3)), x.sum((1, 2, 3)))  # nothing shifted out
    cols = (y[:, 0].sum(1) > 0).float().argmax(1) - 5  # dx of each image
    rows = (y[:, 0].sum(2) > 0).float().argmax(1) - 10
    assert set(cols.tolist()) <= set(range(-2, 3)) and set(rows.tolist()) <= set(range(-2, 3))
    assert len(set(zip(cols.tolist(), rows.tolist()))) > 10  # shifts vary per image
    flipped = metrics.augment(x, 0, True, g)
    n_flipped = sum(torch.equal(f, x[0].flip(2)) for f in flipped)
    assert 10 < n_flipped < 54 and all(torch.equal(f, x[0]) or torch.equal(f, x[0].flip(2)) for f in flipped)


# ---------------------------------------------------------------------------------------------
# The classifier cache
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fast_classifier(synthetic_mnist, monkeypatch):
    """The synthetic 'mnist' with a classifier config that trains in a second."""
    config = dataclasses.replace(metrics.CLASSIFIER_CONFIGS["mnist"], widths=(4, 8), hidden=16, epochs=2)
    monkeypatch.setitem(metrics.CLASSIFIER_CONFIGS, "mnist", config)
    return config


def _count_trainings(monkeypatch) -> list:
    calls = []
    real = metrics.train_classifier

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(metrics, "train_classifier", counting)
    return calls


def test_two_processes_at_once_train_the_classifier_once(fast_classifier, monkeypatch):
    """Two evaluations (or test workers) starting together: the second waits for the first's
    classifier instead of training its own; no lock file is left in the cache. (flock locks belong
    to an open file description, so two threads opening the folder exclude each other as two
    processes would.)"""
    import threading

    from vaelab.data import load

    data = load("mnist", quiet=True)
    trainings, started, second_waits = [], threading.Event(), threading.Event()
    real_train, real_lock = metrics.train_classifier, metrics.folder_lock

    def slow(*a, **k):
        trainings.append(threading.current_thread().name)
        started.set()
        second_waits.wait(60)  # the first trains only once the other caller waits at the lock
        return real_train(*a, **k)

    def waiting():
        waited.append(threading.current_thread().name)
        second_waits.set()

    waited = []
    monkeypatch.setattr(metrics, "train_classifier", slow)
    monkeypatch.setattr(metrics, "folder_lock", lambda folder, on_wait=None: real_lock(folder, on_wait=waiting))
    results = {}
    first = threading.Thread(name="first", target=lambda: results.update(
        first=metrics.load_or_train_classifier(data)[0]))
    first.start()
    assert started.wait(30)
    results["second"] = metrics.load_or_train_classifier(data)[0]
    first.join(60)
    assert trainings == ["first"] and waited == [threading.current_thread().name]
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(results["first"](x), results["second"](x))  # the second loaded the first's
    weights, _ = metrics.classifier_paths("mnist")
    assert not [p for p in weights.parent.iterdir() if "lock" in p.name]


def test_classifier_cache_is_retrained_when_its_settings_or_weights_change(fast_classifier, monkeypatch, capsys):
    from vaelab.data import load

    data = load("mnist", quiet=True)
    calls = _count_trainings(monkeypatch)
    assert not metrics.classifier_cached("mnist")  # what a recipe's time estimate asks first
    clf, info = metrics.load_or_train_classifier(data)
    assert metrics.classifier_cached("mnist")
    weights, info_path = metrics.classifier_paths("mnist")
    stored = json.loads(info_path.read_text())
    assert stored["weights_sha256"] == metrics.sha256_hex(weights.read_bytes())
    assert stored["settings_sha256"] == metrics.settings_hash(metrics.classifier_settings("mnist"))
    assert stored["meets_target"] is False  # 2 epochs of a tiny net on 512 images
    assert "short of its 99.30% target" in capsys.readouterr().err

    again, _ = metrics.load_or_train_classifier(data)
    assert len(calls) == 1
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(again.eval()(x), clf.eval()(x))

    monkeypatch.setitem(metrics.CLASSIFIER_CONFIGS, "mnist", dataclasses.replace(fast_classifier, epochs=3))
    assert not metrics.classifier_cached("mnist")
    _, info = metrics.load_or_train_classifier(data)
    assert len(calls) == 2 and info["epochs"] == 3
    metrics.load_or_train_classifier(data)
    assert len(calls) == 2

    # Other (valid) weights under the same classifier.json: the hash no longer matches.
    other = dict(again.state_dict())
    other["head.6.bias"] = other["head.6.bias"] + 1
    from vaelab.checkpoint import save_tensors

    save_tensors(weights, other, {"format_version": metrics.CLASSIFIER_VERSION})
    assert not metrics.classifier_cached("mnist")
    metrics.load_or_train_classifier(data)
    assert len(calls) == 3 and metrics.classifier_cached("mnist")


def test_training_learns_the_ten_easy_synthetic_classes(tiny_data):
    config = dataclasses.replace(metrics.CLASSIFIER_CONFIGS["mnist"], widths=(8, 16), hidden=32, epochs=10,
                                 batch_size=32)
    state = torch.random.get_rng_state()
    clf, accuracy = metrics.train_classifier(tiny_data, config)
    assert accuracy > 0.9 and not clf.training
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    f, p = metrics.classify(clf, torch.rand(5, 1, 28, 28))
    assert f.shape == (5, 16 + 32) and p.shape == (5, 10) and torch.allclose(p.sum(1), torch.ones(5, dtype=p.dtype))


@pytest.mark.parametrize("content", ["[]", "null", "not json", '{"test_accuracy": "high"}', "\xff\xfe",
                                     '{"settings_sha256": 3, "weights_sha256": [], "test_accuracy": true}'])
def test_a_damaged_classifier_json_is_retrained_not_an_error(fast_classifier, monkeypatch, content):
    from vaelab.data import load

    data = load("mnist", quiet=True)
    metrics.load_or_train_classifier(data)
    _, info_path = metrics.classifier_paths("mnist")
    info_path.write_text(content, encoding="latin-1")
    calls = _count_trainings(monkeypatch)
    _, info = metrics.load_or_train_classifier(data)
    assert len(calls) == 1 and isinstance(json.loads(info_path.read_text()), dict)


# ---------------------------------------------------------------------------------------------
# vaelab score
# ---------------------------------------------------------------------------------------------


def _score(capsys, *args):
    code = main(["score", *map(str, args), "--dataset", "mnist", "--device", "cpu", "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def test_score_prints_the_metrics_and_writes_json(fast_classifier, tmp_path, capsys):
    from vaelab.data import load

    images = load("mnist", quiet=True).test_x[:40].numpy()  # uint8 (40, 28, 28)
    np.save(tmp_path / "a.npy", images)
    code, out, err = _score(capsys, tmp_path / "a.npy", "--json", tmp_path / "a.json")
    assert code == 0, err
    assert "Fréchet distance" in out and "precision" in out and "real (floor)" in out
    result = json.loads((tmp_path / "a.json").read_text())
    assert QUALITY_KEYS <= set(result) and set(result["real_floor"]) == QUALITY_KEYS
    assert result["n"] == 40 and result["real_floor"]["n"] == 40
    assert result["classifier"]["weights_sha256"] and "test_accuracy" in result["classifier"]
    # The same images as floats (n, 1, 28, 28) in an .npz score the same.
    np.savez(tmp_path / "b.npz", labels=np.zeros(40), images=(images / 255.0)[:, None].astype(np.float32))
    code, _, _ = _score(capsys, tmp_path / "b.npz", "--json", tmp_path / "b.json")
    b = json.loads((tmp_path / "b.json").read_text())
    assert code == 0 and b["fd"] == pytest.approx(result["fd"], rel=1e-4) and b["precision"] == result["precision"]


def _bad_files(tmp_path):
    """(file, what the one-line error must mention) for each way an image file can be wrong."""
    good = np.random.default_rng(0).random((20, 28, 28)).astype(np.float32)
    cases = []

    def npy(name, array, expect, **kw):
        np.save(tmp_path / name, array, **kw)
        cases.append((tmp_path / name, expect))

    npy("shape.npy", good.reshape(20, 784), "shape")
    npy("shape3.npy", good[:, :27], "shape")
    npy("channels.npy", np.repeat(good[:, None], 3, 1), "shape")
    npy("int32.npy", (good * 255).astype(np.int32), "dtype")
    npy("bool.npy", good > 0.5, "dtype")
    npy("complex.npy", good.astype(np.complex64), "dtype")
    npy("range.npy", good * 255, "[0, 1]")
    npy("negative.npy", good - 0.5, "[0, 1]")
    nan = good.copy()
    nan[3, 4, 5] = np.nan
    npy("nan.npy", nan, "NaN")
    inf = good.copy()
    inf[0, 0, 0] = np.inf
    npy("inf.npy", inf, "NaN or infinite")
    npy("few.npy", good[:5], "at least 6")
    npy("empty.npy", good[:0], "at least 6")
    npy("pickled.npy", np.array([good, "x"], dtype=object), "dtype object", allow_pickle=True)
    (tmp_path / "pickle.npy").write_bytes(pickle.dumps(good))
    cases.append((tmp_path / "pickle.npy", "readable"))
    blob = (tmp_path / "shape.npy").read_bytes()
    truncated = tmp_path / "truncated.npy"
    np.save(truncated, good)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    cases.append((truncated, "readable"))
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage" + blob[:50])
    cases.append((tmp_path / "garbage.npy", "readable"))
    (tmp_path / "text.npy").write_text("hello")
    cases.append((tmp_path / "text.npy", "readable"))
    np.savez(tmp_path / "two.npz", a=good, b=good)
    cases.append((tmp_path / "two.npz", "name the images"))
    np.savez(tmp_path / "badnpz.npz", images=good.astype(np.int64))
    cases.append((tmp_path / "badnpz.npz", "dtype"))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 broken zip")
    cases.append((tmp_path / "broken.npz", "readable"))
    with zipfile.ZipFile(tmp_path / "nonpy.npz", "w") as z:
        z.writestr("images.npy", b"not an array at all")
    cases.append((tmp_path / "nonpy.npz", "readable"))
    (tmp_path / "images.png").write_bytes(b"\x89PNG")
    cases.append((tmp_path / "images.png", ".npy or .npz"))
    cases.append((tmp_path / "missing.npy", "no such file"))
    cases.append((tmp_path, "not a regular file"))
    return cases


def test_score_refuses_bad_files_in_one_line(tmp_path, capsys, monkeypatch):
    import vaelab.data as data_mod

    def no_data(*a, **k):
        raise AssertionError("the file must be refused before the dataset is loaded")

    monkeypatch.setattr(data_mod, "load", no_data)
    for path, expect in _bad_files(tmp_path):
        code, out, err = _score(capsys, path)
        assert code == 2 and out == "", (path, err)
        assert err.count("\n") == 1 and str(path) in err and expect in err, (path, err)
        assert "Traceback" not in err


def test_score_refuses_a_file_too_large_for_memory(tmp_path, capsys, monkeypatch):
    from vaelab import memory

    np.save(tmp_path / "big.npy", np.zeros((100, 28, 28), np.uint8))
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    code, _, err = _score(capsys, tmp_path / "big.npy")
    assert code == 2 and "available" in err and str(tmp_path / "big.npy") in err
    # A header that claims 10^9 images in a small file is refused before anything is allocated.
    monkeypatch.setattr(memory, "available_memory", lambda: 8 * 2**30)
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 28, 28), np.uint8))
    header["shape"] = (10**9, 28, 28)
    with open(tmp_path / "claims.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 784)
    code, _, err = _score(capsys, tmp_path / "claims.npy")
    assert code == 2 and "available" in err and err.count("\n") == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), cut=st.integers(0, 400), suffix=st.sampled_from([".npy", ".npz"]))
def test_read_images_of_random_or_cut_bytes_raises_only_data_errors(tmp_path, data, cut, suffix):
    path = tmp_path / f"f{suffix}"
    header = path.with_name("seed" + suffix)
    array = np.zeros((5, 28, 28), np.uint8)
    (np.save if suffix == ".npy" else np.savez)(header, array)
    for blob in (data, header.read_bytes()[:cut] + data):
        path.write_bytes(blob)
        try:
            metrics.read_images(path)
        except DataError as e:
            assert str(path) in str(e) and "\n" not in str(e)


def test_read_images_accepts_the_documented_forms(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", x)
    np.savez_compressed(tmp_path / "one.npz", whatever=x[:, None])
    np.savez(tmp_path / "x.npz", y=np.arange(6), x=(x / 255).astype(np.float64))
    np.savez(tmp_path / "arr.npz", x[:, None] / 255.0, np.arange(6))  # arr_0 and arr_1
    expected = torch.from_numpy(x).float().div(255)[:, None]
    for name in ("u8.npy", "one.npz", "x.npz", "arr.npz"):
        got = metrics.read_images(tmp_path / name)
        assert got.dtype == torch.float32 and got.shape == (6, 1, 28, 28)
        torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------
# On real MNIST: the metrics rank image sets as a person would
# ---------------------------------------------------------------------------------------------


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) with zero padding."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = nn.functional.conv2d(nn.functional.pad(x, (r, r, 0, 0)), k.view(1, 1, 1, -1))
    return nn.functional.conv2d(nn.functional.pad(x, (0, 0, r, r)), k.view(1, 1, -1, 1))


def ink_blobs(n: int, generator: torch.Generator, ink=(0.15, 0.20), sigma: float = 2.0,
              edge: float = 0.08) -> torch.Tensor:
    """What a failing GAN draws: white noise smoothed with a Gaussian, faded towards the border
    (ink sits in the middle, as in digits), thresholded so 15-20% of pixels are ink, with a
    soft edge: high-contrast blobs of digit-like size. (n, 1, 28, 28) in [0, 1]."""
    noise = torch.randn(n, 1, 28, 28, generator=generator)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    field = gaussian_blur(noise, sigma) * torch.exp(-((yy - 13.5) ** 2 + (xx - 13.5) ** 2) / (2 * 7.0 ** 2))
    field = field / field.flatten(1).std(1)[:, None, None, None]
    share = torch.empty(n).uniform_(*ink, generator=generator)
    threshold = torch.stack([torch.quantile(f.flatten(), 1 - s) for f, s in zip(field, share)])
    return torch.sigmoid((field - threshold[:, None, None, None]) / edge)


def pixel_shuffled(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image's pixels in a random order of its own: the same ink, no shape."""
    flat = x.flatten(1)
    order = torch.argsort(torch.rand(flat.shape, generator=generator), dim=1)
    return flat.gather(1, order).view_as(x)


N_SET = 2000
SETS = ("real", "blurred", "blobs", "shuffled")  # in the order a person ranks them, best first


@pytest.fixture(scope="module")
def mnist_sets():
    """Quality of four sets of 2000 images against the other 8000 test images, in the features
    of the real (cached) MNIST classifier. The split is random: MNIST's first 5000 test digits
    come from other writers than its last 5000."""
    from vaelab.data import load, to_float

    data = load("mnist", quiet=True)
    clf, info = metrics.load_or_train_classifier(data, progress=True)
    order = torch.randperm(len(data.test_x), generator=torch.Generator().manual_seed(0))
    x = to_float(data.test_x[order[:N_SET]])
    g = torch.Generator().manual_seed(0)
    images = {"real": x, "blurred": gaussian_blur(x, 1.0), "blobs": ink_blobs(N_SET, g),
              "shuffled": pixel_shuffled(x, g)}
    ref, _ = metrics.classify(clf, to_float(data.test_x[order[N_SET:]]))
    scores = {}
    for name, imgs in images.items():
        f, p = metrics.classify(clf, imgs)
        scores[name] = metrics.quality(f, p, ref)
    return info, scores, ref


@pytest.mark.realdata
def test_mnist_classifier_reaches_its_target(mnist_sets):
    info, _, _ = mnist_sets
    assert info["test_accuracy"] >= 0.993 and info["meets_target"]


@pytest.mark.realdata
@pytest.mark.parametrize("metric", ["fd", "kid"])
def test_distances_rank_real_blurred_blobs_shuffled(mnist_sets, metric):
    _, scores, _ = mnist_sets
    values = [scores[s][metric] for s in SETS]
    assert all(a < b for a, b in itertools.pairwise(values)), dict(zip(SETS, values))
    if metric == "kid":  # each step clear of the noise, not a coin flip
        spread = [scores[s]["kid_std"] for s in SETS]
        assert all(b - a > sa + sb for a, b, sa, sb in zip(values, values[1:], spread, spread[1:])), values


@pytest.mark.realdata
def test_precision_ranks_them_the_other_way_round_and_recall_is_highest_for_real(mnist_sets):
    _, scores, _ = mnist_sets
    p = {s: scores[s]["precision"] for s in SETS}
    assert p["real"] > p["blurred"] > p["blobs"] > p["shuffled"], p
    assert all(a - b > 2 * math.hypot(scores[x]["precision_se"], scores[y]["precision_se"])
               for (x, a), (y, b) in itertools.pairwise(p.items())), p  # each step clear of the noise
    assert p["real"] > 0.7 and p["shuffled"] < 0.05, p
    r = {s: scores[s]["recall"] for s in SETS}
    assert r["real"] > max(r["blurred"], r["blobs"], r["shuffled"]), r
    # Coverage ranks all four as a person does, each step clear of the noise; recall does not
    # (the blobs' scattered samples cover more real digits than the blurred ones, 0.11 against 0.005).
    c = {s: scores[s]["coverage"] for s in SETS}
    assert all(a - b > 2 * math.hypot(scores[x]["coverage_se"], scores[y]["coverage_se"])
               for (x, a), (y, b) in itertools.pairwise(c.items())), c
    assert c["real"] > 0.9, c


@pytest.mark.realdata
def test_real_images_against_themselves_and_the_held_out_ones(mnist_sets):
    _, scores, ref = mnist_sets
    assert abs(metrics.frechet_distance(ref, ref)) < 1e-6
    real = scores["real"]
    assert real["fd"] < 0.2 * scores["blurred"]["fd"] and abs(real["kid"]) < 3 * real["kid_std"]
    assert real["confident_share"] > 0.95
