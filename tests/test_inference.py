"""The one batched-inference helper, against the same function applied to the whole input at once."""

import pytest
import torch
from torch import nn

from vaelab.inference import batched


class Counting(nn.Module):
    """A model with dropout (train and eval differ) that records what each call saw."""

    def __init__(self):
        super().__init__()
        self.layer, self.drop = nn.Linear(3, 2), nn.Dropout(0.5)
        self.calls = []

    def forward(self, x):
        self.calls.append((len(x), self.training, torch.is_grad_enabled()))
        return self.drop(self.layer(x))


def test_chunks_concatenate_to_the_whole_computation_in_eval_mode_without_gradients():
    model, x = Counting(), torch.randn(25, 3)
    whole = model.eval()(x).detach()
    model.train()
    model.calls.clear()
    out = batched(model, x, batch_size=10, model=model)
    # equal up to rounding: a BLAS may sum a 10-row and a 25-row multiply differently (it did on
    # a 16-core machine)
    torch.testing.assert_close(out, whole)
    assert model.calls == [(10, False, False), (10, False, False), (5, False, False)]
    assert model.training  # its mode is given back
    assert out.device.type == "cpu"


def test_tuples_several_inputs_and_none_entries():
    x, t = torch.arange(7.0), torch.arange(7.0) * 10

    def fn(a, b):
        return a + b, None, (a * b)[:, None]

    total, nothing, product = batched(fn, x, t, batch_size=3)
    assert torch.equal(total, x + t) and nothing is None and torch.equal(product, (x * t)[:, None])
    with pytest.raises(ValueError, match="different lengths"):
        batched(fn, x, t[:5])


def test_a_count_stands_for_rows_without_data_and_progress_hears_each_chunk():
    class Bar:
        seen = []

        def update(self, n):
            self.seen.append(n)

    bar = Bar()
    out = batched(lambda n: torch.full((n, 2), float(n)), 7, batch_size=3, progress=bar)
    assert out.shape == (7, 2) and out[:, 0].tolist() == [3, 3, 3, 3, 3, 3, 1]
    assert bar.seen == [3, 3, 1]


def test_results_stay_where_asked_and_inputs_move_to_the_device():
    seen = []
    x = torch.ones(4, dtype=torch.float64)
    out = batched(lambda a: seen.append(a.device.type) or a * 2, x, batch_size=2, device="cpu", to=None)
    assert torch.equal(out, x * 2) and seen == ["cpu", "cpu"]
