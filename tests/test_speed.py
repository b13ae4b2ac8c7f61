"""The fast path's functions, on the CPU: oneDNN linear against PyTorch's, the trainer's runtime
choices, the bf16 autocast path the GPU also takes, and a tiny run of the benchmark's functions.
No timing assertions: speed targets are checked by benchmarks/bench.py, never by unit tests."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from vaelab.data import Batcher
from vaelab.fastpath import OneDNNLinearFunction, onednn_available, onednn_linear
from vaelab.models import build_model, make_config
from vaelab.train import (TrainConfig, autocast, evaluate_terms, physical_cores, rng_state, train,
                          wants_channels_last)

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


def test_runtime_choices():
    assert 1 <= physical_cores() <= (torch.get_num_threads() + 1024)
    assert not wants_channels_last(build_model("vae", make_config("vae", hidden_dims=[8])))
    conv = nn.Sequential(nn.Conv2d(1, 4, 3))
    assert wants_channels_last(conv)
    conv.channels_last = False  # a declaration wins over detection
    assert not wants_channels_last(conv)


def test_bf16_autocast_path_trains_and_evaluates_on_cpu(tmp_path, tiny_data):
    """The GPU's `--precision bf16` path runs the same functions: autocast around the step and
    the evaluation, fp32 weights and optimizer state, finite results."""
    cfg = TrainConfig(epochs=1, batch_size=64, eval_batch_size=50, device="cpu", precision="bf16")
    trainer = train("vae", make_config("vae", hidden_dims=[32]), cfg, tmp_path / "run", progress=False,
                    data=tiny_data)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    terms = evaluate_terms(trainer.model, tiny_data.test_x, cfg, torch.device("cpu"))
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    with autocast(torch.device("cpu"), "bf16"):
        assert trainer.model.decode(torch.randn(2, 2)).dtype == torch.bfloat16


def test_batcher_generator_lives_on_the_data_device(tiny_data):
    b = Batcher(tiny_data.train_x, 32, "cpu", binarize="dynamic", seed=3)
    assert b.generator.device == b.images.device
    state = b.state_dict()
    first = [x.clone() for x in b]
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(first, b))
    assert "cuda" not in rng_state() or torch.cuda.is_available()


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
    results = {"machine": {**bench.machine_info(), "load_at_start": 0.0, "load_at_end": 0.0},
               "settings": {"quick": True, "epochs": 1}, "variants": {},
               "baseline": {**base, "max_rss_mb": 1.0, "cpu_seconds": 1.0, "load_before": 0, "load_after": 0},
               "vaelab": {**fast, "max_rss_mb": 1.0, "cpu_seconds": 1.0, "load_before": 0, "load_after": 0},
               "matmul": {"threads": 1, "step_gemms_fp32_gflops": 1.0, "step_gemms_fp32_aten_gflops": 1.0,
                          "step_gemms_fp32_onednn_gflops": 1.0, "step_gemms_bf16_gflops": 1.0,
                          "square_fp32_gflops": 1.0, "square_bf16_gflops": 1.0},
               "models": [{"model": "vae", **fast}, {"model": "broken", "error": "boom"}]}
    bench.summarize(results)
    text = bench.report(results)
    assert "Speed-up" in text and "| vae |" in text and "| broken | error" in text
    from vaelab.models import MODELS

    assert {name for _, name, _ in bench.model_variants()} == set(MODELS)
