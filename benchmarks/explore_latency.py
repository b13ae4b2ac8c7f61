"""`vaelab explore`: the decode round trip the page makes as the mouse moves, per model.

    OMP_NUM_THREADS=1 python benchmarks/explore_latency.py [--requests 200]

For every registered model (at its default config and at the configs the recipes train), a
`LatentSpace` over 3000 synthetic images and the real server on 127.0.0.1; then `--requests`
POST /api/decode of one code each, one after the other, each on a new connection as the page's
fetch may make them: HTTP, JSON, the decode and the base64 answer (a conditional model's with
the class, a different one each time, as the page sends its selected class). Weights are random:
a decode costs the same whatever they hold. Prints a markdown table (median, 95th percentile, max in ms);
the issue's bound is 50 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import synthetic_data  # noqa: E402

from vaelab.explore import LatentSpace, make_server  # noqa: E402
from vaelab.models import MODELS, build_model, make_config  # noqa: E402

CASES = [  # (label, model, config fields)
    *((f"{name} (default config)", name, {}) for name in sorted(MODELS)),
    ("vae 784-512-2 (vae-2d-mnist recipe)", "vae", {"hidden_dims": [512], "latent_dim": 2}),
    ("lstm-vae latent 16 (lstm-vae-mnist recipe)", "lstm-vae", {"lstm_hidden": 128, "latent_dim": 16}),
    ("vae-gan mlp latent 2 (fashion recipe)", "vae-gan", {"arch": "mlp", "hidden_dims": [512], "latent_dim": 2}),
]


def measure(model, n_requests: int) -> list[float]:
    data = synthetic_data(n_train=16, n_test=3000)
    space = LatentSpace(model, data.test_x, data.test_y, data.classes, data.name)
    server = make_server(space)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    g = torch.Generator().manual_seed(0)
    times = []
    try:
        for i in range(n_requests + 10):
            ask = {"z": [torch.randn(space.latent_dim, generator=g).tolist()]}
            if space.conditional:
                ask["class"] = i % len(space.classes)
            body = json.dumps(ask).encode()
            request = urllib.request.Request(server.url + "api/decode", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(request) as response:
                json.load(response)
            if i >= 10:  # the first requests warm up the allocator and the kernels
                times.append((time.perf_counter() - start) * 1000)
    finally:
        server.shutdown()
        server.server_close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}; {args.requests} requests per model\n")
    print("| model | latent | median ms | p95 ms | max ms |\n| --- | --- | --- | --- | --- |")
    for label, name, fields in CASES:
        model = build_model(name, make_config(name, **fields)).eval()
        t = sorted(measure(model, args.requests))
        p95 = t[int(0.95 * (len(t) - 1))]
        print(f"| {label} | {model.latent_dim} | {statistics.median(t):.2f} | {p95:.2f} | {t[-1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
