import csv

import pytest
import torch

from vaelab import checkpoint as ckpt
from vaelab.errors import CheckpointError, ConfigError, DivergenceError, RunExistsError
from vaelab.models import make_config
from vaelab.train import resume, train

from conftest import quick_config


def test_train_writes_a_complete_run_folder(tmp_path, tiny_data):
    run = tmp_path / "run"
    trainer = train("vae", make_config("vae", hidden_dims=[32]), quick_config(epochs=2), run,
                    progress=False, data=tiny_data)
    for name in ("config.json", "model.safetensors", "checkpoint.safetensors", "history.csv", "steps.csv"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [(r["epoch"], r["split"]) for r in rows] == [("1", "train"), ("1", "test"), ("2", "train"), ("2", "test")]
    assert list(rows[0]) == ["epoch", "split", "loss", "recon", "kl", "seconds"]
    steps = (run / "steps.csv").read_text().splitlines()
    assert steps[0] == "step,epoch,loss,recon,kl" and len(steps) == 1 + 2 * 4
    assert trainer.step == 8


def test_run_folder_reloads_to_identical_outputs(tmp_path, tiny_data):
    run = tmp_path / "run"
    trainer = train("vae", make_config("vae", hidden_dims=[32], latent_dim=4), quick_config(epochs=1), run,
                    progress=False, data=tiny_data)
    loaded = ckpt.load_run(run).model
    live = trainer.model.eval()
    x = tiny_data.test_x[:10].unsqueeze(1).float() / 255
    z = torch.randn(6, 4)
    torch.testing.assert_close(loaded.decode(z), live.decode(z), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode(x).logvar, live.encode(x).logvar, rtol=0, atol=0)


def test_same_seed_same_numbers(tmp_path, tiny_data):
    cfg = make_config("vae", hidden_dims=[32])
    a = train("vae", cfg, quick_config(epochs=2, seed=7), tmp_path / "a", progress=False, data=tiny_data)
    b = train("vae", cfg, quick_config(epochs=2, seed=7), tmp_path / "b", progress=False, data=tiny_data)
    c = train("vae", cfg, quick_config(epochs=2, seed=8), tmp_path / "c", progress=False, data=tiny_data)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert strip(a.history) != strip(c.history)


def test_existing_run_folder_is_never_overwritten_silently(tmp_path, tiny_data):
    run = tmp_path / "run"
    train("vae", make_config("vae", hidden_dims=[16]), quick_config(epochs=1), run, progress=False, data=tiny_data)
    before = (run / "model.safetensors").read_bytes()
    with pytest.raises(RunExistsError, match="already exists"):
        train("vae", make_config("vae", hidden_dims=[16]), quick_config(epochs=1), run, progress=False, data=tiny_data)
    assert (run / "model.safetensors").read_bytes() == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    with pytest.raises(RunExistsError, match="not a vaelab run folder"):
        train("vae", make_config("vae"), quick_config(epochs=1), other, overwrite=True, progress=False, data=tiny_data)
    assert (other / "thesis.txt").read_text() == "precious"


def test_resume_extends_a_finished_run(tmp_path, tiny_data):
    cfg = make_config("vae", hidden_dims=[32])
    straight = train("vae", cfg, quick_config(epochs=3), tmp_path / "straight", progress=False, data=tiny_data)
    train("vae", cfg, quick_config(epochs=2), tmp_path / "split", progress=False, data=tiny_data)
    resumed = resume(tmp_path / "split", epochs=3, progress=False, data=tiny_data)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert (tmp_path / "split" / "steps.csv").read_text() == (tmp_path / "straight" / "steps.csv").read_text()
    with pytest.raises(ConfigError, match="already finished"):
        resume(tmp_path / "split", progress=False, data=tiny_data)


def test_divergence_stops_with_epoch_and_step(tmp_path, tiny_data):
    with pytest.raises(DivergenceError, match=r"training diverged at epoch 1, step \d+: .* is (nan|inf)"):
        train("vae", make_config("vae", hidden_dims=[32]), quick_config(lr=1e12), tmp_path / "run",
              progress=False, data=tiny_data)


def test_load_run_errors_are_one_line(tmp_path, tiny_data):
    with pytest.raises(CheckpointError, match="no such run folder"):
        ckpt.load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a vaelab run folder"):
        ckpt.load_run(tmp_path / "empty")
    run = tmp_path / "run"
    train("vae", make_config("vae", hidden_dims=[16]), quick_config(epochs=1), run, progress=False, data=tiny_data)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ckpt.load_run(run)


def test_a_signal_during_the_last_step_of_the_run_just_finishes(tmp_path, tiny_data, monkeypatch):
    """Ctrl-C on the final batch: the run is complete and saved, so there is nothing to resume."""
    import os
    import signal

    from vaelab.models import get_model_class

    cls = get_model_class("vae")
    original = cls.training_step
    calls = {"n": 0}

    def step_then_interrupt(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 8:  # 2 epochs x 4 batches: the very last step
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(cls, "training_step", step_then_interrupt)
    trainer = train("vae", make_config("vae", hidden_dims=[16]), quick_config(epochs=2), tmp_path / "run",
                    progress=False, data=tiny_data)
    assert trainer.epoch == 2 and ckpt.load_checkpoint(tmp_path / "run")["partial"] is None


@pytest.mark.parametrize("binarize", ["none", "dynamic"])
def test_a_run_interrupted_mid_epoch_resumes_to_the_weights_of_a_straight_run(tmp_path, tiny_data, monkeypatch,
                                                                               binarize):
    """Ctrl-C after step 3 of 4, twice (epochs 1 and 2), then resumed each time: bit-identical
    weights, optimizer state, history and steps to the same run trained straight, with dynamic
    binarization (a draw per batch from the batcher's generator) as well."""
    import os
    import signal

    from vaelab.history_files import read_history
    from vaelab.models import get_model_class
    from vaelab.errors import TrainingInterrupted

    cfg, model_config = quick_config(epochs=2, binarize=binarize), make_config("vae", hidden_dims=[16])
    straight = train("vae", model_config, cfg, tmp_path / "straight", progress=False, data=tiny_data)

    cls = get_model_class("vae")
    original, calls = cls.training_step, {"n": 0}

    def step_then_interrupt(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(cls, "training_step", step_then_interrupt)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="in epoch 1 after 3/4 batches"):
        train("vae", model_config, cfg, run, progress=False, data=tiny_data)
    calls["n"] = 0
    with pytest.raises(TrainingInterrupted, match="in epoch 2 after 2/4 batches"):
        resume(run, progress=False, data=tiny_data)  # step 3 of this process: batch 2 of epoch 2
    calls["n"] = -10
    resumed = resume(run, progress=False, data=tiny_data)

    for (name, a), b in zip(resumed.model.state_dict().items(), straight.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    a, b = ckpt.load_checkpoint(run), ckpt.load_checkpoint(tmp_path / "straight")
    assert (a["epoch"], a["step"], a["partial"]) == (b["epoch"], b["step"], None) == (2, 8, None)
    for x, y in zip(a["optimizers"]["model"]["state"].values(), b["optimizers"]["model"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in y)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_history(run)) == strip(read_history(tmp_path / "straight"))
    assert (run / "steps.csv").read_text() == (tmp_path / "straight" / "steps.csv").read_text()


def test_a_resumed_convolutional_run_ends_with_the_weights_of_a_straight_run(tmp_path, tiny_data):
    # Convolution weights train channels-last; Adam's moments come back from a checkpoint
    # contiguous, and fused Adam pairs parameters and moments as flat memory: their layouts must
    # be matched again on resume (train.match_state_layout), or each weight gets another's moments.
    cfg = make_config("vae-gan", arch="conv", channels=[4, 4], fc_dim=16, dec_hidden=0, latent_dim=2)
    straight = train("vae-gan", cfg, quick_config(epochs=2), tmp_path / "straight", progress=False, data=tiny_data)
    train("vae-gan", cfg, quick_config(epochs=1), tmp_path / "split", progress=False, data=tiny_data)
    resumed = resume(tmp_path / "split", epochs=2, progress=False, data=tiny_data)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def plain_adam(monkeypatch) -> None:
    """Every model's optimizers as vaelab made them before PackedAdam: torch.optim.Adam, fused."""
    from vaelab.models.base import GenerativeModel
    from vaelab.models.vae_gan import VAEGAN

    def as_adam(configure):
        def configure_optimizers(self, lr):
            return {name: torch.optim.Adam(opt.param_groups[0]["params"], lr=opt.param_groups[0]["lr"],
                                           betas=opt.param_groups[0]["betas"], fused=True)
                    for name, opt in configure(self, lr).items()}
        return configure_optimizers

    monkeypatch.setattr(GenerativeModel, "configure_optimizers", as_adam(GenerativeModel.configure_optimizers))
    monkeypatch.setattr(VAEGAN, "configure_optimizers", as_adam(VAEGAN.configure_optimizers))


@pytest.mark.parametrize("name, fields", [("ae", dict(hidden_dims=[16], latent_dim=2)),
                                          ("vae-gan", dict(arch="mlp", hidden_dims=[16], latent_dim=2))])
def test_a_run_saved_with_torch_adam_resumes_with_packed_adam_as_it_would_have_trained(tmp_path, tiny_data,
                                                                                       monkeypatch, name, fields):
    """Run folders of earlier versions hold torch.optim.Adam's state; PackedAdam loads it and its
    step is Adam's arithmetic, so the resumed run ends bit for bit where Adam would have taken it."""
    cfg = make_config(name, **fields)
    with monkeypatch.context() as m:
        plain_adam(m)
        straight = train(name, cfg, quick_config(epochs=2), tmp_path / "straight", progress=False, data=tiny_data)
        train(name, cfg, quick_config(epochs=1), tmp_path / "old", progress=False, data=tiny_data)
        assert all(type(o) is torch.optim.Adam for o in straight.optimizers.values())
    resumed = resume(tmp_path / "old", epochs=2, progress=False, data=tiny_data)
    assert all(type(o).__name__ == "PackedAdam" for o in resumed.optimizers.values())
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_after_an_agreed_data_parallel_stop_sigterm_no_longer_ends_the_process():
    """torchrun ends the other processes with SIGTERM once the first exits: a process that has
    agreed to stop ignores it from then on, so process 0 lives to say where it saved; any other
    stop gives the caller's handler back."""
    import signal

    from vaelab.signals import stop_on_signals

    def callers(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, callers)
    try:
        with stop_on_signals() as flag:
            assert signal.getsignal(signal.SIGTERM) is not callers
        assert signal.getsignal(signal.SIGTERM) is callers
        with stop_on_signals() as flag:
            flag["outlive_sigterm"] = True
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
