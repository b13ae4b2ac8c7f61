"""A per-epoch probe of one VAE-GAN configuration: train it with the model's own training step
and, after every epoch, decode 5,000 fixed prior samples and report the share the domain
classifier assigns to one class with probability above 0.9, with the class histogram, and the
same share for the reconstructions of 5,000 test images (from their posterior means); with
`--ema D` the same for an exponential moving average (decay D) of the decoder's weights.

    python benchmarks/vaegan_probe.py NAME [--cfg '{"latent_dim": 8}'] [--lr 2e-4] [--ema 0.999]

Cheaper than `vaegan_ablation.py` (no run folder, no test pass) and it shows the trajectory, so
a variant can be stopped early; docs/vae-gan.md ("Further attempts") lists what it measured.
Writes OUT/NAME.log (one line per epoch), and at the end NAME.pt (the model's weights) and
NAME.png (100 of the scored samples).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from vaelab.batch import Batch, StepState
from vaelab.data import load, to_float
from vaelab.metrics import classify, load_or_train_classifier
from vaelab.models import build_model, make_config
from vaelab.plots import save_image_grid


def confident_share(decoder: torch.nn.Module, clf, z: torch.Tensor) -> tuple[float, list[int]]:
    was_training = decoder.training
    decoder.eval()
    with torch.no_grad():
        images = torch.sigmoid(decoder(z))
    decoder.train(was_training)
    _, probs = classify(clf, images)
    return float((probs.max(1).values > 0.9).float().mean()), torch.bincount(probs.argmax(1), minlength=10).tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("--cfg", default="{}", help="VAE-GAN config overrides as JSON")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", type=float, default=None, help="also score a moving average of the decoder")
    p.add_argument("--decay", choices=("none", "linear", "cosine"), default="none",
                   help="every learning rate falls from its start to 0 over the run")
    p.add_argument("--real-label", type=float, default=1.0,
                   help="the discriminator's target for real images (0.9: one-sided label smoothing, "
                        "Salimans et al. 2016); an experiment, not a model option")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/probe")
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only (a smoke test)")
    a = p.parse_args()

    if a.real_label != 1.0:
        import torch.nn.functional as F
        import vaelab.models.vae_gan as vae_gan_module

        def smoothed(real_logits, fake_logits):
            real = F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, a.real_label))
            return real + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        vae_gan_module.discriminator_loss = smoothed
    torch.manual_seed(a.seed)
    data = load(a.dataset, quiet=True)
    clf, _ = load_or_train_classifier(data, device=a.device)
    model = build_model("vae-gan", make_config("vae-gan", **json.loads(a.cfg))).to(a.device)
    optimizers = model.configure_optimizers(a.lr)
    start_lrs = {name: [g["lr"] for g in o.param_groups] for name, o in optimizers.items()}
    ema = copy.deepcopy(model.decoder).requires_grad_(False) if a.ema else None
    x_train, x_test = to_float(data.train_x[: a.limit]).to(a.device), to_float(data.test_x[:5000]).to(a.device)
    z = torch.randn(5000, model.config.latent_dim, generator=torch.Generator().manual_seed(1)).to(a.device)
    order = torch.Generator().manual_seed(a.seed)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    log = open(Path(a.out) / f"{a.name}.log", "w")
    steps_per_epoch, step = len(x_train) // a.batch, 0
    for epoch in range(1, a.epochs + 1):
        start, perm, terms = time.time(), torch.randperm(len(x_train), generator=order), []
        for i in range(0, len(x_train) - a.batch + 1, a.batch):
            state = StepState(step=step, epoch=epoch, epochs=a.epochs, steps_per_epoch=steps_per_epoch)
            if a.decay != "none":
                done = step / (steps_per_epoch * a.epochs)
                factor = 1 - done if a.decay == "linear" else 0.5 * (1 + math.cos(math.pi * done))
                for name, o in optimizers.items():
                    for g, lr0 in zip(o.param_groups, start_lrs[name]):
                        g["lr"] = lr0 * factor
            out = model.training_step(Batch(x_train[perm[i : i + a.batch].to(a.device)]), optimizers, state)
            step += 1
            if ema is not None:
                with torch.no_grad():
                    for e, m in zip(ema.state_dict().values(), model.decoder.state_dict().values()):
                        e.lerp_(m, 1 - a.ema) if e.dtype.is_floating_point else e.copy_(m)
            if i % (50 * a.batch) == 0:  # every 50th step's terms sample the epoch
                terms.append({k: float(v) for k, v in out.terms.items()})
        seconds = time.time() - start
        share, hist = confident_share(model.decoder, clf, z)
        model.eval()
        with torch.no_grad():
            codes = model.encoder(x_test)[0]  # posterior means of the first 5,000 test images
        model.train()
        recon_share, _ = confident_share(model.decoder, clf, codes)
        mean = {k: sum(t[k] for t in terms) / len(terms) for k in ("kl", "recon")}
        line = (f"{a.name} epoch {epoch} {seconds:.0f}s confident={share:.3f} classes={hist} "
                f"train kl={mean['kl']:.1f} recon={mean['recon']:.1f} reconstructions confident={recon_share:.3f}")
        if ema is not None:
            share_e, hist_e = confident_share(ema, clf, z)
            line += f" | ema confident={share_e:.3f} classes={hist_e}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()
    # The last epoch's weights and 100 of the scored samples, to look at and score further.
    torch.save(model.state_dict(), Path(a.out) / f"{a.name}.pt")
    model.decoder.eval()
    with torch.no_grad():
        save_image_grid(torch.sigmoid(model.decoder(z[:100])), Path(a.out) / f"{a.name}.png")


if __name__ == "__main__":
    main()
