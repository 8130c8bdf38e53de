"""fbalign.perturbation.NodePerturbation: a hand-computed estimate, unbiased on average, lowers the loss of
Lillicrap et al.'s linear task, resumes its noise stream."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbalign
from fbalign import NodePerturbation

DOUBLE = dict(dtype=torch.float64)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def test_estimate_is_hand_computed_loss_change_times_noise():
    model = _small()
    x, t = torch.randn(5, 4, **DOUBLE), torch.randn(5, 2, **DOUBLE)
    loss_fn = lambda y: 0.5 * (y - t).square().sum(1)  # noqa: E731
    sigma = 1e-2
    NodePerturbation(model, sigma=sigma, seed=3).backward(x, loss_fn)

    g = torch.Generator().manual_seed(3)
    w0, b0, w2, b2 = (p.detach() for p in model.parameters())
    a0 = x @ w0.T + b0
    xi0 = sigma * torch.randn(a0.shape, generator=g, **DOUBLE)
    h0 = torch.tanh(a0 + xi0)
    xi2 = sigma * torch.randn(5, 2, generator=g, **DOUBLE)
    perturbed = loss_fn(h0 @ w2.T + b2 + xi2)
    clean = loss_fn(torch.tanh(a0) @ w2.T + b2)
    weight = ((perturbed - clean) / (sigma ** 2 * 5))[:, None]   # gradient of the mean loss
    for grad, expected in [(model[0].weight.grad, (weight * xi0).T @ x), (model[0].bias.grad, (weight * xi0).sum(0)),
                           (model[2].weight.grad, (weight * xi2).T @ torch.tanh(a0)),
                           (model[2].bias.grad, (weight * xi2).sum(0))]:
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_estimate_is_unbiased_on_average():
    model = _small()
    x, t = torch.randn(16, 4, **DOUBLE), torch.randn(16, 2, **DOUBLE)
    F.mse_loss(model(x), t, reduction="none").sum(1).mean().backward()
    true = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    perturbation = NodePerturbation(model, sigma=1e-4, seed=0)
    for _ in range(400):   # .grad accumulates: the sum of 400 estimates
        perturbation.backward(x, lambda y: F.mse_loss(y, t, reduction="none").sum(1))
    mean = torch.cat([p.grad.flatten() for p in model.parameters()]) / 400
    assert F.cosine_similarity(mean, true, dim=0) > 0.95
    assert abs(mean.norm() / true.norm() - 1) < 0.15


def test_node_perturbation_learns_the_linear_task():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(10, 30, generator=g) * 2 - 1        # Lillicrap et al.'s T ~ U[-1, 1], 30 → 10
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(30, 20, bias=False), nn.Linear(20, 10, bias=False))
    for p in model.parameters():
        nn.init.uniform_(p, -0.01, 0.01)
    test_x = torch.randn(500, 30, generator=g)

    def nse():
        with torch.no_grad():
            return ((model(test_x) - test_x @ target.T).square().sum() / (test_x @ target.T).square().sum()).item()

    perturbation = NodePerturbation(model, sigma=1e-3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=5e-3)
    start = nse()
    for _ in range(300):
        x = torch.randn(20, 30, generator=g)
        wanted = x @ target.T
        opt.zero_grad()
        perturbation.backward(x, lambda y, wanted=wanted: 0.5 * (y - wanted).square().sum(1))
        opt.step()
    assert start > 0.99 and nse() < 0.1, (start, nse())   # measured: 1.00 → 0.04


def test_state_dict_resumes_the_noise_stream_and_scalar_losses_work():
    model = _small()
    x, t = torch.randn(5, 4, **DOUBLE), torch.randn(5, 2, **DOUBLE)
    loss_fn = lambda y: F.mse_loss(y, t)  # noqa: E731  a scalar loss works too
    a = NodePerturbation(model, sigma=1e-2, seed=1)
    a.backward(x, loss_fn)
    state = a.state_dict()
    model.zero_grad()
    a.backward(x, loss_fn)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    b = NodePerturbation(model, sigma=0.5, seed=9)
    b.load_state_dict(state)
    b.backward(x, loss_fn)
    for e, p in zip(expected, model.parameters()):
        assert torch.equal(e, p.grad)


def test_works_on_converted_convolutional_models_and_chosen_layers():
    model = fbalign.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)), "fa",
                            seed=0)
    perturbation = NodePerturbation(model, sigma=1e-2, layers=["0"], seed=0)
    loss = perturbation.backward(torch.randn(4, 1, 6, 6), lambda y: F.cross_entropy(y, torch.arange(4) % 3,
                                                                                      reduction="none"))
    assert loss.dim() == 0 and model[0].weight.grad is not None and model[3].weight.grad is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma must be > 0"):
        NodePerturbation(_small(), sigma=0)
    with pytest.raises(ValueError, match="'1' is not a Linear/Conv layer of the model; these are: 0, 2"):
        NodePerturbation(_small(), layers=["1"])
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar or one loss per example \(N,\)"):
        NodePerturbation(_small(), seed=0).backward(torch.randn(3, 4, **DOUBLE), lambda y: y)
