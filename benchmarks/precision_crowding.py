"""Where do a model's samples land in the real images' k-NN manifold? The README's note on what
precision cannot tell (Fashion-MNIST, the fashion-generative recipe's run folders).

    python benchmarks/precision_crowding.py RUN [RUN ...] --dataset fashion-mnist

For each run: 5,000 prior samples against 5,000 real test images in the domain classifier's
features: precision (samples inside any real image's k = 3 ball), density (Naeem et al. 2020: the
mean number of real balls a sample lies in, over k), coverage (real images whose ball holds a
sample), the share of the hits that fall in the 20 busiest real balls and those balls' median
radius against the median radius of all.
"""

from __future__ import annotations

import argparse

import torch

from vaelab.checkpoint import load_run
from vaelab.data import load, to_float
from vaelab.evaluate import generate
from vaelab.metrics import PR_K, _squared_distances, classify, knn_radii, load_or_train_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("-n", type=int, default=5000)
    a = p.parse_args()
    data = load(a.dataset, quiet=True)
    clf, _ = load_or_train_classifier(data)
    real, _ = classify(clf, to_float(data.test_x[: a.n]))
    radii = knn_radii(real, PR_K)  # squared
    for run in a.runs:
        features, _ = classify(clf, generate(load_run(run).model.eval(), a.n, seed=0))
        hits = torch.zeros(len(features))
        per_real = torch.zeros(len(real))
        for i in range(0, len(features), 1000):
            inside = _squared_distances(features[i : i + 1000], real) <= radii[None]  # (1000, n)
            hits[i : i + 1000] = inside.sum(1).double()
            per_real += inside.sum(0)
        busiest = per_real.topk(20).indices
        print(f"{run}: precision {(hits > 0).double().mean():.3f}  density {hits.mean() / PR_K:.3f}  "
              f"coverage {(per_real > 0).double().mean():.3f}  hits in the 20 busiest balls "
              f"{per_real[busiest].sum() / per_real.sum().clamp_min(1):.2f}  their median radius / all "
              f"{radii[busiest].median().sqrt() / radii.median().sqrt():.1f}")


if __name__ == "__main__":
    main()
