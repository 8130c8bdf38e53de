"""DFA points (Launay et al. 2020's "macro" DFA; TinyDFA's marker layers): the output error is injected at the
outputs of modules you name, through a fixed random matrix each, and everything inside each module trains by
backprop from that injected error.

    >>> model = fbalign.dfa_points(model, ["encoder.layers.*"], seed=0)   # each transformer block is a point
    >>> loss_fn(model(x), y).backward(); optimizer.step()               # an ordinary training loop
    >>> print(fbalign.summary(model))                                   # names the points and the error source

**The error.** ``e`` is the gradient of the loss with respect to the model's output (its first tensor when it
returns a tuple), or to the output of the module named by ``output=``. The layers above the last point (the head)
learn from ``e`` by backprop.

**The points.** The output ``o_k`` of each point module ``k`` receives ``φ(e · B_k)`` as its gradient *in place of*
whatever reaches it from above, so no error passes from one block to the block below through the forward weights:
each block learns from its own projection of the output error, by backprop inside it (or by the rule its layers
were converted to: ``dfa_points(fbalign.convert(model, "fa"), ...)`` composes). Layers below the first point (an
embedding) learn from the first block's error by backprop. ``B_k`` (buffer ``dfa_point_feedback`` on the point
module) is drawn as dfa draws its matrices (:class:`fbalign.dfa.DFA`'s ``init``, ``scale``, ``seed``,
``resolution``, ``feedback_nonlinearity``) at the first training forward, since its size depends on the sizes of
``e`` and ``o_k``; it is then a buffer like any other (state_dict, ``.to()``). Shapes follow layer-level dfa: when
``e`` has the leading (batch, time...) dimensions of ``o_k`` (a language model's per-token logits and a block's
per-token output) ``B_k`` is ``(n_err, features)`` and token ``t`` gets ``e_t · B_k``; when ``e`` has only the
batch dimension, ``(N, *, features)`` outputs get it broadcast over the middle dimensions and image maps
``(N, C, H, W)`` get a ``C × r × r`` map as in :mod:`fbalign.dfa`. A point whose output is a tuple (an LSTM's
``(output, (h, c))``) gets the error at its first tensor.

Inside :func:`fbalign.exact_backprop` the points are inactive: the model computes backprop's gradients (the
reference for alignment measurements). The layer-level rule ``dfa`` (:mod:`fbalign.dfa`) is unchanged and
independent: it sends the error to every layer's input.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

import torch
from torch import Tensor, nn

from . import nn as fbnn
from . import rules
from .dfa import DFA, _project

__all__ = ["dfa_points", "DFAPoints"]

_BUFFER = "dfa_point_feedback"


class _Pass:
    __slots__ = ("error", "points", "source")

    def __init__(self) -> None:
        self.error: Tensor | None = None
        self.source: Tensor | None = None  # the output the error will be taken at
        self.points: list[tuple[str, Tensor]] = []  # (name, output) of the points that ran in this pass


class _Record(torch.autograd.Function):
    """Identity whose backward stores the gradient at the error source's output: the output error ``e``."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, forward_pass: _Pass) -> Tensor:
        ctx.forward_pass = forward_pass
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        ctx.forward_pass.error = grad_output
        return grad_output, None


class _Inject(torch.autograd.Function):
    """Identity whose backward ignores the gradient from above and returns ``φ(e · B_k)`` shaped like the output."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, forward_pass: _Pass, module: nn.Module, name: str,
                nonlinearity: Any) -> Tensor:
        ctx.forward_pass, ctx.module, ctx.name, ctx.nonlinearity = forward_pass, module, name, nonlinearity
        ctx.shape_of = output.detach()  # a view: only its shape and dtype are read
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None, None, None]:
        error = ctx.forward_pass.error
        if error is None:
            raise RuntimeError(
                f"dfa_points: point '{ctx.name}' got its gradient before the output error existed: the loss does not "
                "depend on the model's output (or the output= module's) through it. Compute the loss from the "
                "model's output, or name the module whose output is the error with dfa_points(..., output=...)")
        matrix = getattr(ctx.module, _BUFFER)
        return _project(error, matrix, ctx.shape_of, ctx.nonlinearity, ctx.name), None, None, None, None


class DFAPoints(fbnn.ModelWiring):
    """The wiring installed by :func:`dfa_points`: the error source, the points, one :class:`_Pass` per forward."""

    def __init__(self, model: nn.Module, points: dict[str, nn.Module], rule: DFA, output: str | None) -> None:
        self.points = points
        self.rule = rule
        self.output = output
        self.model_ref = model
        self._passes: list[_Pass] = []

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # ModelWiring's: the hook handles that still have their model
        return {**(state if isinstance(state, dict) else self.__dict__), "_passes": []}

    def _active(self) -> bool:
        return (torch.is_grad_enabled() and bool(self._passes)
                and not self.model_ref.__dict__.get("_exact_depth", 0))

    def install(self, model: nn.Module) -> None:
        super().install(model)
        handles = [module.register_forward_hook(_PointHook(self, name)) for name, module in self.points.items()]
        if self.output is not None:
            handles.append(model.get_submodule(self.output).register_forward_hook(_SourceHook(self)))
        self.__dict__.setdefault("_handles", []).extend(handles)  # removed with the wiring's own hooks

    def before_forward(self, model: nn.Module, args: tuple) -> None:
        self._passes.append(_Pass())

    def after_forward(self, model: nn.Module, args: tuple, output: Any) -> Any:
        if not self._passes:
            return None
        done = self._passes.pop()
        if output is None or not done.points:
            return None
        if self.output is not None:
            if done.source is None:
                raise RuntimeError(f"dfa_points: points ran but the error source '{self.output}' did not run with "
                                   "gradient enabled in this forward, so they could never receive the output error")
            self._draw(done, done.source)
            return None
        tensor = _first_tensor(output)
        if tensor is None:
            raise RuntimeError("dfa_points: the model's output holds no tensor to take the error from; name the "
                               "module whose output is the error with dfa_points(..., output=...)")
        self._draw(done, tensor)
        return _replace_first(output, _Record.apply(tensor, done))

    def record_source(self, output: Any) -> Any:
        if not self._active():
            return None
        tensor = _first_tensor(output)
        if tensor is None:
            raise RuntimeError(f"dfa_points: the output of '{self.output}' holds no tensor to take the error from")
        current = self._passes[-1]
        current.source = tensor
        return _replace_first(output, _Record.apply(tensor, current))

    def inject(self, name: str, module: nn.Module, output: Any) -> Any:
        tensor = _first_tensor(output)
        if not self._passes:
            if torch.is_grad_enabled() and tensor is not None and tensor.requires_grad:
                raise RuntimeError(f"dfa_points: point '{name}' ran outside a forward of the model it is wired to, "
                                   "so there is no output error for it; train by calling the model itself")
            return None
        if not self._active() or tensor is None or not tensor.requires_grad:
            return None
        current = self._passes[-1]
        current.points.append((name, tensor))
        return _replace_first(output, _Inject.apply(tensor, current, module, name, self.rule._nonlinearity))

    def _draw(self, done: _Pass, error_like: Tensor) -> None:
        """Draw each point's ``B_k`` the first time its shapes are known (after the first forward that trains)."""
        n_err = error_like.shape[-1]
        for index, (name, output) in enumerate(done.points):
            module = self.points[name]
            if _BUFFER in module._buffers and module._buffers[_BUFFER].shape[0] == n_err:
                continue
            lead, target = error_like.shape[:-1], output.shape[:-1]
            if lead == target or output.dim() <= 3:
                shape: tuple[int, ...] = (n_err, output.shape[-1])
            else:  # an image map (N, C, *spatial) and one error per example
                shape = (n_err, output.shape[1], *[self.rule.resolution] * (output.dim() - 2))
            rule = self.rule if self.rule.seed is None else rules.get(self.rule, seed=self.rule.seed + index)
            module.register_buffer(_BUFFER, rule.draw(shape).to(output.dtype).to(output.device))

    def describe(self) -> str:
        source = f"module '{self.output}'" if self.output else "the model"
        return (f"dfa points: the output error is the gradient at the output of {source}; it replaces the gradient at "
                f"the output of {len(self.points)} point(s) ({', '.join(self.points)}) through each one's "
                f"{_BUFFER} matrix; inside each point, backprop")


class _PointHook:
    def __init__(self, wiring: DFAPoints, name: str) -> None:
        self.wiring, self.name = wiring, name

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.wiring.inject(self.name, module, output)


class _SourceHook:
    def __init__(self, wiring: DFAPoints) -> None:
        self.wiring = wiring

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.wiring.record_source(output)


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    return None


def _replace_first(output: Any, tensor: Tensor) -> Any:
    if isinstance(output, Tensor):
        return tensor
    first = _replace_first(output[0], tensor)
    return type(output)([first, *output[1:]]) if isinstance(output, list) else (first, *output[1:])


def dfa_points(model: nn.Module, points: list[str] | str, *, output: str | None = None, inplace: bool = False,
               **options: Any) -> nn.Module:
    """Inject the output error at the outputs of the modules named by ``points`` (see :mod:`fbalign.dfa_points`).

    Args:
        model: the module whose forward produces the output the loss sees.
        points: module names as in ``model.named_modules()``, globs allowed (``"encoder.layers.*"`` names each
            block, not their children: a glob matches names with no further dot than the pattern has).
        output: name of the module whose output gradient is the error; None (default): the model's output.
        inplace: modify ``model`` itself instead of a deep copy.
        **options: how the matrices are drawn, as for the ``dfa`` rule: ``init``, ``scale``, ``seed``,
            ``resolution``, ``feedback_nonlinearity``, ``feedback_saturation``.

    Returns:
        The model; :func:`fbalign.summary` describes the wiring.
    """
    if isinstance(points, str):
        points = [points]
    rule = rules.get("dfa", **options)
    assert isinstance(rule, DFA)
    names = dict(model.named_modules())
    chosen: dict[str, nn.Module] = {}
    for pattern in points:
        depth = pattern.count(".")
        found = [n for n in names if n and n.count(".") == depth and fnmatch.fnmatchcase(n, pattern)]
        if not found:
            raise ValueError(f"dfa_points: {pattern!r} names no module of the model; names are as in "
                             "model.named_modules(), e.g. 'encoder.layers.*' or 'blocks.0'")
        chosen.update((n, names[n]) for n in found)
    if output is not None and output not in names:
        raise ValueError(f"dfa_points: output={output!r} is not a module of the model")
    if not inplace:
        model = copy.deepcopy(model)
        names = dict(model.named_modules())
        chosen = {n: names[n] for n in chosen}
    DFAPoints.remove(model)
    for module in model.modules():  # hooks of an earlier wiring on the points and the source
        for key in [k for k, h in module._forward_hooks.items() if isinstance(h, (_PointHook, _SourceHook))]:
            del module._forward_hooks[key]
    wiring = DFAPoints(model, chosen, rule, output)
    wiring.install(model)
    return model
