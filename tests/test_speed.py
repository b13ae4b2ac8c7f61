"""The fast path's functions, on the CPU: oneDNN linear against PyTorch's, the runtime's thread
policy (on faked topologies, loads and timings), the bf16 autocast path the GPU also takes, and a
tiny run of the benchmark's functions. No timing assertions: speed targets are checked by
benchmarks/bench.py, never by unit tests."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vaelab.data import Batcher
from vaelab.fastpath import OneDNNLinearFunction, onednn_available, onednn_linear
from vaelab.models import build_model, make_config
from vaelab import fastpath, runtime
from vaelab.errors import ConfigError
from vaelab.devices import autocast, wants_channels_last
from vaelab.evaluate import evaluate_terms
from vaelab.train import train

from conftest import quick_config, write_dataset_files

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("shape", [(128, 784), (7, 3, 20)])
def test_onednn_linear_matches_torch_forward_and_gradients(shape):
    torch.manual_seed(0)
    layer = nn.Linear(shape[-1], 33)
    x = torch.randn(*shape, requires_grad=True)
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, layer.weight, layer.bias))
    with onednn_linear(layer) as changed:
        assert changed == [layer]
        out = layer(x)
        grads = torch.autograd.grad(out.square().sum(), (x, layer.weight, layer.bias))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    assert "forward" not in vars(layer)  # restored: the same bits as a model rebuilt from disk


@needs_onednn
def test_onednn_linear_steps_aside_for_autocast_and_inference():
    layer = nn.Linear(8, 4)
    x = torch.randn(5, 8)
    with onednn_linear(layer):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16  # PyTorch's own path under autocast
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias),
                                       rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_function_without_bias_passes_gradcheck_shapes():
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(3, 6, requires_grad=True)
    y = OneDNNLinearFunction.apply(x, w, None)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    torch.testing.assert_close(dx, torch.ones(4, 3) @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, torch.ones(3, 4) @ x, rtol=1e-5, atol=1e-5)


ZEN4_THEN_INTEL = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                   "flags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n")


@pytest.mark.parametrize("cpuinfo, vendor, family, half_width", [
    (ZEN4_THEN_INTEL, "AuthenticAMD", 25, True),  # Zen 4; the second block is not read
    (ZEN4_THEN_INTEL.replace(": 25", ": 26"), "AuthenticAMD", 26, False),  # Zen 5: full-width AVX-512
    ("vendor_id\t: GenuineIntel\ncpu family\t: 6\n", "GenuineIntel", 6, False),
    ("", "", None, False),  # unreadable or another format: the instruction set alone decides
])
def test_onednn_is_not_chosen_where_avx512_runs_on_half_width_units(cpuinfo, vendor, family, half_width):
    assert fastpath.cpu_vendor_family(cpuinfo) == (vendor, family)
    assert fastpath.avx512_on_half_width_units(vendor, family) is half_width


def test_channels_last_is_chosen_for_convolutions_unless_declared():
    assert not wants_channels_last(build_model("vae", make_config("vae", hidden_dims=[8])))
    conv = nn.Sequential(nn.Conv2d(1, 4, 3))
    assert wants_channels_last(conv)
    conv.channels_last = False  # a declaration wins over detection
    assert not wants_channels_last(conv)


def test_physical_cores_counts_smt_siblings_once(tmp_path):
    for cpu, siblings in {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}.items():
        (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(siblings + "\n")
    assert runtime.physical_cores({0, 1, 2, 3}, sysfs=tmp_path) == 2
    assert runtime.physical_cores({0, 2}, sysfs=tmp_path) == 1
    assert runtime.physical_cores({0, 1, 7}, sysfs=tmp_path) == 3  # no topology: a core of its own


@pytest.mark.parametrize("cores, load, idle", [(2, 0.1, 2), (2, 1.0, 1), (2, 3.7, 1), (8, 2.4, 6)])
def test_idle_cores_subtracts_the_load_average(monkeypatch, cores, load, idle):
    monkeypatch.setattr(runtime, "physical_cores", lambda: cores)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (load, load, load))
    assert runtime.idle_cores.__wrapped__() == idle


@pytest.mark.parametrize("seconds, chosen", [
    ({1: 1.0, 2: 0.5}, 2),  # a quiet machine: two threads twice as fast
    ({1: 1.0, 2: 0.9}, 1),  # within the margin: fewer threads
    ({1: 1.2, 2: 16.0}, 1),  # a busy neighbour stalls every barrier (as measured on a 2-core VM)
    ({1: 4.0, 3: 1.0, 6: 2.0}, 3),
], ids=["quiet", "marginal", "busy", "middle"])
def test_fastest_threads_picks_the_fastest_probe_and_restores_the_thread_count(monkeypatch, seconds, chosen):
    monkeypatch.setattr(runtime, "probe_seconds", lambda threads, a, b: seconds[threads])
    before = torch.get_num_threads()
    assert runtime.fastest_threads(list(seconds)) == chosen
    assert torch.get_num_threads() == before


def test_configure_takes_threads_then_the_environment_then_the_probe(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime._Tuning, "auto", False)  # configure() below sets it for the process
    monkeypatch.setattr(runtime, "default_threads", lambda: 1)
    try:
        assert runtime.configure(threads=2) == 2 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert runtime.configure() == 2  # the user's environment wins over the default
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert runtime.configure() == 1
        with pytest.raises(ConfigError, match="--threads must be at least 1, got 0"):
            runtime.configure(threads=0)
    finally:
        torch.set_num_threads(before)


def test_retune_measures_again_only_where_configure_chose_the_threads(monkeypatch):
    """A probe that saw a bad moment (or a neighbour that came later) is corrected at the next
    retune, RETUNE_SECONDS on; the user's --threads or OMP_NUM_THREADS never changes."""
    before = torch.get_num_threads()
    clock = [100.0]
    probes = []
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(runtime, "physical_cores", lambda: 2)
    monkeypatch.setattr(runtime, "default_threads", lambda: 1)  # the start's probe: a bad moment
    monkeypatch.setattr(runtime, "fastest_threads", lambda candidates: probes.append(candidates) or 2)
    monkeypatch.setattr(runtime._Tuning, "auto", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert runtime.configure(threads=1) == 1
        clock[0] += 60
        assert runtime.retune() == 1 and probes == []  # --threads 1: the user's choice stays
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        runtime.configure()
        clock[0] += 60
        assert runtime.retune() == 1 and probes == []  # so does the environment's
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert runtime.configure() == 1  # vaelab's own choice, from the probe at the start
        clock[0] += runtime.FIRST_RETUNE_SECONDS - 1
        assert runtime.retune() == 1 and probes == []  # not yet
        clock[0] += 1
        assert runtime.retune() == 2 == torch.get_num_threads() and probes == [[1, 1, 2]]
        monkeypatch.setattr(runtime, "fastest_threads", lambda candidates: probes.append(candidates) or 1)
        clock[0] += runtime.RETUNE_SECONDS - 1
        assert runtime.retune() == 2 and len(probes) == 1  # measured too recently
        clock[0] += 1
        assert runtime.retune() == 1 and probes[-1] == [1, 2, 2]  # a neighbour came: back to one
    finally:
        torch.set_num_threads(before)


def test_the_trainer_retunes_the_threads_at_its_host_syncs(monkeypatch, tiny_data, tmp_path):
    calls = []
    monkeypatch.setattr(runtime, "retune", lambda: calls.append(1) or torch.get_num_threads())
    train("vae", make_config("vae", ["hidden_dims=[16]"]), quick_config(epochs=2), tmp_path / "run",
          progress=False, data=tiny_data)
    assert len(calls) == 4  # 4 steps an epoch, a sync every 2 steps, 2 epochs


# One process: `vaelab train` of two models (one optimizer, three optimizers) on a synthetic
# "mnist" (tests/_synthetic_cli.py), then TorchDynamo imported, reporting what was imported when.
NO_DYNAMO_SCRIPT = """
import runpy, sys, torch
script, data, out = sys.argv[1:4]
runs = [["train", "vae", "--set", "hidden_dims=[16]"],
        ["train", "vae-gan", "--set", "arch=mlp", "--set", "hidden_dims=[16]"]]
for i, args in enumerate(runs):
    sys.argv = [script, "--data", data, "--n-train", "64", "--no-figures", "--", *args, "--epochs", "1",
                "--batch-size", "16", "--quiet", "--out", f"{out}/run{i}"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None), e.code
trained = "torch._dynamo" in sys.modules
from vaelab.optim import PackedAdam
opt = PackedAdam(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
import torch._dynamo  # as torch.compile does
opt.zero_grad()  # from now on torch's own disable wraps it again
wrapped = getattr(torch.optim.Optimizer.zero_grad.__wrapped__, "__dynamo_disable")
print(trained, type(wrapped).__name__)
"""


def test_training_from_the_command_line_does_not_import_torchdynamo(tmp_path):
    """torch.optim imports TorchDynamo (1.7 s of CPU) on an optimizer's first use; runtime.configure
    (every command) and PackedAdam.step keep that out of training that compiles nothing, and a
    process that compiles later gets torch's own wrapping back."""
    script = Path(__file__).resolve().parent / "_synthetic_cli.py"
    write_dataset_files(tmp_path / "data", n_train=64, n_test=32)
    env = {**os.environ, "VAELAB_DATA": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(script.parents[1] / "src"), str(script.parent)])}
    result = subprocess.run([sys.executable, "-c", NO_DYNAMO_SCRIPT, str(script), str(tmp_path / "data"), str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1].split() == ["False", "function"], result.stdout[-2000:] + result.stderr[-2000:]


def flushes_denormals() -> bool:
    return float(torch.tensor([1e-40]) * 1.0) == 0.0


def test_training_as_a_library_changes_no_process_setting(tmp_path, tiny_data):
    """`train()` leaves threads and denormals as the caller set them (only runtime.configure,
    which the CLI calls, changes them)."""
    before = torch.get_num_threads()
    unusual = runtime.physical_cores() + 1  # a count the runtime's policy never picks
    torch.set_num_threads(unusual)
    torch.set_flush_denormal(False)
    try:
        train("vae", make_config("vae", hidden_dims=[16]), quick_config(), tmp_path / "run", progress=False,
              data=tiny_data)
        assert torch.get_num_threads() == unusual and not flushes_denormals()
    finally:
        torch.set_num_threads(before)
        torch.set_flush_denormal(True)
    assert flushes_denormals()  # the check above can see a flushing process


def test_bf16_autocast_path_trains_and_evaluates_on_cpu(tmp_path, tiny_data):
    """The GPU's `--precision bf16` path runs the same functions: autocast around the step and
    the evaluation, fp32 weights and optimizer state, finite results."""
    cfg = quick_config(precision="bf16")
    trainer = train("vae", make_config("vae", hidden_dims=[32]), cfg, tmp_path / "run", progress=False,
                    data=tiny_data)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    terms = evaluate_terms(trainer.model, tiny_data.test_x, cfg, torch.device("cpu"))
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    with autocast(torch.device("cpu"), "bf16"):
        assert trainer.model.decode(torch.randn(2, 2)).dtype == torch.bfloat16


@pytest.mark.parametrize("slow", [True, False])
def test_bf16_on_a_cpu_without_fast_bf16_says_so_once(tmp_path, tiny_data, monkeypatch, capsys, slow):
    import sys

    monkeypatch.setattr(sys.modules["vaelab.train"], "bf16_slow", lambda device: slow)  # the module, not the function
    train("vae", make_config("vae", hidden_dims=[16]), quick_config(epochs=1, precision="bf16"), tmp_path / "run",
          data=tiny_data)
    notes = [line for line in capsys.readouterr().err.splitlines() if "bf16" in line]
    assert notes == (["vaelab: note: this CPU has no fast bf16 (oneDNN's bf16 kernels need AVX-512), so bf16 is "
                      "emulated here and several times slower than fp32; --precision fp32 trains faster"]
                     if slow else [])


def test_bf16_is_slow_only_on_a_cpu(monkeypatch):
    from vaelab.devices import bf16_slow

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert bf16_slow(torch.device("cpu")) and not bf16_slow(torch.device("cuda"))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert not bf16_slow(torch.device("cpu"))


def test_batcher_state_replays_the_same_batches(tiny_data):
    b = Batcher(tiny_data.train_x, 32, "cpu", binarize="dynamic", seed=3)
    state = b.state_dict()
    first = [batch.x.clone() for batch in b]
    assert not all(torch.equal(x, y.x) for x, y in zip(first, b))  # the next epoch is another draw
    b.load_state_dict(state)
    assert all(torch.equal(x, y.x) for x, y in zip(first, b))


def _bench_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    spec = importlib.util.spec_from_file_location("vaelab_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_functions_on_a_tiny_configuration(synthetic_mnist):
    bench = _bench_module()
    # FLOP counting: 3x the forward GEMMs less the first layer's input gradient.
    forward = sum(2 * i * o for i, o in bench.MLP_LAYERS)
    assert bench.gemm_flops(bench.mlp_step_gemms(1)) == 3 * forward - 2 * 784 * 400
    assert bench.time_gemms(bench.mlp_step_gemms(4)[:2], seconds=0.01, repeats=1) > 0
    x = torch.randint(0, 256, (28, 28), dtype=torch.uint8)
    from PIL import Image

    tensor = bench.pil_to_tensor(Image.fromarray(x.numpy(), mode="L"))
    assert torch.equal(tensor, x.unsqueeze(0).float() / 255)
    base = bench.run_baseline(epochs=1, n_train=256, n_test=128)
    fast = bench.run_vaelab("vae", {"hidden_dims": [400], "latent_dim": 20}, epochs=1, n_train=256,
                            n_test=128, sample_n=50)
    for r in (base, fast):
        assert r["images"] == 256 and r["wall_seconds"] > 0 and r["run_cpu_seconds"] > 0 and len(r["curve"]) == 1
    assert fast["sample_images_per_s"] > 0
    plain = bench.run_plain("vae", {"hidden_dims": [400], "latent_dim": 20}, epochs=1, n_train=256, n_test=128)
    assert plain["images"] == 256 and plain["train_seconds"] > 0
    assert 0 < plain["kernel_fraction"] <= 1  # the step's share inside its multiplies
    # one step of the 784-400-20 VAE: the GEMMs counted by hand, plus the sampling layer's few
    assert 128 * bench.gemm_flops(bench.mlp_step_gemms(1)) <= plain["step_flops"] <= 1.01 * 128 * 3 * forward
    half = bench.run_plain("vae", {"hidden_dims": [8]}, epochs=1, n_train=256, n_test=128, precision="bf16")
    assert half["images"] == 256 and half["step_flops"] > 0
    for name in ("cvae", "vae-gan"):  # a conditional model and one with three optimizers
        tiny = {"hidden_dims": [8]} if name == "cvae" else {"arch": "mlp", "hidden_dims": [8], "dis_hidden_dims": [8]}
        assert bench.run_plain(name, tiny, epochs=1, n_train=256, n_test=128)["images"] == 256
    # The LSTM's FLOPs are counted too (torch's counter alone has no formula for its kernel):
    # 28 steps of (128 x 44) @ (44 x 64) forward, twice that backward, plus the decoder's.
    lstm = bench.run_plain("lstm-vae", {"lstm_hidden": 16}, epochs=1, n_train=256, n_test=128)
    lstm_alone = 3 * 2 * 28 * 128 * 64 * (28 + 16)
    from torch.utils.flop_counter import FlopCounterMode

    layer = nn.LSTM(28, 16, batch_first=True)
    counter = FlopCounterMode(display=False, custom_mapping=bench.RNN_FLOP_FORMULAS)
    with counter:
        layer(torch.rand(128, 28, 28))[1][0].sum().backward()
    assert counter.get_total_flops() == lstm_alone
    assert lstm["step_flops"] > lstm_alone
    results = {"machine": {**bench.machine_info(), "load_at_start": 0.0, "load_at_end": 0.0},
               "settings": {"quick": True, "epochs": 1}, "variants": {},
               "baseline": {**base, "max_rss_mb": 1.0, "cpu_seconds": 1.0, "load_before": 0, "load_after": 0},
               "vaelab": {**fast, "max_rss_mb": 1.0, "cpu_seconds": 1.0, "load_before": 0, "load_after": 0},
               "matmul": {"threads": 1, "step_gemms_fp32_gflops": 1.0, "step_gemms_fp32_aten_gflops": 1.0,
                          "step_gemms_fp32_onednn_gflops": 1.0, "step_gemms_bf16_gflops": 1.0,
                          "square_fp32_gflops": 1.0, "square_bf16_gflops": 1.0},
               "models": [{"model": "vae", **fast, "plain": {**plain, "train_seconds": 2 * fast["train_seconds"]}},
                          {"model": "broken", "error": "boom"}]}
    bench.summarize(results)
    text = bench.report(results)
    assert "Speed-up" in text and "| vae |" in text and "| broken | error" in text
    assert "| 2.00x |" in text  # vaelab / plain, from the two loops' train seconds
    # The kernel bound: 90 % of the plain step in its kernels allows at most 1.11x, below the
    # target, and the note names the model; at 50 % (2x) it names none.
    results["models"][0]["plain"]["kernel_fraction"] = 0.9
    text = bench.report(results)
    assert "| 2.00x | 90% | 1.11x |" in text
    assert "Below 1.3x for `vae`: there the target cannot be met" in text
    results["models"][0]["plain"]["kernel_fraction"] = 0.5
    text = bench.report(results)
    assert "| 2.00x | 50% | 2.00x |" in text and "Below 1.3x" not in text
    assert "For every model the bound is at least 1.3x." in text
    assert "bf16 autocast (`--precision bf16`)" not in text  # no bf16 runs, no bf16 table
    # With bf16 runs: vaelab bf16 at 1/4 of plain fp32's seconds and 1/3 of plain bf16's.
    t = fast["train_seconds"]
    bf16_curve = [{**fast["curve"][0], "test_loss": fast["curve"][0]["test_loss"] + 0.25}]
    results["models"][0].update(
        vaelab_bf16={**fast, "train_seconds": t / 2, "curve": bf16_curve},
        plain_bf16={**plain, "train_seconds": 1.5 * t}, rounds=1,
        train_seconds_each={"vaelab_bf16": [t / 2], "plain_bf16": [1.5 * t]})
    text = bench.report(results)
    row = next(line for line in text.splitlines() if line.startswith("| vae |") and line.count("x |") == 3)
    assert [c.strip() for c in row.split("|")[5:8]] == ["4.00x", "3.00x", "2.00x"], row
    assert row.endswith(f"| {fast['curve'][0]['test_loss']:.1f} / {bf16_curve[0]['test_loss']:.1f} |"), row
    from vaelab.models import MODELS

    assert {name for _, name, _ in bench.model_variants()} == set(MODELS)
