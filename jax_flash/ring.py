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

Without causal masking or a window the layout only names where the tokens
are; every step is a full block.

Local windows: a query at global position p sees the keys p - left .. p +
right. Each (query chunk, key chunk) pair of a step is then skipped, full,
or a band, which is one kernel call on a slice of the pair (queries cut at
the end or keys cut at the end, so that the kernels' bottom-right aligned
window is the global one; see `_pair_case`). Which case a device has depends
on its index, so a step switches (`lax.switch`) between the distinct cases
of its devices, all known when tracing. Steps in which no device sees a key
are not run at all and the ring jumps over them (a permute by several
places), so a window of w positions costs about w / seqlen_local + 1 steps
instead of n, on either layout.

K/V exchange: ``"ring"`` as above (memory per device linear in its own
sequence length), or ``"allgather"``: one all-gather of K/V (and a
reduce-scatter of dK/dV in the backward) and the same per-step compute on
the gathered blocks; one collective instead of n - 1 dependent ones, at n
times the K/V memory. ``"auto"`` takes the all-gather when the gathered K/V
of a device is at most `ALLGATHER_AUTO_BYTES` (short sequences, few K/V
heads: per-step transfers too small to hide behind their compute), the ring
otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_flash._src import backend as backend_lib
from jax_flash._src import validate
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


# ---- One block pair: kernel forward / backward through the backends ---------


class _Block:
    """Attention of a query block against one key/value block under a local
    (bottom-right aligned) window: forward gives (out, lse) with lse -inf on
    rows without keys (so blocks merge by logaddexp); backward gives the
    block's share of the gradients given the merged out and lse."""

    def __init__(self, window, softmax_scale, softcap, deterministic):
        self.window = window
        self.opts = dict(softmax_scale=softmax_scale, softcap=softcap,
                         deterministic=deterministic)

    def _bind(self, q, k, v, ids):
        spec, operands = bind(
            (q, k, v), layout="fixed", packing="", dropout_p=0.0, causal=False,
            window_size=self.window, alibi_slopes=None, return_attn_probs=False,
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


class _BlockFactory:
    """A hashable maker of `_Block`s for one set of options (part of
    custom_vjp's static argument)."""

    def __init__(self, softmax_scale, softcap, deterministic):
        self.key = (softmax_scale, float(softcap), bool(deterministic))

    def __call__(self, window) -> _Block:
        return _Block(window, *self.key)

    def __eq__(self, other):
        return isinstance(other, _BlockFactory) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


_FULL, _CAUSAL = (-1, -1), (-1, 0)


def _merge(acc, block):
    """Two partial attentions over disjoint keys -> their union's (out, lse);
    out (b, s, h, d) float32, lse (b, h, s) with -inf for no keys. None is
    the empty partial."""
    if acc is None or block is None:
        return block if acc is None else acc
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


def _empty(rows, q, v, *like):
    """(out, lse) of `rows` rows of q that see no key."""
    b, _, h, _ = q.shape
    return (_filled(0.0, (b, rows, h, v.shape[-1]), q, v, *like),
            _filled(-jnp.inf, (b, h, rows), q, v, *like))


def _halves(x, axis=1):
    c = x.shape[axis] // 2
    return jax.lax.slice_in_dim(x, 0, c, axis=axis), jax.lax.slice_in_dim(x, c, None, axis=axis)


def _ids(q_ids, kv_ids):
    return None if q_ids is None else (q_ids, kv_ids)


def _pad_rows(x, total, axis=1):
    """x zero-padded at the end of `axis` to `total` rows."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, total - x.shape[axis])
    return jnp.pad(x, pad)


# ---- Steps without a window (all keys, or causal over the global sequence) -----


class _GlobalSteps:
    """Every step is run; with causal masking, a device whose step holds only
    future keys computes nothing (contiguous), and zigzag steps compute the
    two half blocks that see keys."""

    def __init__(self, n, layout, causal, block):
        self.relevant = tuple(range(n))
        self.layout, self.causal, self.block = layout, causal, block

    def forward(self, j, i, q, k, v, q_ids, kv_ids):
        if j == 0:  # own keys; for zigzag the two local chunks are in sequence order
            return self.block(_CAUSAL if self.causal else _FULL).forward(q, k, v,
                                                                        _ids(q_ids, kv_ids))
        full = self.block(_FULL)
        if not self.causal:
            return full.forward(q, k, v, _ids(q_ids, kv_ids))
        if self.layout == "contiguous":
            # Keys of device i - j: all in the past when i >= j, else the future.
            return jax.lax.cond(i >= j, lambda: full.forward(q, k, v, _ids(q_ids, kv_ids)),
                                lambda: _empty(q.shape[1], q, v, k))

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
            out0, lse0 = _empty(q.shape[1] - q1.shape[1], q, v, k)
            return jnp.concatenate([out0, out1], axis=1), jnp.concatenate([lse0, lse1], axis=2)

        return jax.lax.cond(j <= i, first, second)

    def backward(self, j, i, q, k, v, q_ids, kv_ids, out, lse, d_out):
        if j == 0:
            return self.block(_CAUSAL if self.causal else _FULL).backward(
                q, k, v, _ids(q_ids, kv_ids), out, lse, d_out)
        full = self.block(_FULL)

        def whole():
            return full.backward(q, k, v, _ids(q_ids, kv_ids), out, lse, d_out)

        if not self.causal:
            return whole()

        def zeros():
            return tuple(_filled(0.0, x.shape, q, k, v) for x in (q, k, v))

        if self.layout == "contiguous":
            return jax.lax.cond(i >= j, whole, zeros)

        def first():
            k0, v0 = _halves(k)[0], _halves(v)[0]
            ids0 = None if kv_ids is None else _halves(kv_ids)[0]
            dq, dk0, dv0 = full.backward(q, k0, v0, _ids(q_ids, ids0), out, lse, d_out)
            return dq, _pad_rows(dk0, k.shape[1]), _pad_rows(dv0, v.shape[1])

        def second():
            q0, q1 = _halves(q)
            ids1 = None if q_ids is None else _halves(q_ids)[1]
            dq1, dk, dv = full.backward(q1, k, v, _ids(ids1, kv_ids), _halves(out)[1],
                                        _halves(lse, axis=2)[1], _halves(d_out)[1])
            return jnp.concatenate([_filled(0.0, q0.shape, q, k, v), dq1], axis=1), dk, dv

        return jax.lax.cond(j <= i, first, second)


# ---- Steps under a local window --------------------------------------------------


def _pair_case(delta: int, size: int, left: int, right: int):
    """How a chunk of `size` queries sees a chunk of `size` keys when the
    queries start `delta` positions after the keys (global positions), under
    the window (left, right) (-1: unbounded). Row a sees key b iff lo <= b -
    a <= hi with lo = delta - left, hi = delta + right.

    Returns None (no row sees a key) or (s, wl, wr): one call with a
    bottom-right aligned window (wl, wr) on the first size - s queries and all
    keys when s > 0, on all queries and the first size + s keys when s < 0,
    or on the whole pair when s = 0 ((0, -1, -1) is a full block). With
    seqlen_k - seqlen_q = s the call's window is the global one: row a sees
    key b iff a + s - wl <= b <= a + s + wr, so wl = s - lo and wr = hi - s,
    both >= 0 for s = clamp(0, lo, hi); the rows (keys) cut off see (are
    seen by) nothing."""
    lo = None if left < 0 else delta - left
    hi = None if right < 0 else delta + right
    if (lo is not None and lo > size - 1) or (hi is not None and hi < 1 - size):
        return None
    if (lo is None or lo <= 1 - size) and (hi is None or hi >= size - 1):
        return (0, -1, -1)
    s = 0 if lo is None else max(0, lo)
    s = s if hi is None else min(s, hi)
    return (s, -1 if lo is None else s - lo, -1 if hi is None else hi - s)


class _WindowSteps:
    """The steps of a windowed ring: per step, the case of every (query chunk,
    key chunk) pair of every device, known when tracing; steps where every
    pair of every device is empty are left out of `relevant`."""

    def __init__(self, n, layout, window, seqlen_local, block):
        self.chunks = 2 if layout == "zigzag" else 1
        size = seqlen_local // self.chunks
        self.block = block

        def starts(d):  # global start positions of device d's chunks
            return (d * size, (2 * n - 1 - d) * size) if self.chunks == 2 else (d * size,)

        self.plans = {}
        for j in range(n):
            per_device = [tuple(tuple(_pair_case(qs - ks, size, *window)
                                      for ks in starts((i - j) % n)) for qs in starts(i))
                          for i in range(n)]
            if all(case is None for plan in per_device for row in plan for case in row):
                continue
            distinct = list(dict.fromkeys(per_device))
            self.plans[j] = (tuple(distinct.index(p) for p in per_device), distinct)
        self.relevant = tuple(self.plans)

    def _split(self, x, axis=1):
        return _halves(x, axis) if self.chunks == 2 else (x,)

    def _switch(self, j, i, branch, *args):
        table, distinct = self.plans[j]
        branches = [functools.partial(branch, plan, *args) for plan in distinct]
        if len(branches) == 1:
            return branches[0]()
        return jax.lax.switch(jnp.asarray(table, jnp.int32)[i], branches)

    def forward(self, j, i, q, k, v, q_ids, kv_ids):
        del q_ids, kv_ids  # windows take no segment ids (checked by ring_attention)
        return self._switch(j, i, self._plan_forward, q, k, v)

    def backward(self, j, i, q, k, v, q_ids, kv_ids, out, lse, d_out):
        del q_ids, kv_ids
        return self._switch(j, i, self._plan_backward, q, k, v, out, lse, d_out)

    def _plan_forward(self, plan, q, k, v):
        ks, vs = self._split(k), self._split(v)
        outs, lses = [], []
        for q_a, row in zip(self._split(q), plan):
            acc = None
            for k_b, v_b, case in zip(ks, vs, row):
                if case is not None:
                    acc = _merge(acc, self._band_forward(case, q_a, k_b, v_b))
            out, lse = acc if acc is not None else _empty(q_a.shape[1], q_a, v, k)
            outs.append(out)
            lses.append(lse)
        return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)

    def _band_forward(self, case, q, k, v):
        s, wl, wr = case
        size = q.shape[1]
        if s < 0:
            k, v = k[:, :size + s], v[:, :size + s]
        out, lse = self.block((wl, wr)).forward(q[:, :size - max(s, 0)], k, v, None)
        if s > 0:
            e_out, e_lse = _empty(s, q, v, k)
            out, lse = jnp.concatenate([out, e_out], axis=1), jnp.concatenate([lse, e_lse], 2)
        return out, lse

    def _plan_backward(self, plan, q, k, v, out, lse, d_out):
        qs, ks, vs = self._split(q), self._split(k), self._split(v)
        outs, lses, d_outs = self._split(out), self._split(lse, axis=2), self._split(d_out)
        zeros = lambda x: _filled(0.0, x.shape, q, k, v)  # noqa: E731
        dqs, dks, dvs = [zeros(x) for x in qs], [zeros(x) for x in ks], [zeros(x) for x in vs]
        for a, row in enumerate(plan):
            for b, case in enumerate(row):
                if case is None:
                    continue
                dq, dk, dv = self._band_backward(case, qs[a], ks[b], vs[b], outs[a], lses[a],
                                                 d_outs[a])
                dqs[a], dks[b], dvs[b] = dqs[a] + dq, dks[b] + dk, dvs[b] + dv
        return tuple(jnp.concatenate(x, axis=1) for x in (dqs, dks, dvs))

    def _band_backward(self, case, q, k, v, out, lse, d_out):
        s, wl, wr = case
        size = q.shape[1]
        rows, keys = size - max(s, 0), size + min(s, 0)
        dq, dk, dv = self.block((wl, wr)).backward(
            q[:, :rows], k[:, :keys], v[:, :keys], None, out[:, :rows], lse[:, :, :rows],
            d_out[:, :rows])
        return _pad_rows(dq, size), _pad_rows(dk, size), _pad_rows(dv, size)


# ---- The exchange of K/V blocks -------------------------------------------------


def _shift(tree, axis_name, n, places=1):
    """Every device's tree to the device `places` further round the ring."""
    perm = [(i, (i + places) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


def _gather(tree, axis_name):
    """(n, ...) stacks of every device's arrays, in device order."""
    return jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name), tree)


def _take(gathered, index):
    return jax.tree.map(lambda g: jax.lax.dynamic_index_in_dim(g, index, keepdims=False),
                        gathered)


def _setup(cfg, q):
    axis_name, layout, window, exchange, block = cfg
    n = jax.lax.axis_size(axis_name)
    if window in (_FULL, _CAUSAL):
        steps = _GlobalSteps(n, layout, window == _CAUSAL, block)
    else:
        steps = _WindowSteps(n, layout, window, q.shape[1], block)
    return axis_name, exchange, n, jax.lax.axis_index(axis_name), steps


def _ring_forward(cfg, q, k, v, q_ids, kv_ids):
    axis_name, exchange, n, i, steps = _setup(cfg, q)
    own = kv = (k, v, kv_ids)
    gathered = _gather(own, axis_name) if exchange == "allgather" and steps.relevant[-1] else None
    acc, held = None, 0
    for j in steps.relevant:
        if j and gathered is not None:
            kv = _take(gathered, (i - j) % n)
        elif j != held:  # issued before this step's compute
            kv, held = _shift(kv, axis_name, n, j - held), j
        k_j, v_j, ids_j = kv
        acc = _merge(acc, steps.forward(j, i, q, k_j, v_j, q_ids, ids_j))
    return acc


def _ring_backward(cfg, q, k, v, q_ids, kv_ids, out, lse, d_out):
    axis_name, exchange, n, i, steps = _setup(cfg, q)
    own = kv = (k, v, kv_ids)
    gathered = _gather(own, axis_name) if exchange == "allgather" and steps.relevant[-1] else None
    dq = _filled(0.0, q.shape, q, k, v)
    dkv = None  # dK/dV of the block held: they travel with it (ring)
    sums = None  # dK/dV of every device's block (allgather), summed by a reduce-scatter
    held = 0
    for j in steps.relevant:
        if j and gathered is not None:
            kv = _take(gathered, (i - j) % n)
        elif j != held:
            kv, dkv, held = _shift(kv, axis_name, n, j - held), _shift(dkv, axis_name, n,
                                                                        j - held), j
        k_j, v_j, ids_j = kv
        dq_j, dk_j, dv_j = steps.backward(j, i, q, k_j, v_j, q_ids, ids_j, out, lse, d_out)
        dq = dq + dq_j
        if gathered is None:
            dkv = (dk_j, dv_j) if dkv is None else (dkv[0] + dk_j, dkv[1] + dv_j)
            continue
        if sums is None:
            sums = tuple(_filled(0.0, (n, *x.shape), q, k, v) for x in (k, v))
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
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *zero_ids)


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
        run. A window balances best on the contiguous layout (every device
        does a diagonal and its neighbours' bands); zigzag works too.
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
        of dK/dV; n times the K/V memory) or "auto": the all-gather when a
        device's gathered K and V take at most `ALLGATHER_AUTO_BYTES`, the
        ring otherwise. Same results either way (the same per-block calls).

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
    # The window over the global sequence: entries that cannot bind are -1.
    window = validate.canonical_window(*validate.window(window_size, causal), 2 * n * q.shape[1])
    if window not in (_FULL, _CAUSAL) and ids is not None:
        raise ValueError(f"segment_ids must be None with a local window in ring_attention "
                         f"(window_size={tuple(window_size)!r}), got segment ids")
    if window != _FULL and layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"q must have an even seqlen_local for the zigzag layout with causal "
                         f"masking or a window (two chunks per device), got {tuple(q.shape)}")
    if kv_exchange == "auto":
        gathered = n * (k.size * k.dtype.itemsize + v.size * v.dtype.itemsize)
        kv_exchange = "allgather" if gathered <= ALLGATHER_AUTO_BYTES else "ring"
    cfg = (axis_name, layout, window, kv_exchange,
           _BlockFactory(softmax_scale, softcap, deterministic))
    q_ids, kv_ids = (None, None) if ids is None else ids
    return _ring(cfg, q, k, v, q_ids, kv_ids)
