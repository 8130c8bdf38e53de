"""What a feedback rule does to the error, compared with exact backprop, per layer, for one batch.

:func:`measure_alignment` runs the model twice on a batch: once as training runs it (the rule's pass) and once
inside :func:`fbalign.exact_backprop` (the backprop reference), each a forward and a backward, and compares
what the two send to every layer. Nothing the model or the training loop can see changes: no ``.grad`` is
written (gradients come from ``torch.autograd.grad``), the random streams are forked and restored (so a
``brsf`` redraw or a dropout mask in the measurement is not drawn from the training's stream), and buffers
(batch-norm statistics, rule state) are put back as they were.

Notation (Lillicrap et al. 2016): for a layer ``y = W h`` with error ``e = -∂L/∂y``, backprop sends
``Δh_BP = Wᵀe`` below it, a rule with feedback matrix ``B`` sends ``Δh = B e`` (fbalign stores ``V = Bᵀ``
in the weight's shape), pseudo-backprop sends ``Δh_PBP = W⁺e``. Here ``Δh`` of a layer is ``-∂L/∂(its
input)`` in the whole network, so it covers any rule (also ones whose error does not come from the layer
above) and any architecture.

Keys of the returned dict (angles in degrees; a layer is named as in ``model.named_modules()``):

===============================  ===================================================================
``loss``                         the training loss on the batch
``nse``                          normalized squared error on the batch (:func:`nse`); only when the
                                 targets have the outputs' shape (regression / one-hot targets)
``nse_reference``,               the same and the loss on ``reference`` data (eval mode, no gradient),
``loss_reference``               when ``reference=(inputs, targets)`` is given
``angle_dh_bp/<layer>``          ∡(Δh, Δh_BP) at the layer's input, per example, averaged over the
                                 batch (Lillicrap Fig. 1e, 2b)
``frac_agree_dh_bp/<layer>``     fraction of examples with Δh · Δh_BP > 0; for the layer just below
                                 the output this is the fraction with eᵀ W B e > 0
``angle_dh_pbp/<layer>``         ∡(Δh, W⁺e) with ``e`` the error arriving at the layer's output under
                                 the rule (Linear layers; Lillicrap Fig. 4c)
``angle_b_wt/<layer>``           ∡(B, Wᵀ) = ∡(V, W), both flattened (rules whose feedback has W's shape and
                                 carries the error at the layer's own output: not dfa's hidden layers)
``norm_ratio_b_w/<layer>``       ‖B‖ / ‖W‖ (Frobenius)
``angle_grad_bp/<parameter>``    ∡ between the rule's gradient of each parameter tensor and backprop's
                                 (the weights' update directions; conv kernels included)
===============================  ===================================================================

``Δh`` keys exist for layers whose input carries a gradient (not the first layer, whose input is the data).
An angle is NaN where it is undefined: an example (or tensor) where either vector is zero, e.g. below a
``shallow`` layer, which sends no error down.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..dfa import DFA, DirectFeedback
from ..nn import FeedbackLayer, ModelWiring, exact_backprop, feedback_layers

__all__ = ["angle", "example_angles", "nse", "measure_alignment"]

LossFn = Callable[[Any, Any], Tensor]


def _angles_between_rows(a: Tensor, b: Tensor) -> Tensor:
    """Degrees between the rows of two ``(N, D)`` tensors as float64 ``(N,)``, NaN where a row is zero.

    ``2·atan2(‖b − k·a‖, ‖b + k·a‖)`` with ``k = ‖b‖/‖a‖`` (Kahan's ``2·atan2(‖â − b̂‖, ‖â + b̂‖)`` scaled by ‖b‖)
    rather than ``acos(â·b̂)``: accurate at 0° and 180°, where acos loses half the digits, even in float32 (two
    equal vectors give exactly 0); so half-precision input is only widened to float32. Four passes over the data.
    """
    a, b = _at_least_float32(a), _at_least_float32(b)
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    k = norm_b / norm_a
    apart = torch.linalg.vector_norm(torch.addcmul(b, a, k, value=-1), dim=1)
    together = torch.linalg.vector_norm(torch.addcmul(b, a, k), dim=1)
    degrees = torch.rad2deg(2 * torch.atan2(apart.double(), together.double()))
    defined = (norm_a > 0).squeeze(1) & (norm_b > 0).squeeze(1)
    return torch.where(defined, degrees, torch.nan)


def _at_least_float32(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def angle(a: Tensor, b: Tensor) -> Tensor:
    """The angle in degrees between ``a`` and ``b``, each flattened (same number of elements); NaN if either is 0.

    Returns a 0-dim float64 tensor.
    """
    if a.numel() != b.numel():
        raise ValueError(f"angle() needs tensors with as many elements; got shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return _angles_between_rows(a.reshape(1, -1), b.reshape(1, -1))[0]


def example_angles(a: Tensor, b: Tensor) -> Tensor:
    """Per-example angles in degrees between ``a`` and ``b`` of shape ``(N, *)``: the rows of their ``(N, -1)``
    views. Returns shape ``(N,)`` float64, NaN for an example where either vector is zero."""
    if a.shape != b.shape or a.dim() == 0:
        raise ValueError(f"example_angles() needs two tensors of one shape (N, *); got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return _angles_between_rows(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def nse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Normalized squared error ``NSE = Σₙ‖y*ₙ − yₙ‖² / Σₙ‖y*ₙ − ȳ*‖²`` (Lillicrap et al. 2016).

    ``y = outputs``, ``y* = targets``, both ``(N, *)``; ``ȳ*`` is the mean target over the N examples. So
    NSE = mean squared error / variance of the targets: 0 is perfect, 1 is no better than always predicting
    the mean target. Needs N ≥ 2 distinct targets (NaN otherwise). Returns a 0-dim float64 tensor.
    """
    if outputs.shape != targets.shape:
        raise ValueError(f"nse() needs outputs and targets of one shape; got {tuple(outputs.shape)} and "
                         f"{tuple(targets.shape)} (class labels have no NSE; use one-hot targets)")
    y, y_star = outputs.detach().double(), targets.detach().double()
    spread = (y_star - y_star.mean(0)).square().sum()
    return (y_star - y).square().sum() / spread if spread > 0 else torch.tensor(torch.nan, dtype=torch.float64)


@dataclass
class _Pass:
    """What one forward/backward of the model sent where."""

    loss: Tensor
    outputs: Any  # what the model returned
    # Gradients, not updates: every comparison below has the same sign flip on both sides (Δh = −∂L/∂input,
    # e = −∂L/∂output, ΔW = −∂L/∂W), which changes no angle, dot-product sign or norm ratio.
    dh: dict[str, list[Tensor]] = field(default_factory=dict)  # layer -> ∂L/∂input, one per call
    output_errors: dict[str, list[Tensor]] = field(default_factory=dict)  # layer -> ∂L/∂output, one per call
    grads: dict[str, Tensor | None] = field(default_factory=dict)  # parameter -> ∂L/∂parameter


def _run_pass(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any,
              layers: list[tuple[str, FeedbackLayer]], output_errors_of: set[str]) -> _Pass:
    """Forward and backward through ``model`` as it is set up now; record Δh at every layer input and the error
    at the outputs of the layers in ``output_errors_of``."""
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name, _ in layers}
    errors: dict[str, dict[int, Tensor]] = {name: {} for name in output_errors_of}

    def remember(name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            calls[name].append((args[0], output))
            if name in errors and output.requires_grad:
                # A tensor hook sees the gradient of the value the layer produced, even if a later in-place op
                # (ReLU(inplace=True)) rewrites the tensor; asking autograd.grad for the tensor would not.
                output.register_hook(partial(_keep, errors[name], len(calls[name]) - 1))
        return hook

    handles = [layer.register_forward_hook(remember(name)) for name, layer in layers]
    try:
        with torch.enable_grad():
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"loss_fn must return the scalar training loss; it returned {shape} "
                                 "(use reduction='mean' or 'sum')")
            if not loss.requires_grad:
                raise ValueError("the loss does not depend on any parameter that requires grad; nothing to measure")
            hidden = {id(x): x for name in calls for x, _ in calls[name] if x.requires_grad}
            params = {name: p for name, p in model.named_parameters() if p.requires_grad}
            grads = torch.autograd.grad(loss, [*hidden.values(), *params.values()], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    grad_of = dict(zip(hidden, grads))
    result = _Pass(loss.detach(), outputs, grads=dict(zip(params, grads[len(hidden):])))
    for name, layer_calls in calls.items():
        if layer_calls and all(x.requires_grad for x, _ in layer_calls):
            result.dh[name] = [_or_zeros(grad_of[id(x)], x) for x, _ in layer_calls]
            if name in errors:
                result.output_errors[name] = [errors[name].get(i, torch.zeros_like(y))
                                              for i, (_, y) in enumerate(layer_calls)]
    return result


def _keep(errors: dict[int, Tensor], index: int, grad: Tensor | None) -> None:
    if grad is not None:
        errors[index] = grad


def _or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    """A gradient that autograd left as None (nothing reached the tensor) is zero."""
    return torch.zeros_like(like) if grad is None else grad


def _per_example(tensors: list[Tensor], n: int) -> Tensor:
    """A layer's tensors (one per call) as ``(n, D)`` rows, one per example; a single row when the leading
    dimension is not the batch's."""
    rows = n if all(t.dim() > 0 and t.shape[0] == n for t in tensors) else 1
    if len(tensors) == 1:
        return tensors[0].reshape(rows, -1)
    return torch.cat([t.reshape(rows, -1) for t in tensors], dim=1)


@contextlib.contextmanager
def _leaves_no_trace(model: nn.Module, inputs: Any) -> Iterator[Callable[[], contextlib.AbstractContextManager]]:
    """Restore every buffer of ``model`` on exit; yield a factory of contexts that each run from, and then restore,
    the random state as it was on entry (CPU and every accelerator in use), so each pass sees the same draws."""
    buffers = [(module, name, buf, buf.clone()) for module in model.modules()
               for name, buf in module._buffers.items() if buf is not None]
    tensors = [*model.parameters(), *model.buffers()]
    if isinstance(inputs, Tensor):
        tensors.append(inputs)
    accelerators: dict[str, set[int]] = {}
    for t in tensors:
        if t.device.type != "cpu":
            accelerators.setdefault(t.device.type, set()).add(t.device.index or 0)

    @contextlib.contextmanager
    def same_random_draws() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=[]))
            for device_type, indices in accelerators.items():
                stack.enter_context(torch.random.fork_rng(devices=sorted(indices), device_type=device_type))
            yield

    try:
        yield same_random_draws
    finally:
        with torch.no_grad():
            for module, name, original, saved in buffers:
                original.copy_(saved)
                module._buffers[name] = original


def _reference_scores(model: nn.Module, loss_fn: LossFn, reference: tuple[Any, Any]) -> dict[str, Tensor]:
    """Loss (and NSE when defined) on held-out data, in eval mode and without gradients."""
    inputs, targets = reference
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(inputs)
            scores = {"loss_reference": loss_fn(outputs, targets).detach()}
    finally:
        for module, training in modes:
            module.training = training
    if _regression(outputs, targets):
        scores["nse_reference"] = nse(outputs, targets)
    return scores


def _regression(outputs: Any, targets: Any) -> bool:
    """Targets in the outputs' space (NSE is defined), rather than class labels."""
    return (isinstance(outputs, Tensor) and isinstance(targets, Tensor) and targets.shape == outputs.shape
            and targets.is_floating_point())


def _batch_size(outputs: Any, inputs: Any) -> int:
    """Examples are along the first dimension of the output (or of the input, for outputs that are not a tensor)."""
    for t in (outputs, inputs):
        if isinstance(t, Tensor):
            return t.shape[0] if t.dim() > 1 else 1
    return 1


def _display_name(name: str) -> str:
    return name or "(model)"


def measure_alignment(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, *,
                      reference: tuple[Any, Any] | None = None, pseudo_backprop: bool = False) -> dict[str, float]:
    """Measure how the rule's updates align with backprop's on one batch (see the module docstring for the keys).

    Args:
        model: a model with fbalign layers (see :func:`fbalign.convert`), in the mode it trains in.
        loss_fn: ``loss_fn(model(inputs), targets)`` is the scalar training loss.
        inputs, targets: one batch, examples along the first dimension.
        reference: optional held-out ``(inputs, targets)`` for ``loss_reference`` and ``nse_reference``.
        pseudo_backprop: also measure ``angle_dh_pbp``. Off by default: it costs a pseudo-inverse (an SVD) of every
            Linear weight, which on wide layers outweighs the two passes (Lillicrap's small nets: turn it on).

    Returns:
        A flat dict of floats. Costs two forward/backward passes on the batch (the rule's and backprop's) and
        leaves no trace: parameters, ``.grad``, buffers and random streams are as they were.
    """
    layers = feedback_layers(model)
    if not layers:
        raise ValueError("the model has no fbalign layers, so there is no rule to compare with backprop; convert it "
                         "first, e.g. fbalign.convert(model, 'fa')")
    linear = {name for name, layer in layers if isinstance(layer, nn.Linear)} if pseudo_backprop else set()
    with _leaves_no_trace(model, inputs) as same_random_draws:
        with same_random_draws():
            rule = _run_pass(model, loss_fn, inputs, targets, layers, output_errors_of=linear)
        with same_random_draws(), exact_backprop(model):
            bp = _run_pass(model, loss_fn, inputs, targets, layers, output_errors_of=set())
    outputs = rule.outputs.detach() if isinstance(rule.outputs, Tensor) else rule.outputs
    n = _batch_size(outputs, inputs)

    values: dict[str, Tensor] = {"loss": rule.loss}
    if _regression(outputs, targets):
        values["nse"] = nse(outputs, targets)
    if reference is not None:
        with _leaves_no_trace(model, reference[0]) as same_random_draws, same_random_draws():
            values.update(_reference_scores(model, loss_fn, reference))

    # A dfa layer's B multiplies the network's output error, not the error at its own output as W does, so ∡(B, Wᵀ)
    # means nothing there (even when the shapes happen to match); the error source's B is an ordinary feedback matrix.
    sources = {id(w.source) for w in ModelWiring.installed(model) if isinstance(w, DirectFeedback)}
    direct_receivers = {id(layer) for _, layer in layers if isinstance(layer.rule, DFA) and id(layer) not in sources}
    groups: dict[str, dict[str, Tensor]] = {key: {} for key in (
        "angle_dh_bp", "frac_agree_dh_bp", "angle_dh_pbp", "angle_b_wt", "norm_ratio_b_w", "angle_grad_bp")}
    with torch.no_grad():
        for name, layer in layers:
            label = _display_name(name)
            if name in rule.dh and name in bp.dh:
                dh, dh_bp = _per_example(rule.dh[name], n), _per_example(bp.dh[name], n)
                groups["angle_dh_bp"][label] = example_angles(dh, dh_bp).nanmean()
                agree = torch.linalg.vecdot(_at_least_float32(dh), _at_least_float32(dh_bp)) > 0
                groups["frac_agree_dh_bp"][label] = agree.double().mean()
                if name in rule.output_errors:
                    w_pinv_t = torch.linalg.pinv(layer.weight.detach()).mT
                    dh_pbp = _per_example([e @ w_pinv_t for e in rule.output_errors[name]], n)
                    groups["angle_dh_pbp"][label] = example_angles(dh, dh_pbp).nanmean()
            weight = layer.weight.detach()
            feedback = layer.rule.feedback(layer) if id(layer) not in direct_receivers else None
            if feedback is not None and feedback.shape == weight.shape:
                groups["angle_b_wt"][label] = angle(feedback, weight)
                groups["norm_ratio_b_w"][label] = feedback.norm() / weight.norm()
        params = dict(model.named_parameters())
        for name, grad in rule.grads.items():
            grad_bp = bp.grads[name]
            if grad is not None or grad_bp is not None:
                groups["angle_grad_bp"][name] = angle(_or_zeros(grad, params[name]), _or_zeros(grad_bp, params[name]))
    for group, per_name in groups.items():
        values.update({f"{group}/{name}": v for name, v in per_name.items()})
    # One transfer for all the numbers (one device sync on an accelerator).
    device = rule.loss.device
    numbers = torch.stack([v.detach().to(device, torch.float64) for v in values.values()]).tolist()
    return dict(zip(values, numbers))
