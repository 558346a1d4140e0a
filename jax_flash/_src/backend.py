"""Backend choice and the shared run step of every public function.

A backend computes (out, lse) for a bound call (`spec.bind`). The plain-JAX
reference is the semantics of record and runs anywhere; kernel families are
tried first, in `BACKENDS` order, and the first whose `supports(spec,
platform)` holds runs the call. A new kernel family is one more class with
`supports`, `prepare`, `forward`, `backward` and `dropout_mask`, placed
before the reference. Every call goes through `jax_flash.sharding` (the
partitioning rules) and one `custom_vjp` here, whatever the backend.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from jax_flash import reference, sharding
from jax_flash._src import cuda_kvcache, kvcache_ref
from jax_flash._src.cuda import CudaBackend
from jax_flash._src.spec import AttentionSpec, Operands


class Backend(Protocol):
    name: str

    def supports(self, spec: AttentionSpec, platform: str) -> bool:
        """Whether this backend runs spec on platform (jax.default_backend())."""

    def prepare(self, spec: AttentionSpec, operands: Operands) -> Operands:
        """The operands as `forward`/`backward` take them (plain JAX, before
        partitioning; e.g. segment tables from segment ids)."""

    def forward(self, spec: AttentionSpec, xs, operands: Operands):
        """(out, lse) of one shard: out like q, lse float32 (..., nheads,
        seqlen_q); varlen inputs arrive as (1, total, ...) buffers. Not
        differentiated: `backward` is its gradient."""

    def kvcache_forward(self, spec, xs, operands, switches):
        """(out, lse, k_cache, v_cache) of one shard of a kv-cache call
        (`KVCacheSpec`); xs = (q, k_cache, v_cache, k, v), k/v None without
        an append; `switches`: `cuda_kvcache.Switches`, read when the call
        was traced."""

    def backward(self, spec: AttentionSpec, xs, operands: Operands, out, lse, d_out):
        """Gradients of xs (in their packed layout) given the forward's out
        and lse, which act as the softmax statistics: a block of keys gets
        its share of the gradient of an attention over more keys when out and
        lse are that attention's (ring attention relies on it)."""

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


def _segments(spec: AttentionSpec, operands: Operands) -> dict:
    return dict(q_segment_ids=operands.seg_q, kv_segment_ids=operands.seg_k) \
        if spec.segments else {}


def _padded_rows(spec: AttentionSpec, operands: Operands, total_q: int, total_k: int,
                 pad_q: int, pad_k: int):
    """Varlen: (index, valid, lengths) of q's and k's rows padded to pad_q /
    pad_k per sequence (`reference.varlen_rows`)."""
    return (reference.varlen_rows(operands.cu_seqlens_q, pad_q, total_q),
            reference.varlen_rows(operands.cu_seqlens_k, pad_k, total_k))


def _probs(spec: AttentionSpec, q, k, lse, operands: Operands, rows=None):
    """exp(score - lse) in float32 (batch, nheads, seqlen_q, seqlen_k) for
    the given LSE; varlen: q, k, lse already padded per sequence and rows =
    `_padded_rows`' result."""
    opts = dict(softmax_scale=spec.softmax_scale, softcap=spec.softcap,
                alibi_slopes=_alibi(operands), window_size=spec.window)
    if spec.varlen:
        (_, _, len_q), (_, _, len_k) = rows
        return reference.attention_probs(q, k, lse, key_lengths=len_k, query_lengths=len_q,
                                         **opts)
    return reference.attention_probs(q, k, lse, **_segments(spec, operands), **opts)


def _pad_lse(lse, index, valid):
    """Varlen LSE (nheads, total) -> (batch, nheads, pad) per sequence, +inf
    on padding."""
    rows = reference.varlen_gather(lse.T, index, valid)
    return jnp.where(valid[:, None, :], jnp.moveaxis(rows, -1, 1), jnp.inf)


class ReferenceBackend:
    """`jax_flash.reference` in plain JAX (float32 compute), on any platform."""

    name = "reference"

    def supports(self, spec: AttentionSpec, platform: str) -> bool:
        return True

    def prepare(self, spec: AttentionSpec, operands: Operands) -> Operands:
        return operands

    def _keep(self, spec: AttentionSpec, operands: Operands, batch, seqlen_q, seqlen_k):
        if spec.dropout_p == 0:
            return None
        return self.dropout_mask(spec, (batch, seqlen_q, spec.nheads, 0), seqlen_k,
                                 operands.rng)

    def forward(self, spec: AttentionSpec, xs, operands: Operands):
        q, k, v = _unpack(xs, spec.packing)
        opts = dict(softmax_scale=spec.softmax_scale, window_size=spec.window,
                    softcap=spec.softcap, alibi_slopes=_alibi(operands),
                    dropout_p=spec.dropout_p, upcast=True)
        if spec.varlen:
            # Sequences are padded to min(max_seqlen, buffer rows) there: the
            # mask needs only that many rows and columns.
            keep = self._keep(spec, operands, spec.batch, min(spec.max_seqlen_q, spec.seqlen_q),
                              min(spec.max_seqlen_k, spec.seqlen_k))
            out, lse = reference.attention_varlen_padded(
                q[0], k[0], v[0], operands.cu_seqlens_q, operands.cu_seqlens_k,
                spec.max_seqlen_q, spec.max_seqlen_k, dropout_mask=keep, **opts)
            return out[None], lse[None]
        keep = self._keep(spec, operands, q.shape[0], q.shape[1], k.shape[1])
        return reference.attention_ref(q, k, v, dropout_mask=keep,
                                       **_segments(spec, operands), **opts)

    def kvcache_forward(self, spec, xs, operands, switches):
        return kvcache_ref.run(spec, xs, operands)  # no switch changes the reference

    def backward(self, spec: AttentionSpec, xs, operands: Operands, out, lse, d_out):
        # With out O and lse L held fixed, h(q, k, v)_i = sum_j P_ij (m_ij V_j
        # - O_i), P = exp(S - L), m the dropout scaling, has the attention's
        # gradient: dh/dS_ij = P_ij (m_ij dO_i.V_j - dO_i.O_i), the softmax
        # backward with D_i = dO_i.O_i, and dh/dV_j = sum_i P_ij m_ij dO_i.
        out32, d_out32 = out.astype(jnp.float32), d_out.astype(jnp.float32)
        if spec.varlen:
            total_q, total_k = spec.seqlen_q, spec.seqlen_k
            pad_q, pad_k = min(spec.max_seqlen_q, total_q), min(spec.max_seqlen_k, total_k)
            rows = _padded_rows(spec, operands, total_q, total_k, pad_q, pad_k)
            (index_q, valid_q, _), (index_k, valid_k, _) = rows
            lse_p = _pad_lse(lse[0], index_q, valid_q)
            out_p = reference.varlen_gather(out32[0], index_q, valid_q)
            d_out_p = reference.varlen_gather(d_out32[0], index_q, valid_q)
            keep = self._keep(spec, operands, spec.batch, pad_q, pad_k)

            def padded(xs):
                q, k, v = (x[0] for x in _unpack(xs, spec.packing))
                return (reference.varlen_gather(q, index_q, valid_q),
                        reference.varlen_gather(k, index_k, valid_k),
                        reference.varlen_gather(v, index_k, valid_k))
        else:
            rows, lse_p, out_p, d_out_p = None, lse, out32, d_out32
            q_shape, k_shape = _unpack(xs, spec.packing)[0].shape, _unpack(xs, spec.packing)[1].shape
            keep = self._keep(spec, operands, q_shape[0], q_shape[1], k_shape[1])

            def padded(xs):
                return _unpack(xs, spec.packing)

        def h(xs):
            q, k, v = padded(xs)
            p = _probs(spec, q, k, lse_p, operands, rows)  # (b, h, s, t)
            pm = p if keep is None else jnp.where(keep, p / (1.0 - spec.dropout_p), 0.0)
            groups = spec.nheads // spec.nheads_k
            v = jnp.repeat(v.astype(jnp.float32), groups, axis=2)
            return (jnp.einsum("bhst,bthd->bshd", pm, v)
                    - jnp.einsum("bhst->bsh", p)[..., None] * out_p)

        _, vjp = jax.vjp(h, tuple(xs))
        (grads,) = vjp(d_out_p)
        return grads

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
    if spec.varlen:
        rows = _padded_rows(spec, operands, q.shape[1], k.shape[1], spec.max_seqlen_q,
                            spec.max_seqlen_k)
        (index_q, valid_q, _), (index_k, valid_k, _) = rows
        q_pad = reference.varlen_gather(q[0], index_q, valid_q)
        k_pad = reference.varlen_gather(k[0], index_k, valid_k)
        probs = _probs(spec, q_pad, k_pad, _pad_lse(lse[0], index_q, valid_q), operands, rows)
        q_shape, seqlen_k = q_pad.shape, spec.max_seqlen_k
    else:
        probs = _probs(spec, q, k, lse, operands)
        q_shape, seqlen_k = q.shape, k.shape[1]
    if spec.dropout_p > 0:
        keep = backend.dropout_mask(spec, q_shape, seqlen_k, operands.rng)
        probs = jnp.where(keep, probs, -probs)
    return probs


def _with_head_offset(operands, head_offset):
    """Dropout's RNG state of a head shard: word 3 holds the shard's first
    global head, which the kernels and the reference add to the head index."""
    if head_offset is None or operands.rng.size == 0:
        return operands
    rng = operands.rng.at[..., 3].add(jnp.asarray(head_offset, jnp.uint32))
    return operands._replace(rng=rng)


@dataclasses.dataclass(frozen=True)
class _Forward:
    """One shard's forward (`sharding.call`'s fn): (out, lse)."""

    backend: Backend

    def __call__(self, spec, args, head_offset):
        xs, operands = args
        return tuple(self.backend.forward(spec, xs, _with_head_offset(operands, head_offset)))


@dataclasses.dataclass(frozen=True)
class _Backward:
    """One shard's backward: the gradients of xs."""

    backend: Backend

    def __call__(self, spec, args, head_offset):
        xs, operands, out, lse, d_out = args
        return tuple(self.backend.backward(spec, xs, _with_head_offset(operands, head_offset),
                                           out, lse, d_out))


def forward(backend: Backend, spec: AttentionSpec, xs, operands: Operands):
    """(out, lse) of backend's forward, partitioned; not differentiable."""
    sig = sharding.attention_signature(spec, xs, operands, backward=False)
    return sharding.call(_Forward(backend), spec, (tuple(xs), operands), sig)


def backward(backend: Backend, spec: AttentionSpec, xs, operands: Operands, out, lse, d_out):
    """The gradients of xs given out, lse (the softmax statistics) and d_out,
    partitioned."""
    sig = sharding.attention_signature(spec, xs, operands, backward=True)
    args = (tuple(xs), operands, out, lse, d_out.astype(out.dtype))
    return sharding.call(_Backward(backend), spec, args, sig)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(backend: Backend, spec: AttentionSpec, xs, operands: Operands):
    return forward(backend, spec, xs, operands)


def _attention_fwd(backend, spec, xs, operands):
    out, lse = forward(backend, spec, xs, operands)
    return (out, lse), (xs, operands, out, lse)


def _attention_bwd(backend, spec, residuals, cotangents):
    # The LSE output is not differentiable: its cotangent is ignored. So are
    # the integer and RNG operands and the ALiBi slopes.
    xs, operands, out, lse = residuals
    d_out, _ = cotangents
    grads = backward(backend, spec, xs, operands, out, lse, d_out)
    return tuple(grads), operands.zero_cotangents()


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(backend: Backend, spec: AttentionSpec, xs, operands: Operands):
    """(out, lse) of a bound call on backend, partitioned (`jax_flash.sharding`)
    and differentiable w.r.t. xs."""
    return _attention(backend, spec, tuple(xs), backend.prepare(spec, operands))


def run(spec: AttentionSpec, xs, operands: Operands):
    """Runs a bound call on the chosen backend; the public functions' result:
    out, or (out, softmax_lse, attn_probs) with return_attn_probs."""
    backend = select(spec)
    if spec.varlen:
        xs = tuple(x[None] for x in xs)  # the kernels' one (1, total, ...) buffer
    out, lse = attention(backend, spec, xs, operands)
    if spec.return_attn_probs:
        probs = _attn_probs(backend, spec, xs, lse, operands)
        lse = jax.lax.stop_gradient(lse)
    if spec.varlen:
        out, lse = out[0], lse[0]
    return (out, lse, probs) if spec.return_attn_probs else out


@dataclasses.dataclass(frozen=True)
class _KVCacheForward:
    """One shard of a kv-cache call, with the switches read when the call
    was traced (part of the partitioned call's key)."""

    backend: Backend
    switches: cuda_kvcache.Switches

    def __call__(self, spec, args, head_offset):
        xs, operands = args
        return tuple(self.backend.kvcache_forward(spec, xs, operands, self.switches))


def run_kvcache(spec, xs, operands):
    """Runs a bound `flash_attn_with_kvcache` call (`_src/kvcache.bind`) on
    the chosen backend, partitioned: (out, lse, k_cache, v_cache): the decode
    kernels on GPUs (`cuda_kvcache`), the reference elsewhere."""
    backend = select(spec)
    sig = sharding.kvcache_signature(spec, xs, operands)
    fn = _KVCacheForward(backend, cuda_kvcache.switches())
    return sharding.call(fn, spec, (tuple(xs), operands), sig)
