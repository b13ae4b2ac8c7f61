"""The model contract: what the trainer hands a training step (a `Batch` with its labels, a
`StepState` that advances), conditions (refused by the unconditional models, used by a conditional
one), and the KL weight as a method a schedule overrides, in autograd and in the hand-derived step."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import nn

from vaelab import checkpoint as ckpt
from vaelab.batch import Batch, StepState
from vaelab.data import to_float
from vaelab.errors import ConfigError
from vaelab.models import MODELS, build_model, make_config
from vaelab.models.base import GenerativeModel
from vaelab.models.vae import VAE
from vaelab.models.vae_gan import VAEGAN
from vaelab.train import resume, train

from conftest import quick_config
from test_fast_step import autograd_twin
from test_models import CASES


def record_steps(monkeypatch, cls, interrupt_at: int | None = None) -> list[tuple[Batch, StepState]]:
    """Record the (batch, state) of every training step of `cls`; with `interrupt_at`, send SIGINT
    during that call (1-based), which the trainer turns into a save after the step."""
    calls, original, fired = [], cls.training_step, []

    def spy(self, batch, optimizers, state):
        calls.append((batch, state))
        if len(calls) == interrupt_at and not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, optimizers, state)

    monkeypatch.setattr(cls, "training_step", spy)
    return calls


def label_of_each_image(batch: Batch, data) -> torch.Tensor:
    """The dataset label of each batch image, found by its pixels (the synthetic images are noisy,
    so no two are alike)."""
    flat = data.train_x.reshape(len(data.train_x), -1).float() / 255
    return data.train_y[torch.cdist(batch.x.reshape(len(batch), -1), flat).argmin(1)]


def test_the_trainer_hands_each_step_its_labels_and_an_advancing_state(tmp_path, tiny_data, monkeypatch):
    calls = record_steps(monkeypatch, VAE)
    train("vae", make_config("vae", hidden_dims=[16]), quick_config(epochs=2, clip_grad=3.0), tmp_path / "run",
          progress=False, data=tiny_data)
    # 2 epochs of 256 images in batches of 64
    assert [s.step for _, s in calls] == list(range(8))
    assert [s.epoch for _, s in calls] == [1] * 4 + [2] * 4
    assert {(s.epochs, s.steps_per_epoch, s.total_steps, s.clip_grad) for _, s in calls} == {(2, 4, 8, 3.0)}
    assert [s.progress for _, s in calls] == [i / 8 for i in range(8)]
    for batch, _ in calls:
        assert batch.y is not None and torch.equal(batch.y, label_of_each_image(batch, tiny_data))
    epoch_labels = torch.cat([b.y for b, _ in calls[:4]])
    assert sorted(epoch_labels.tolist()) == sorted(tiny_data.train_y.tolist())  # each image once an epoch


def test_a_resumed_run_continues_the_step_count(tmp_path, tiny_data, monkeypatch):
    """Stopped after its 3rd step (inside epoch 1), a run resumes at step 3: no step counted twice
    or skipped, and the batches are those the uninterrupted run would have seen."""
    from vaelab.errors import TrainingInterrupted

    run, cfg = tmp_path / "run", quick_config(epochs=2)
    calls = record_steps(monkeypatch, VAE, interrupt_at=3)
    with pytest.raises(TrainingInterrupted):
        train("vae", make_config("vae", hidden_dims=[16]), cfg, run, progress=False, data=tiny_data)
    assert ckpt.load_checkpoint(run)["partial"]["batches_done"] == 3
    calls.clear()
    resume(run, progress=False, data=tiny_data)
    assert [(s.step, s.epoch) for _, s in calls] == [(3, 1), (4, 2), (5, 2), (6, 2), (7, 2)]

    straight = record_steps(monkeypatch, VAE)
    train("vae", make_config("vae", hidden_dims=[16]), cfg, tmp_path / "straight", progress=False, data=tiny_data)
    for (resumed, _), (expected, _) in zip(calls, straight[3:]):
        assert torch.equal(resumed.x, expected.x) and torch.equal(resumed.y, expected.y)


def small_model(case: str) -> GenerativeModel:
    name, cfg = CASES[case]
    torch.manual_seed(0)
    return build_model(name, cfg).eval()


@pytest.mark.parametrize("case", [c for c, (name, _) in CASES.items() if not MODELS[name].conditional])
def test_unconditional_models_refuse_a_condition_and_work_without_one(case):
    """Ignoring a condition would return unconditional images that look like an answer to it."""
    model = small_model(case)
    assert not model.conditional
    x, y, z = torch.rand(4, 1, 28, 28), torch.arange(4), torch.randn(4, model.latent_dim)
    calls = {"encode": lambda c: model.encode(x, c), "decode_logits": lambda c: model.decode_logits(z, c),
             "decode": lambda c: model.decode(z, c), "latent": lambda c: model.latent(x, condition=c),
             "sample": lambda c: model.sample(4, condition=c), "reconstruct": lambda c: model.reconstruct(x, c)}
    for what, call in calls.items():
        with pytest.raises(ConfigError, match=f"model {model.name} is unconditional: it takes no condition"):
            call(y)
        assert call(None) is not None, what
    assert model.sample(4).shape == model.reconstruct(x).shape == (4, 1, 28, 28)


class LabelledVAE(VAE):
    """A conditional VAE in one small class: the decoder sees z plus a learned embedding of the
    label. The trainer needs no change to train it: the labels arrive in the Batch."""

    conditional = True

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(10, config.latent_dim)

    def encode(self, x, condition=None):
        return super().encode(x)  # q(z | x), whatever the label

    def decode_logits(self, z, condition=None):
        if condition is None:
            raise ConfigError("labelled-vae decodes a class: pass condition= (B,) labels")
        return super().decode_logits(z + self.embed(condition))


def registered(monkeypatch, name: str, cls: type) -> type:
    """`cls` in the registry as `name` for this test only (test_models checks the registry's list)."""
    monkeypatch.setattr(cls, "name", name)
    monkeypatch.setitem(MODELS, name, cls)
    return cls


@pytest.fixture
def labelled_vae(monkeypatch):
    return registered(monkeypatch, "labelled-vae", LabelledVAE)


def test_a_conditional_model_trains_on_the_batch_labels_and_samples_per_class(tmp_path, tiny_data, labelled_vae):
    torch.manual_seed(0)
    fresh = build_model("labelled-vae", make_config("vae", hidden_dims=[16]))
    trainer = train("labelled-vae", make_config("vae", hidden_dims=[16]), quick_config(), tmp_path / "run",
                    progress=False, data=tiny_data)
    model = trainer.model.eval()
    # The embedding only trains if the labels reached the decoder in every step's loss.
    assert not torch.equal(model.embed.weight, fresh.embed.weight)
    classes = torch.arange(10)
    gen = torch.Generator().manual_seed(1)
    per_class = model.sample(10, generator=gen, condition=classes)
    assert per_class.shape == (10, 1, 28, 28)
    # the condition changes the image decoded from the same code
    z = torch.zeros(2, model.latent_dim)
    two = model.decode(z, torch.tensor([0, 1]))
    assert not torch.equal(two[0], two[1])
    assert model.reconstruct(to_float(tiny_data.test_x[:3]), condition=tiny_data.test_y[:3]).shape == (3, 1, 28, 28)
    with pytest.raises(ConfigError, match="pass condition="):
        model.sample(3)
    # The run folder rebuilds it, and the evaluation saw the test labels (it would have raised).
    assert {r["split"] for r in trainer.history} == {"train", "test"}
    reloaded = ckpt.load_run(tmp_path / "run").model
    torch.testing.assert_close(reloaded.decode(z, classes[:2]), model.decode(z, classes[:2]))


# --- the KL weight ---------------------------------------------------------------------------------

WARMUP_STEPS = 8


class WarmupVAE(VAE):
    """A linear KL warm-up: the weight rises from 0 to beta over the first WARMUP_STEPS steps;
    outside training (state None) the loss is the objective trained towards."""

    def kl_weight(self, state):
        beta = super().kl_weight(state)
        return beta if state is None else beta * min(1.0, state.step / WARMUP_STEPS)


def test_a_warmup_subclass_weighs_the_kl_term_by_the_step():
    torch.manual_seed(0)
    model = WarmupVAE(make_config("vae", hidden_dims=[24], latent_dim=3, beta=2.0))
    batch = Batch(torch.rand(16, 1, 28, 28))
    for step, weight in [(0, 0.0), (2, 0.5), (4, 1.0), (8, 2.0), (100, 2.0), (None, 2.0)]:
        state = None if step is None else StepState(step=step, steps_per_epoch=10)
        assert model.kl_weight(state) == weight
        torch.manual_seed(1)
        out = model(batch, state)
        torch.testing.assert_close(out.loss, out.terms["recon"] + weight * out.terms["kl"], rtol=1e-6, atol=0)
        assert out.terms["kl"] > 1e-3  # so a wrong weight would show
    # At step 0 the KL term has no gradient: the gradients are the reconstruction's alone.
    torch.manual_seed(1)
    warm = torch.autograd.grad(model(batch, StepState(step=0)).loss, list(model.parameters()))
    torch.manual_seed(1)
    recon_only = torch.autograd.grad(_recon(model, batch), list(model.parameters()))
    torch.manual_seed(1)
    full = torch.autograd.grad(model(batch, None).loss, list(model.parameters()))
    for a, b, c in zip(warm, recon_only, full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert max(float((a - c).abs().max()) for a, c in zip(warm, full)) > 1e-3  # KL's gradient is not nil


def _recon(model: VAE, batch: Batch) -> torch.Tensor:
    """The reconstruction term alone, drawn with the same noise as `forward` (seed set by the caller)."""
    from vaelab.losses import bce_from_logits, reparameterize

    post = model.encode(batch.x)
    return bce_from_logits(model.decode_logits(reparameterize(post.mu, post.logvar)), batch.x).mean()


def test_a_warmup_subclass_trains_by_autograd_exactly_with_the_weight_of_each_step():
    """The hand-derived step was derived for VAE itself: the subclass falls back to autograd, which
    Adam on a copy whose config.beta is set to each step's weight reproduces bit for bit; and the
    warm-up changes training (a copy trained with the constant beta ends elsewhere)."""
    torch.manual_seed(0)
    model = WarmupVAE(make_config("vae", hidden_dims=[24], latent_dim=3))
    opts = model.configure_optimizers(1e-2)
    assert model._derivation is None
    twin, twin_opts = autograd_twin(VAE(make_config("vae", hidden_dims=[24], latent_dim=3)))
    twin.load_state_dict(model.state_dict())
    constant, constant_opts = autograd_twin(twin)
    for step in range(5):
        batch, state = Batch(torch.rand(40, 1, 28, 28)), StepState(step=step, steps_per_epoch=5)
        torch.manual_seed(step)
        out = model.training_step(batch, opts, state)
        assert all(p.grad is not None for p in model.parameters())  # autograd's step, not the hand one
        twin.config.beta = step / WARMUP_STEPS
        torch.manual_seed(step)
        ref = GenerativeModel.training_step(twin, batch, twin_opts, state)
        torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
        torch.manual_seed(step)
        GenerativeModel.training_step(constant, batch, constant_opts, state)
    for (name, p), q, c in zip(model.named_parameters(), twin.parameters(), constant.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"{name} after 5 steps")
    assert max(float((p - c).detach().abs().max()) for p, c in zip(model.parameters(), constant.parameters())) > 1e-3


def test_the_hand_step_uses_the_kl_weight_it_is_given():
    """On VAE itself the hand-derived step is taken with the model's `kl_weight(state)`: a weight
    set on the instance (here a warm-up) is honoured, matching autograd to rounding, and differs
    from training with the constant beta by far more than that."""
    torch.manual_seed(0)
    model = build_model("vae", make_config("vae", hidden_dims=[24], latent_dim=3))
    constant, constant_opts = autograd_twin(model)
    model.kl_weight = lambda state: 1.0 if state is None else min(1.0, state.step / WARMUP_STEPS)
    twin, twin_opts = autograd_twin(model)  # copies the instance's kl_weight
    opts = model.configure_optimizers(1e-2)
    assert model._derivation is not None
    for step in range(5):
        batch, state = Batch(torch.rand(40, 1, 28, 28)), StepState(step=step, steps_per_epoch=5)
        for m, o, take in ((model, opts, VAE.training_step), (twin, twin_opts, GenerativeModel.training_step),
                           (constant, constant_opts, GenerativeModel.training_step)):
            torch.manual_seed(step)
            take(m, batch, o, state)
    assert all(p.grad is None for p in model.parameters())  # the hand step ran
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=f"{name} after 5 steps")
    assert max(float((p - c).detach().abs().max()) for p, c in zip(model.parameters(), constant.parameters())) > 1e-3


@pytest.fixture
def warmup_vae(monkeypatch):
    return registered(monkeypatch, "warmup-vae", WarmupVAE)


def test_the_trainers_steps_reach_kl_weight(tmp_path, tiny_data, warmup_vae):
    """Each logged step's loss is recon + (its step's weight) * KL; the evaluation's is the full
    objective (state None)."""
    trainer = train("warmup-vae", make_config("vae", hidden_dims=[16]), quick_config(epochs=2), tmp_path / "run",
                    progress=False, data=tiny_data)
    step, loss, recon, kl = trainer.steps[:, 0], trainer.steps[:, 2], trainer.steps[:, 3], trainer.steps[:, 4]
    assert step.tolist() == list(range(1, 9))  # steps.csv counts from 1: state.step is one less
    weight = ((step - 1) / WARMUP_STEPS).clamp(max=1.0)
    # The KL part of each loss, to float32 rounding at a loss of ~550 ...
    torch.testing.assert_close(loss - recon, weight * kl, rtol=0, atol=2e-4)
    assert float(kl[0]) > 20 * 2e-4  # ... where a wrong weight (1 at step 0, say) would show
    test = [r for r in trainer.history if r["split"] == "test"]
    assert all(r["loss"] == pytest.approx(r["recon"] + r["kl"], rel=1e-6) for r in test)


def test_the_vae_gans_encoder_loss_uses_kl_weight():
    class HalfKL(VAEGAN):
        def kl_weight(self, state):
            return 0.5

    _, cfg = CASES["vae-gan-mlp"]
    cfg = dict(cfg, feature_loss=False)
    batch = Batch(torch.rand(8, 1, 28, 28))
    for cls, weight in ((VAEGAN, 1.0), (HalfKL, 0.5)):
        torch.manual_seed(0)
        model = cls(make_config("vae-gan", **cfg))
        torch.manual_seed(1)
        t = model.losses(batch, StepState())
        assert model.kl_weight(StepState()) == weight
        torch.testing.assert_close(t["enc_loss"], weight * t["kl"] + model.config.pixel_weight * t["recon"])
