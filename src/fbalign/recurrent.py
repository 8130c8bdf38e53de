"""Recurrent nets built from ``nn.Linear`` layers, so that every feedback rule reaches their weights.

torch's ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their cells run their weights inside fused kernels (``_VF.lstm``,
cuDNN): no rule can reroute their error. The modules here are the same nets (same constructor arguments, same
forward signature and outputs, PackedSequence inputs included) written as a loop over time steps whose products
are child ``nn.Linear`` layers sharing the original Parameters:

* ``ih_l{k}[_reverse]`` — input-to-hidden, ``weight_ih_l{k}`` and ``bias_ih_l{k}``, applied to the whole sequence at
  once (one product per layer and direction);
* ``hh_l{k}[_reverse]`` — hidden-to-hidden, ``weight_hh_l{k}`` and ``bias_hh_l{k}``, applied at every step;
* ``hr_l{k}[_reverse]`` — an LSTM's projection (``proj_size > 0``), ``weight_hr_l{k}``.

``fbalign.convert`` rebuilds every torch recurrent module this way and then converts the Linear children like any
other, so the error flows back through time (through ``hh``) and down the layers (through ``ih``) by the rule's
feedback matrices, while the gates' nonlinearities and the cell state's path keep their exact derivatives. The old
attribute names (``lstm.weight_ih_l0``) still reach the Parameters.

Under layer-level ``dfa`` every step's hidden state receives the output error through ``hh``'s matrix (and the
layer's input sequence through ``ih``'s). When the model's output has a time dimension (one prediction per step,
laid out as this module's output), the hidden state of step ``t`` receives the error of step ``t``; when it has
none (one prediction per sequence) every step receives the same output error.

Speed: a Python loop of small products, against torch's fused CPU kernel; ``benchmarks/architectures.py`` measures
the ratio. cuDNN was not measured (no GPU on the machine this was written on).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import dfa as _dfa
from .attention import _holder

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "RESTRUCTURE"]

_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs")


def _step(mode: str, gates_x: Tensor, hh: nn.Module, state: tuple[Tensor, ...], hr: nn.Module | None,
          step_of_state: int | None, time_dim: int) -> tuple[Tensor, ...]:
    """One time step of cell ``mode`` from the input's precomputed gates; returns the new state."""
    h = state[0]
    gates_h = _hh(hh, h, step_of_state, time_dim)
    if mode == "LSTM":
        i, f, g, o = (gates_x + gates_h).chunk(4, dim=-1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if hr is None else hr(h), c)
    if mode == "GRU":
        x_r, x_z, x_n = gates_x.chunk(3, dim=-1)
        h_r, h_z, h_n = gates_h.chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return ((1 - z) * n + z * h,)
    pre = gates_x + gates_h
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre),)


def _hh(hh: nn.Module, h: Tensor, step: int | None, time_dim: int) -> Tensor:
    """``hh(h)``; under layer-level dfa with a per-step output error, ``h`` (the state of ``step``) gets that step's."""
    rule = getattr(hh, "rule", None)
    if step is None or not isinstance(rule, _dfa.DFA) or not (torch.is_grad_enabled() and h.requires_grad):
        return hh(h)
    state = getattr(hh, "rule_state", None)  # where dfa keeps its wiring (before the layer API's rename: __dict__)
    wiring = state.get("dfa_wiring") if state is not None else hh.__dict__.get("_dfa_wiring")
    if wiring is None:
        return hh(h)  # the rule's own error message
    at_step = _AtStep(wiring.send_down(hh, rule._nonlinearity), step, time_dim)
    send_down = getattr(hh, "forward_send_down", None)
    return send_down(h, at_step) if send_down is not None else hh._forward_feedback(h, at_step)


class _AtStep:
    """dfa's signal for a hidden state: the output error of its own step when the error has a time dimension."""

    __slots__ = ("direct", "step", "time_dim")

    def __init__(self, direct: Any, step: int, time_dim: int) -> None:
        self.direct, self.step, self.time_dim = direct, step, time_dim

    def __call__(self, grad_output: Tensor, input: Tensor) -> Tensor:
        error = self.direct.forward_pass.error
        if error is not None and error.dim() == input.dim() + 1 and error.shape[self.time_dim] > self.step:
            d = self.direct
            return _dfa._project(error.select(self.time_dim, self.step), d.matrix, input, d.nonlinearity,
                                 d.layer_name)
        return self.direct(grad_output, input)


class _TorchLayout(nn.Module):
    """Shared by the recurrent modules and the cells: built from the torch module they replace (same constructor
    arguments, plus ``rule=`` and its options), whose Parameters their Linear children hold under torch's names."""

    replaces: type[nn.Module]
    mode: str

    @classmethod
    def from_module(cls, module: Any) -> Any:
        raise NotImplementedError

    def __init__(self, *args: Any, rule: Any = None, **kwargs: Any) -> None:
        rule_options = {k: kwargs.pop(k) for k in list(kwargs) if k not in _TORCH_ARGS}
        other = type(self).from_module(self.replaces(*args, **kwargs))
        nn.Module.__init__(self)
        self.__dict__.update({k: v for k, v in other.__dict__.items() if k != "training"})
        if rule is not None:
            from .convert import convert

            convert(self, rule, inplace=True, **rule_options)

    def _with_hooks_of(self, module: nn.Module) -> Any:
        for hooks in _HOOKS:
            getattr(self, hooks).update(getattr(module, hooks))
        return self

    def __getattr__(self, name: str) -> Any:
        # torch's names: weight_ih_l0 -> ih_l0.weight, bias_hh_l1_reverse -> hh_l1_reverse.bias, weight_hh -> hh.weight
        kind, _, rest = name.partition("_")
        if kind in ("weight", "bias") and rest[:2] in ("ih", "hh", "hr"):
            child = self.__dict__["_modules"].get(rest)
            if child is not None:
                return getattr(child, kind)
        return super().__getattr__(name)


class _Recurrent(_TorchLayout):
    """Shared by RNN, LSTM and GRU: the layer/direction loop, packed sequences, dropout between layers."""

    replaces: type[nn.RNNBase]
    mode: str

    @classmethod
    def from_module(cls, module: nn.RNNBase) -> Any:
        """This module with ``module``'s Parameters (shared, not copied), mode and hooks; products plain Linear."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                     "bidirectional", "proj_size", "training"):
            setattr(new, attr, getattr(module, attr))
        for layer in range(module.num_layers):
            for suffix in ("", "_reverse")[: 2 if module.bidirectional else 1]:
                tag = f"_l{layer}{suffix}"
                bias = module.bias
                setattr(new, f"ih{tag}", _holder(getattr(module, f"weight_ih{tag}"),
                                                  getattr(module, f"bias_ih{tag}") if bias else None))
                setattr(new, f"hh{tag}", _holder(getattr(module, f"weight_hh{tag}"),
                                                  getattr(module, f"bias_hh{tag}") if bias else None))
                if module.proj_size > 0:
                    setattr(new, f"hr{tag}", _holder(getattr(module, f"weight_hr{tag}"), None))
        return new._with_hooks_of(module)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, batch_first={self.batch_first}"
                f", dropout={self.dropout}, bidirectional={self.bidirectional}, proj_size={self.proj_size}")

    def forward(self, input: Tensor | PackedSequence, hx: Any = None) -> tuple[Any, Any]:
        lstm = self.mode == "LSTM"
        directions = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_idx, unsorted_idx = input
            steps = [int(b) for b in batch_sizes]
            n, time_dim, unbatched = steps[0], 0, False
        else:
            unbatched = input.dim() == 2
            time_dim = 1 if self.batch_first and not unbatched else 0
            data = input.unsqueeze(1) if unbatched else input
            n = data.shape[1 - time_dim]
            steps = [n] * data.shape[time_dim]
            sorted_idx = unsorted_idx = None
        zeros = torch.zeros(self.num_layers * directions, n, out_size, dtype=data.dtype, device=data.device)
        if hx is None:
            h0 = zeros
            c0 = (torch.zeros(self.num_layers * directions, n, self.hidden_size, dtype=data.dtype,
                              device=data.device) if lstm else None)
        else:
            h0, c0 = hx if lstm else (hx, None)
            if unbatched:
                h0, c0 = h0.unsqueeze(1), (None if c0 is None else c0.unsqueeze(1))
            if sorted_idx is not None:
                h0 = h0.index_select(1, sorted_idx)
                c0 = None if c0 is None else c0.index_select(1, sorted_idx)

        layer_input = data
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                tag = f"_l{layer}{'_reverse' if direction else ''}"
                index = layer * directions + direction
                state = (h0[index], c0[index]) if lstm else (h0[index],)
                seq, state = self._run(layer_input, steps, packed, time_dim, tag, state, reverse=direction == 1)
                outputs.append(seq)
                h_n.append(state[0])
                if lstm:
                    c_n.append(state[1])
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        h_out = torch.stack(h_n)
        c_out = torch.stack(c_n) if lstm else None
        if unsorted_idx is not None:
            h_out = h_out.index_select(1, unsorted_idx)
            c_out = None if c_out is None else c_out.index_select(1, unsorted_idx)
        if packed:
            output: Any = PackedSequence(layer_input, batch_sizes, sorted_idx, unsorted_idx)
        elif unbatched:
            output = layer_input.squeeze(1)
            h_out = h_out.squeeze(1)
            c_out = None if c_out is None else c_out.squeeze(1)
        else:
            output = layer_input
        return output, ((h_out, c_out) if lstm else h_out)

    def _run(self, sequence: Tensor, steps: list[int], packed: bool, time_dim: int, tag: str,
             state: tuple[Tensor, ...], reverse: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One layer in one direction over the whole sequence; returns its outputs and its final state."""
        gates = getattr(self, f"ih{tag}")(sequence)  # all steps at once
        hh = getattr(self, f"hh{tag}")
        hr = self._modules.get(f"hr{tag}")
        if packed:
            offsets = [0]
            for size in steps:
                offsets.append(offsets[-1] + size)
            step_gates = [gates[offsets[t]:offsets[t + 1]] for t in range(len(steps))]
        else:
            step_gates = list(gates.unbind(time_dim))
        order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
        outputs: list[Tensor] = [None] * len(steps)  # type: ignore[list-item]
        previous: int | None = None
        for t in order:
            size = steps[t]
            live = tuple(s[:size] for s in state) if size < state[0].shape[0] else state
            # The error a per-step dfa signal uses is that of the step whose output the state was.
            new = _step(self.mode, step_gates[t], hh, live, hr, None if packed else previous, time_dim)
            if size < state[0].shape[0]:
                state = tuple(torch.cat([a, b[size:]]) for a, b in zip(new, state))
            else:
                state = new
            outputs[t] = new[0]
            previous = t
        if packed:
            return torch.cat(outputs), state
        return torch.stack(outputs, dim=time_dim), state


_TORCH_ARGS = {"input_size", "hidden_size", "num_layers", "nonlinearity", "bias", "batch_first", "dropout",
               "bidirectional", "proj_size", "device", "dtype"}


class RNN(_Recurrent):
    """``nn.RNN`` (tanh or relu) as a loop over ``nn.Linear`` layers (see :mod:`fbalign.recurrent`).

    Same arguments, shapes and outputs as ``nn.RNN``; ``rule=`` (and its options) converts the Linears.
    """

    replaces = nn.RNN


class LSTM(_Recurrent):
    """``nn.LSTM`` (with ``proj_size``) as a loop over ``nn.Linear`` layers (see :mod:`fbalign.recurrent`).

    Same arguments, shapes and outputs as ``nn.LSTM``; ``rule=`` (and its options) converts the Linears.
    """

    replaces = nn.LSTM


class GRU(_Recurrent):
    """``nn.GRU`` as a loop over ``nn.Linear`` layers (see :mod:`fbalign.recurrent`).

    Same arguments, shapes and outputs as ``nn.GRU``; ``rule=`` (and its options) converts the Linears.
    """

    replaces = nn.GRU


class _Cell(_TorchLayout):
    """Shared by the cells: ``ih`` and ``hh`` Linear children holding ``weight_ih``/``weight_hh`` and biases."""

    replaces: type[nn.RNNCellBase]
    mode: str

    @classmethod
    def from_module(cls, module: nn.RNNCellBase) -> Any:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("input_size", "hidden_size", "bias", "training"):
            setattr(new, attr, getattr(module, attr))
        new.mode = _cell_mode(module)
        new.ih = _holder(module.weight_ih, module.bias_ih if module.bias else None)
        new.hh = _holder(module.weight_hh, module.bias_hh if module.bias else None)
        return new._with_hooks_of(module)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}"

    def forward(self, input: Tensor, hx: Any = None) -> Any:
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        if hx is None:
            h = torch.zeros(x.shape[0], self.hidden_size, dtype=x.dtype, device=x.device)
            state = (h, torch.zeros_like(h)) if self.mode == "LSTM" else (h,)
        else:
            state = tuple(hx) if self.mode == "LSTM" else (hx,)
            if unbatched:
                state = tuple(s.unsqueeze(0) for s in state)
        new = _step(self.mode, self.ih(x), self.hh, state, None, None, 0)
        if unbatched:
            new = tuple(s.squeeze(0) for s in new)
        return new if self.mode == "LSTM" else new[0]


def _cell_mode(module: nn.RNNCellBase) -> str:
    if isinstance(module, nn.LSTMCell):
        return "LSTM"
    if isinstance(module, nn.GRUCell):
        return "GRU"
    return "RNN_RELU" if getattr(module, "nonlinearity", "tanh") == "relu" else "RNN_TANH"


class RNNCell(_Cell):
    """``nn.RNNCell`` from two ``nn.Linear`` layers, ``ih`` and ``hh``; same arguments and outputs."""

    replaces = nn.RNNCell


class LSTMCell(_Cell):
    """``nn.LSTMCell`` from two ``nn.Linear`` layers, ``ih`` and ``hh``; returns ``(h, c)`` as torch's."""

    replaces = nn.LSTMCell


class GRUCell(_Cell):
    """``nn.GRUCell`` from two ``nn.Linear`` layers, ``ih`` and ``hh``; same arguments and outputs."""

    replaces = nn.GRUCell


RESTRUCTURE: dict[type[nn.Module], Any] = {
    nn.RNN: RNN.from_module, nn.LSTM: LSTM.from_module, nn.GRU: GRU.from_module,
    nn.RNNCell: RNNCell.from_module, nn.LSTMCell: LSTMCell.from_module, nn.GRUCell: GRUCell.from_module,
}
"""torch's recurrent module -> how ``convert`` rebuilds it (used by :func:`fbalign.convert`)."""
