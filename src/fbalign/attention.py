"""Multi-head attention built from ``nn.Linear`` projections, so that every feedback rule reaches its weights.

torch's ``nn.MultiheadAttention`` applies its projection weights inside ``F.multi_head_attention_forward``: no
rule can reroute their error. :class:`MultiheadAttention` is the same module (a subclass, same constructor, same
forward signature and outputs) whose projections are child ``nn.Linear`` layers sharing the original Parameters:

* ``in_proj`` — the packed ``(3·E, E)`` query/key/value projection (``in_proj_weight``, ``in_proj_bias``), or
  ``q_proj``, ``k_proj``, ``v_proj`` when ``kdim``/``vdim`` differ from ``embed_dim`` (their biases stay one
  packed ``in_proj_bias`` Parameter of the attention module, added after the projections);
* ``out_proj`` — the output projection, as in torch.

``fbalign.convert`` turns every ``nn.MultiheadAttention`` into this module and then converts the Linear children
like any other, so they take the rule (and a per-layer rule mapping can name them, e.g.
``"encoder.layers.*.self_attn.in_proj"``). The weightless parts — scores, masks, softmax, dropout, the weighted sum
of values — run as torch ops with exact gradients. Attention is computed by ``F.scaled_dot_product_attention``, or
by the explicit softmax path when ``need_weights=True``, in the order torch uses, so dropout draws the same random
numbers and the outputs equal torch's (to float rounding) in train and eval mode.

Costs: torch's fused fast path (``torch._native_multi_head_attention``, taken in inference) is bypassed whenever
this module's own forward runs; ``nn.TransformerEncoderLayer``'s inference fast path still runs, since it reads the
same Parameters (``benchmarks/architectures.py`` measures both). Cross-attention with the packed projection
computes the full ``3·E`` projection of the query and of the key/value input and keeps the slices it needs, so the
in-projection costs 2x torch's there (self-attention: the same single product as torch).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiheadAttention"]


def _holder(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` whose parameters are ``weight`` and ``bias`` themselves (no allocation, no init)."""
    with torch.device("meta"):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = weight
    layer.bias = bias
    return layer


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose projections are ``nn.Linear`` children (``in_proj`` or ``q_proj``/``k_proj``/
    ``v_proj``, and ``out_proj``), so that ``fbalign.convert`` gives them a feedback rule.

    Shapes, arguments and outputs are torch's: query ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``) or
    unbatched ``(L, E)``; key and value ``(S, N, kdim/vdim)``; returns ``(attn_output, attn_weights or None)``.
    The attributes torch's transformer layers read (``in_proj_weight``, ``in_proj_bias``, ``q_proj_weight``, ...)
    are the children's Parameters.

    Args:
        (torch's arguments): as for ``nn.MultiheadAttention``.
        rule: None (default) leaves the projections plain ``nn.Linear`` (exact backprop); a rule name or object
            converts them with ``fbalign.convert`` (``**rule_options`` are passed on, e.g. ``seed=0``).
    """

    replaces = nn.MultiheadAttention  # convert's class patterns match it; its own children carry the weights

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device: Any = None,
                 dtype: torch.dtype | None = None, *, rule: Any = None, **rule_options: Any) -> None:
        nn.Module.__init__(self)
        original = nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
                                         vdim, batch_first, device, dtype)
        self._take(original)
        if rule is not None:
            from .convert import convert

            convert(self, rule, inplace=True, **rule_options)

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention) -> MultiheadAttention:
        """This module with ``module``'s Parameters (shared, not copied), mode and hooks; projections plain Linear."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._take(module)
        return new

    def _take(self, old: nn.MultiheadAttention) -> None:
        for attr in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                     "head_dim", "add_zero_attn", "training"):
            setattr(self, attr, getattr(old, attr))
        self.bias_k, self.bias_v = old.bias_k, old.bias_v
        bias = old.in_proj_bias
        if old._qkv_same_embed_dim:
            self.in_proj = _holder(old.in_proj_weight, bias)
        else:
            self.q_proj = _holder(old.q_proj_weight, None)
            self.k_proj = _holder(old.k_proj_weight, None)
            self.v_proj = _holder(old.v_proj_weight, None)
            self._parameters["in_proj_bias"] = bias  # the packed bias stays ours: added after the projections
        self.out_proj = old.out_proj
        for hooks in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                      "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
            getattr(self, hooks).update(getattr(old, hooks))

    # torch's transformer layers (and their inference fast path) read these attributes.
    @property
    def in_proj_weight(self) -> Tensor | None:  # type: ignore[override]
        return self.in_proj.weight if "in_proj" in self._modules else None

    @property
    def in_proj_bias(self) -> Tensor | None:  # type: ignore[override]
        if "in_proj" in self._modules:
            return self.in_proj.bias
        return self._parameters.get("in_proj_bias")

    @property
    def q_proj_weight(self) -> Tensor | None:  # type: ignore[override]
        return self.q_proj.weight if "q_proj" in self._modules else None

    @property
    def k_proj_weight(self) -> Tensor | None:  # type: ignore[override]
        return self.k_proj.weight if "k_proj" in self._modules else None

    @property
    def v_proj_weight(self) -> Tensor | None:  # type: ignore[override]
        return self.v_proj.weight if "v_proj" in self._modules else None

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v in the inputs' own layout (so a dfa error shaped like the model's output matches them)."""
        e = self.embed_dim
        if "in_proj" in self._modules:
            if query is key and key is value:  # self-attention: one product, as torch does
                q, k, v = self.in_proj(query).chunk(3, dim=-1)
            elif key is value:
                q = self.in_proj(query)[..., :e]
                k, v = self.in_proj(key)[..., e:].chunk(2, dim=-1)
            else:
                q = self.in_proj(query)[..., :e]
                k = self.in_proj(key)[..., e:2 * e]
                v = self.in_proj(value)[..., 2 * e:]
            return q, k, v
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        bias = self._parameters.get("in_proj_bias")
        if bias is not None:
            b_q, b_k, b_v = bias.chunk(3)
            q, k, v = q + b_q, k + b_k, v + b_v
        return q, k, v

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        # The same checks and mask semantics as torch's (its helpers, so the two cannot drift apart).
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        q, k, v = self._project(query, key, value)
        if not is_batched:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        tgt_len, bsz, _ = q.shape
        heads, head_dim = self.num_heads, self.head_dim

        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=q.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=q.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False  # the merged mask is no longer causal
        src_len = k.shape[0]
        if attn_mask is not None:
            expected = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * heads, tgt_len, src_len)
            if tuple(attn_mask.shape) != expected:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is {tuple(attn_mask.shape)}, "
                                   f"but should be {expected}.")
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got "
                                     f"{tuple(key_padding_mask.shape)}")
            padding = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
            padding = padding.reshape(bsz * heads, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            if is_causal and attn_mask is None:
                raise AssertionError("is_causal is not implemented for need_weights")
            scores = q * math.sqrt(1.0 / float(head_dim))
            scores = (torch.baddbmm(attn_mask, scores, k.transpose(-2, -1)) if attn_mask is not None
                      else torch.bmm(scores, k.transpose(-2, -1)))
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            attended = torch.bmm(weights, v).view(bsz, heads, tgt_len, head_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                weights = weights.squeeze(0)
        else:
            if attn_mask is not None:
                attn_mask = (attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1
                             else attn_mask.view(bsz, heads, -1, src_len))
            attended = F.scaled_dot_product_attention(q.view(bsz, heads, tgt_len, head_dim),
                                                      k.view(bsz, heads, src_len, head_dim),
                                                      v.view(bsz, heads, src_len, head_dim), attn_mask, dropout_p,
                                                      is_causal)
        # (N, H, L, hd) -> (L, N, E) as torch lays it out, seen in the caller's layout; the output projection runs
        # on that view (so a dfa error shaped like the model's output matches it) and the result keeps torch's
        # memory layout (so a dropout after it draws the same mask as after torch's module).
        attended = attended.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim)
        if not is_batched:
            return self.out_proj(attended.squeeze(1)), weights
        if not self.batch_first:
            return self.out_proj(attended), weights
        out = self.out_proj(attended.transpose(0, 1))
        return out.transpose(0, 1).contiguous().transpose(0, 1), weights
