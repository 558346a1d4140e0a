"""Ring attention (context parallelism): exact attention over a sequence
split across the devices of one mesh axis.

Call `ring_attention` inside `jax.shard_map` with q/k/v sharded along the
sequence over `axis_name` (n devices). K/V blocks travel round the ring with
`ppermute`, the next block's transfer issued before the current block's
compute so the two can overlap; partial outputs merge through their LSE.
The backward pass is its own ring: dK/dV accumulate in float32 and travel with their blocks,
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

Without causal masking or a window the layout only names where the tokens
are; every step is a full block.

Local windows: a query at global position p sees the keys p - left .. p +
right. Each (query chunk, key chunk) pair of a step is then skipped, full,
or a band, which is one kernel call on a slice of the pair (queries cut at
the end or keys cut at the end, so that the kernels' bottom-right aligned
window is the global one; `_src/ring_steps.py`, `pair_case`). Which case a
device has depends on its index, so a step switches (`lax.switch`)
between the distinct cases of its devices, all known when tracing. Steps in
which no device sees a key are not run at all and the ring jumps over them
(a permute by several places): a window of w positions costs about w / seqlen_local + 1 steps
instead of n on the contiguous layout; on zigzag a chunk's neighbours sit
on other devices, and it takes up to about 4 w / seqlen_local + 1.

K/V exchange: ``"ring"`` as above (memory per device linear in its own
sequence length), or ``"allgather"``: one all-gather of K/V (and a
reduce-scatter of dK/dV in the backward) and the same per-step compute on
the gathered blocks; one collective instead of n - 1 dependent ones, at n
times the K/V memory (and float32 dK/dV for all n blocks in the backward).
``"auto"`` takes the all-gather when the gathered K/V of a device is at
most `ALLGATHER_AUTO_BYTES` (short sequences, few K/V heads: per-step
transfers too small to hide behind their compute) and every step is needed
(a window needing a few neighbours moves less by ring), the ring
otherwise.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash._src import validate
from jax_flash._src.ring_steps import (CAUSAL, FULL, BlockFactory, GlobalSteps, WindowSteps,
                                       filled, merge)
from jax_flash._src.spec import bind

__all__ = ["ring_attention", "zigzag_shard", "zigzag_unshard", "ALLGATHER_AUTO_BYTES"]

_LAYOUTS = ("zigzag", "contiguous")
_EXCHANGES = ("auto", "ring", "allgather")
# kv_exchange="auto": all-gather when a device's gathered K and V together take
# at most this many bytes (8192 tokens x 8 K/V heads x d=128 in bf16).
ALLGATHER_AUTO_BYTES = 32 << 20


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


# ---- The exchange of K/V blocks -------------------------------------------------


def _ring_to_permute_index(axis_name):
    """Ring position (`axis_index(axis_name)`'s order: a tuple's axes in the
    tuple's order) -> the device index `ppermute` takes, which counts a tuple
    of axes in the mesh's order."""
    if not isinstance(axis_name, tuple) or len(axis_name) == 1:
        return lambda i: i
    mesh_order = [a for a in jax.sharding.get_abstract_mesh().axis_names if a in axis_name]
    sizes = {a: jax.lax.axis_size(a) for a in axis_name}

    def index(i):
        coords = dict(zip(axis_name, np.unravel_index(i, [sizes[a] for a in axis_name])))
        return int(np.ravel_multi_index([coords[a] for a in mesh_order],
                                        [sizes[a] for a in mesh_order]))

    return index


def _shift(tree, axis_name, n, places=1):
    """Every device's tree to the device `places` further round the ring."""
    index = _ring_to_permute_index(axis_name)
    perm = [(index(i), index((i + places) % n)) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


def _gather(tree, axis_name):
    """(n, ...) stacks of every device's arrays, in device order."""
    return jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name), tree)


def _take(gathered, index):
    return jax.tree.map(lambda g: jax.lax.dynamic_index_in_dim(g, index, keepdims=False),
                        gathered)


class _Config(NamedTuple):
    """custom_vjp's static argument: everything but the arrays."""

    axis_name: Any
    layout: str
    window: tuple[int, int]  # over global positions, causal folded in
    exchange: str  # "ring" | "allgather"
    block: BlockFactory


def _steps(cfg: _Config, n: int, seqlen_local: int):
    if cfg.window in (FULL, CAUSAL):
        return GlobalSteps(n, cfg.layout, cfg.window == CAUSAL, cfg.block)
    return WindowSteps(n, cfg.layout, cfg.window, seqlen_local, cfg.block)


def _setup(cfg: _Config, q):
    n = jax.lax.axis_size(cfg.axis_name)
    steps = _steps(cfg, n, q.shape[1])
    # Gather only when a step needs another device's block.
    gather = cfg.exchange == "allgather" and len(steps.relevant) > 1
    return cfg.axis_name, gather, n, jax.lax.axis_index(cfg.axis_name), steps


def _blocks(steps, kv, gathered, axis_name, n, i):
    """(j, block j's (k, v, ids)) for the relevant steps j. On the ring, the
    transfer of the next step's block is issued (traced) before the caller
    computes on this one, so that it can run under that compute."""
    relevant = list(steps.relevant)
    if gathered is not None:
        for j in relevant:
            yield j, (_take(gathered, (i - j) % n) if j else kv)
        return
    held = 0
    for index, j in enumerate(relevant):
        if j != held:  # only before the first step (a ring that skips its own block)
            kv, held = _shift(kv, axis_name, n, j - held), j
        ahead = relevant[index + 1] if index + 1 < len(relevant) else None
        nxt = None if ahead is None else _shift(kv, axis_name, n, ahead - j)
        yield j, kv
        if nxt is not None:
            kv, held = nxt, ahead


def _ring_forward(cfg, q, k, v, q_ids, kv_ids):
    axis_name, gather, n, i, steps = _setup(cfg, q)
    own = (k, v, kv_ids)
    gathered = _gather(own, axis_name) if gather else None
    acc = None
    for j, (k_j, v_j, ids_j) in _blocks(steps, own, gathered, axis_name, n, i):
        acc = merge(acc, steps.forward(j, i, q, k_j, v_j, q_ids, ids_j))
    return acc


def _ring_backward(cfg, q, k, v, q_ids, kv_ids, out, lse, d_out):
    axis_name, gather, n, i, steps = _setup(cfg, q)
    own = (k, v, kv_ids)
    gathered = _gather(own, axis_name) if gather else None
    dq = filled(0.0, q.shape, q, k, v)
    dkv = None  # dK/dV of the block held: they travel with it (ring)
    sums = None  # dK/dV of every device's block (allgather), summed by a reduce-scatter
    held = 0  # the step whose block dkv belongs to
    for j, (k_j, v_j, ids_j) in _blocks(steps, own, gathered, axis_name, n, i):
        if gathered is None and j != held:  # dK/dV follow their block, after its compute
            dkv, held = _shift(dkv, axis_name, n, j - held), j
        dq_j, dk_j, dv_j = steps.backward(j, i, q, k_j, v_j, q_ids, ids_j, out, lse, d_out)
        dq = dq + dq_j
        if gathered is None:
            dkv = (dk_j, dv_j) if dkv is None else (dkv[0] + dk_j, dkv[1] + dv_j)
            continue
        if sums is None:
            sums = tuple(filled(0.0, (n, *x.shape), k, v) for x in (k, v))
        src = (i - j) % n
        sums = tuple(jax.lax.dynamic_update_index_in_dim(
            s, jax.lax.dynamic_index_in_dim(s, src, keepdims=False) + d, src, 0)
            for s, d in zip(sums, (dk_j, dv_j)))
    if sums is not None:
        dkv = tuple(jax.lax.psum_scatter(s, axis_name) for s in sums)
    elif held:
        dkv = _shift(dkv, axis_name, n, n - held)  # home: device i gets its own block's
    return dq, *dkv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg, q, k, v, q_ids, kv_ids):
    out, _ = _ring_forward(cfg, q, k, v, q_ids, kv_ids)
    return out.astype(q.dtype)


def _ring_fwd(cfg, q, k, v, q_ids, kv_ids):
    out, lse = _ring_forward(cfg, q, k, v, q_ids, kv_ids)
    out = out.astype(q.dtype)
    return out, (q, k, v, q_ids, kv_ids, out, lse)


def _ring_bwd(cfg, residuals, d_out):
    q, k, v, q_ids, kv_ids, out, lse = residuals
    dq, dk, dv = _ring_backward(cfg, q, k, v, q_ids, kv_ids, out, lse, d_out.astype(q.dtype))
    zero_ids = (None, None) if q_ids is None else tuple(
        jnp.zeros(x.shape, jax.dtypes.float0) for x in (q_ids, kv_ids))
    # Each gradient varies over the shard_map axes its primal does (a kernel
    # call's outputs carry no varying axes: with one device on the ring no
    # collective adds them); zeros_like keeps an array's varying axes.
    dq, dk, dv = (g.astype(x.dtype) + jnp.zeros_like(x) for g, x in ((dq, q), (dk, k), (dv, v)))
    return (dq, dk, dv, *zero_ids)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, *, axis_name, causal: bool = False, layout: str = "zigzag",
                   softmax_scale: float | None = None, window_size=(-1, -1),
                   softcap: float = 0.0, segment_ids=None, deterministic: bool = False,
                   kv_exchange: str = "auto"):
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
        traffic) or "contiguous" (device i holds chunk i). With causal
        masking or a window, "zigzag" needs an even seqlen_local.
      window_size: (left, right) over global positions, as in
        `flash_attn_func` (-1: unbounded): a query at position p sees the
        keys p - left .. p + right. Steps whose blocks see no key are not
        run. A window balances best, and needs fewest steps, on the
        contiguous layout (every device does a diagonal and its neighbours'
        bands); zigzag works too.
      softmax_scale, softcap, deterministic: as in `flash_attn_func`.
      segment_ids: optional (q_ids, kv_ids), this device's (batch,
        seqlen_local) document ids of its positions: a query sees only keys
        of its own document. With causal, q_ids must equal kv_ids (the
        same tokens on both sides, as in self-attention; not checked, the
        values may be traced): the ring applies causal masking per block,
        which matches `flash_attn_func`'s segment-relative alignment only
        then. Not with a window.
      kv_exchange: "ring" (K/V blocks passed round the ring, memory linear in
        seqlen_local), "allgather" (one all-gather of K/V, a reduce-scatter
        of dK/dV; n times the K/V memory, float32 dK/dV of every block in the
        backward) or "auto": the all-gather when a device's gathered K and V
        take at most `ALLGATHER_AUTO_BYTES` and every ring step is needed,
        the ring otherwise. Same results either way (the same per-block
        calls).

    Returns:
      (batch, seqlen_local, nheads, headdim) in q's dtype: this device's rows
      of the output. Differentiable w.r.t. q, k, v.

    Raises:
      ValueError, TypeError: bad options or shapes, naming the argument.
    """
    try:
        n = jax.lax.axis_size(axis_name)
    except NameError as e:
        raise ValueError(f"ring_attention must run inside jax.shard_map with axis_name "
                         f"{axis_name!r} bound (q/k/v sharded along the sequence over it), "
                         f"got an unbound axis name") from e
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if kv_exchange not in _EXCHANGES:
        raise ValueError(f"kv_exchange must be one of {_EXCHANGES}, got {kv_exchange!r}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must hold the same positions (seqlen_local), got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    # Binding the whole local call validates every argument once, up front.
    ids = None if segment_ids is None else tuple(segment_ids)
    bind((q, k, v), layout="fixed", packing="", dropout_p=0.0, softmax_scale=softmax_scale,
         causal=causal, window_size=(-1, -1), softcap=softcap, alibi_slopes=None,
         deterministic=deterministic, return_attn_probs=False, dropout_key=None,
         segment_ids=ids)
    # The window over the global sequence: entries that cannot bind (no two
    # positions are n * seqlen_local apart) are -1.
    window = validate.canonical_window(*validate.window(window_size, causal), n * q.shape[1])
    if window not in (FULL, CAUSAL) and ids is not None:
        raise ValueError(f"segment_ids must be None with a local window in ring_attention "
                         f"(window_size={tuple(window_size)!r}, in effect {window}), got "
                         f"segment ids")
    if window != FULL and layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"q must have an even seqlen_local for the zigzag layout with causal "
                         f"masking or a window (two chunks per device), got {tuple(q.shape)}")
    cfg = _Config(axis_name, layout, window, kv_exchange,
                  BlockFactory(softmax_scale, softcap, deterministic))
    if kv_exchange == "auto":
        # The all-gather moves every block; a window may need only a few.
        gathered = n * (k.size * k.dtype.itemsize + v.size * v.dtype.itemsize)
        every_step = len(_steps(cfg, n, q.shape[1]).relevant) == n
        small = gathered <= ALLGATHER_AUTO_BYTES
        cfg = cfg._replace(exchange="allgather" if small and every_step else "ring")
    q_ids, kv_ids = (None, None) if ids is None else ids
    return _ring(cfg, q, k, v, q_ids, kv_ids)
