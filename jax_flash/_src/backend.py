"""Backend choice and the shared run step of every public function.

A backend computes (out, lse) for a bound call (`spec.bind`). The plain-JAX
reference is the semantics of record and runs anywhere; kernel families are
tried first, in `BACKENDS` order, and the first whose `supports(spec,
platform)` holds runs the call. A new kernel family is one more class with
`supports`, `run` and `dropout_mask`, placed before the reference.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from jax_flash import reference
from jax_flash._src import kvcache_ref
from jax_flash._src.cuda import CudaBackend
from jax_flash._src.spec import AttentionSpec, Operands


class Backend(Protocol):
    name: str

    def supports(self, spec: AttentionSpec, platform: str) -> bool:
        """Whether this backend runs spec on platform (jax.default_backend())."""

    def run(self, spec: AttentionSpec, xs, operands: Operands):
        """(out, lse): out like q, lse float32 (..., nheads, seqlen_q); varlen
        inputs arrive as (1, total, ...) buffers. Differentiable w.r.t. xs."""

    def dropout_mask(self, spec: AttentionSpec, q_shape, seqlen_k: int, rng):
        """The keep-mask this backend's dropout draws, bool (batch, nheads,
        seqlen_q, seqlen_k), for return_attn_probs."""


def _unpack(xs, packing: str):
    """(q, k, v) views of one packing's inputs (slices: copies under XLA)."""
    if packing == "qkv":
        (qkv,) = xs
        return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    if packing == "kv":
        q, kv = xs
        return q, kv[..., 0, :, :], kv[..., 1, :, :]
    return tuple(xs)


def _alibi(operands: Operands):
    return operands.alibi if operands.alibi.size else None


class ReferenceBackend:
    """`jax_flash.reference` in plain JAX (float32 compute), on any platform."""

    name = "reference"

    def supports(self, spec: AttentionSpec, platform: str) -> bool:
        return True

    def run(self, spec: AttentionSpec, xs, operands: Operands):
        if spec.layout == "kvcache":
            # (out, lse, k_cache, v_cache); xs = (q, k_cache, v_cache, k, v).
            return kvcache_ref.run(spec, xs, operands)
        q, k, v = _unpack(xs, spec.packing)
        opts = dict(softmax_scale=spec.softmax_scale, window_size=spec.window,
                    softcap=spec.softcap, alibi_slopes=_alibi(operands),
                    dropout_p=spec.dropout_p, upcast=True)
        if spec.varlen:
            # Sequences are padded to min(max_seqlen, buffer rows) there: the
            # mask needs only that many rows and columns.
            keep = None
            if spec.dropout_p > 0:
                keep = self.dropout_mask(
                    spec, (spec.batch, min(spec.max_seqlen_q, spec.seqlen_q), spec.nheads, 0),
                    min(spec.max_seqlen_k, spec.seqlen_k), operands.rng)
            out, lse = reference.attention_varlen_padded(
                q[0], k[0], v[0], operands.cu_seqlens_q, operands.cu_seqlens_k,
                spec.max_seqlen_q, spec.max_seqlen_k, dropout_mask=keep, **opts)
            return out[None], lse[None]
        keep = None
        if spec.dropout_p > 0:
            keep = self.dropout_mask(spec, q.shape, k.shape[1], operands.rng)
        seg = dict(q_segment_ids=operands.seg_q, kv_segment_ids=operands.seg_k) \
            if spec.segments else {}
        return reference.attention_ref(q, k, v, dropout_mask=keep, **seg, **opts)

    def dropout_mask(self, spec: AttentionSpec, q_shape, seqlen_k: int, rng):
        batch, seqlen_q, nheads, _ = q_shape
        return reference.dropout_keep_mask(rng, nheads, seqlen_q, seqlen_k, spec.dropout_p)


BACKENDS: tuple[Backend, ...] = (CudaBackend(), ReferenceBackend())


def select(spec: AttentionSpec, platform: str | None = None) -> Backend:
    """The first backend of BACKENDS that supports spec on platform (default:
    JAX's default backend)."""
    platform = jax.default_backend() if platform is None else platform
    return next(b for b in BACKENDS if b.supports(spec, platform))


def _attn_probs(backend: Backend, spec: AttentionSpec, xs, lse, operands: Operands):
    """return_attn_probs' probabilities from q, k and the LSE (XLA, small
    sizes), dropped entries negated. Varlen: (batch, nheads, max_seqlen_q,
    max_seqlen_k), each sequence padded."""
    q, k, _ = (jax.lax.stop_gradient(x) for x in _unpack(xs, spec.packing))
    lse = jax.lax.stop_gradient(lse)
    opts = dict(softmax_scale=spec.softmax_scale, softcap=spec.softcap,
                alibi_slopes=_alibi(operands), window_size=spec.window)
    if spec.varlen:
        index_q, valid_q, len_q = reference.varlen_rows(
            operands.cu_seqlens_q, spec.max_seqlen_q, q.shape[1])
        index_k, valid_k, len_k = reference.varlen_rows(
            operands.cu_seqlens_k, spec.max_seqlen_k, k.shape[1])
        q_pad = reference.varlen_gather(q[0], index_q, valid_q)
        k_pad = reference.varlen_gather(k[0], index_k, valid_k)
        # (nheads, total_q) -> (batch, nheads, max_seqlen_q); padding: +inf.
        lse_rows = reference.varlen_gather(lse[0].T, index_q, valid_q)
        lse_pad = jnp.where(valid_q[:, None, :], jnp.moveaxis(lse_rows, -1, 1), jnp.inf)
        probs = reference.attention_probs(q_pad, k_pad, lse_pad, key_lengths=len_k,
                                          query_lengths=len_q, **opts)
        q_shape, seqlen_k = q_pad.shape, spec.max_seqlen_k
    else:
        seg = dict(q_segment_ids=operands.seg_q, kv_segment_ids=operands.seg_k) \
            if spec.segments else {}
        probs = reference.attention_probs(q, k, lse, **seg, **opts)
        q_shape, seqlen_k = q.shape, k.shape[1]
    if spec.dropout_p > 0:
        keep = backend.dropout_mask(spec, q_shape, seqlen_k, operands.rng)
        probs = jnp.where(keep, probs, -probs)
    return probs


def run(spec: AttentionSpec, xs, operands: Operands):
    """Runs a bound call on the chosen backend; the public functions' result:
    out, or (out, softmax_lse, attn_probs) with return_attn_probs."""
    backend = select(spec)
    if spec.varlen:
        xs = tuple(x[None] for x in xs)  # the kernels' one (1, total, ...) buffer
    out, lse = backend.run(spec, xs, operands)
    if spec.return_attn_probs:
        probs = _attn_probs(backend, spec, xs, lse, operands)
        lse = jax.lax.stop_gradient(lse)
    if spec.varlen:
        out, lse = out[0], lse[0]
    return (out, lse, probs) if spec.return_attn_probs else out


def run_kvcache(spec, xs, operands):
    """Runs a bound `flash_attn_with_kvcache` call (`_src/kvcache.bind`) on
    the chosen backend: (out, lse, k_cache, v_cache). No kernel family
    supports the "kvcache" layout yet, so this is the reference everywhere."""
    return select(spec).run(spec, xs, operands)
