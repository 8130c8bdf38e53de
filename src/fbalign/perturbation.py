"""Node perturbation (Williams 1992; the "reinforcement learning" curve of Lillicrap et al. 2016, Fig. 1d): learning
without any backward pathway.

Every layer's output (each unit's activity, ``a = W x + b``) is perturbed with Gaussian noise ``ξ ~ N(0, σ²)``;
the change in loss ``δL = L(perturbed) − L(clean)`` is correlated with the noise, ``ĝ = δL · ξ / σ²``, which is an
unbiased estimate of ``∂L/∂a`` for small σ; each weight then learns locally from it, ``ĝ xᵀ`` (the same local
product every rule uses, with ĝ in place of the backpropagated error). All layers are perturbed at once, so the
estimate is noisy and learning slow — which is the point of the comparison.

    >>> perturbation = fbalign.NodePerturbation(model, sigma=1e-3, seed=0)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    >>> for x, target in batches:
    ...     optimizer.zero_grad()
    ...     loss = perturbation.backward(x, lambda y: ((y - target) ** 2).sum(1))   # two forwards, no backprop
    ...     optimizer.step()

Only the perturbed layers' weights and biases get gradients (other parameters, e.g. BatchNorm's, get none).
Both forwards run in the model's current mode: dropout or batch statistics that differ between them add to δL,
so use deterministic models (or ``model.eval()``) for clean estimates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NodePerturbation"]

_PERTURBABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class NodePerturbation:
    """Fills ``.grad`` of a model's Linear/Conv layers with node-perturbation estimates; step any optimizer on them.

    Args:
        model: the network (plain torch layers or fbalign layers alike).
        sigma: σ, the standard deviation of the noise added to every unit's output.
        layers: names (as in ``model.named_modules()``) of the layers to perturb and train; None: every
            Linear and Conv1d/2d/3d.
        seed: seeds the noise (a generator of its own, saved by :meth:`state_dict`); None draws the seed from
            torch's global RNG.
    """

    def __init__(self, model: nn.Module, sigma: float = 1e-3, *, layers: list[str] | None = None,
                 seed: int | None = None) -> None:
        if not sigma > 0:
            raise ValueError(f"NodePerturbation: sigma must be > 0, got {sigma}")
        available = {name: m for name, m in model.named_modules() if isinstance(m, _PERTURBABLE)}
        if not available:
            raise ValueError("NodePerturbation: the model has no Linear or Conv layers to perturb")
        if layers is None:
            layers = list(available)
        unknown = [name for name in layers if name not in available]
        if unknown:
            raise ValueError(f"NodePerturbation: {', '.join(map(repr, unknown))} is not a Linear/Conv layer of the "
                             f"model; these are: {', '.join(available)}")
        self.model = model
        self.sigma = sigma
        self.layers = [available[name] for name in layers]
        self.seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if seed is None else seed
        self._generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None

    def _noise_like(self, output: Tensor) -> Tensor:
        if self._generator is None or self._generator.device != output.device:
            self._generator = torch.Generator(device=output.device).manual_seed(self.seed)
            if self._pending_state is not None:
                self._generator.set_state(self._pending_state)
                self._pending_state = None
        return torch.randn(output.shape, generator=self._generator, device=output.device,
                           dtype=output.dtype).mul_(self.sigma)

    def backward(self, input: Any, loss_fn: Callable[[Any], Tensor]) -> Tensor:
        """Run a clean and a perturbed forward of ``input``, accumulate the estimated gradients into ``.grad``.

        Args:
            input: what ``model(input)`` takes; the batch is dimension 0 of every layer's output.
            loss_fn: maps the model's output to the loss: one value per example (``reduction='none'``, shape
                ``(N,)``), whose mean is the objective, or a scalar. Per-example losses give each example's noise
                its own loss change, a much less noisy estimate.

        Returns:
            The clean loss (the mean, when per example), detached.
        """
        outputs: list[Tensor] = []
        noises: list[Tensor] = []

        def cut_below(module: nn.Module, args: tuple) -> tuple:
            return tuple(a.detach() if isinstance(a, Tensor) else a for a in args)  # each layer's graph stays local

        def record(module: nn.Module, args: tuple, output: Tensor) -> None:
            outputs.append(output)

        def perturb(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            noises.append(self._noise_like(output))
            return output + noises[-1]

        with _hooks(self.layers, pre=cut_below, post=record), torch.enable_grad():
            out = self.model(input)
        with torch.no_grad():
            clean = loss_fn(out)
            with _hooks(self.layers, post=perturb):
                perturbed = loss_fn(self.model(input))
        change = (perturbed - clean).detach()
        if change.dim() == 0:
            weight = change / self.sigma ** 2
        elif change.dim() == 1:
            weight = change / (self.sigma ** 2 * change.shape[0])  # the mean's gradient
        else:
            raise ValueError(f"NodePerturbation: loss_fn must return a scalar or one loss per example (N,), got shape "
                             f"{tuple(change.shape)}")
        if len(outputs) != len(noises):
            raise RuntimeError("NodePerturbation: the two forwards ran different layers; the model must be "
                               "deterministic in which layers it runs")
        estimates = []
        for noise in noises:
            per_example = weight.reshape(-1, *[1] * (noise.dim() - 1)) if weight.dim() == 1 else weight
            estimates.append(noise * per_example)
        torch.autograd.backward(outputs, estimates)
        return clean.mean().detach()

    def state_dict(self) -> dict[str, Any]:
        """σ, the seed and the noise generator's state: what resuming needs to draw the same noise."""
        state = self._generator.get_state() if self._generator is not None else self._pending_state
        return {"sigma": self.sigma, "seed": self.seed, "generator": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sigma, self.seed = state["sigma"], state["seed"]
        self._generator = None
        self._pending_state = state["generator"]


@contextmanager
def _hooks(modules: list[nn.Module], pre: Callable | None = None, post: Callable | None = None) -> Iterator[None]:
    """Register a forward pre-hook and/or a forward hook on each module for the duration of the block."""
    handles = []
    try:
        for module in modules:
            if pre is not None:
                handles.append(module.register_forward_pre_hook(pre))
            if post is not None:
                handles.append(module.register_forward_hook(post))
        yield
    finally:
        for handle in handles:
            handle.remove()
