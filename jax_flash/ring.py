"""Ring attention (context parallelism): exact attention over a sequence
split across the devices of one mesh axis.

Call `ring_attention` inside `jax.shard_map` with q/k/v sharded along the
sequence over `axis_name` (n devices). K/V blocks travel round the ring with
`ppermute`, each transfer issued before the current block's compute so the
two can overlap; partial outputs merge through their LSE. The backward pass
is its own ring: dK/dV accumulate in float32 and travel with their blocks,
dQ stays home; it reuses the forward's output and LSE (nothing recomputed
but the per-block scores, as in any FlashAttention backward).

Layouts (the order of the global sequence over the devices):

* ``"zigzag"`` (causal load balance): the sequence is cut into 2n chunks and
  device i holds chunks i and 2n - 1 - i. Every ring step then costs every
  device the same (half a block pair each), where the contiguous layout
  leaves device 0 idle for all but one step. `zigzag_shard` /
  `zigzag_unshard` reorder a global (batch, seqlen, ...) array to and from
  that layout (seqlen divisible by 2n).
* ``"contiguous"``: device i holds chunk i. Steps whose keys lie wholly in
  the future of the device's queries are skipped (a `lax.cond`).

Without causal masking the layout only names where the tokens are; every
step is a full block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_flash._src import backend as backend_lib
from jax_flash._src.spec import bind

__all__ = ["ring_attention", "zigzag_shard", "zigzag_unshard"]

_LAYOUTS = ("zigzag", "contiguous")


def zigzag_shard(x, n: int, axis: int = 1):
    """Reorders the sequence axis of x so that splitting it into n equal
    contiguous shards gives device i the chunks i and 2n - 1 - i of 2n.

    Args:
      x: an array whose `axis` (default 1, the sequence axis of (batch,
        seqlen, ...)) has a length divisible by 2n.
      n: the number of devices of the ring.
    """
    length = x.shape[axis]
    if length % (2 * n):
        raise ValueError(f"x's axis {axis} must have a length divisible by 2 * n = {2 * n} "
                         f"for the zigzag layout, got {length}")
    chunks = jnp.split(x, 2 * n, axis=axis)
    order = [c for i in range(n) for c in (i, 2 * n - 1 - i)]
    return jnp.concatenate([chunks[c] for c in order], axis=axis)


def zigzag_unshard(x, n: int, axis: int = 1):
    """The inverse of `zigzag_shard`: the natural sequence order back."""
    length = x.shape[axis]
    if length % (2 * n):
        raise ValueError(f"x's axis {axis} must have a length divisible by 2 * n = {2 * n}, "
                         f"got {length}")
    chunks = jnp.split(x, 2 * n, axis=axis)
    order = [c for i in range(n) for c in (i, 2 * n - 1 - i)]
    natural = [None] * (2 * n)
    for position, c in enumerate(order):
        natural[c] = chunks[position]
    return jnp.concatenate(natural, axis=axis)


# ---- One block pair: kernel forward / backward through the backends ---------


class _Block:
    """Attention of a query block against one key/value block: forward gives
    (out, lse) with lse -inf on rows without keys (so blocks merge by
    logaddexp); backward gives the block's share of the gradients given the
    merged out and lse."""

    def __init__(self, causal: bool, softmax_scale, softcap, deterministic):
        self.causal = causal
        self.opts = dict(softmax_scale=softmax_scale, softcap=softcap,
                         deterministic=deterministic)

    def _bind(self, q, k, v, ids):
        spec, operands = bind(
            (q, k, v), layout="fixed", packing="", dropout_p=0.0, causal=self.causal,
            window_size=(-1, -1), alibi_slopes=None, return_attn_probs=False,
            dropout_key=None, segment_ids=ids, **self.opts)
        backend = backend_lib.select(spec)
        return backend, spec, backend.prepare(spec, operands)

    def forward(self, q, k, v, ids):
        backend, spec, operands = self._bind(q, k, v, ids)
        out, lse = backend_lib.forward(backend, spec, (q, k, v), operands)
        return out.astype(jnp.float32), jnp.where(jnp.isposinf(lse), -jnp.inf, lse)

    def backward(self, q, k, v, ids, out, lse, d_out):
        backend, spec, operands = self._bind(q, k, v, ids)
        # The kernels' convention for rows without keys: lse = +inf.
        lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)
        dq, dk, dv = backend_lib.backward(backend, spec, (q, k, v), operands, out, lse, d_out)
        return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)


def _merge(acc, block):
    """Two partial attentions over disjoint keys -> their union's (out, lse);
    out (b, s, h, d) float32, lse (b, h, s) with -inf for no keys."""
    out_a, lse_a = acc
    out_b, lse_b = block
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isneginf(lse), 0.0, lse)

    def weight(x):  # exp(x - lse) as (b, s, h, 1); 0 where x = -inf
        w = jnp.where(jnp.isneginf(x), 0.0, jnp.exp(x - safe))
        return jnp.swapaxes(w, 1, 2)[..., None]

    return out_a * weight(lse_a) + out_b * weight(lse_b), lse


def _filled(value, shape, *like):
    """A float32 array of value that varies over the shard_map axes the
    arrays `like` vary over (both branches of a lax.cond must agree on it):
    zeros_like keeps an array's varying axes."""
    out = jnp.full(shape, value, jnp.float32)
    for y in like:
        out = out + jnp.zeros_like(y, shape=shape, dtype=jnp.float32)
    return out


def _empty(q, v):
    """(out, lse) of rows that see no key."""
    b, s, h, _ = q.shape
    return _filled(0.0, (b, s, h, v.shape[-1]), q, v), _filled(-jnp.inf, (b, h, s), q, v)


def _halves(x, axis=1):
    c = x.shape[axis] // 2
    return jax.lax.slice_in_dim(x, 0, c, axis=axis), jax.lax.slice_in_dim(x, c, None, axis=axis)


# ---- The ring -------------------------------------------------------------------


def _shift(tree, axis_name, n):
    """Every device's tree to the next device of the ring."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


def _ring_forward(cfg, q, k, v, q_ids, kv_ids):
    axis_name, layout, causal, block = cfg
    n = jax.lax.axis_size(axis_name)
    i = jax.lax.axis_index(axis_name)
    ids = None if q_ids is None else (q_ids, kv_ids)
    # Step 0: the device's own keys; causal within the block (for zigzag the
    # two local chunks are in sequence order, so that is exact too).
    acc = block(causal).forward(q, k, v, ids)
    kv = (k, v, kv_ids)
    for j in range(1, n):
        kv = _shift(kv, axis_name, n)  # issued before this step's compute
        k_j, v_j, kv_ids_j = kv
        acc = _merge(acc, _step_forward(block, layout, causal, i, j, q, k_j, v_j, q_ids,
                                        kv_ids_j))
    return acc


def _ids(q_ids, kv_ids):
    return None if q_ids is None else (q_ids, kv_ids)


def _step_forward(block, layout, causal, i, j, q, k, v, q_ids, kv_ids):
    """The partial (out, lse) of ring step j >= 1 on device i."""
    full = block(False)
    if not causal:
        return full.forward(q, k, v, _ids(q_ids, kv_ids))
    if layout == "contiguous":
        # Keys of device i - j: all in the past when i >= j, else the future.
        return jax.lax.cond(i >= j, lambda: full.forward(q, k, v, _ids(q_ids, kv_ids)),
                            lambda: _empty(q, v))

    # Zigzag: the block of device src = (i - j) mod n holds chunks src and
    # 2n - 1 - src. src < i: both query chunks see the first key chunk only;
    # src > i: only the second query chunk sees keys, and it sees all of them.
    def first():
        k0, v0 = _halves(k)[0], _halves(v)[0]
        ids0 = None if kv_ids is None else _halves(kv_ids)[0]
        return full.forward(q, k0, v0, _ids(q_ids, ids0))

    def second():
        q1 = _halves(q)[1]
        ids1 = None if q_ids is None else _halves(q_ids)[1]
        out1, lse1 = full.forward(q1, k, v, _ids(ids1, kv_ids))
        out0, lse0 = _empty(_halves(q)[0], v)
        return jnp.concatenate([out0, out1], axis=1), jnp.concatenate([lse0, lse1], axis=2)

    return jax.lax.cond(j <= i, first, second)


def _step_backward(block, layout, causal, i, j, q, k, v, q_ids, kv_ids, out, lse, d_out):
    """(dq, dk, dv) float32 of ring step j >= 1 on device i."""
    full = block(False)

    def whole():
        return full.backward(q, k, v, _ids(q_ids, kv_ids), out, lse, d_out)

    if not causal:
        return whole()

    def zeros():
        return tuple(_filled(0.0, x.shape, q, k, v) for x in (q, k, v))

    if layout == "contiguous":
        return jax.lax.cond(i >= j, whole, zeros)

    def first():
        (k0, k1), (v0, v1) = _halves(k), _halves(v)
        ids0 = None if kv_ids is None else _halves(kv_ids)[0]
        dq, dk0, dv0 = full.backward(q, k0, v0, _ids(q_ids, ids0), out, lse, d_out)
        pad_k = _filled(0.0, k1.shape, q, k, v)
        pad_v = _filled(0.0, v1.shape, q, k, v)
        return (dq, jnp.concatenate([dk0, pad_k], axis=1), jnp.concatenate([dv0, pad_v], axis=1))

    def second():
        q0, q1 = _halves(q)
        ids1 = None if q_ids is None else _halves(q_ids)[1]
        dq1, dk, dv = full.backward(q1, k, v, _ids(ids1, kv_ids), _halves(out)[1],
                                    _halves(lse, axis=2)[1], _halves(d_out)[1])
        pad_q = _filled(0.0, q0.shape, q, k, v)
        return jnp.concatenate([pad_q, dq1], axis=1), dk, dv

    return jax.lax.cond(j <= i, first, second)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg, q, k, v, q_ids, kv_ids):
    out, _ = _ring_forward(cfg, q, k, v, q_ids, kv_ids)
    return out.astype(q.dtype)


def _ring_fwd(cfg, q, k, v, q_ids, kv_ids):
    out, lse = _ring_forward(cfg, q, k, v, q_ids, kv_ids)
    out = out.astype(q.dtype)
    return out, (q, k, v, q_ids, kv_ids, out, lse)


def _ring_bwd(cfg, residuals, d_out):
    axis_name, layout, causal, block = cfg
    q, k, v, q_ids, kv_ids, out, lse = residuals
    d_out = d_out.astype(q.dtype)
    n = jax.lax.axis_size(axis_name)
    i = jax.lax.axis_index(axis_name)
    dq, dk, dv = block(causal).backward(q, k, v, _ids(q_ids, kv_ids), out, lse, d_out)
    kv = (k, v, kv_ids)
    for j in range(1, n):
        kv = _shift(kv, axis_name, n)  # the next block, issued before the compute
        # dK/dV of the block this device just passed on travel one step behind it.
        dk, dv = _shift((dk, dv), axis_name, n)
        k_j, v_j, kv_ids_j = kv
        dq_j, dk_j, dv_j = _step_backward(block, layout, causal, i, j, q, k_j, v_j, q_ids,
                                          kv_ids_j, out, lse, d_out)
        dq, dk, dv = dq + dq_j, dk + dk_j, dv + dv_j
    if n > 1:
        dk, dv = _shift((dk, dv), axis_name, n)  # home: device i gets its own block's
    zero_ids = (None if q_ids is None else
                (jnp.zeros(q_ids.shape, jax.dtypes.float0), jnp.zeros(kv_ids.shape,
                                                                      jax.dtypes.float0)))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            *(zero_ids or (None, None)))


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, *, axis_name, causal: bool = False, layout: str = "zigzag",
                   softmax_scale: float | None = None, window_size=(-1, -1),
                   softcap: float = 0.0, segment_ids=None, deterministic: bool = False):
    """Exact attention over a sequence sharded along `axis_name`, inside
    `jax.shard_map`.

    Args:
      q: this device's (batch, seqlen_local, nheads, headdim) rows of the
        sequence, float16 or bfloat16, in `layout` order.
      k, v: (batch, seqlen_local, nheads_k, headdim), the same positions.
      axis_name: the mesh axis (or tuple of axes) the sequence is sharded over.
      causal: causal masking over the global sequence.
      layout: "zigzag" (device i holds chunks i and 2n - 1 - i of 2n; see
        `zigzag_shard`, best applied in the data pipeline: inside a jitted
        program the reordering of a sharded sequence is itself collective
        traffic) or "contiguous" (device i holds chunk i).
      softmax_scale, softcap, deterministic: as in `flash_attn_func`.
      window_size: only (-1, -1): local windows are not supported by the
        ring (a window needs only neighbouring blocks: shard_map with a halo
        exchange serves it better).
      segment_ids: optional (q_ids, kv_ids), this device's (batch,
        seqlen_local) document ids of its positions: a query sees only keys
        of its own document. With causal, q_ids must equal kv_ids (the
        same tokens on both sides, as in self-attention; not checked, the
        values may be traced): the ring applies causal masking per block,
        which matches `flash_attn_func`'s segment-relative alignment only
        then.

    Returns:
      (batch, seqlen_local, nheads, headdim) in q's dtype: this device's rows
      of the output. Differentiable w.r.t. q, k, v.

    Raises:
      ValueError, TypeError: bad options or shapes, naming the argument.
    """
    try:
        jax.lax.axis_size(axis_name)
    except NameError as e:
        raise ValueError(f"ring_attention must run inside jax.shard_map with axis_name "
                         f"{axis_name!r} bound (q/k/v sharded along the sequence over it), "
                         f"got an unbound axis name") from e
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if tuple(window_size) != (-1, -1):
        raise ValueError(f"window_size must be (-1, -1) for ring_attention (local windows are "
                         f"not supported by the ring), got {window_size!r}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must hold the same positions (seqlen_local), got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    if causal and layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"q must have an even seqlen_local for the zigzag layout (two "
                         f"chunks per device), got {tuple(q.shape)}")
    # Binding the whole local call validates every argument once, up front.
    ids = None if segment_ids is None else tuple(segment_ids)
    bind((q, k, v), layout="fixed", packing="", dropout_p=0.0, softmax_scale=softmax_scale,
         causal=causal, window_size=(-1, -1), softcap=softcap, alibi_slopes=None,
         deterministic=deterministic, return_attn_probs=False, dropout_key=None,
         segment_ids=ids)
    cfg = (axis_name, layout, bool(causal), _BlockFactory(softmax_scale, softcap, deterministic))
    q_ids, kv_ids = (None, None) if ids is None else ids
    return _ring(cfg, q, k, v, q_ids, kv_ids)


class _BlockFactory:
    """A hashable maker of `_Block`s for one set of options (custom_vjp's
    static argument)."""

    def __init__(self, softmax_scale, softcap, deterministic):
        self.key = (softmax_scale, float(softcap), bool(deterministic))

    def __call__(self, causal: bool) -> _Block:
        return _Block(causal, *self.key)

    def __eq__(self, other):
        return isinstance(other, _BlockFactory) and self.key == other.key

    def __hash__(self):
        return hash(self.key)
