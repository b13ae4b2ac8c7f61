import pytest
import torch

from vaelab.batch import Batch, StepState
from vaelab.config import apply_overrides
from vaelab.errors import ConfigError
from vaelab.models import MODELS, build_model, make_config


def test_registry_lists_vae():
    assert "vae" in MODELS
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("nope")


def test_default_architecture_is_784_512_2():
    model = build_model("vae")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    shapes = [(m.in_features, m.out_features) for m in linears]
    assert shapes == [(784, 512), (512, 2), (512, 2), (2, 512), (512, 784)]


def test_forward_shapes_and_terms():
    torch.manual_seed(0)
    model = build_model("vae", {"latent_dim": 3, "hidden_dims": [64, 32]})
    x = torch.rand(5, 1, 28, 28)
    out = model(Batch(x))
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert list(out.terms) == ["recon", "kl"]
    torch.testing.assert_close(out.loss, out.terms["recon"] + out.terms["kl"])
    assert model.encode(x).mu.shape == (5, 3)
    assert model.decode(torch.randn(4, 3)).shape == (4, 1, 28, 28)
    s = model.sample(7)
    assert s.shape == (7, 1, 28, 28) and 0 <= s.min() and s.max() <= 1
    assert model.reconstruct(x).shape == x.shape
    assert model.interpolate(x[:1], x[1:2], steps=6).shape == (6, 1, 28, 28)


def test_loss_falls_on_a_tiny_problem(tiny_data):
    torch.manual_seed(0)
    model = build_model("vae", {"hidden_dims": [128]})
    opts = model.configure_optimizers(lr=3e-3)
    x = tiny_data.train_x[:128].unsqueeze(1).float() / 255
    first = model(Batch(x)).loss.item()
    for step in range(60):
        model.training_step(Batch(x), opts, StepState(step=step, steps_per_epoch=60))
    assert model(Batch(x)).loss.item() < 0.7 * first


def test_training_step_changes_every_weight():
    torch.manual_seed(0)
    model = build_model("vae", {"hidden_dims": [32]})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.training_step(Batch(torch.rand(8, 1, 28, 28)), model.configure_optimizers(1e-3), StepState())
    for k, v in model.state_dict().items():
        assert not torch.equal(before[k], v), k


def test_set_overrides_are_parsed_and_type_checked():
    cfg = make_config("vae", ["hidden_dims=[400]", "beta=2"], latent_dim=20)
    assert cfg.hidden_dims == [400] and cfg.beta == 2.0 and cfg.latent_dim == 20
    with pytest.raises(ConfigError, match="unknown field"):
        make_config("vae", ["width=3"])
    with pytest.raises(ConfigError, match="expected"):
        make_config("vae", ["hidden_dims=abc"])
    with pytest.raises(ConfigError, match="latent_dim must be at least 1"):
        make_config("vae", latent_dim=0)
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(make_config("vae"), ["novalue"])
