"""What a feedback rule does to the error, compared with exact backprop, per layer, for one batch.

:func:`measure_alignment` runs the model twice on a batch: once as training runs it (the rule's pass) and once
inside :func:`fbalign.exact_backprop` (the backprop reference), each a forward and a backward, and compares
what the two send to every layer. Nothing the model or the training loop can see changes: no ``.grad`` is
written (gradients come from ``torch.autograd.grad``), the random streams are forked and restored (so a
``brsf`` redraw or a dropout mask in the measurement is not drawn from the training's stream), and buffers
(batch-norm statistics, rule state) are put back as they were.

:func:`measure_step` measures the same things on a training step as it happens, for one extra pass instead of
two: gradient hooks read the rule's pass off the step's own forward/backward, and only the backprop reference is
run again, from the random state and buffers the step started from.

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
``angle_b_wt/<layer>``           ∡(B, Wᵀ) = ∡(V, W), both flattened (where the rule's feedback is local,
                                 ``FeedbackRule.local_feedback``: not dfa's hidden layers)
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
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import FeedbackLayer, exact_backprop, feedback_layers

__all__ = ["angle", "example_angles", "nse", "measure_alignment", "measure_step"]

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


def _keep(found: dict[int, Tensor], index: int, grad: Tensor | None) -> None:
    """A gradient hook that stores the gradient and returns None, so the gradient itself is left as it is."""
    if grad is not None:
        found[index] = grad


def _or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    """A gradient that autograd left as None (nothing reached the tensor) is zero."""
    return torch.zeros_like(like) if grad is None else grad


class _LayerCalls:
    """While installed (a context manager): forward hooks on the fbalign layers that record every call's input and
    output, and gradient hooks that record the error at the outputs of the layers in ``output_errors_of`` and, with
    ``input_grads``, Δh at every input, as the backward computes them."""

    def __init__(self, layers: list[tuple[str, FeedbackLayer]], output_errors_of: set[str], input_grads: bool) -> None:
        self.layers, self.output_errors_of, self.input_grads = layers, output_errors_of, input_grads
        self.calls: dict[str, list[Tensor]] = {name: [] for name, _ in layers}  # layer -> its inputs, one per call
        self.outputs: dict[str, list[Tensor]] = {name: [] for name in output_errors_of}
        self.errors: dict[str, dict[int, Tensor]] = {name: {} for name in output_errors_of}
        self.input_grads_found: dict[str, dict[int, Tensor]] = {name: {} for name, _ in layers}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not torch.is_grad_enabled():
                return  # e.g. an evaluation inside the training step: no error goes anywhere
            index = len(self.calls[name])
            self.calls[name].append(args[0])
            if self.input_grads and args[0].requires_grad:
                args[0].register_hook(partial(_keep, self.input_grads_found[name], index))
            if name in self.errors:
                self.outputs[name].append(output)
                if output.requires_grad:
                    # A tensor hook sees the gradient of the value the layer produced, even if a later in-place op
                    # (ReLU(inplace=True)) rewrites the tensor; asking autograd.grad for the tensor would not.
                    output.register_hook(partial(_keep, self.errors[name], index))
        return hook

    def __enter__(self) -> _LayerCalls:
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def hidden_inputs(self) -> dict[int, Tensor]:
        """The recorded inputs that carry a gradient, by id (an input shared by several layers once)."""
        return {id(x): x for inputs in self.calls.values() for x in inputs if x.requires_grad}

    def fill(self, result: _Pass, input_grad: Callable[[str, int, Tensor], Tensor | None]) -> _Pass:
        """Put Δh (from ``input_grad(layer, call, input)``) and the output errors of every layer into ``result``;
        a layer with an input that carries no gradient (the data) has no Δh."""
        for name, inputs in self.calls.items():
            if inputs and all(x.requires_grad for x in inputs):
                result.dh[name] = [_or_zeros(input_grad(name, i, x), x) for i, x in enumerate(inputs)]
                if name in self.errors:
                    result.output_errors[name] = [self.errors[name].get(i, torch.zeros_like(y))
                                                  for i, y in enumerate(self.outputs[name])]
        return result


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return the scalar training loss; it returned {shape} "
                         "(use reduction='mean' or 'sum')")


def _run_pass(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any,
              layers: list[tuple[str, FeedbackLayer]], output_errors_of: set[str]) -> _Pass:
    """Forward and backward through ``model`` as it is set up now, with ``torch.autograd.grad`` (no ``.grad`` is
    written); record Δh at every layer input and the error at the outputs of the layers in ``output_errors_of``."""
    with _LayerCalls(layers, output_errors_of, input_grads=False) as calls, torch.enable_grad():
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        _check_loss(loss)
        if not loss.requires_grad:
            raise ValueError("the loss does not depend on any parameter that requires grad; nothing to measure")
        hidden = calls.hidden_inputs()
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        grads = torch.autograd.grad(loss, [*hidden.values(), *params.values()], allow_unused=True)
    grad_of = dict(zip(hidden, grads))
    result = _Pass(loss.detach(), outputs, grads=dict(zip(params, grads[len(hidden):])))
    return calls.fill(result, lambda name, i, x: grad_of[id(x)])


def _per_example(tensors: list[Tensor], n: int) -> Tensor:
    """A layer's tensors (one per call) as ``(n, D)`` rows, one per example; a single row when the leading
    dimension is not the batch's."""
    rows = n if all(t.dim() > 0 and t.shape[0] == n for t in tensors) else 1
    if len(tensors) == 1:
        return tensors[0].reshape(rows, -1)
    return torch.cat([t.reshape(rows, -1) for t in tensors], dim=1)


def _accelerators(model: nn.Module, inputs: Any) -> dict[str, list[int]]:
    """Device type -> indices of the accelerators the model's tensors (and the inputs) live on."""
    tensors = [*model.parameters(), *model.buffers()]
    if isinstance(inputs, Tensor):
        tensors.append(inputs)
    found: dict[str, set[int]] = {}
    for t in tensors:
        if t.device.type != "cpu":
            found.setdefault(t.device.type, set()).add(t.device.index or 0)
    return {device_type: sorted(indices) for device_type, indices in found.items()}


class _RandomState:
    """The state of the random streams the model can draw from: the CPU's and those of its accelerators."""

    def __init__(self, accelerators: dict[str, list[int]]) -> None:
        self.accelerators = accelerators
        self.cpu = torch.get_rng_state()
        self.devices = {(t, i): torch.get_device_module(t).get_rng_state(i)
                        for t, indices in accelerators.items() for i in indices}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for (device_type, index), state in self.devices.items():
            torch.get_device_module(device_type).set_rng_state(state, index)

    @contextlib.contextmanager
    def rewound(self) -> Iterator[None]:
        """Run the block from this state; afterwards the streams are where they were before the block."""
        now = _RandomState(self.accelerators)
        self.restore()
        try:
            yield
        finally:
            now.restore()


class _Buffers:
    """A copy of some buffers of a model, to put back (also where a module replaced a buffer by a new tensor)."""

    def __init__(self, model: nn.Module, skip: Collection[int] = ()) -> None:
        self.saved = [(module, name, buf, buf.clone()) for module in model.modules()
                      for name, buf in module._buffers.items() if buf is not None and id(buf) not in skip]

    @torch.no_grad()
    def restore(self) -> None:
        for module, name, original, saved in self.saved:
            original.copy_(saved)
            module._buffers[name] = original


@contextlib.contextmanager
def _leaves_no_trace(model: nn.Module, inputs: Any) -> Iterator[Callable[[], contextlib.AbstractContextManager]]:
    """Restore every buffer of ``model`` on exit; yield a factory of contexts that each run from, and then restore,
    the random state as it was on entry (CPU and every accelerator in use), so each pass sees the same draws."""
    buffers = _Buffers(model)
    random_state = _RandomState(_accelerators(model, inputs))
    try:
        yield random_state.rewound
    finally:
        buffers.restore()


def _reference_scores(model: nn.Module, loss_fn: LossFn, reference: tuple[Any, Any]) -> dict[str, Tensor]:
    """Loss (and NSE when defined) on held-out data, in eval mode and without gradients; leaves no trace."""
    inputs, targets = reference
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with _leaves_no_trace(model, inputs) as same_random_draws, same_random_draws(), torch.no_grad():
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


def _layers_to_measure(model: nn.Module) -> list[tuple[str, FeedbackLayer]]:
    layers = feedback_layers(model)
    if not layers:
        raise ValueError("the model has no fbalign layers, so there is no rule to compare with backprop; convert it "
                         "first, e.g. fbalign.convert(model, 'fa')")
    return layers


def _linear_layers(layers: list[tuple[str, FeedbackLayer]], pseudo_backprop: bool) -> set[str]:
    """The layers whose output error is recorded for ∡(Δh, W⁺e)."""
    return {name for name, layer in layers if isinstance(layer, nn.Linear)} if pseudo_backprop else set()


def _compare(model: nn.Module, layers: list[tuple[str, FeedbackLayer]], rule: _Pass, bp: _Pass, inputs: Any,
             targets: Any) -> dict[str, Tensor]:
    """Every key of the module docstring but the reference scores, from the rule's pass and backprop's; the
    feedback matrices are read as the rule's pass used them."""
    outputs = rule.outputs.detach() if isinstance(rule.outputs, Tensor) else rule.outputs
    n = _batch_size(outputs, inputs)
    values: dict[str, Tensor] = {"loss": rule.loss}
    if _regression(outputs, targets):
        values["nse"] = nse(outputs, targets)
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
            feedback = layer.rule.local_feedback(layer)  # None where ∡(B, Wᵀ) means nothing (dfa's hidden layers)
            if feedback is not None and feedback.shape == weight.shape:
                groups["angle_b_wt"][label] = angle(feedback, weight)
                groups["norm_ratio_b_w"][label] = feedback.norm() / weight.norm()
        params = dict(model.named_parameters())
        for name, grad in rule.grads.items():
            grad_bp = bp.grads.get(name)
            if grad is not None or grad_bp is not None:
                groups["angle_grad_bp"][name] = angle(_or_zeros(grad, params[name]), _or_zeros(grad_bp, params[name]))
    for group, per_name in groups.items():
        values.update({f"{group}/{name}": v for name, v in per_name.items()})
    return values


def _as_floats(values: dict[str, Tensor]) -> dict[str, float]:
    # One transfer for all the numbers (one device sync on an accelerator).
    device = values["loss"].device
    numbers = torch.stack([v.detach().to(device, torch.float64) for v in values.values()]).tolist()
    return dict(zip(values, numbers))


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

    Example::

        >>> values = measure_alignment(model, F.cross_entropy, x, y)
        >>> values["angle_dh_bp/2"]          # degrees between the rule's Δh and backprop's at layer '2''s input

    Returns:
        A flat dict of floats. Costs two forward/backward passes on the batch (the rule's and backprop's) and
        leaves no trace: parameters, ``.grad``, buffers and random streams are as they were. While training,
        :func:`measure_step` gets the same numbers for one extra pass instead of two.
    """
    layers = _layers_to_measure(model)
    linear = _linear_layers(layers, pseudo_backprop)
    with _leaves_no_trace(model, inputs) as same_random_draws:
        with same_random_draws():
            rule = _run_pass(model, loss_fn, inputs, targets, layers, output_errors_of=linear)
        with same_random_draws(), exact_backprop(model):
            bp = _run_pass(model, loss_fn, inputs, targets, layers, output_errors_of=set())
        values = _compare(model, layers, rule, bp, inputs, targets)  # with the feedback the rule's pass used
    if reference is not None:
        values.update(_reference_scores(model, loss_fn, reference))
    return _as_floats(values)


@contextlib.contextmanager
def measure_step(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, *,
                 reference: tuple[Any, Any] | None = None, pseudo_backprop: bool = False) -> Iterator[dict[str, float]]:
    """Measure alignment on the training step run inside the block, for one extra forward/backward (backprop's).

        with measure_step(model, loss_fn, x, y) as measured:
            loss = loss_fn(model(x), y)
            loss.backward()
        optimizer.step()            # after the block: the reference pass needs the weights the step's pass saw
        measured["angle_dh_bp/2"]   # filled in when the block ends

    The block must run one forward of ``model`` on ``inputs`` and the backward of ``loss_fn(outputs, targets)``,
    as training does. Hooks record the rule's Δh at every layer input and every parameter's gradient as that
    backward computes them (the hooks return nothing, so no gradient changes, and ``.grad`` is not read: gradient
    accumulation is no problem). When the block ends, backprop's pass runs once inside
    :func:`fbalign.exact_backprop` from the random state and buffers the training forward started from (so it sees
    the same dropout masks), and the random streams and buffers are then put back as training left them. Training
    follows the same trajectory, bit for bit, as without the measurement.

    Yields a dict, filled on exit with the keys of :func:`measure_alignment` (same arguments, same values); left
    empty if the block raises.

    Raises:
        ValueError: the block ran the model other than once with gradients, ran no backward reaching a parameter,
            or changed a parameter (an ``optimizer.step()`` inside the block).
    """
    layers = _layers_to_measure(model)
    linear = _linear_layers(layers, pseudo_backprop)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    versions = {name: p._version for name, p in params.items()}
    # Rule buffers are neither read nor written inside exact_backprop, so only the others need rewinding.
    rule_buffers = {id(buffer) for _, layer in layers for buffer in layer.rule_buffers().values()}
    start_buffers = _Buffers(model, skip=rule_buffers)
    start_random = _RandomState(_accelerators(model, inputs))
    grads: dict[str, dict[int, Tensor]] = {name: {} for name in params}
    forwards: list[Any] = []
    measured: dict[str, float] = {}
    with contextlib.ExitStack() as hooks:
        calls = hooks.enter_context(_LayerCalls(layers, linear, input_grads=True))
        for name, p in params.items():
            hooks.callback(p.register_hook(partial(_keep, grads[name], 0)).remove)
        hooks.callback(model.register_forward_hook(partial(_top_level_forward, forwards)).remove)
        yield measured

    if any(p._version != versions[name] for name, p in params.items()):
        raise ValueError("a parameter changed inside measure_step() / recorder.step(): call optimizer.step() after "
                         "the with-block, so that the backprop reference sees the weights the training pass saw")
    if len(forwards) != 1:
        raise ValueError(f"measure_step() / recorder.step() measures one training step: one forward of the model on "
                         f"the batch and its backward, but the model ran {len(forwards)} times with gradients "
                         "inside the block; measure a single forward/backward, or use measure_alignment()")
    if not any(grads.values()):
        raise ValueError("no gradient reached the model's parameters inside measure_step() / recorder.step(): run "
                         "loss.backward() inside the with-block")
    outputs = forwards[0]
    with torch.no_grad():
        loss = loss_fn(outputs, targets)
    _check_loss(loss)
    rule = _Pass(loss.detach(), outputs, grads={name: found.get(0) for name, found in grads.items()})
    calls.fill(rule, lambda name, i, x: calls.input_grads_found[name].get(i))

    trained_buffers = _Buffers(model, skip=rule_buffers)
    start_buffers.restore()
    try:
        # Scored as the model was when the step began (batch-norm statistics included), as measure_alignment does.
        scores = _reference_scores(model, loss_fn, reference) if reference is not None else {}
        with start_random.rewound(), exact_backprop(model):
            bp = _run_pass(model, loss_fn, inputs, targets, layers, output_errors_of=set())
    finally:
        trained_buffers.restore()
    values = _compare(model, layers, rule, bp, inputs, targets)
    measured.update(_as_floats({**values, **scores}))


def _top_level_forward(forwards: list[Any], model: nn.Module, args: tuple, output: Any) -> None:
    if torch.is_grad_enabled():
        forwards.append(output)
