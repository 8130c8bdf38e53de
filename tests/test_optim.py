"""fbalign.optim.BatchManhattan: hand-computed sign steps, momentum/decay/Nesterov as torch's SGD on sign(g),
param groups, schedulers and state_dict round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fbalign.optim import BatchManhattan


def _param(values, grad):
    p = nn.Parameter(torch.tensor(values, dtype=torch.float64))
    p.grad = torch.tensor(grad, dtype=torch.float64)
    return p


def test_plain_step_is_minus_lr_times_sign_of_gradient():
    p = _param([1.0, -2.0, 0.5, 3.0], [0.3, -1e-9, 0.0, -40.0])
    BatchManhattan([p], lr=0.1).step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9, 0.5, 3.1], dtype=torch.float64),
                               rtol=0, atol=1e-15)


def test_weight_decay_and_momentum_hand_computed_over_three_steps():
    lr, mu, wd, tau = 0.1, 0.9, 0.01, 0.2
    p = _param([1.0, -1.0], [0.0, 0.0])
    opt = BatchManhattan([p], lr=lr, momentum=mu, weight_decay=wd, dampening=tau)
    theta = torch.tensor([1.0, -1.0], dtype=torch.float64)
    buffer = None
    for grad in ([0.5, 0.5], [-0.2, 0.7], [0.0, -3.0]):
        p.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
        d = torch.sign(torch.tensor(grad, dtype=torch.float64)) + wd * theta
        buffer = d if buffer is None else mu * buffer + (1 - tau) * d  # first step: no dampening, like SGD
        theta = theta - lr * buffer
        torch.testing.assert_close(p.detach(), theta, rtol=0, atol=1e-15)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buffer, rtol=0, atol=1e-15)


@pytest.mark.parametrize("options", [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, weight_decay=1e-3),
    dict(momentum=0.5, dampening=0.3, weight_decay=0.1),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.9, maximize=True),
])
def test_equals_torch_sgd_fed_with_sign_of_gradient(options):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    twin = copy.deepcopy(model)
    ours = BatchManhattan(model.parameters(), lr=0.01, **options)
    ref = torch.optim.SGD(twin.parameters(), lr=0.01, **options)
    for _ in range(4):
        x = torch.randn(8, 4, dtype=torch.float64)
        for m, opt in ((model, ours), (twin, ref)):
            opt.zero_grad()
            m(x).square().mean().backward()
        for q in twin.parameters():
            q.grad = torch.sign(q.grad)
        ours.step()
        ref.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_param_groups_use_their_own_hyperparameters_and_schedulers_work():
    a = _param([0.0], [1.0])
    b = _param([0.0], [1.0])
    opt = BatchManhattan([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    opt.step()
    scheduler.step()
    opt.step()
    torch.testing.assert_close(a.detach(), torch.tensor([-0.1 - 0.01], dtype=torch.float64))
    torch.testing.assert_close(b.detach(), torch.tensor([-0.5 - 0.05], dtype=torch.float64))


def test_state_dict_round_trip_resumes_bit_exactly(tmp_path):
    torch.manual_seed(2)
    data = [torch.randn(6, 3) for _ in range(5)]

    def run(model, opt, batches):
        for x in batches:
            opt.zero_grad()
            model(x).sin().sum().backward()
            opt.step()

    model = nn.Linear(3, 4)
    start = copy.deepcopy(model.state_dict())
    opt = BatchManhattan(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3)
    run(model, opt, data)

    resumed = nn.Linear(3, 4)
    resumed.load_state_dict(start)
    first = BatchManhattan(resumed.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3)
    run(resumed, first, data[:2])
    torch.save({"model": resumed.state_dict(), "optimizer": first.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt")
    again = nn.Linear(3, 4)
    again.load_state_dict(saved["model"])
    second = BatchManhattan(again.parameters(), lr=0.5)  # hyperparameters come back from the state dict
    second.load_state_dict(saved["optimizer"])
    assert second.param_groups[0]["lr"] == 0.01 and second.param_groups[0]["nesterov"]
    run(again, second, data[2:])
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("options,match", [
    (dict(lr=-1.0), "Invalid learning rate"),
    (dict(momentum=-0.1), "Invalid momentum"),
    (dict(weight_decay=-1.0), "Invalid weight_decay"),
    (dict(nesterov=True), "Nesterov momentum requires a momentum"),
])
def test_bad_hyperparameters_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        BatchManhattan([nn.Parameter(torch.zeros(1))], **options)


def test_sparse_gradients_are_refused_with_a_hint():
    embedding = nn.Embedding(5, 2, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        BatchManhattan(embedding.parameters(), lr=0.1).step()
