"""The per-step computations of `jax_flash.ring_attention`: one block pair
through the backends (`Block`), partial results merged by their LSE, and
which pairs of query and key chunks each ring step computes, with no window
(`GlobalSteps`) or under a local window (`WindowSteps`, `pair_case`).

A steps object has `relevant` (the ring steps to run, 0 = the device's own
block) and forward(j, i, q, k, v, q_ids, kv_ids) -> (out, lse) / backward(j,
i, q, k, v, q_ids, kv_ids, out, lse, d_out) -> (dq, dk, dv) for step j on
device i (traced), all float32; lse is -inf on rows that see no key.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_flash._src import backend as backend_lib
from jax_flash._src.spec import bind

# ---- One block pair: kernel forward / backward through the backends ---------


class Block:
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


class BlockFactory:
    """A hashable maker of `Block`s for one set of options (part of
    custom_vjp's static argument)."""

    def __init__(self, softmax_scale, softcap, deterministic):
        self.key = (softmax_scale, float(softcap), bool(deterministic))

    def __call__(self, window) -> Block:
        return Block(window, *self.key)

    def __eq__(self, other):
        return isinstance(other, BlockFactory) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


FULL, CAUSAL = (-1, -1), (-1, 0)


def merge(acc, block):
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


def filled(value, shape, *like):
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
    return (filled(0.0, (b, rows, h, v.shape[-1]), q, v, *like),
            filled(-jnp.inf, (b, h, rows), q, v, *like))


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


class GlobalSteps:
    """Every step is run; with causal masking, a device whose step holds only
    future keys computes nothing (contiguous), and zigzag steps compute the
    two half blocks that see keys."""

    def __init__(self, n, layout, causal, block):
        self.relevant = tuple(range(n))
        self.layout, self.causal, self.block = layout, causal, block

    def forward(self, j, i, q, k, v, q_ids, kv_ids):
        if j == 0:  # own keys; for zigzag the two local chunks are in sequence order
            return self.block(CAUSAL if self.causal else FULL).forward(q, k, v,
                                                                        _ids(q_ids, kv_ids))
        full = self.block(FULL)
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
            return self.block(CAUSAL if self.causal else FULL).backward(
                q, k, v, _ids(q_ids, kv_ids), out, lse, d_out)
        full = self.block(FULL)

        def whole():
            return full.backward(q, k, v, _ids(q_ids, kv_ids), out, lse, d_out)

        if not self.causal:
            return whole()

        def zeros():  # dq varies like the scores; dK/dV like K and V
            return (filled(0.0, q.shape, q, k, v), filled(0.0, k.shape, k, v),
                    filled(0.0, v.shape, k, v))

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
            return jnp.concatenate([filled(0.0, q0.shape, q, k, v), dq1], axis=1), dk, dv

        return jax.lax.cond(j <= i, first, second)


# ---- Steps under a local window --------------------------------------------------


def pair_case(delta: int, size: int, left: int, right: int):
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


class WindowSteps:
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
            per_device = [tuple(tuple(pair_case(qs - ks, size, *window)
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
                    acc = merge(acc, self._band_forward(case, q_a, k_b, v_b))
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
        # dq varies like the scores (q, k and v), dK/dV like K and V only (K/V may
        # be replicated over an axis q is split along).
        dqs = [filled(0.0, x.shape, q, k, v) for x in qs]
        dks, dvs = [filled(0.0, x.shape, k, v) for x in ks], [filled(0.0, x.shape, k, v)
                                                              for x in vs]
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
