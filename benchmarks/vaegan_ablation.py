"""The VAE-GAN ablation behind docs/vae-gan.md: train each variant, then score its samples.

    python benchmarks/vaegan_ablation.py train --dataset mnist --variants all --out runs/ablation
    python benchmarks/vaegan_ablation.py score --out runs/ablation --json runs/ablation/scores.json

`train` runs one variant per process (`--jobs N` at a time; on a GPU several share the card) and
writes run folders OUT/<dataset>/<variant>/; `score` draws 10,000 prior samples from every run
folder it finds and measures them with the dataset's domain classifier (`vaelab.metrics`), the
same way `vaelab evaluate` does, and prints the table in Markdown.

Every variant changes one thing against the row it names (`base`), so each row measures one
choice. Seconds per epoch are training only, as the run's history.csv records them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name -> (changes against its base, base). "old" is the previous default.
OLD = {"channels": [16, 32], "fc_dim": 128, "batch_norm": False, "project_norm": False,
       "spectral_norm": False, "margin": 0.35, "gamma": 0.1, "feature_loss": False,
       "fakes": "both", "dec_hidden": 0, "gen_prior": "normal"}
VARIANTS: dict[str, tuple[dict, str | None]] = {
    "old": (OLD, None),
    "wide": ({"channels": [64, 128], "fc_dim": 512}, "old"),
    "wide-bn": ({"batch_norm": True, "project_norm": True}, "wide"),
    "wide-bn-sn": ({"spectral_norm": True}, "wide-bn"),
    "wide-bn-sn-norule": ({"margin": None}, "wide-bn-sn"),
    "wide-bn-sn-norule-lr": ({"dec_lr_scale": 0.5, "dis_lr_scale": 0.5}, "wide-bn-sn-norule"),
    "wide-bn-sn-norule-g03": ({"gamma": 0.03}, "wide-bn-sn-norule"),
    "wide-bn-sn-norule-g3": ({"gamma": 0.3}, "wide-bn-sn-norule"),
    "wide-bn-sn-norule-feat": ({"feature_loss": True}, "wide-bn-sn-norule"),
    "wide-sn-norule": ({"batch_norm": False, "project_norm": False}, "wide-bn-sn-norule"),
    # round 2: around "wide" (the crispest MNIST digits by eye in round 1) and "wide-sn-norule"
    "wide-z16": ({"latent_dim": 16}, "wide"),
    "wide-z8": ({"latent_dim": 8}, "wide"),
    "wide-norule": ({"margin": None}, "wide"),
    "wide-g03": ({"gamma": 0.03}, "wide"),
    "wide-z16-ttur": ({"dis_lr_scale": 2.0, "dec_lr_scale": 0.5}, "wide-z16"),
    "wide-z16-feat": ({"feature_loss": True}, "wide-z16"),
    "wide-z16-bn": ({"batch_norm": True, "project_norm": True}, "wide-z16"),
    "mid-z16": ({"channels": [32, 64], "fc_dim": 256}, "wide-z16"),
    "wide-sn-z16": ({"latent_dim": 16}, "wide-sn-norule"),
    "wide-sn-z16-g03": ({"gamma": 0.03}, "wide-sn-z16"),
    # round 3: a quarter of the wide nets' multiply-adds (a CPU epoch ~4x shorter)
    "mid-z16-bn": ({"batch_norm": True, "project_norm": True}, "mid-z16"),
    "mid-z16-g03": ({"gamma": 0.03}, "mid-z16"),
    "mid-z16-bn-g03": ({"gamma": 0.03}, "mid-z16-bn"),
    "mid-z16-bn-norule": ({"margin": None}, "mid-z16-bn"),
    "mid-z16-bn-feat": ({"feature_loss": True}, "mid-z16-bn"),
    "mid-z32-bn": ({"latent_dim": 32}, "mid-z16-bn"),
    "mid-sn-z16-g03": ({"spectral_norm": True, "margin": None, "gamma": 0.03}, "mid-z16"),
    "mid-sn-z16-bn-g03": ({"batch_norm": True, "project_norm": True}, "mid-sn-z16-g03"),
    "mid-sn-z16-bn": ({"gamma": 0.1}, "mid-sn-z16-bn-g03"),
    "mid-z16-bn-ttur": ({"dis_lr_scale": 2.0, "dec_lr_scale": 0.5}, "mid-z16-bn"),
    # round 4: the adversarial game on prior samples only (docs/vae-gan.md, "Further attempts")
    "mid-z16-bn-g03-prior": ({"fakes": "prior"}, "mid-z16-bn-g03"),
    "mid-z16-bn-g03-prior-dh1024": ({"dec_hidden": 1024}, "mid-z16-bn-g03-prior"),
    # round 5: generation draws its codes from a Gaussian mixture fitted to the training codes;
    # training is the run above's, so `score --gen-prior mixture` on it measures this variant
    "mid-z16-bn-g03-prior-dh1024-mix": ({"gen_prior": "mixture"}, "mid-z16-bn-g03-prior-dh1024"),
}

# The variant the model's defaults are (tests/test_models.py checks they stay the same).
DEFAULT_VARIANT = "mid-z16-bn-g03-prior-dh1024-mix"


def variant_config(name: str) -> dict:
    changes, base = VARIANTS[name]
    return {**(variant_config(base) if base else {}), **changes}


def cmd_train(args) -> int:
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.one:
        return train_one(args)
    procs: list[subprocess.Popen] = []
    failed = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for name in names:
        while len([p for p in procs if p.poll() is None]) >= args.jobs:
            time.sleep(1)
        cmd = [sys.executable, __file__, "train", "--one", "--variants", name, "--dataset", args.dataset,
               "--epochs", str(args.epochs), "--out", args.out, "--device", args.device, "--seed", str(args.seed)]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        log = open(Path(args.out) / f"{args.dataset}-{name}.log", "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    for name, p in zip(names, procs):
        if p.wait() != 0:
            failed.append(name)
    print("trained:", ", ".join(n for n in names if n not in failed), "| failed:", ", ".join(failed) or "none")
    return 1 if failed else 0


def train_one(args) -> int:
    from vaelab.models import make_config
    from vaelab.train import TrainConfig, train

    name = args.variants
    cfg = make_config("vae-gan", **variant_config(name))
    tc = TrainConfig(dataset=args.dataset, epochs=args.epochs, device=args.device, seed=args.seed)
    run = Path(args.out) / args.dataset / name
    trainer = train("vae-gan", cfg, tc, run, overwrite=True, progress=False)
    last = [r for r in trainer.history if r["split"] == "test"][-1]
    print(name, "done", {k: round(float(v), 3) for k, v in last.items() if k not in ("split",)})
    return 0


def load_generator(run_dir: Path, device: str, gen_prior: str | None = None, data=None):
    """The run's model, or, from a folder holding only `decoder.safetensors` (what comes back from
    a remote machine), a model whose decoder has the trained weights: enough to sample.
    `gen_prior`: sample from that prior whatever the run's config says (as `vaelab config` would
    switch it); a run saved before the VAE-GAN fitted its mixture has it fitted here to `data`'s
    training codes, as the model's own end-of-epoch step fits it."""
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from vaelab.checkpoint import load_run, read_run_config
    from vaelab.models import build_model

    if (run_dir / "model.safetensors").exists():
        model = load_run(run_dir, device=device).model.eval()
        if gen_prior:
            model.config = dataclasses.replace(model.config, gen_prior=gen_prior)
            if gen_prior == "mixture" and model.absent_state:
                model.end_of_epoch(data.train_x.to(model.device))
                model.absent_state = ()
        return model
    cfg = read_run_config(run_dir)
    model = build_model(cfg["model"], cfg["model_config"], stored=True)
    weights = load_file(run_dir / "decoder.safetensors")
    model.decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in weights.items()})
    return model.to(torch.device(device)).eval()


def cmd_score(args) -> int:
    from vaelab.data import load
    from vaelab.evaluate import generate
    from vaelab.history_files import read_history
    from vaelab.metrics import load_or_train_classifier, sample_quality

    rows = []
    runs = sorted(p.parent for p in Path(args.out).glob("*/*/config.json"))
    datasets = {}
    for run_dir in runs:
        dataset = run_dir.parent.name
        if dataset not in datasets:
            data = load(dataset, quiet=True)
            clf, info = load_or_train_classifier(data, device=args.device, progress=True)
            datasets[dataset] = (data, clf, info)
        data, clf, info = datasets[dataset]
        if args.gen_prior == "codes":
            samples = decoded_training_codes(load_generator(run_dir, args.device), data, args.n)
        else:
            samples = generate(load_generator(run_dir, args.device, args.gen_prior, data), args.n, seed=0)
        quality = sample_quality(samples, data, clf, seed=0)
        test = [h for h in read_history(run_dir) if h["split"] == "test"]
        name = run_dir.name + ("-mix" if args.gen_prior == "mixture" and not run_dir.name.endswith("-mix") else "")
        name += "-codes" if args.gen_prior == "codes" else ""
        for variant, q in ((name, quality["samples"]), (FLOOR, quality["real_train"])):
            if variant == FLOOR and any(r["dataset"] == dataset and r["variant"] == FLOOR for r in rows):
                continue
            row = {"dataset": dataset, "variant": variant, "classifier_accuracy": info["test_accuracy"],
                   "test_recon": round(float(test[-1]["recon"]), 2) if variant != FLOOR else None,
                   **{k: v for k, v in q.items() if k != "class_histogram"}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print_table(rows)
    return 0


FLOOR = "real training images"


def decoded_training_codes(model, data, n: int):
    """The decoder's images of n random training images' codes, one draw z ~ q(z|x) each: the
    distribution of codes the decoder was trained on, with nothing estimated, so the best any
    generation prior of this decoder can do (`--gen-prior codes`)."""
    import torch

    from vaelab.inference import batched

    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.train_x), generator=g)[:n]
    z = model.codes(data.train_x[idx].to(model.device), torch.Generator(device=model.device).manual_seed(0))
    return batched(lambda c: torch.sigmoid(model.decode_logits(c)), z, batch_size=1000, model=model)


def print_table(rows: list[dict]) -> None:
    """The Markdown tables of docs/vae-gan.md, one per dataset, best confident share first."""
    for dataset in sorted({r["dataset"] for r in rows}, reverse=True):
        sub = sorted((r for r in rows if r["dataset"] == dataset), key=lambda r: -r["confident_share"])
        print(f"\n{dataset} (classifier test accuracy {sub[0]['classifier_accuracy']:.2%})\n")
        print("| variant | changes (against) | FD ↓ | KID ↓ | precision ↑ | recall ↑ | coverage ↑ | confident > 0.9 ↑ "
              "| test BCE |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in sub:
            changes, base = VARIANTS.get(r["variant"], ({}, None))
            what = ", ".join(f"{k}={v}" for k, v in changes.items()) if r["variant"] != "old" else "the previous default"
            what = f"{what} ({base})" if base else what
            bce = f"{r['test_recon']:.1f}" if r.get("test_recon") is not None else "—"
            coverage = f"{r['coverage']:.3f}" if r.get("coverage") is not None else "—"  # scored before it existed
            print(f"| {r['variant']} | {what if r['variant'] != FLOOR else '—'} | {r['fd']:.3f} | "
                  f"{r['kid']:.4f} ± {r['kid_std']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                  f"{coverage} | {r['confident_share']:.1%} | {bce} |")


def cmd_table(args) -> int:
    rows = [r for path in args.json for r in json.loads(Path(path).read_text())]
    print_table(rows)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--dataset", default="mnist")
    t.add_argument("--variants", default="all")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--out", default="runs/ablation")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--jobs", type=int, default=1)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    s = sub.add_parser("score")
    s.add_argument("--out", default="runs/ablation")
    s.add_argument("--n", type=int, default=10000)
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", default=None)
    s.add_argument("--gen-prior", choices=("normal", "mixture", "codes"), default=None,
                   help="sample from this prior whatever the run was trained with (mixture: fitted to its "
                        "training codes; codes: decode the codes of random training images themselves)")
    tb = sub.add_parser("table", help="print the tables of one or more score JSON files")
    tb.add_argument("json", nargs="+")
    args = p.parse_args()
    return {"train": cmd_train, "score": cmd_score, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
