"""The `likelihood-mnist` recipe's costs: seconds per epoch of each of its models, the per-epoch
test evaluation, and the IWAE NLL with K = 5000.

    OMP_NUM_THREADS=1 python benchmarks/likelihood_timing.py [--steps 300] [--batch-sizes 20 100]
    python benchmarks/likelihood_timing.py --device cuda           # on a GPU

For each model of the recipe (Burda et al.'s 784-200-200-50 tanh network as the VAE, k = 1, and
as the IWAE, k = 5 and k = 50), `--steps` training steps of the trainer's own path (the model's
`training_step`, its optimizer, oneDNN linear layers, dynamically binarised real MNIST batches)
after 20 steps of warm-up, at each batch size; then one evaluation of the model's own loss over
the 10,000 test images (what the trainer does after every epoch); then the IWAE NLL with
K = 5000 on `--nll-images` test images. Weights are untrained: the cost does not depend on them.

Prints wall-clock and CPU seconds for each. On a machine shared with other jobs the CPU seconds
of this single-threaded process are the better guide to what an idle core would take (they
leave out the time the process waited for a core), so both are shown, with the load average.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from vaelab import runtime
from vaelab.batch import StepState
from vaelab.data import Batcher, load, to_float
from vaelab.evaluate import evaluate_terms, iwae_nll, likelihood_images
from vaelab.fastpath import onednn_faster, onednn_linear
from vaelab.models import build_model, make_config
from vaelab.recipes import RECIPES
from vaelab.train_config import TrainConfig


DEVICE = torch.device("cpu")


def clocks() -> tuple[float, float]:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)  # the queued work counts where it is done, not where it is asked for
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clocks()
    return wall - start[0], cpu - start[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="default: the recipe's own batch size")
    parser.add_argument("--nll-images", type=int, default=200)
    parser.add_argument("--nll-k", type=int, default=5000)
    parser.add_argument("--no-eval", action="store_true", help="skip the per-epoch evaluation and the NLL")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--data-dir", default=None, help="load MNIST from this folder (a machine with no internet)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    runtime.configure()
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} "
          f"(on {os.cpu_count()} cores)")
    data = load("mnist", quiet=True, from_dir=args.data_dir)
    steps = RECIPES["likelihood-mnist"].steps
    for step in steps:
        config = make_config(step.model, **step.config)
        for batch_size in args.batch_sizes or [step.train.get("batch_size", 128)]:
            torch.manual_seed(0)
            model = build_model(step.model, config).to(DEVICE)
            opts = model.configure_optimizers(1e-3)
            batches = Batcher(data.train_x, batch_size, DEVICE, shuffle=True, binarize="dynamic")
            per_epoch = len(batches)
            it = iter(batches)
            with onednn_linear(model, enabled=DEVICE.type == "cpu" and onednn_faster()):
                for i in range(20 + args.steps):
                    if i == 20:
                        start = clocks()
                    model.training_step(next(it), opts, StepState(step=i, steps_per_epoch=per_epoch))
            wall, cpu = since(start)
            print(f"{step.key:<8} batch {batch_size:>4}: {wall / args.steps * 1e3:6.2f} ms/step wall, "
                  f"{cpu / args.steps * 1e3:6.2f} ms/step CPU -> {wall / args.steps * per_epoch:6.1f} s/epoch "
                  f"wall, {cpu / args.steps * per_epoch:6.1f} s/epoch CPU ({per_epoch} steps)", flush=True)
        if args.no_eval:
            continue
        model.eval()
        train_config = TrainConfig(binarize="dynamic", device=DEVICE.type)
        start = clocks()
        evaluate_terms(model, data.test_x, train_config, DEVICE)
        wall, cpu = since(start)
        print(f"{step.key:<8} per-epoch test evaluation (10,000 images): {wall:.1f} s wall, {cpu:.1f} s CPU",
              flush=True)
        targets, _ = likelihood_images(data, "dynamic")
        start = clocks()
        iwae_nll(model, targets[: args.nll_images].to(DEVICE), args.nll_k)
        wall, cpu = since(start)
        scale = 10000 / args.nll_images
        print(f"{step.key:<8} IWAE NLL K={args.nll_k} on {args.nll_images} images: {wall:.1f} s wall, "
              f"{cpu:.1f} s CPU -> 10,000 images: {wall * scale / 60:.1f} min wall, {cpu * scale / 60:.1f} min CPU",
              flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
