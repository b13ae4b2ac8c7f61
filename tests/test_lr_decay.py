"""The learning-rate decay (`--lr-decay`): epoch e trains at lr * lr_decay^(e-1) in every
optimizer, a resumed run trains at the rates of a straight one, and runs saved before the option
existed load and continue as they were trained (at a constant rate)."""

import json

import pytest
import torch

from vaelab import checkpoint as ckpt
from vaelab.cli import main
from vaelab.errors import ConfigError, TrainingInterrupted
from vaelab.models import get_model_class, make_config
from vaelab.train import resume, train
from vaelab.train_config import TrainConfig

from conftest import quick_config
from test_models import CASES


def record_rates(monkeypatch, name: str, interrupt_at: int | None = None) -> list[dict[str, list[float]]]:
    """Every optimizer's rates at each training step of model `name` (what the step's update
    reads); with `interrupt_at`, SIGINT during that call (1-based), as test_contract's spy does."""
    import os
    import signal

    cls = get_model_class(name)
    original, rates = cls.training_step, []

    def spy(self, batch, optimizers, state):
        rates.append({k: [g["lr"] for g in opt.param_groups] for k, opt in optimizers.items()})
        if len(rates) == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, optimizers, state)

    monkeypatch.setattr(cls, "training_step", spy)
    return rates


@pytest.mark.parametrize("name,fields", [("vae", {"hidden_dims": [16]}),
                                         ("vae-gan", {**CASES["vae-gan-mlp"][1], "dis_lr_scale": 0.5})],
                         ids=["vae", "vae-gan-three-optimizers"])
def test_epoch_e_trains_at_lr_times_decay_to_the_e_minus_1(tmp_path, tiny_data, monkeypatch, name, fields):
    rates = record_rates(monkeypatch, name)
    train(name, make_config(name, **fields), quick_config(epochs=3, lr=0.01, lr_decay=0.5), tmp_path / "run",
          progress=False, data=tiny_data)
    assert len(rates) == 12  # 3 epochs of 4 steps
    scales = {"model": 1.0} if name == "vae" else {"encoder": 1.0, "decoder": 1.0, "discriminator": 0.5}
    for step, seen in enumerate(rates):
        epoch = step // 4 + 1
        assert seen == {k: [0.01 * s * 0.5 ** (epoch - 1)] for k, s in scales.items()}, f"step {step}"


def test_without_decay_the_rate_stays_the_configured_one(tmp_path, tiny_data, monkeypatch):
    rates = record_rates(monkeypatch, "vae")
    train("vae", make_config("vae", hidden_dims=[16]), quick_config(epochs=2, lr=0.01), tmp_path / "run",
          progress=False, data=tiny_data)
    assert rates == [{"model": [0.01]}] * 8


@pytest.mark.parametrize("activation", ["relu", "tanh"])  # the hand-derived step and autograd's
def test_a_decaying_run_interrupted_mid_epoch_resumes_to_the_straight_runs_weights(tmp_path, tiny_data,
                                                                                   monkeypatch, activation):
    """Interrupted in epoch 2 (after step 6 of 12), resumed, then extended by a fourth epoch: the
    weights and steps of the run trained straight for 4 epochs, bit for bit; the rates of every
    step are the straight run's; and the decay matters (a constant-rate run ends elsewhere)."""
    cfg = make_config("vae", hidden_dims=[16], activation=activation)
    train_cfg = quick_config(epochs=3, lr=0.01, lr_decay=0.5)
    straight_rates = record_rates(monkeypatch, "vae")
    straight = train("vae", cfg, quick_config(epochs=4, lr=0.01, lr_decay=0.5), tmp_path / "straight",
                     progress=False, data=tiny_data)
    monkeypatch.undo()
    rates = record_rates(monkeypatch, "vae", interrupt_at=6)
    with pytest.raises(TrainingInterrupted, match="in epoch 2 after 2/4 batches"):
        train("vae", cfg, train_cfg, tmp_path / "run", progress=False, data=tiny_data)
    resume(tmp_path / "run", progress=False, data=tiny_data)
    resumed = resume(tmp_path / "run", epochs=4, progress=False, data=tiny_data)
    assert rates == straight_rates
    for (key, a), b in zip(resumed.model.state_dict().items(), straight.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert torch.equal(resumed.steps, straight.steps)
    monkeypatch.undo()
    constant = train("vae", cfg, quick_config(epochs=4, lr=0.01), tmp_path / "constant", progress=False,
                     data=tiny_data)
    assert not torch.equal(constant.steps, straight.steps)


def test_a_run_saved_before_lr_decay_and_activation_existed_loads_and_continues_as_trained(tmp_path, tiny_data,
                                                                                    monkeypatch):
    cfg = make_config("vae", hidden_dims=[16])
    straight = train("vae", cfg, quick_config(epochs=2, lr=0.01), tmp_path / "straight", progress=False,
                     data=tiny_data)
    old = tmp_path / "old"
    train("vae", cfg, quick_config(epochs=1, lr=0.01), old, progress=False, data=tiny_data)
    stored = json.loads((old / "config.json").read_text())
    del stored["train"]["lr_decay"]  # as an older vaelab wrote it, and without the MLP's activation
    del stored["model_config"]["activation"]
    (old / "config.json").write_text(json.dumps(stored))
    spec = ckpt.parse_spec(stored, old / "config.json")
    assert spec.train.lr_decay == 1.0 and spec.model_config.activation == "relu"
    assert ckpt.load_run(old).train_config.lr_decay == 1.0
    rates = record_rates(monkeypatch, "vae")
    resumed = resume(old, epochs=2, progress=False, data=tiny_data)
    assert rates == [{"model": [0.01]}] * 4
    for (key, a), b in zip(resumed.model.state_dict().items(), straight.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_lr_decay_is_checked_and_a_flag(tmp_path, capsys):
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match=r"lr-decay must be in \(0, 1\]"):
            TrainConfig(lr_decay=bad).validate()
    assert main(["train", "vae", "--lr-decay", "2", "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "lr-decay must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
