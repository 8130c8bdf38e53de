"""Optimizers for asymmetric-feedback training.

:class:`BatchManhattan` (Liao, Leibo & Poggio 2016) steps every weight by the *sign* of its mini-batch gradient:
the update no longer depends on the gradient's size, only on its direction per element, which Liao et al. found
indispensable for sign-symmetric feedback (whose error signals are badly scaled) unless Batch Normalization is
used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchManhattan"]


class BatchManhattan(torch.optim.Optimizer):
    r"""Stochastic gradient descent along the sign of the mini-batch gradient (Batch Manhattan).

    Exactly :class:`torch.optim.SGD` with each gradient ``g`` replaced by ``sign(g)`` before weight decay,
    momentum and Nesterov are applied, as in the sign-symmetry reference code (Xiao et al. 2018's ``BMSGD``):

    .. math::
        d_t &= \operatorname{sign}(g_t) + \lambda\,\theta_{t-1} \\
        b_t &= \begin{cases} d_t & t = 1 \\ \mu\, b_{t-1} + (1 - \tau)\, d_t & t > 1 \end{cases} \\
        \theta_t &= \theta_{t-1} - \gamma \cdot \begin{cases} d_t + \mu\, b_t & \text{nesterov} \\
                                                     b_t & \text{momentum } \mu > 0 \\
                                                     d_t & \text{otherwise} \end{cases}

    With no momentum and no decay each element moves by exactly ``lr`` against the sign of its gradient (not at
    all where the gradient is exactly zero). ``sign(-g) = -sign(g)``, so ``maximize=True`` simply climbs.

    Args:
        params: iterable of parameters or dicts defining parameter groups (as for any torch optimizer).
        lr: step size γ: how far each element moves per step (default: 1e-3).
        momentum: momentum factor μ (default: 0).
        dampening: dampening τ for momentum (default: 0).
        weight_decay: L2 penalty λ, added to the *sign* (default: 0), so it keeps its size relative to it.
        nesterov: Nesterov momentum (default: False).
        maximize: maximize the objective instead of minimizing it (default: False).

    State: ``momentum_buffer`` per parameter when ``momentum > 0``, saved by ``state_dict`` like SGD's.

    Example::

        >>> optimizer = fbalign.optim.BatchManhattan(model.parameters(), lr=1e-4, momentum=0.9)
        >>> optimizer.zero_grad()
        >>> loss_fn(model(input), target).backward()
        >>> optimizer.step()
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum} (must be >= 0)")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss, as for SGD."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
            weight_decay, nesterov = group["weight_decay"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BatchManhattan does not support sparse gradients; use torch.optim.SparseAdam "
                                       "or give the sparse parameters to a separate optimizer")
                if p.grad.is_complex():
                    raise RuntimeError("BatchManhattan steps along sign(gradient), which is undefined for complex "
                                       "parameters; view them as real with torch.view_as_real")
                direction = torch.sign(p.grad)
                if group["maximize"]:
                    direction.neg_()
                if weight_decay != 0:
                    direction.add_(p, alpha=weight_decay)
                if momentum != 0:
                    state = self.state[p]
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = state["momentum_buffer"] = direction.clone()
                    else:
                        buffer.mul_(momentum).add_(direction, alpha=1 - dampening)
                    direction = direction.add_(buffer, alpha=momentum) if nesterov else buffer
                p.add_(direction, alpha=-lr)
        return loss
