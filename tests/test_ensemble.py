"""fbalign.Ensemble: each member trains exactly as it would alone (float64, 1e-12 relative after 200 steps), for
every rule, Linear and Conv; per-member learning rates; divergence stops one member only; members()."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import fbalign
from fbalign.ensemble import register_container

STEPS = 200


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests time nothing but take 200 small steps many times: one thread avoids contention on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
LR = 0.03


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3, stride=1, padding="same", padding_mode="reflect"), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double()


INPUTS = {"mlp": (6,), "cnn": (2, 6, 6)}
BUILD = {"mlp": mlp, "cnn": cnn}

# (rule, options, learning rate): pbp's pseudo-inverse amplifies rounding (a 1e-15 change of the start grows to
# 1e-10 in 200 steps at lr 0.05 with momentum, measured), so it is checked where its dynamics are not chaotic.
RULES = [
    ("backprop", {}, LR),
    ("backprop", {"feedback_nonlinearity": "tanh"}, LR),
    ("fa", {}, LR),
    ("fa", {"sparsity": 0.5, "feedback_nonlinearity": "softsign"}, LR),
    ("usf", {}, LR),
    ("usf", {"concordance": 0.7}, LR),
    ("frsf", {}, LR),
    ("brsf", {}, LR),
    ("brsf", {"scale": 1.0, "concordance": 0.8}, LR / 3),  # scale 1: large errors, so a gentler lr
    ("shallow", {}, LR),
    ("dfa", {}, LR),
    ("kp", {}, LR),
    ("wm", {}, LR),
    ("pbp", {}, 0.002),
]


def data(member: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + member)
    x = torch.randn(STEPS, 2, *shape, generator=generator, dtype=torch.float64)
    y = torch.randn(STEPS, 2, 3, generator=generator, dtype=torch.float64)
    return x, y


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each member's batch-mean squared error, summed over members when there is a member dimension."""
    return (out - y).square().sum(-1).mean(-1).sum()


def make_optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr * 0.1, weight_decay=1e-3)
    if kind == "momentum":  # no weight decay: what members mixing shallow with other rules need
        return torch.optim.SGD(params, lr=lr, momentum=0.5)
    return torch.optim.SGD(params, lr=lr, momentum=0.5, weight_decay=1e-3)


def train_alone(model: nn.Module, seed: int, lr: float, x: torch.Tensor, y: torch.Tensor, optimizer: str,
                mirror_every: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # the member's generator seed: brsf's draws and mirror noise come from here
    opt = make_optimizer(optimizer, model.parameters(), lr)
    for step in range(STEPS):
        opt.zero_grad()
        loss_fn(model(x[step]), y[step]).backward()
        opt.step()
        if mirror_every and step % mirror_every == 0:
            fbalign.mirror(model, 2, batch_size=8, lr=0.05)
    return model


def train_ensemble(models: list[nn.Module], seeds: list[int], lrs: list[float], xs: list[torch.Tensor],
                   ys: list[torch.Tensor], optimizer: str, mirror_every: int = 0) -> fbalign.Ensemble:
    top = max(lrs)
    ens = fbalign.Ensemble(models, lr_scale=[lr / top for lr in lrs], seeds=seeds)
    opt = make_optimizer(optimizer, ens.parameters(), top)
    x, y = torch.stack(xs, 1), torch.stack(ys, 1)
    for step in range(STEPS):
        opt.zero_grad()
        loss_fn(ens(x[step]), y[step]).backward()
        opt.step()
        if mirror_every and step % mirror_every == 0:
            ens.mirror(2, batch_size=8, lr=0.05)
    return ens


def assert_same(alone: nn.Module, member: nn.Module, tol: float = 1e-12) -> None:
    theirs = member.state_dict()
    for name, mine in alone.state_dict().items():
        if mine.is_floating_point():
            error = float((theirs[name] - mine).norm() / mine.norm().clamp_min(1e-300))
            assert error <= tol, f"{name}: relative difference {error:.3g}"
        else:
            assert torch.equal(theirs[name], mine), name


def check_members_train_alone(build: Callable[[int], nn.Module], shape: tuple[int, ...], rule: str, options: dict,
                              lr: float, optimizer: str = "sgd", members: int = 3) -> None:
    seeds, lrs = [11, 12, 13][:members], [lr, lr / 2, lr / 4][:members]
    models = [fbalign.convert(build(m), rule, seed=100 + m, **options) for m in range(members)]
    batches = [data(m, shape) for m in range(members)]
    mirror_every = 20 if rule == "wm" else 0
    ens = train_ensemble(models, seeds, lrs, [b[0] for b in batches], [b[1] for b in batches], optimizer,
                         mirror_every)
    for m, member in enumerate(ens.members()):
        alone = train_alone(copy.deepcopy(models[m]), seeds[m], lrs[m], *batches[m], optimizer, mirror_every)
        assert_same(alone, member)


@pytest.mark.parametrize("rule,options,lr", RULES, ids=[f"{r}{o or ''}" for r, o, _ in RULES])
def test_linear_members_train_as_alone(rule: str, options: dict, lr: float) -> None:
    check_members_train_alone(mlp, INPUTS["mlp"], rule, options, lr)


CONV_RULES = [r for r in RULES if r[0] != "pbp"]  # pbp is defined for Linear layers only


@pytest.mark.parametrize("rule,options,lr", CONV_RULES, ids=[f"{r}{o or ''}" for r, o, _ in CONV_RULES])
def test_conv_members_train_as_alone(rule: str, options: dict, lr: float) -> None:
    # Two members (time): a grouped convolution rounds differently from a single one, so a gentler lr.
    check_members_train_alone(cnn, INPUTS["cnn"], rule, options, lr / 3, members=2)


@pytest.mark.parametrize("rule", ["fa", "kp", "brsf"])
def test_adam_members_train_as_alone(rule: str) -> None:
    check_members_train_alone(mlp, INPUTS["mlp"], rule, {}, LR, optimizer="adam")


@pytest.mark.parametrize("build", ["mlp", "cnn"])
def test_members_mixing_backprop_fa_and_shallow_train_as_alone(build: str) -> None:
    rules = ["backprop", "fa", "shallow", "fa"]
    seeds, lrs = [21, 22, 23, 24], [LR, LR / 2, LR, LR / 4]
    models = [fbalign.convert(BUILD[build](m), rule, seed=200 + m) for m, rule in enumerate(rules)]
    batches = [data(m, INPUTS[build]) for m in range(len(rules))]
    ens = train_ensemble(models, seeds, lrs, [b[0] for b in batches], [b[1] for b in batches], "momentum")
    for m, member in enumerate(ens.members()):
        assert [getattr(layer, "rule", None).name for layer in member.modules() if hasattr(layer, "rule")] == \
            [rules[m]] * sum(1 for layer in member.modules() if hasattr(layer, "rule"))
        alone = train_alone(copy.deepcopy(models[m]), seeds[m], lrs[m], *batches[m], "momentum")
        assert_same(alone, member)
    first = [member for member in ens.members()][2]  # shallow: its lower layers never moved
    assert torch.equal(first[0].weight, models[2][0].weight)


def test_member_views_write_through_and_follow_a_move() -> None:
    ens = fbalign.Ensemble([fbalign.convert(mlp(m), "wm", seed=m) for m in range(3)])
    views = ens.member_views()
    assert ens.member_views()[1] is views[1]  # made once
    with torch.no_grad():
        views[1][0].feedback.fill_(0.5)
        views[2][0].weight.fill_(0.25)
    assert bool((ens.stack[0].feedback[1] == 0.5).all()) and bool((ens.stack[0].weight[2] == 0.25).all())
    assert bool((ens.stack[0].feedback[0] != 0.5).any())
    ens.float()  # new tensors: new views
    moved = ens.member_views()
    assert moved[1] is not views[1] and moved[1][0].weight.dtype == torch.float32
    assert moved[1][0].weight.data_ptr() == ens.stack[0].weight[1].data_ptr()


def test_mixing_other_rules_is_refused() -> None:
    with pytest.raises(ValueError, match="mix only backprop, fa and shallow"):
        fbalign.Ensemble([fbalign.convert(mlp(0), "fa", seed=0), fbalign.convert(mlp(1), "usf")])


def test_member_does_not_depend_on_the_others() -> None:
    models = [fbalign.convert(mlp(m), "brsf", seed=m) for m in range(4)]
    batches = [data(m, (6,)) for m in range(4)]
    big = train_ensemble(models, [1, 2, 3, 4], [LR] * 4, [b[0] for b in batches], [b[1] for b in batches], "sgd")
    alone = train_ensemble(models[2:3], [3], [LR], [batches[2][0]], [batches[2][1]], "sgd")
    assert_same(alone.members()[0], big.members()[2], tol=1e-13)


def test_shared_input_is_every_members_input() -> None:
    models = [fbalign.convert(mlp(m), "fa", seed=m) for m in range(3)]
    ens = fbalign.Ensemble(models)
    x = torch.randn(5, 6, dtype=torch.float64)
    out = ens(x)
    assert out.shape == (3, 5, 3)
    for m, model in enumerate(models):
        torch.testing.assert_close(out[m], model(x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ens(x.expand(3, 5, 6)), out)
    torch.testing.assert_close(ens(x.expand(3, 5, 6), shared=False), out)


def test_plain_models_and_state_dict_names() -> None:
    models = [mlp(m) for m in range(2)]
    ens = fbalign.Ensemble(models)
    assert set(ens.state_dict()) >= {f"stack.{k}" for k in models[0].state_dict()}
    for member, model in zip(ens.members(), models):
        assert type(member) is type(model)
        assert_same(model, member, tol=0.0)


def test_diverged_member_is_stopped_and_others_train_on() -> None:
    models = [fbalign.convert(mlp(m), "fa", seed=m) for m in range(3)]
    ens = fbalign.Ensemble(models, lr_scale=[1.0, 1e12, 1.0])
    opt = torch.optim.SGD(ens.parameters(), lr=0.01)
    x, y = data(0, (6,))
    with pytest.warns(fbalign.MemberDivergedWarning, match="member 1 diverged"):
        for step in range(30):
            opt.zero_grad()
            loss_fn(ens(x[step]), y[step] * 1e6).backward()
            opt.step()
    assert list(ens.diverged) == [1] and not bool(ens.alive[1])
    assert all(torch.isfinite(p).all() for p in ens.parameters())
    frozen = ens.members()[1].state_dict()
    before = [m.state_dict() for m in ens.members()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second report of the same member
        opt.zero_grad()
        loss_fn(ens(x[0]), y[0]).backward()
        opt.step()
    after = ens.members()
    for name, value in after[1].state_dict().items():
        assert torch.equal(value, frozen[name]), name
    assert not torch.equal(after[0].state_dict()["4.bias"], before[0]["4.bias"])  # the others train on


def test_huge_finite_weights_are_not_taken_for_divergence() -> None:
    """The quick check sums the parameters' norms, which overflows for weights near float64's range: the exact
    per-member check behind it must find every member finite and stop none."""
    ens = fbalign.Ensemble([fbalign.convert(mlp(m), "fa", seed=m) for m in range(2)])
    with torch.no_grad():
        ens.stack[0].weight[1].fill_(1e200)  # its norm (and the sum of norms) is inf, every value finite
    opt = torch.optim.SGD(ens.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ens(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
        opt.step()
    assert not ens.diverged and bool(ens.alive.all())


def test_members_are_copies() -> None:
    ens = fbalign.Ensemble([fbalign.convert(mlp(m), "fa", seed=m) for m in range(2)])
    member = ens.members()[0]
    with torch.no_grad():
        member[0].weight.add_(1.0)
    assert not torch.equal(ens.members()[0][0].weight, member[0].weight)
    assert member[0].feedback.shape == (5, 6)


def test_per_member_alignment_metrics() -> None:
    ens = fbalign.Ensemble([fbalign.convert(mlp(m), "fa", seed=m) for m in range(2)])
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    found = ens.per_member(fbalign.metrics.measure_alignment, lambda o, t: (o - t).square().mean(), x, y)
    assert len(found) == 2 and found[0] != found[1]
    assert any(key.startswith("angle_dh_bp/") for key in found[0])


def test_bad_input_is_explained() -> None:
    with pytest.raises(ValueError, match="at least one"):
        fbalign.Ensemble([])
    with pytest.raises(ValueError, match="share one architecture|differs"):
        fbalign.Ensemble([mlp(0), nn.Sequential(nn.Linear(6, 3))])
    with pytest.raises(ValueError, match="rule"):
        fbalign.Ensemble([fbalign.convert(mlp(0), "fa"), fbalign.convert(mlp(1), "usf")])
    with pytest.raises(ValueError, match="lr_scale"):
        fbalign.Ensemble([mlp(0), mlp(1)], lr_scale=[1.0])
    ens = fbalign.Ensemble([mlp(0), mlp(1)])
    with pytest.raises(ValueError, match="first dimension"):
        ens(torch.randn(3, 4, 6, dtype=torch.float64), shared=False)

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))
    with pytest.raises(ValueError, match="register_container"):
        fbalign.Ensemble([Custom(), Custom()])


def test_registered_container_and_batchnorm() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.norm = nn.BatchNorm1d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.norm(self.fc(x))
    register_container(Block)

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(Block(), nn.ReLU(), nn.Linear(6, 3)).double()
    models = [fbalign.convert(build(m), "fa", seed=m) for m in range(2)]
    # batches of 8: BatchNorm over 2 examples makes the dynamics chaotic (rounding grows past 1e-12)
    generator = torch.Generator().manual_seed(5)
    xs = [torch.randn(STEPS, 8, 6, generator=generator, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randn(STEPS, 8, 3, generator=generator, dtype=torch.float64) for _ in range(2)]
    ens = train_ensemble(models, [1, 2], [LR, LR], xs, ys, "sgd")
    for m, member in enumerate(ens.members()):
        alone = train_alone(copy.deepcopy(models[m]), m + 1, LR, xs[m], ys[m], "sgd")
        assert_same(alone, member)  # BatchNorm's running statistics included
