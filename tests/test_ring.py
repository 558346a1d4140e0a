"""Ring attention (`jax_flash.ring`): `ring_attention` inside `jax.shard_map`
over n devices gives the unsharded `flash_attn_func`'s output and gradients
(jax.vjp with a random cotangent, through jax.jit) and passes FlashAttention's
error rule against the float32 `reference.attention_ref` (max error within 2x
(out) / 3x (dq, dk, dv) of the same reference in the input dtype, plus a small
epsilon: `gpu_grid.check_fa_rule`), for both layouts, causal or not,
MHA/GQA/MQA, softcap, softmax_scale, packed-document segment ids,
deterministic, bf16/fp16, odd local lengths where the layout allows them, a
2-D ("dp", "sp") mesh and a sequence axis made of two mesh axes. Plus the
zigzag helpers, the argument errors and the collectives of the compiled ring
(collective-permute only). Causal segment ids need q_ids == kv_ids (the
documented precondition), which every case here has.

CPU: 8 host devices (tests/conftest.py sets XLA_FLAGS; without it run with
XLA_FLAGS=--xla_force_host_platform_device_count=8). A test needing more
devices than `jax.devices()` has is skipped. GPU: meshes of the first N GPUs.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_flash
from jax_flash import reference
from jax_flash.ring import ring_attention, zigzag_shard, zigzag_unshard

from gpu_grid import check_fa_rule

AUTO = jax.sharding.AxisType.Auto
ATOL = 1e-5
_COLLECTIVE = re.compile(
    r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter|"
    r"collective-broadcast)(?:-start)?\(")


# ---- Helpers ------------------------------------------------------------------


def make_mesh(shape, names):
    """A mesh of the first prod(shape) devices; skips when there are fewer."""
    n = math.prod(shape)
    devices = jax.devices()
    if len(devices) < n:
        pytest.skip(f"needs {n} devices, {len(devices)} available (set XLA_FLAGS="
                    f"--xla_force_host_platform_device_count=8 before jax initialises)")
    return jax.sharding.Mesh(np.asarray(devices[:n]).reshape(shape), names,
                             axis_types=(AUTO,) * len(shape))


def inputs(seed, batch, seqlen, heads, head_dim=32, dtype=jnp.bfloat16):
    """Random-normal q, k, v and a cotangent (numpy: no per-shape compiles)."""
    nheads, nheads_k = heads
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))
    return (normal(batch, seqlen, nheads, head_dim), normal(batch, seqlen, nheads_k, head_dim),
            normal(batch, seqlen, nheads_k, head_dim), normal(batch, seqlen, nheads, head_dim))


def documents(seed, batch, seqlen):
    """Packed-document ids: contiguous runs (about 7 tokens each) of distinct
    ids in the global sequence, different cuts per batch row."""
    rng = np.random.default_rng(seed)
    starts = rng.random((batch, seqlen)) < 0.15
    starts[:, 0] = False
    return jnp.asarray(np.cumsum(starts, axis=1) + 10 * np.arange(batch)[:, None], jnp.int32)


def ring_fn(mesh, axis_name, spec, *, layout, causal, kv_exchange="ring", **opts):
    """The ring as a global function: (q, k, v[, ids]) in layout order,
    sharded over axis_name by `spec` -> the output in layout order."""

    def local(q, k, v, *ids):
        return ring_attention(q, k, v, axis_name=axis_name, causal=causal, layout=layout,
                              segment_ids=(ids[0], ids[0]) if ids else None,
                              kv_exchange=kv_exchange, **opts)

    return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec)


def run_jit(fn, *args):
    """jax.jit(fn)(*args); on CPU compiled at LLVM -O0 (half the compile
    time of these small programs, the same HLO passes)."""
    options = ({"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu"
               else None)
    return jax.jit(fn).lower(*args).compile(compiler_options=options)(*args)


def vjp(fn, q, k, v, d_out):
    """(out, (dq, dk, dv)) of fn at q, k, v with cotangent d_out."""
    out, pullback = jax.vjp(fn, q, k, v)
    return out, pullback(d_out)


def zigzag_order(n, seqlen):
    """zigzag_shard's order of the positions 0..seqlen-1 (applied with numpy
    below: jitted reorderings of 16 chunks cost a second of CPU compile)."""
    return np.asarray(zigzag_shard(jnp.arange(seqlen)[None], n))[0]


def ring_vjp(fn, q, k, v, d_out, ids=None, permute=0):
    """(out, grads) of the ring on global natural-order inputs, through
    jax.jit. `permute` = n: reorder everything to the zigzag layout of n
    devices before, and back after (outside the jit, like a data loader)."""
    args = (q, k, v, d_out) + (() if ids is None else (ids,))
    if permute:
        order = zigzag_order(permute, q.shape[1])
        args = tuple(jnp.asarray(np.asarray(x)[:, order]) for x in args)
    result = run_jit(lambda q, k, v, d_out, *ids: vjp(lambda q, k, v: fn(q, k, v, *ids),
                                                      q, k, v, d_out), *args)
    if permute:
        inverse = np.argsort(order)
        result = jax.tree.map(lambda x: np.asarray(x)[:, inverse], result)
    return result


def references(q, k, v, d_out, ids=None, *, causal, softmax_scale=None, softcap=0.0,
               deterministic=False, window_size=(-1, -1)):
    """(out, grads) of the unsharded flash_attn_func, of attention_ref in
    float32 (float32 inputs) and of attention_ref in the input dtype."""
    seg = dict(q_segment_ids=ids, kv_segment_ids=ids)
    opts = dict(causal=causal, softmax_scale=softmax_scale, softcap=softcap,
                window_size=window_size)

    def all_three(q, k, v, d_out, ids):
        flash = vjp(lambda q, k, v: jax_flash.flash_attn_func(
            q, k, v, segment_ids=None if ids is None else (ids, ids),
            deterministic=deterministic, **opts), q, k, v, d_out)
        f32 = lambda x: x.astype(jnp.float32)
        ref32 = vjp(lambda q, k, v: reference.attention_ref(q, k, v, upcast=True, **seg,
                                                            **opts)[0],
                    f32(q), f32(k), f32(v), f32(d_out))
        low = vjp(lambda q, k, v: reference.attention_ref(q, k, v, upcast=False, **seg,
                                                          **opts)[0],
                  q, k, v, d_out)
        return flash, ref32, low

    return run_jit(all_three, q, k, v, d_out, ids)


def check_ring(ring, flash, ref32, low):
    """Ring and flash_attn_func by FlashAttention's rule vs float32; the ring
    also within the same bound of flash_attn_func itself."""
    check_fa_rule([ring, ref32, low], ATOL)
    check_fa_rule([flash, ref32, low], ATOL)
    (out, grads), (f_out, f_grads), (r_out, r_grads), (l_out, l_grads) = ring, flash, ref32, low
    for name, x, f, r, lo, factor in [("out", out, f_out, r_out, l_out, 2.0)] + [
            (nm, *t, 3.0) for nm, t in zip(("dq", "dk", "dv"),
                                           zip(grads, f_grads, r_grads, l_grads))]:
        assert x.shape == f.shape and x.dtype == f.dtype, name
        # The ring merges several rounded block outputs: one ulp of slack.
        ulp = float(jnp.finfo(x.dtype).eps) * float(np.abs(np.asarray(f, np.float32)).max())
        x, f, r, lo = (np.asarray(a, np.float32) for a in (x, f, r, lo))
        diff, low_err = np.abs(x - f).max(initial=0), np.abs(lo - r).max(initial=0)
        assert diff <= factor * low_err + ulp + ATOL, (name, "ring vs flash_attn_func", diff,
                                                       low_err)


def run_case(*, n, layout, causal, local=8, heads=(4, 2), dtype=jnp.bfloat16, batch=2,
             segments=False, permute=None, mesh_shape=None, seed=0, kv_exchange="ring",
             **opts):
    """Ring over n devices vs the unsharded call (check_ring). Returns the
    ring's (out, grads), a function recomputing them (a fresh jit) and the
    inputs, for extra checks."""
    if mesh_shape is None:
        mesh, axis, spec = make_mesh((n,), ("sp",)), "sp", P(None, "sp")
    else:
        mesh, axis, spec = mesh_shape()
    seqlen = n * local
    if permute is None:
        permute = layout == "zigzag" and seqlen % (2 * n) == 0
    q, k, v, d_out = inputs(seed, batch, seqlen, heads, dtype=dtype)
    ids = documents(seed + 1, batch, seqlen) if segments else None
    fn = ring_fn(mesh, axis, spec, layout=layout, causal=causal, kv_exchange=kv_exchange,
                 **opts)
    ring = ring_vjp(fn, q, k, v, d_out, ids, permute=n if permute else 0)
    check_ring(ring, *references(q, k, v, d_out, ids, causal=causal, **opts))
    return ring, lambda: ring_vjp(fn, q, k, v, d_out, ids, permute=n if permute else 0), (
        q, k, v, d_out, ids)


# ---- Ring vs the unsharded call -------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_ring_matches_unsharded(n, layout, causal):
    # GQA; zigzag: local 10 (two chunks of 5), contiguous: an odd local 7.
    local = 10 if layout == "zigzag" else 7
    ring, _, (q, k, v, d_out, _) = run_case(n=n, layout=layout, causal=causal, local=local,
                                            seed=n)
    if n == 1:  # one device: the ring is the local call (same backend calls), bit for bit
        flash = run_jit(lambda q, k, v, d: vjp(
            lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=causal), q, k, v, d),
            q, k, v, d_out)
        for a, b in zip(jax.tree.leaves(ring), jax.tree.leaves(flash)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


VARIANTS = {
    # heads, score modifiers, softmax_scale, fp16
    "mha-softcap-zigzag-causal-n4": dict(n=4, layout="zigzag", causal=True, heads=(4, 4),
                                         softcap=2.0),
    "mqa-fp16-zigzag-causal-n4": dict(n=4, layout="zigzag", causal=True, heads=(4, 1),
                                      dtype=jnp.float16),
    "mqa-fp16-contiguous-full-n2": dict(n=2, layout="contiguous", causal=False, heads=(4, 1),
                                        dtype=jnp.float16, local=13),
    "softcap-scale-contiguous-causal-n2": dict(n=2, layout="contiguous", causal=True,
                                               softcap=1.5, softmax_scale=0.3, local=9),
    "softcap-scale-zigzag-full-n2": dict(n=2, layout="zigzag", causal=False,
                                         softmax_scale=0.5, softcap=3.0),
    # packed documents (ids reordered with zigzag_shard's order like q/k/v)
    "segments-zigzag-causal-n4": dict(n=4, layout="zigzag", causal=True, segments=True,
                                      local=12),
    "segments-mqa-zigzag-causal-n8": dict(n=8, layout="zigzag", causal=True, segments=True,
                                          heads=(4, 1)),
    "segments-scale-contiguous-causal-n4": dict(n=4, layout="contiguous", causal=True,
                                                segments=True, softmax_scale=0.3, local=7),
    "segments-fp16-zigzag-full-n2": dict(n=2, layout="zigzag", causal=False, segments=True,
                                         dtype=jnp.float16, local=16),
    "segments-softcap-contiguous-full-n2": dict(n=2, layout="contiguous", causal=False,
                                                segments=True, softcap=2.0, local=11),
    # odd / tiny local lengths
    "mha-zigzag-causal-local6-n4": dict(n=4, layout="zigzag", causal=True, local=6,
                                        heads=(4, 4)),  # chunks of 3
    "zigzag-causal-local2-n4": dict(n=4, layout="zigzag", causal=True, local=2),  # chunks of 1
    "zigzag-full-local7-n2": dict(n=2, layout="zigzag", causal=False, local=7),  # no reorder
    "contiguous-causal-local1-n4": dict(n=4, layout="contiguous", causal=True, local=1),
    # rings of 3 (not a power of two)
    "segments-zigzag-causal-n3": dict(n=3, layout="zigzag", causal=True, local=8,
                                      segments=True),
    "mqa-contiguous-causal-n3": dict(n=3, layout="contiguous", causal=True, local=5,
                                     heads=(4, 1)),
}


@pytest.mark.parametrize("case", list(VARIANTS), ids=list(VARIANTS))
def test_ring_variants(case):
    run_case(seed=len(case), **VARIANTS[case])


@pytest.mark.parametrize("n,layout,segments", [(4, "zigzag", False), (2, "contiguous", True)])
def test_deterministic_is_bitwise_reproducible(n, layout, segments):
    # Two runs (two compilations) of the deterministic ring: identical bits.
    ring, rerun, _ = run_case(n=n, layout=layout, causal=True, segments=segments,
                              deterministic=True)
    again = rerun()
    for a, b in zip(jax.tree.leaves(ring), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_outside_shard_map_names_the_axis():
    q, k, v, _ = inputs(0, 1, 8, (2, 2))
    with pytest.raises(ValueError, match="ring_attention must run inside jax.shard_map with "
                                         "axis_name 'sp'"):
        ring_attention(q, k, v, axis_name="sp", causal=True)


# ---- Local windows and the all-gather exchange ------------------------------------


WINDOWS = {
    # window below one chunk: a diagonal band and one neighbour step
    "contiguous-causal-w3-n4": dict(n=4, layout="contiguous", causal=True, window_size=(3, 0)),
    # a window over more than one device's chunk, odd local length
    "contiguous-causal-w11-n4": dict(n=4, layout="contiguous", causal=True, local=7,
                                     window_size=(11, -1)),
    "contiguous-both-n4": dict(n=4, layout="contiguous", causal=False, local=7,
                               window_size=(5, 2)),
    "contiguous-left-only-n3-mqa": dict(n=3, layout="contiguous", causal=False, local=5,
                                        window_size=(4, -1), heads=(4, 1)),
    "contiguous-right-only-n2-softcap": dict(n=2, layout="contiguous", causal=False, local=9,
                                             window_size=(-1, 6), softcap=2.0),
    "zigzag-causal-w5-n4": dict(n=4, layout="zigzag", causal=True, window_size=(5, 0)),
    "zigzag-causal-w17-n4-fp16": dict(n=4, layout="zigzag", causal=True, local=10,
                                      window_size=(17, 0), dtype=jnp.float16),
    "zigzag-both-n2-mha": dict(n=2, layout="zigzag", causal=False, local=10,
                               window_size=(2, 9), heads=(4, 4)),
    "zigzag-right-only-n4": dict(n=4, layout="zigzag", causal=False, local=6,
                                 window_size=(-1, 3), softmax_scale=0.4),
    "zigzag-zero-window-n2": dict(n=2, layout="zigzag", causal=False, window_size=(0, 0)),
    # a window wider than the sequence is no window (the causal ring)
    "contiguous-causal-w1000-n2": dict(n=2, layout="contiguous", causal=True,
                                       window_size=(1000, 0)),
    # the same computations on the gathered K/V
    "allgather-zigzag-causal-n4": dict(n=4, layout="zigzag", causal=True,
                                       kv_exchange="allgather"),
    "allgather-contiguous-full-n3-segments": dict(n=3, layout="contiguous", causal=False,
                                                  segments=True, local=5,
                                                  kv_exchange="allgather"),
    "allgather-zigzag-causal-n8-segments-mqa": dict(n=8, layout="zigzag", causal=True,
                                                    segments=True, heads=(4, 1),
                                                    kv_exchange="allgather"),
    "allgather-contiguous-window-n4": dict(n=4, layout="contiguous", causal=False, local=7,
                                           window_size=(5, 2), kv_exchange="allgather"),
    "allgather-zigzag-window-n4-det": dict(n=4, layout="zigzag", causal=True,
                                           window_size=(5, 0), kv_exchange="allgather",
                                           deterministic=True),
}


@pytest.mark.parametrize("case", list(WINDOWS), ids=list(WINDOWS))
def test_ring_windows_and_allgather(case):
    run_case(seed=len(case) + 1, **WINDOWS[case])


def test_allgather_over_two_mesh_axes():
    mesh = lambda: (make_mesh((2, 2), ("a", "b")), ("a", "b"), P(None, ("a", "b")))
    run_case(n=4, layout="zigzag", causal=True, mesh_shape=mesh, kv_exchange="allgather")


@pytest.mark.parametrize("exchange,window", [("ring", (-1, -1)), ("ring", (3, 4)),
                                             ("allgather", (3, 4))])
def test_axes_tuple_in_another_order_than_the_mesh(exchange, window):
    # The ring order is axis_index(("b", "a")), not the mesh's ("a", "b").
    mesh = lambda: (make_mesh((2, 2), ("a", "b")), ("b", "a"), P(None, ("b", "a")))
    run_case(n=4, layout="zigzag", causal=True, local=4, mesh_shape=mesh, kv_exchange=exchange,
             window_size=window)


@pytest.mark.parametrize("layout,window,exchange", [
    ("contiguous", (-1, -1), "ring"), ("zigzag", (-1, -1), "ring"),
    ("contiguous", (5, 0), "ring"), ("zigzag", (-1, -1), "allgather")])
def test_kv_replicated_over_the_head_axis(layout, window, exchange):
    # MQA under tensor parallelism: q's heads split over "tp", K/V replicated
    # over it: the gradients of K/V vary over "sp" only, as K/V do.
    mesh = make_mesh((2, 2), ("sp", "tp"))
    n, local = 2, 8
    q, k, v, d_out = inputs(3, 1, n * local, (2, 1))

    def local_fn(q, k, v):
        return ring_attention(q, k, v, axis_name="sp", causal=True, layout=layout,
                              window_size=window, kv_exchange=exchange)

    fn = jax.shard_map(local_fn, mesh=mesh, in_specs=(P(None, "sp", "tp"), P(None, "sp"),
                                                      P(None, "sp")),
                       out_specs=P(None, "sp", "tp"))
    ring = ring_vjp(fn, q, k, v, d_out, permute=n if layout == "zigzag" else 0)
    check_ring(ring, *references(q, k, v, d_out, causal=True, window_size=window))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_pair_case_is_the_global_window(size):
    # Every pair placement and window: the sliced, bottom-right aligned call
    # that _pair_case describes sees exactly the keys the global window allows.
    from jax_flash._src.ring_steps import pair_case as _pair_case
    a = np.arange(size)[:, None]
    b = np.arange(size)[None, :]
    for delta in range(-3 * size, 3 * size + 1):
        for left in range(-1, 2 * size + 2):
            for right in range(-1, 2 * size + 2):
                want = np.ones((size, size), bool)
                if left >= 0:
                    want &= b - a >= delta - left
                if right >= 0:
                    want &= b - a <= delta + right
                case = _pair_case(delta, size, left, right)
                if case is None:
                    assert not want.any(), (delta, left, right)
                    continue
                s, wl, wr = case
                rows, keys = size - max(s, 0), size + min(s, 0)
                assert rows >= 1 and keys >= 1 and wl >= -1 and wr >= -1, case
                got = np.zeros((size, size), bool)
                ra, rb = np.arange(rows)[:, None], np.arange(keys)[None, :]
                seen = np.ones((rows, keys), bool)  # flash_attn_func's bottom-right window
                if wl >= 0:
                    seen &= rb >= ra + keys - rows - wl
                if wr >= 0:
                    seen &= rb <= ra + keys - rows + wr
                got[:rows, :keys] = seen
                np.testing.assert_array_equal(got, want, err_msg=str((delta, left, right, case)))


def _forward_collectives(n, local, **kw):
    """Collective op names (with repeats) of the compiled forward ring."""
    mesh = make_mesh((n,), ("sp",))
    q, k, v, _ = inputs(0, 1, local * n, (4, 2))
    fn = ring_fn(mesh, "sp", P(None, "sp"), **kw)
    text = jax.jit(fn).lower(q, k, v).compile().as_text()
    return [m.group(1) for m in _COLLECTIVE.finditer(text)]


def test_window_skips_steps():
    # n = 4, 8 positions per device, causal window of 3: only the step from
    # the previous device holds visible keys, so K and V move once (two
    # permutes) where the causal ring moves them n - 1 = 3 times.
    causal = _forward_collectives(4, 8, layout="contiguous", causal=True)
    window = _forward_collectives(4, 8, layout="contiguous", causal=True, window_size=(3, 0))
    assert causal == ["collective-permute"] * 6, causal
    assert window == ["collective-permute"] * 2, window
    # left and right: the previous and the next device's keys: one jump of 1,
    # one of n - 2 places.
    both = _forward_collectives(4, 8, layout="contiguous", causal=False, window_size=(3, 3))
    assert both == ["collective-permute"] * 4, both


def test_contiguous_causal_steps_are_conditional():
    # Contiguous + causal: each of the n - 1 steps with another device's keys
    # is a lax.cond (device i skips keys from a device after it); without
    # causal masking, and on zigzag (equal work every step), none is.
    def conds(**kw):
        mesh = make_mesh((4,), ("sp",))
        q, k, v, _ = inputs(0, 1, 32, (4, 2))
        jaxpr = str(jax.make_jaxpr(ring_fn(mesh, "sp", P(None, "sp"), **kw))(q, k, v))
        return len(re.findall(r"\bcond\[", jaxpr))

    assert conds(layout="contiguous", causal=True) == 3
    assert conds(layout="contiguous", causal=False) == 0
    assert conds(layout="zigzag", causal=False) == 0


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for x in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(x, "jaxpr", x)  # ClosedJaxpr -> Jaxpr
            if hasattr(inner, "eqns"):
                yield inner


def _computes(eqn):
    """Whether eqn is or holds a matmul or a kernel call."""
    return eqn.primitive.name in ("dot_general", "ffi_call") or any(
        _computes(e) for jaxpr in _sub_jaxprs(eqn) for e in jaxpr.eqns)


def test_next_block_is_sent_before_this_blocks_compute():
    # Program order in the forward's shard_map body (n = 4, no mask: every
    # step computes): the permutes of block j + 1 (k and v) come before block
    # j's compute, so the transfer can run under it.
    mesh = make_mesh((4,), ("sp",))
    q, k, v, _ = inputs(0, 1, 32, (4, 2))
    fn = ring_fn(mesh, "sp", P(None, "sp"), layout="contiguous", causal=False)
    closed = jax.make_jaxpr(fn)(q, k, v)
    (body,) = [jaxpr for e in closed.jaxpr.eqns if e.primitive.name == "shard_map"
               for jaxpr in _sub_jaxprs(e)]

    def flatten(jaxpr):  # the ring's own order, through the custom_vjp wrapper
        for e in jaxpr.eqns:
            if e.primitive.name.startswith("custom_vjp"):
                for inner in _sub_jaxprs(e):
                    yield from flatten(inner)
                    break
            else:
                yield e

    order = ["send" if e.primitive.name == "ppermute" else "compute"
             for e in flatten(body) if e.primitive.name == "ppermute" or _computes(e)]
    assert order.count("send") == 2 * 3, order  # k and v, three steps
    # Sends traced before each compute: 2 before block 0's (block 1's k and
    # v), 4 before block 1's, 6 before blocks 2 and 3's. Sending each block
    # just before its own compute would give 0, 2, 4, 6.
    sends_before = {order[:idx].count("send") for idx, o in enumerate(order) if o == "compute"}
    assert sorted(sends_before) == [2, 4, 6], order


def test_allgather_compiles_to_gather_and_reduce_scatter():
    n = 4
    mesh = make_mesh((n,), ("sp",))
    q, k, v, d_out = inputs(0, 2, 8 * n, (4, 2))
    fn = ring_fn(mesh, "sp", P(None, "sp"), layout="zigzag", causal=True,
                 kv_exchange="allgather")
    text = jax.jit(lambda q, k, v, d_out: vjp(fn, q, k, v, d_out)).lower(
        q, k, v, d_out).compile().as_text()
    found = {m.group(1) for m in _COLLECTIVE.finditer(text)}
    assert found == {"all-gather", "reduce-scatter"}, found


def test_auto_exchange_follows_the_byte_threshold(monkeypatch):
    small = set(_forward_collectives(2, 8, layout="zigzag", causal=True, kv_exchange="auto"))
    assert small == {"all-gather"}, small
    # A window that needs one neighbour of four devices: the ring moves less.
    window = set(_forward_collectives(4, 8, layout="contiguous", causal=True,
                                      window_size=(3, 0), kv_exchange="auto"))
    assert window == {"collective-permute"}, window
    monkeypatch.setattr(jax_flash.ring, "ALLGATHER_AUTO_BYTES", 0)
    large = set(_forward_collectives(2, 8, layout="zigzag", causal=True, kv_exchange="auto"))
    assert large == {"collective-permute"}, large


# ---- Meshes of two axes -----------------------------------------------------------


def test_2d_mesh_batch_over_dp_sequence_over_sp():
    # Batch 4 over dp = 2, sequence over sp = 4 inside one shard_map.
    mesh = lambda: (make_mesh((2, 4), ("dp", "sp")), "sp", P("dp", "sp"))
    run_case(n=4, layout="zigzag", causal=True, batch=4, segments=True, mesh_shape=mesh)


def test_sequence_over_two_mesh_axes():
    # axis_name may be a tuple: the ring runs over the 2 x 2 devices of ("a", "b").
    mesh = lambda: (make_mesh((2, 2), ("a", "b")), ("a", "b"), P(None, ("a", "b")))
    run_case(n=4, layout="zigzag", causal=True, mesh_shape=mesh)


# ---- The compiled program: collective-permutes only -------------------------------


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_compiled_ring_uses_collective_permute_only(layout):
    # Forward + backward (the forward's permutes are part of it): K/V and
    # dK/dV travel by collective-permute; nothing is gathered or reduced.
    n = 4
    mesh = make_mesh((n,), ("sp",))
    q, k, v, d_out = inputs(0, 2, 8 * n, (4, 2))
    fn = ring_fn(mesh, "sp", P(None, "sp"), layout=layout, causal=True)
    lowered = jax.jit(lambda q, k, v, d_out: vjp(fn, q, k, v, d_out)).lower(q, k, v, d_out)
    text = lowered.compile().as_text()
    found = {m.group(1) for m in _COLLECTIVE.finditer(text)}
    assert "all-gather" not in text and "all-to-all" not in text, found
    assert found == {"collective-permute"}, found


# ---- zigzag_shard / zigzag_unshard --------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_zigzag_chunk_order_and_round_trip(n):
    chunk = 3
    x = jnp.arange(2 * n * chunk)[None, :, None] * jnp.ones((2, 1, 5), jnp.int32)
    z = zigzag_shard(x, n)
    assert z.shape == x.shape
    shards = np.split(np.asarray(z[0, :, 0]), n)
    for i, shard in enumerate(shards):  # device i: chunks i and 2n - 1 - i
        expected = np.concatenate([np.arange(i * chunk, (i + 1) * chunk),
                                   np.arange((2 * n - 1 - i) * chunk, (2 * n - i) * chunk)])
        np.testing.assert_array_equal(shard, expected)
    np.testing.assert_array_equal(zigzag_unshard(z, n), x)
    np.testing.assert_array_equal(zigzag_shard(zigzag_unshard(x, n), n), x)


def test_zigzag_other_axis():
    x = jnp.arange(8 * 3).reshape(8, 3)
    z = zigzag_shard(x, 2, axis=0)
    np.testing.assert_array_equal(z[:, 0], np.array([0, 1, 6, 7, 2, 3, 4, 5]) * 3)
    np.testing.assert_array_equal(zigzag_unshard(z, 2, axis=0), x)


def test_zigzag_length_not_divisible():
    with pytest.raises(ValueError, match=r"axis 1 must have a length divisible by 2 \* n = 4 "
                                         r".*got 10"):
        zigzag_shard(jnp.zeros((1, 10, 2)), 2)
    with pytest.raises(ValueError, match=r"divisible by 2 \* n = 8, got 12"):
        zigzag_unshard(jnp.zeros((1, 12)), 4)


# ---- Errors -------------------------------------------------------------------


def _trace_ring(q_len, k_len, dtype=jnp.bfloat16, **kw):
    """Traces (no compile) the ring over 2 devices with local lengths q_len, k_len."""
    mesh = make_mesh((2,), ("sp",))
    q = jnp.zeros((1, 2 * q_len, 2, 32), dtype)
    k = jnp.zeros((1, 2 * k_len, 2, 32), dtype)
    fn = jax.shard_map(lambda q, k, v: ring_attention(q, k, v, axis_name="sp", **kw),
                       mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"))
    return jax.eval_shape(fn, q, k, k)


@pytest.mark.parametrize("args,kw,error,match", [
    ((8, 8), dict(layout="diagonal"), ValueError, r"layout must be one of .*got 'diagonal'"),
    ((8, 8), dict(window_size=(4, 0), layout="contiguous", kv_exchange="all"), ValueError,
     r"kv_exchange must be one of \('auto', 'ring', 'allgather'\), got 'all'"),
    ((8, 8), dict(window_size=(4, -1), segment_ids=(jnp.zeros((1, 8), jnp.int32),) * 2),
     ValueError, r"segment_ids must be None with a local window .*\(4, -1\).*got segment ids"),
    ((7, 7), dict(window_size=(4, 4), layout="zigzag"), ValueError,
     r"q must have an even seqlen_local for the zigzag layout .*got \(1, 7, 2, 32\)"),
    ((8, 8), dict(window_size=(-2, 0)), ValueError, r"window_size entries must be >= -1"),
    ((8, 6), {}, ValueError,
     r"q and k must hold the same positions \(seqlen_local\).*q \(1, 8, 2, 32\) and k "
     r"\(1, 6, 2, 32\)"),
    ((7, 7), dict(causal=True, layout="zigzag"), ValueError,
     r"q must have an even seqlen_local for the zigzag layout .*got \(1, 7, 2, 32\)"),
    ((8, 8), dict(dtype=jnp.float32), TypeError, "q must be float16 or bfloat16, got float32"),
], ids=["layout", "kv_exchange", "window_segments", "zigzag_window_odd", "window_negative",
        "seqlen_mismatch", "zigzag_causal_odd", "dtype"])
def test_errors(args, kw, error, match):
    with pytest.raises(error, match=match):
        _trace_ring(*args, **kw)


def test_odd_local_length_allowed_without_zigzag_causal():
    for kw in (dict(causal=True, layout="contiguous"), dict(causal=False, layout="zigzag")):
        assert _trace_ring(7, 7, **kw).shape == (1, 14, 2, 32)
