"""The linear student's learning dynamics, as Lillicrap et al. (2016, Supplementary Notes) analyse them, computed
by fbalign's own layers: the expected update over x ~ N(0, I), FA's conserved quantity B·W + Wᵀ·Bᵀ − A·Aᵀ (and
backprop's Wᵀ·W − A·Aᵀ), Euler and 8th-order Runge–Kutta paths of the expected dynamics, and one-pair training
from zero, where FA's hidden update is a positive multiple of pseudo-backprop's.

The student is ``y = W·A·x`` (``A`` the hidden layer's weight, 20×30; ``W`` the output layer's, 10×20), the task
``y* = T·x``; a layer ``y = W h`` sends the error ``e`` below as ``Wᵀe`` (backprop), ``B e`` (FA; fbalign stores
``V = Bᵀ``) or ``W⁺e`` (pseudo-backprop).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import fbalign
from fbalign.metrics import measure_alignment

from .toolkit import half_sse, output_layer

__all__ = ["linear_pair", "expected_update", "invariants", "angle_and_sine", "euler_path", "integrate_path",
           "single_pair_path"]


def linear_pair(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The two fbalign Linear layers of a 2-layer linear student: the hidden one (weight ``A``, 20×30) and the
    output one (weight ``W``, 10×20)."""
    layers = [layer for _, layer in fbalign.feedback_layers(model)]
    if len(layers) != 2:
        raise ValueError(f"the theory checks need a net with two Linear layers; this one has {len(layers)}")
    return layers[0], layers[1]


def expected_update(model: nn.Module, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """The expected update ``(ΔA, ΔW)`` per unit learning rate of the linear student ``y = W·A·x`` learning
    ``y* = T·x`` (``teacher`` T, 10×30) over ``x ~ N(0, I)``, computed by the model's own rule: ``(B·E, E·Aᵀ)``
    for FA, ``(Wᵀ·E, E·Aᵀ)`` for backprop, ``E = T − W·A``.

    E[e·xᵀ] = E·E[x·xᵀ] = E is the sum of e·xᵀ over the basis inputs x = e₁ … e₃₀, so the loss ½Σₙ‖eₙ‖² summed
    over the identity batch has exactly the expected update as its (negative) gradient.
    """
    hidden, output = linear_pair(model)
    inputs = torch.eye(teacher.shape[1], dtype=teacher.dtype)
    model.zero_grad(set_to_none=True)
    (0.5 * (inputs @ teacher.T - model(inputs)).square().sum()).backward()
    return -hidden.weight.grad, -output.weight.grad


def invariants(a: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """FA's conserved ``B·W + Wᵀ·Bᵀ − A·Aᵀ`` and backprop's ``Wᵀ·W − A·Aᵀ`` (each hidden × hidden)."""
    return b @ w + w.T @ b.T - a @ a.T, w.T @ w - a @ a.T


def angle_and_sine(a: Tensor, b: Tensor) -> tuple[float, float]:
    """∡(a, b) in degrees (fbalign.metrics.angle) and ‖a − s·b‖/‖a‖ for the best scalar s: the angle's sine,
    free of arccos's rounding near 0 (where the angle itself resolves only to ≈ 1e-6°)."""
    s = (a * b).sum() / b.square().sum()
    return float(fbalign.metrics.angle(a, b)), float((a - s * b).norm() / a.norm())


def euler_path(model: nn.Module, teacher: Tensor, feedback: Tensor, eta: float, steps: int,
               pseudo_backprop: bool = False) -> dict[str, Any]:
    """Step the expected dynamics ``A += η·ΔA``, ``W += η·ΔW`` (:func:`expected_update`, by the model's rule)
    ``steps`` times from the model's weights: Euler's method for ``dA/dt = ΔA``, ``dW/dt = ΔW`` at time step η.

    Returns the drift of FA's and backprop's invariants (``drift_fa``, ``drift_bp``: the largest
    ‖Q(t) − Q(0)‖_F on the path; FA's invariant with ``feedback`` as B), their ``scale`` (the largest ‖A·Aᵀ‖_F),
    ``link_residual`` (the largest ‖B·ΔW − ΔA·Aᵀ‖_F / ‖ΔA·Aᵀ‖_F: the identity FA's conservation rests on),
    the expected NSE ‖E‖²/‖T‖² at the end, and with ``pseudo_backprop`` the angle and its sine between the
    hidden update ΔA and pseudo-backprop's W⁺·E at every step where W ≠ 0.
    """
    hidden, output = linear_pair(model)
    a, w = hidden.weight, output.weight
    q_fa0, q_bp0 = invariants(a.detach(), w.detach(), feedback)
    found: dict[str, Any] = {"eta": eta, "steps": steps, "drift_fa": 0.0, "drift_bp": 0.0, "scale": 0.0,
                             "link_residual": 0.0, "time": [], "drift_fa_path": []}
    if pseudo_backprop:
        found["pbp_step"], found["angle_pbp"], found["sine_pbp"] = [], [], []
    record = max(1, steps // 200)
    for step in range(steps):
        da, dw = expected_update(model, teacher)
        with torch.no_grad():
            link = feedback @ dw - da @ a.T
            found["link_residual"] = max(found["link_residual"], float(link.norm() / (da @ a.T).norm()))
            if pseudo_backprop and w.abs().max() > 0:
                angle, sine = angle_and_sine(da, torch.linalg.pinv(w) @ (teacher - w @ a))
                found["pbp_step"].append(step)
                found["angle_pbp"].append(angle)
                found["sine_pbp"].append(sine)
            a.add_(da, alpha=eta)
            w.add_(dw, alpha=eta)
            q_fa, q_bp = invariants(a, w, feedback)
            found["drift_fa"] = max(found["drift_fa"], float((q_fa - q_fa0).norm()))
            found["drift_bp"] = max(found["drift_bp"], float((q_bp - q_bp0).norm()))
            found["scale"] = max(found["scale"], float((a @ a.T).norm()))
            if (step + 1) % record == 0:
                found["time"].append((step + 1) * eta)
                found["drift_fa_path"].append(float((q_fa - q_fa0).norm()))
    with torch.no_grad():
        found["nse"] = float((teacher - w @ a).square().sum() / teacher.square().sum())
    return found


def integrate_path(model: nn.Module, teacher: Tensor, feedback: Tensor, duration: float,
                   rtol: float) -> dict[str, Any]:
    """The expected dynamics integrated by scipy's 8th-order Runge–Kutta (DOP853) at tolerance ``rtol``, the
    velocity computed by the model's rule (:func:`expected_update`): the drift of FA's invariant on 201 points
    of ``[0, duration]``, its scale, the velocity evaluations it took and the NSE at the end."""
    from scipy.integrate import solve_ivp

    hidden, output = linear_pair(model)
    a_shape, w_shape = hidden.weight.shape, output.weight.shape
    split = hidden.weight.numel()

    def load(state: np.ndarray) -> None:
        with torch.no_grad():
            hidden.weight.copy_(torch.from_numpy(state[:split]).reshape(a_shape))
            output.weight.copy_(torch.from_numpy(state[split:]).reshape(w_shape))

    def velocity(t: float, state: np.ndarray) -> np.ndarray:
        load(state)
        da, dw = expected_update(model, teacher)
        return torch.cat([da.flatten(), dw.flatten()]).numpy()

    start = torch.cat([hidden.weight.detach().flatten(), output.weight.detach().flatten()]).numpy().copy()
    times = np.linspace(0.0, duration, 201)
    solution = solve_ivp(velocity, (0.0, duration), start, method="DOP853", t_eval=times, rtol=rtol,
                         atol=rtol * np.abs(start).max())
    if not solution.success:
        raise RuntimeError(f"DOP853 failed: {solution.message}")
    drifts, scale = [], 0.0
    for state in solution.y.T:
        a = torch.from_numpy(state[:split].copy()).reshape(a_shape)
        w = torch.from_numpy(state[split:].copy()).reshape(w_shape)
        q_fa, _ = invariants(a, w, feedback)
        drifts.append(q_fa)
        scale = max(scale, float((a @ a.T).norm()))
    drift_path = [float((q - drifts[0]).norm()) for q in drifts]
    load(solution.y[:, -1])
    with torch.no_grad():
        nse_end = float((teacher - output.weight @ hidden.weight).square().sum() / teacher.square().sum())
    return {"rtol": rtol, "evaluations": int(solution.nfev), "drift_fa": max(drift_path), "scale": scale,
            "time": times, "drift_fa_path": drift_path, "nse": nse_end}


def single_pair_path(model: nn.Module, inputs: Tensor, targets: Tensor, eta: float, steps: int,
                     metric_every: int = 10) -> dict[str, Any]:
    """Train the linear FA student on the one pair ``(inputs (1, 30), targets (1, 10))`` by SGD at rate ``eta``
    (the set-up of the paper's theorem that FA's hidden update is a positive multiple of pseudo-backprop's) and,
    before each step where W ≠ 0, compare Δh_FA = −∂L/∂h (through fbalign's B) with Δh_PBP = W⁺e: their
    ``ratio`` s = ⟨Δh_FA, Δh_PBP⟩/‖Δh_PBP‖², ``sine`` = ‖Δh_FA − s·Δh_PBP‖/‖Δh_FA‖, the ``angle``, and the
    relative error ‖e‖/‖y*‖; every ``metric_every`` steps also the angle as
    :func:`fbalign.metrics.measure_alignment` reports it (``angle_dh_pbp``; ``metric_step``, ``metric_angle``)."""
    hidden_layer, output_layer_ = linear_pair(model)
    name = output_layer(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=eta)
    found: dict[str, list[float]] = {"step": [], "ratio": [], "sine": [], "angle": [], "relative_error": [],
                                     "metric_step": [], "metric_angle": []}
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        hidden = hidden_layer(inputs)
        hidden.retain_grad()
        outputs = output_layer_(hidden)
        half_sse(outputs, targets).backward()
        error = (targets - outputs).detach()[0]
        if output_layer_.weight.abs().max() > 0:
            dh_fa = -hidden.grad[0]
            dh_pbp = torch.linalg.pinv(output_layer_.weight.detach()) @ error
            angle, sine = angle_and_sine(dh_fa, dh_pbp)
            found["step"].append(step)
            found["ratio"].append(float((dh_fa * dh_pbp).sum() / dh_pbp.square().sum()))
            found["sine"].append(sine)
            found["angle"].append(angle)
            found["relative_error"].append(float(error.norm() / targets.norm()))
            if step % metric_every == 0:
                found["metric_step"].append(step)
                found["metric_angle"].append(measure_alignment(model, half_sse, inputs, targets,
                                                               pseudo_backprop=True)[f"angle_dh_pbp/{name}"])
        optimizer.step()
    return found


