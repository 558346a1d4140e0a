"""One attention call, described once: `bind` turns a public function's
arguments into an `AttentionSpec` (everything static, validated and
canonicalised, hashable: the custom_vjp's nondiff argument and the kernel
plan's key) and `Operands` (the non-differentiable arrays besides q/k/v)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash._src import segments as segments_lib
from jax_flash._src import validate
from jax_flash._src.dropout import dropout_rng


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """The static description of one attention call.

    Shapes: fixed layout: q (batch, seqlen_q, nheads, head_dim), k/v (batch,
    seqlen_k, nheads_k, head_dim). Varlen: batch is the number of sequences,
    seqlen_q / seqlen_k the rows of the packed q / k buffers (total_q /
    total_k), max_seqlen_q / max_seqlen_k the static bounds (-1 for fixed).

    Options are canonical: softmax_scale is the float actually used; causal
    is folded in as window_right = 0 and a window entry that can never bind
    is -1 (unbounded); softcap 0 and dropout_p 0 are off.
    """

    layout: str  # "fixed" | "varlen"
    packing: str  # "" (q, k, v) | "kv" (q, kv) | "qkv" (qkv,)
    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    head_dim: int
    dtype: str
    softmax_scale: float
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    dropout_p: float = 0.0
    deterministic: bool = False
    has_alibi: bool = False
    segments: bool = False
    max_seqlen_q: int = -1
    max_seqlen_k: int = -1
    return_attn_probs: bool = False

    @property
    def varlen(self) -> bool:
        return self.layout == "varlen"

    @property
    def local(self) -> bool:
        """Whether a window (causal included) restricts the keys."""
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def window(self) -> tuple[int, int]:
        return self.window_left, self.window_right


class Operands(NamedTuple):
    """Non-differentiable array operands, in the kernels' order; empty arrays
    when off (the FFI handlers take them either way, and a fixed pytree keeps
    custom_vjp simple)."""

    alibi: jax.Array  # float32 (batch, nheads), a constant (stop_gradient)
    rng: jax.Array  # uint32 (batch, 4), dropout RNG state (dropout.dropout_rng)
    cu_seqlens_q: jax.Array  # int32 (batch + 1,), varlen
    cu_seqlens_k: jax.Array  # int32 (batch + 1,), varlen
    # Segment ids (batch, seqlen_q) / (batch, seqlen_k) as bound (any integer
    # dtype); the CUDA backend replaces them by its int32 tables (segments.py).
    seg_q: jax.Array
    seg_k: jax.Array

    @staticmethod
    def of(alibi=None, rng=None, cu_seqlens_q=None, cu_seqlens_k=None, seg_q=None,
           seg_k=None) -> "Operands":
        def operand(x, dtype):
            return jnp.zeros((0,), dtype) if x is None else x

        return Operands(
            operand(alibi, jnp.float32), operand(rng, jnp.uint32),
            operand(cu_seqlens_q, jnp.int32), operand(cu_seqlens_k, jnp.int32),
            operand(seg_q, jnp.int32), operand(seg_k, jnp.int32),
        )

    def zero_cotangents(self) -> "Operands":
        """The cotangent of these operands: nothing flows into them."""
        return Operands(*(
            jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating)
            else np.zeros(x.shape, jax.dtypes.float0)
            for x in self
        ))


# Input layouts per (layout, packing): (name, packs, axis of the packs, shape).
_PACKED = {
    ("fixed", "qkv"): ("qkv", 3, 2, "(batch, seqlen, 3, nheads, headdim)"),
    ("fixed", "kv"): ("kv", 2, 2, "(batch, seqlen_k, 2, nheads_k, headdim)"),
    ("varlen", "qkv"): ("qkv", 3, 1, "(total, 3, nheads, headdim)"),
    ("varlen", "kv"): ("kv", 2, 1, "(total_k, 2, nheads_k, headdim)"),
}


def _logical_qkv(xs, layout: str, packing: str):
    """Validates the inputs; returns shape/dtype stand-ins for q, k, v."""
    if packing:
        name, packs, axis, shape = _PACKED[(layout, packing)]
        slot = validate.packed(name, xs[-1], packs, axis, shape)
        q, k, v = (slot, slot, slot) if packing == "qkv" else (xs[0], slot, slot)
    else:
        q, k, v = xs
    (validate.varlen_qkv if layout == "varlen" else validate.qkv)(q, k, v)
    return q, k, v


def bind(xs, *, layout: str, packing: str, dropout_p, softmax_scale, causal, window_size,
         softcap, alibi_slopes, deterministic, return_attn_probs, dropout_key,
         segment_ids=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
         max_seqlen_k=None) -> tuple[AttentionSpec, Operands]:
    """A public call's arguments -> (spec, operands), validating everything.

    Args:
      xs: the array inputs as the public function takes them: (q, k, v),
        (q, kv) or (qkv,), fixed-shape or varlen (packed rows).
      layout: "fixed" or "varlen"; packing: "", "kv" or "qkv".
      Other arguments: the public functions' (segment_ids: fixed only;
        cu_seqlens_* and max_seqlen_*: varlen only).

    Raises:
      TypeError, ValueError: naming the argument, the expected and the actual.
    """
    q, k, _ = _logical_qkv(xs, layout, packing)
    if layout == "varlen":
        validate.cu_seqlens(cu_seqlens_q, cu_seqlens_k)
        max_q = validate.max_seqlen("max_seqlen_q", max_seqlen_q)
        max_k = validate.max_seqlen("max_seqlen_k", max_seqlen_k)
        _, nheads, head_dim = q.shape
        batch, seqlen_q, seqlen_k = cu_seqlens_q.shape[0] - 1, q.shape[0], k.shape[0]
        ids = None
        span = max_q + max_k
    else:
        batch, seqlen_q, nheads, head_dim = q.shape
        seqlen_k = k.shape[1]
        max_q = max_k = -1
        ids = validate.segment_ids(segment_ids, batch, seqlen_q, seqlen_k)
        span = seqlen_q + seqlen_k
    left, right = validate.canonical_window(*validate.window(window_size, causal), span)
    scale = validate.softmax_scale(softmax_scale, head_dim)
    cap = validate.softcap(softcap, scale)
    alibi = validate.alibi(alibi_slopes, batch, nheads)
    p = validate.dropout(dropout_p, dropout_key)
    spec = AttentionSpec(
        layout=layout, packing=packing, batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        nheads=nheads, nheads_k=k.shape[-2], head_dim=head_dim, dtype=str(q.dtype),
        softmax_scale=scale, window_left=left, window_right=right, softcap=cap, dropout_p=p,
        deterministic=validate.static_bool("deterministic", deterministic),
        has_alibi=alibi is not None, segments=ids is not None, max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        return_attn_probs=validate.static_bool("return_attn_probs", return_attn_probs),
    )
    if ids is not None and isinstance(ids[0], np.ndarray) and isinstance(ids[1], np.ndarray):
        # numpy ids are ranked exactly here: JAX without 64-bit types would
        # otherwise truncate int64 ids on their way in and merge documents.
        ids = segments_lib.dense_ranks(*ids)
    operands = Operands.of(
        # ALiBi slopes are constants on every backend: the kernels have no
        # gradient for them, so the reference path must not make one up.
        alibi=None if alibi is None else jax.lax.stop_gradient(alibi),
        rng=dropout_rng(dropout_key, batch) if p > 0 else None,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        seg_q=None if ids is None else ids[0], seg_k=None if ids is None else ids[1],
    )
    return spec, operands
