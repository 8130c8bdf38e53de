"""Many runs as one model: E copies of one architecture (seeds, rules' random matrices, learning rates) trained
side by side, each exactly as it would train alone.

    >>> models = [fbalign.convert(make_net(seed=s), "fa", seed=s) for s in range(20)]
    >>> ens = fbalign.Ensemble(models, lr_scale=[1.0] * 10 + [0.5] * 10)  # a learning-rate grid is one ensemble
    >>> opt = torch.optim.SGD(ens.parameters(), lr=0.01)                  # any torch optimizer
    >>> out = ens(x)                   # x: (B, ...) the same batch for all, or (E, B, ...) one batch per member
    >>> loss = loss_fn(out, y).sum()   # SUM the members' losses: each member's gradient is its own loss's
    >>> opt.zero_grad(); loss.backward(); opt.step()
    >>> ens.members()                  # E ordinary converted models (copies) for saving, metrics and plots

**How.** Every Linear/Conv (fbalign's with any rule, or torch's) becomes a :class:`fbalign.stacked.StackedLayer`:
the members' weights stacked as ``(E, out, in)``, one batched matmul (a grouped convolution for Conv) for all of
them, whose backward sends each member's error through that member's own feedback matrix, asked of the member's
rule (see :mod:`fbalign.stacked`). Members share one rule with its options (only seeds differ), or mix backprop,
fa and shallow (a rule comparison as one model; :data:`fbalign.stacked.MIXABLE_RULES`). Parameter-free modules
(activations, pooling, Flatten) run on the members' batches merged into one; other modules with parameters or
buffers (BatchNorm, LayerNorm, ...) run per member under :func:`torch.func.vmap` of
:func:`torch.func.functional_call`. Containers are ``nn.Sequential``, fbalign's own
models, and classes passed to :func:`register_container` (their ``forward`` must only call submodules and combine
their outputs elementwise, so a leading member dimension passes through).

**Per-member learning rates** (``lr_scale``): member ``e`` trains with the optimizer's learning rate times
``lr_scale[e]``. After every step of any optimizer holding the ensemble's parameters, member ``e``'s step is scaled:
``θ_e ← θ_e,old + lr_scale[e] · (θ_e,new − θ_e,old)``. That is exactly the member's own run at that learning rate
for every optimizer whose step is the learning rate times a direction the learning rate does not enter: SGD (with
momentum, Nesterov, weight decay), Adam, AdamW, RMSprop, Adagrad, BatchManhattan; not for Rprop or LBFGS. Keep the
optimizer's lr at the largest member's (scales ≤ 1): the rescaling then adds at most a rounding of the weight per
step. kp's coupling uses the member's own learning rate.

**Divergence**: after every step, a member whose parameters became NaN or infinite is put back to its last finite
weights, stopped (it never moves again), listed in :attr:`Ensemble.diverged` and warned about
(:class:`MemberDivergedWarning`); the others train on.

**Random draws** (brsf's per-step magnitudes, mirror phases' noise) come from one generator per member, seeded
with ``seeds[e]``: member ``e`` draws what it would draw alone after ``torch.manual_seed(seeds[e])``, provided
nothing else draws from torch's global generator during its solo run. (Members' feedback matrices are drawn at
conversion, by each member's own rule seeds, before the ensemble exists.)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import dfa as fbdfa
from . import nn as fbnn
from ._util import keep_freed_cpu_memory
from .plastic import KP, mirror
from .stacked import StackedLayer

__all__ = ["Ensemble", "MemberDivergedWarning", "register_container"]

_CONTAINERS: set[type[nn.Module]] = {nn.Sequential}
_STACKABLE = (fbnn.FeedbackLayer, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Elementwise modules take (E, N, ...) as they are: no reshaping needed.
_ELEMENTWISE = (nn.Identity, nn.Tanh, nn.Sigmoid, nn.ReLU, nn.ReLU6, nn.GELU, nn.ELU, nn.LeakyReLU, nn.SiLU,
                nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Mish, nn.Tanhshrink, nn.Dropout)
_PER_MEMBER = "_per_member"  # the attribute a vmapped module sits under; dropped from members' state names


def register_container(cls: type[nn.Module]) -> type[nn.Module]:
    """Let :class:`Ensemble` stack models containing ``cls``: its ``forward`` only calls its submodules and
    combines their outputs elementwise (``+``, ``*``), so tensors with a leading member dimension pass through."""
    _CONTAINERS.add(cls)
    return cls


def _register_fbalign_models() -> None:
    from . import models  # their forwards compose submodules and add: member-dimension safe
    for cls in (models.LeNet5, models.BasicBlock, models.ResNet, models.MLP):
        register_container(cls)


class MemberDivergedWarning(RuntimeWarning):
    """A member of an :class:`Ensemble` diverged and was stopped; the others train on."""


class _MergedBatch(nn.Module):
    """A module without parameters or buffers, run once on all members' examples: ``(E, N, ...) -> (E·N, ...)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, input: Tensor) -> Tensor:
        out = self.module(input.flatten(0, 1))
        return out.unflatten(0, input.shape[:2])


class _PerMember(nn.Module):
    """A module with its own state (BatchNorm, LayerNorm, ...), run per member with vmap over its stacked state."""

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        inner = copy.deepcopy(modules[0])
        with torch.no_grad():
            for name, _ in list(modules[0].named_parameters()):
                stacked = torch.stack([m.get_parameter(name).detach() for m in modules])
                _set(inner, name, nn.Parameter(stacked, requires_grad=modules[0].get_parameter(name).requires_grad))
            for name, _ in list(modules[0].named_buffers()):
                _set(inner, name, torch.stack([m.get_buffer(name) for m in modules]), buffer=True)
        setattr(self, _PER_MEMBER, inner)

    def forward(self, input: Tensor) -> Tensor:
        inner = getattr(self, _PER_MEMBER)
        state = {**dict(inner.named_parameters()), **dict(inner.named_buffers())}

        def one(member_state: dict[str, Tensor], x: Tensor) -> Tensor:
            return torch.func.functional_call(inner, member_state, (x,))
        return torch.func.vmap(one)(state, input)


def _set(module: nn.Module, name: str, tensor: Tensor, buffer: bool = False) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    (owner._buffers if buffer else owner._parameters)[leaf] = tensor


def _state_names(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}


def _has_state(module: nn.Module, recurse: bool = True) -> bool:
    return any(True for _ in module.parameters(recurse)) or any(True for _ in module.buffers(recurse))


def _stack(modules: list[nn.Module], path: str) -> nn.Module:
    """The stacked counterpart of the members' modules at ``path``."""
    first = modules[0]
    where = f"'{path}'" if path else "the top level"
    for index, module in enumerate(modules):
        if type(module) is not type(first):
            raise ValueError(f"Ensemble: member {index} has a {type(module).__name__} at {where} where member 0 has a "
                             f"{type(first).__name__}; members must share one architecture")
    if isinstance(first, _STACKABLE):
        if parametrize.is_parametrized(first):
            raise ValueError(f"Ensemble: the layer at {where} is parametrized (torch.nn.utils.parametrize); its "
                             "weight is computed, so it cannot be stacked. Remove the parametrization (apply a fixed "
                             "mask to the weight and its gradient instead)")
        return StackedLayer(modules)
    if type(first) in _ELEMENTWISE:
        return first
    if not _has_state(first):
        return _MergedBatch(first)
    if isinstance(first, tuple(_CONTAINERS)) and not _has_state(first, recurse=False):
        new = copy.copy(first)
        new.__dict__.update(_parameters={}, _buffers={}, _non_persistent_buffers_set=set(), _modules=OrderedDict())
        for hooks in fbnn._HOOK_DICTS:  # a member's hooks (dfa's wiring) belong to that member
            if hasattr(first, hooks):
                setattr(new, hooks, OrderedDict())
        for name in dict(first.named_children()):
            new._modules[name] = _stack([m._modules[name] for m in modules], f"{path}.{name}" if path else name)
        return new
    if not any(isinstance(m, _STACKABLE) for m in first.modules()):
        return _PerMember(modules)
    raise ValueError(f"Ensemble: {where} is a {type(first).__name__} whose own forward uses its Linear/Conv layers; "
                     "the ensemble stacks nn.Sequential and fbalign's models. If its forward only calls its "
                     "submodules and combines their outputs elementwise, register it: "
                     f"fbalign.ensemble.register_container({type(first).__name__})")


class _DFAPass:
    """One forward of a dfa ensemble: the members' output errors once the source layer's backward has them."""

    def __init__(self) -> None:
        self.error: Tensor | None = None

    def send_down(self, layer: StackedLayer, grad_output: Tensor, input: Tensor) -> Tensor:
        if layer.is_dfa_source:
            self.error = grad_output
        if self.error is None:
            raise RuntimeError("dfa: a layer got its error before the output error existed: the loss does not "
                               "depend on the error source's output (see fbalign.dfa)")
        return torch.func.vmap(fbdfa._project, in_dims=(0, 0, 0, None, None))(
            self.error, layer.direct_feedback, input, layer.rule._nonlinearity, "ensemble")


class Ensemble(nn.Module):
    """E models of one architecture trained as one module (see :mod:`fbalign.ensemble`).

    Args:
        models: E models with the same modules and shapes, each converted by fbalign with the same rule and options
            (their seeds, hence random matrices, differ) or left plain (backprop). Copied: later changes to them do
            not reach the ensemble.
        lr_scale: E factors: member ``e`` trains at the optimizer's learning rate times ``lr_scale[e]`` (default 1).
        seeds: E seeds of the members' generators (brsf redraws, mirror noise); None draws them from torch's
            global generator.
        stop_diverged: stop a member whose parameters become NaN/Inf after a step (default True; costs a copy of
            the parameters per step).

    Shapes: ``forward(x)`` takes ``(E, B, ...)`` (one batch per member: a tensor of 3 or more dimensions whose first
    is E) or ``(B, ...)`` (the same batch for every member; force either reading with ``shared=``) and returns
    ``(E, B, ...)``.
    """

    def __init__(self, models: Sequence[nn.Module], *, lr_scale: Sequence[float] | Tensor | None = None,
                 seeds: Sequence[int] | None = None, stop_diverged: bool = True) -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("Ensemble needs at least one model")
        size = len(models)
        self._templates = [copy.deepcopy(m) for m in models]  # each member's rules, wiring, structure (not trained)
        self.stack = _stack(self._templates, "")
        scale = torch.ones(size, dtype=torch.float64) if lr_scale is None else torch.as_tensor(
            lr_scale, dtype=torch.float64).clone()
        if scale.shape != (size,) or not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise ValueError(f"Ensemble: lr_scale must be {size} finite factors >= 0, one per member; got "
                             f"{lr_scale!r}")
        self.register_buffer("lr_scale", scale)
        self.register_buffer("alive", torch.ones(size, dtype=torch.bool))
        if seeds is None:
            seeds = [int(torch.randint(0, 2**62, (), dtype=torch.int64)) for _ in range(size)]
        if len(seeds) != size:
            raise ValueError(f"Ensemble: seeds has {len(seeds)} entries for {size} members")
        self.seeds = [int(s) for s in seeds]
        self._generators: list[torch.Generator] = []
        self.stop_diverged = stop_diverged
        self.diverged: dict[int, str] = {}
        self.steps = 0
        self._layers = [m for m in self.stack.modules() if isinstance(m, StackedLayer)]
        self._dfa_layers = [m for m in self._layers if getattr(m.rule, "name", "") == "dfa"]
        self._draws = any(getattr(layer.rule, "name", "") == "brsf" for layer in self._layers)
        self._params = list(self.parameters())
        self._plans: dict[int, _StepPlan] = {}
        self._mark_dfa_source()
        self._kp_warned = False
        if any(p.device.type == "cpu" for p in self._params):
            keep_freed_cpu_memory()  # the stacked tensors are large: see fbalign._util
        _ENSEMBLES.add(self)
        _install_optimizer_hooks()

    def _mark_dfa_source(self) -> None:
        if not self._dfa_layers:
            return
        member = dict(self._templates[0].named_modules())
        stacked = dict(self.stack.named_modules())
        for name, layer in member.items():
            wiring = fbdfa.wiring_of(layer)
            if wiring is not None and layer is wiring.source:
                stacked[name].is_dfa_source = True

    @property
    def size(self) -> int:
        """E, the number of members."""
        return len(self._templates)

    def __len__(self) -> int:
        return self.size

    def generator(self, member: int) -> torch.Generator:
        """Member ``member``'s generator (on the ensemble's device; created from its seed on first use there)."""
        device = next(self.parameters()).device
        if not self._generators or self._generators[0].device != device:
            self._generators = [torch.Generator(device).manual_seed(s) for s in self.seeds]
            for layer in self._layers:
                layer.generators = self._generators
        return self._generators[member]

    def forward(self, input: Tensor, *, shared: bool | None = None) -> Tensor:
        size = self.size
        if shared is None:
            shared = not (input.dim() >= 3 and input.shape[0] == size)
        if shared:
            input = input.unsqueeze(0).expand(size, *input.shape)
        elif input.shape[0] != size:
            raise ValueError(f"Ensemble: a per-member input needs its first dimension to be E = {size}; got shape "
                             f"{tuple(input.shape)}")
        if self._draws:
            self.generator(0)
        if self._dfa_layers:
            current = _DFAPass()
            for layer in self._dfa_layers:
                layer.dfa_pass = current
        return self.stack(input)

    # --- members --------------------------------------------------------------------------------------------------

    def _state(self) -> list[tuple[str, Tensor, bool]]:
        def member_name(name: str) -> str:
            return ".".join(part for part in name.split(".") if part != _PER_MEMBER)
        return ([(member_name(n), p, False) for n, p in self.stack.named_parameters()]
                + [(member_name(n), b, True) for n, b in self.stack.named_buffers()])

    def members(self) -> list[nn.Module]:
        """E ordinary models (copies, in the ensemble's current state and mode, on its device) for saving,
        metrics and plotting; training them does not change the ensemble."""
        found = []
        state = self._state()
        for index, template in enumerate(self._templates):
            member = copy.deepcopy(template)
            own = _state_names(member)
            with torch.no_grad():
                for name, tensor, buffer in state:
                    if name not in own:  # a buffer of another member's rule (members mixing rules)
                        continue
                    target = member.get_buffer(name) if buffer else member.get_parameter(name)
                    target.data = tensor[index].detach().clone()
            found.append(member.train(self.training))
        return found

    def member_views(self) -> list[nn.Module]:
        """E models whose parameters and buffers are views of the ensemble's: writing to them writes to it (for
        what changes a model in place, such as a mirror phase: ``fbalign.mirror(ens.member_views()[e], ...)``).
        Made once and reused while the ensemble's tensors stay where they are (``.to()`` makes new ones)."""
        state = self._state()
        key = tuple(tensor.data_ptr() for _, tensor, _ in state)
        if getattr(self, "_views_key", None) != key:
            self._views = []
            for index, template in enumerate(self._templates):
                member = copy.deepcopy(template)
                own = _state_names(member)
                for name, tensor, buffer in state:
                    if name not in own:
                        continue
                    view = tensor[index] if buffer else nn.Parameter(tensor.detach()[index], tensor.requires_grad)
                    _set(member, name, view, buffer=buffer)
                self._views.append(member)
            self._views_key = key
        return [view.train(self.training) for view in self._views]

    def per_member(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """``[function(member, *args, **kwargs) for member in self.members()]``: e.g. the alignment metrics per
        member, ``ens.per_member(fbalign.metrics.measure_alignment, loss_fn, x, y)``."""
        return [function(member, *args, **kwargs) for member in self.members()]

    def mirror(self, steps: int, **options: Any) -> None:
        """A weight-mirror phase (:func:`fbalign.mirror`) for every member, each drawing its noise from its own
        generator (what it draws alone after ``torch.manual_seed(seeds[e])``); ``options`` as for ``mirror``."""
        for index, member in enumerate(self.member_views()):
            if index in self.diverged:
                continue
            mirror(member, steps, **{"generator": self.generator(index), **options})

    def extra_repr(self) -> str:
        return f"members={self.size}"

    # --- around every optimizer step ------------------------------------------------------------------------------

    def _member_view(self, values: Tensor, like: Tensor) -> Tensor:
        return values.to(like.dtype).view(-1, *[1] * (like.dim() - 1))

    def _scale(self) -> tuple[Tensor, bool]:
        """Each member's step factor (lr_scale, 0 once stopped) and whether any differs from 1 (cached)."""
        lr_scale, alive = self._buffers["lr_scale"], self._buffers["alive"]  # not nn.Module's slower __getattr__
        key = (lr_scale._version, alive._version, lr_scale.data_ptr(), alive.data_ptr())
        if getattr(self, "_scale_key", None) != key:
            scale = lr_scale * alive
            self._scale_cache = (scale, bool((scale != 1).any()))
            stopped = (~alive).nonzero().flatten()
            self._stopped_cache = stopped if len(stopped) else None  # their indices; None: every member trains
            self._lerp_weights: dict[tuple[torch.dtype, int], Tensor] = {}
            self._scale_key = key
        return self._scale_cache

    def _lerp_weight(self, like: Tensor) -> Tensor:
        """``1 − scale`` per member, shaped to broadcast over ``like`` (cached per dtype and rank)."""
        key = (like.dtype, like.dim())
        weight = self._lerp_weights.get(key)
        if weight is None:
            weight = self._lerp_weights[key] = self._member_view(1.0 - self._scale_cache[0], like)
        return weight

    def _plan(self, optimizer: torch.optim.Optimizer) -> _StepPlan | None:
        """What this ensemble does around ``optimizer``'s steps (cached until its parameter groups change)."""
        key = tuple(len(group["params"]) for group in optimizer.param_groups)
        plan = self._plans.get(id(optimizer))
        if plan is not None and plan.key == key and plan.optimizer() is optimizer:
            return plan
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        mine = [p for p in self._params if id(p) in group_of]
        if not mine:
            self._plans[id(optimizer)] = plan = _StepPlan(key, weakref.ref(optimizer), [], [], {}, [])
            return plan
        kp = [(layer, group_of[id(layer.weight)]) for layer in self._layers
              if isinstance(layer.rule, KP) and id(layer.weight) in group_of]
        plan = _StepPlan(key, weakref.ref(optimizer), mine, [torch.empty_like(p) for p in mine], group_of[id(mine[0])],
                         kp)
        self._plans[id(optimizer)] = plan
        return plan

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        plan = self._plan(optimizer)
        if plan is None or not plan.params:
            return
        scale, rescale = self._scale()
        plan.saving = rescale or self.stop_diverged
        if plan.saving:
            first, copy0 = plan.params[0], plan.old[0]
            if copy0.device != first.device or copy0.dtype != first.dtype:  # moved or cast since the plan was made
                plan.old = [torch.empty_like(p) for p in plan.params]
            torch._foreach_copy_(plan.old, plan.params)
        for layer, group in plan.kp:
            if layer.weight.grad is None:
                continue
            rule = layer.rule
            decay = rule.decay if rule.decay is not None else float(group.get("weight_decay", 0.0))
            if decay == 0.0 and not self._kp_warned:
                self._kp_warned = True
                warnings.warn("kp: weight decay 0, so each member's B keeps its initial offset from W forever; give "
                              "the optimizer a weight_decay or the rule a decay", stacklevel=4)
            shrink = 1.0 - float(group["lr"]) * scale * decay
            layer.feedback.sub_(layer.weight).mul_(self._member_view(shrink, layer.feedback))
            layer._kp_stepping = True

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        plan = self._plans.get(id(optimizer))
        if plan is None or not plan.params:
            return
        if plan.saving:
            plan.saving = False
            self.steps += 1
            rescale = self._scale_cache[1]  # as _before_step found it just now
            if rescale:
                # One pass per tensor: p + (1 - s)(old - p), which torch.lerp makes exactly p at s = 1 and exactly
                # old at s = 0 (for finite p; a stopped member's NaNs are overwritten just below).
                for p, old in zip(plan.params, plan.old):
                    p.lerp_(old, self._lerp_weight(p))
                stopped = self._stopped_cache
                if stopped is not None:
                    for p, old in zip(plan.params, plan.old):
                        p.index_copy_(0, stopped, old.index_select(0, stopped))
            if self.stop_diverged:
                self._stop_diverged(plan)
        for layer, _ in plan.kp:
            if getattr(layer, "_kp_stepping", False):
                layer._kp_stepping = False
                layer.feedback.add_(layer.weight)

    def _stop_diverged(self, plan: _StepPlan) -> None:
        # One pass over all parameters: a NaN or an inf anywhere reaches the sum of the norms (read as Python
        # floats: cheaper than stacking them for a step of the small online nets, where this check is a sizeable
        # share; an overflow of finite values only sends it to the exact check below).
        if math.isfinite(sum(map(float, torch._foreach_norm(plan.params)))):
            return
        finite = torch.stack([torch.isfinite(p).flatten(1).all(1) for p in plan.params]).all(0)
        newly = (~finite & self.alive).nonzero().flatten().tolist()
        for member in newly:
            for p, old in zip(plan.params, plan.old):
                p[member] = old[member]
            self.alive[member] = False
            lr = float(plan.group["lr"]) * float(self.lr_scale[member])
            self.diverged[member] = (f"member {member} diverged at optimizer step {self.steps} (learning rate "
                                     f"{lr:g}): its parameters became NaN or infinite, so it is stopped at its last "
                                     "finite weights; the other members train on")
            warnings.warn(self.diverged[member], MemberDivergedWarning, stacklevel=4)


@dataclasses.dataclass
class _StepPlan:
    """An optimizer's share of an ensemble: its parameters, their copies from before the step, the first one's
    group (whose lr a divergence message quotes), and the kp layers (with their groups) whose B follows the step."""

    key: tuple[int, ...]
    optimizer: Callable[[], torch.optim.Optimizer | None]
    params: list[Tensor]
    old: list[Tensor]
    group: dict
    kp: list[tuple[StackedLayer, dict]]
    saving: bool = False


# --- optimizer step hooks (any optimizer holding an ensemble's parameters) -------------------------------------------

_ENSEMBLES: weakref.WeakSet[Ensemble] = weakref.WeakSet()


@functools.cache  # once per process: the hooks serve every optimizer
def _install_optimizer_hooks() -> None:
    register_optimizer_step_pre_hook(_before_step)
    register_optimizer_step_post_hook(_after_step)


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for ensemble in list(_ENSEMBLES):
        ensemble._before_step(optimizer)


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for ensemble in list(_ENSEMBLES):
        ensemble._after_step(optimizer)


_register_fbalign_models()
