"""Sharded calls (`jax_flash.sharding`).

Under `jax.jit`, inputs sharded over batch and/or heads compile to one local
call per device with no collective, forward and backward, and give the
unsharded call's values and gradients; GQA with fewer K/V heads than head
shards slices replicated K/V (the backward adds dK/dV up: one all-reduce);
sequence / head-dim sharding gives the right result; dropout drops the same
entries as the unsharded call; inside `jax.shard_map` every call is local.

CPU: 8 host devices (tests/conftest.py sets XLA_FLAGS). GPU: meshes are built
from the first N devices; a test needing more than present is skipped.
Each test compiles few programs (several calls per jitted function): XLA
compilation is most of the run time.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_flash

shard_map = getattr(jax, "shard_map", None)
if shard_map is None:  # older JAX
    from jax.experimental.shard_map import shard_map

BF16 = jnp.bfloat16
B, S, T, H, D = 4, 9, 13, 8, 32
AUTO = jax.sharding.AxisType.Auto
DATA_MODEL = ((2, 4), ("data", "model"))
Q_SPEC = P("data", None, "model")  # (batch, seqlen, heads, head_dim)

# Collective HLO instructions: the opcode followed by its operands (async
# forms end in -start).
_COLLECTIVE = re.compile(
    r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter|"
    r"collective-broadcast)(?:-start)?\(")
ANY_COLLECTIVE = ("all-gather", "all-to-all", "collective-permute", "all-reduce",
                  "reduce-scatter", "collective-broadcast")
# Tolerances of (out, dq, dk, dv) (`assert_same`). On GPUs dQ is not bitwise
# across shardings even with deterministic=True: its float32 slices number
# about num_SMs / (batch * nheads_k), which the local shapes change.
_DQ = "exact" if jax.default_backend() == "cpu" else "close"
EXACT4, CLOSE4 = ("exact", _DQ, "exact", "exact"), ("close",) * 4
SLICED_EXACT = ("exact", _DQ, "partial-sums", "partial-sums")
SLICED_CLOSE = ("close", "close", "partial-sums", "partial-sums")


# ---- Helpers ------------------------------------------------------------------


def make_mesh(shape, names, axis_type=AUTO):
    """A mesh of the first prod(shape) devices (skips when there are fewer)."""
    n = math.prod(shape)
    devices = jax.devices()
    if len(devices) < n:
        pytest.skip(f"needs {n} devices, {len(devices)} available")
    return jax.sharding.Mesh(np.asarray(devices[:n]).reshape(shape), names,
                             axis_types=(axis_type,) * len(shape))


def _collectives_in(hlo_text):
    return sorted({m.group(1) for m in _COLLECTIVE.finditer(hlo_text)})


def collectives(fn, *args):
    """The collective ops of fn's compiled (partitioned) program."""
    return _collectives_in(jax.jit(fn).lower(*args).compile().as_text())


def place(mesh, args, specs):
    return [jax.device_put(x, NamedSharding(mesh, P() if spec is None else spec))
            for x, spec in zip(args, specs, strict=True)]


def unsharded(fn, args):
    """fn's results on one device: what every sharded run must give."""
    return jax.jit(fn)(*[jax.device_put(x, jax.devices()[0]) for x in args])


def _f32(x):
    return np.asarray(x).astype(np.float32)


def _ulp(x):
    """bfloat16 ulp (8 significant bits) at |x|."""
    return np.exp2(np.floor(np.log2(np.maximum(np.abs(x), 2.0 ** -126))) - 7)


def assert_same(got, want, tol="close"):
    """Equal leaf by leaf, to a tolerance (one, or one per leaf):

    "exact": bit for bit;
    "close": 2 bf16 ulps of the entry plus 2^-8 of the leaf's largest
      magnitude. The reference backend (XLA:CPU) rounds its float32 sums
      differently for different local shapes, sharding or not (a call on half
      the batch is not bitwise a slice of the call on the whole batch); an
      output 1 ulp off moves dO.O and so a whole dQ row by ~1 ulp of the row;
    "partial-sums": 2 ulps plus 2^-7 of the largest magnitude: dK/dV of
      sliced K/V add up per-shard partial gradients rounded to bf16, so an
      entry where they cancel keeps an error of their size, not its own.
    Wrong heads, masks or slices differ by far more (tenths).
    """
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want)
    tols = tuple(tol) if isinstance(tol, (tuple, list)) else (tol,) * len(got)
    assert len(tols) == len(got), (len(tols), len(got))
    for i, (g, w, t) in enumerate(zip(got, want, tols)):
        assert g.shape == w.shape and g.dtype == w.dtype, (i, g.shape, w.shape, g.dtype, w.dtype)
        g, w = _f32(g), _f32(w)
        if t == "exact":
            np.testing.assert_array_equal(g, w, err_msg=f"result {i}")
            continue
        scale = {"close": 2.0 ** -8, "partial-sums": 2.0 ** -7}[t]
        largest = float(np.max(np.abs(w[np.isfinite(w)]), initial=0.0))
        tolerance = 2 * _ulp(np.maximum(np.abs(g), np.abs(w))) + scale * largest
        with np.errstate(invalid="ignore"):  # inf - inf
            diff = np.abs(g - w)
        bad = ~((diff <= tolerance) | (g == w))  # g == w: equal infinities
        assert not bad.any(), (f"result {i}: {bad.sum()} of {bad.size} entries differ beyond "
                               f"{t!r}, max diff {np.max(np.where(bad, diff, 0))}")


def assert_sharded(mesh, results, specs):
    """Each result keeps its spec (None: not checked)."""
    assert len(results) == len(specs)
    for i, (x, spec) in enumerate(zip(results, specs)):
        if spec is not None:
            assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), \
                (i, x.sharding, spec)


def check(fn, args, specs, mesh, *, allow=(), tol="close", out_specs=None):
    """fn on args placed per specs under jit: its compiled program has no
    collective but those in `allow`, its results equal the unsharded run's
    (`assert_same`) and keep out_specs. Returns (sharded results, unsharded
    results, collectives found)."""
    sharded = place(mesh, args, specs)
    compiled = jax.jit(fn).lower(*sharded).compile()
    found = _collectives_in(compiled.as_text())
    assert set(found) <= set(allow), f"collectives {found} in the compiled program"
    got = compiled(*sharded)
    want = unsharded(fn, args)
    assert_same(got, want, tol)
    if out_specs is not None:
        assert_sharded(mesh, jax.tree.leaves(got), out_specs)
    return jax.tree.leaves(got), jax.tree.leaves(want), found


def with_grads(call, n):
    """fn(*xs, d_out, *rest) -> (out, *d_xs) for out = call(*xs, *rest): the
    vjp with a cotangent sharded like out (a scalar loss would need an
    all-reduce of its own)."""
    def fn(*args):
        xs, d_out, rest = args[:n], args[n], args[n + 1:]
        out, vjp = jax.vjp(lambda *xs: call(*xs, *rest), *xs)
        return (out, *vjp(d_out))
    return fn


def normal(seed, shape):
    """Host (numpy) bf16 data: no device op, nothing to compile."""
    return np.random.default_rng(seed).standard_normal(shape, np.float32).astype(BF16)


def qkv(batch=B, seqlen_q=S, seqlen_k=T, nheads=H, nheads_k=H, seed=0):
    """q, k, v and a cotangent for out."""
    return (normal(seed, (batch, seqlen_q, nheads, D)),
            normal(seed + 1, (batch, seqlen_k, nheads_k, D)),
            normal(seed + 2, (batch, seqlen_k, nheads_k, D)),
            normal(seed + 3, (batch, seqlen_q, nheads, D)))


def cu_seqlens(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def one_hot_values(shape):
    """v[..., j, h, :] = e_j (needs seqlen_k <= head_dim): out[..., i, h, j]
    is then query i's rescaled probability of key j, exactly 0 where
    dropout dropped it, whatever the rounding."""
    *lead, seqlen, nheads, head_dim = shape
    assert seqlen <= head_dim
    e = np.eye(seqlen, head_dim, dtype=np.float32)[:, None, :]
    return np.broadcast_to(e, (*lead, seqlen, nheads, head_dim)).astype(BF16)


def assert_same_dropped(got, want, visible, p):
    """Outputs of one-hot values: the dropped entries (zeros) agree bit for
    bit, and about a fraction p of the visible entries (nonzero without
    dropout) are dropped."""
    dropped = _f32(got) == 0
    np.testing.assert_array_equal(dropped, _f32(want) == 0)
    visible = _f32(visible) != 0
    assert not (~visible & ~dropped).any()
    rate = (dropped & visible).sum() / visible.sum()
    assert 0.6 * p < rate < 1.5 * p, rate


def _heads_size(mesh, spec):
    entry = spec[2] if len(spec) > 2 else None
    axes = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[a] for a in axes)


def test_collective_detector():
    mesh = make_mesh(*DATA_MODEL)
    x = place(mesh, [np.ones((8, 8), np.float32)], [P("data", "model")])[0]
    assert collectives(lambda x: jnp.sum(x, axis=0), x) != []
    assert collectives(lambda x: x * 2, x) == []


# ---- flash_attn_func ----------------------------------------------------------

# id: (mesh, batch, q/out spec, [(nheads_k, k/v spec, options), ...]), the
# calls compiled together. K/V heads are sharded like the query heads
# (nheads_k divisible by the head axis) or, in the "sliced" case, replicated
# over the head axis (each shard slices its K/V heads).
FUNC_CASES = {
    "split-batch-heads": (DATA_MODEL, B, Q_SPEC, [
        (8, Q_SPEC, dict(causal=True)), (8, Q_SPEC, dict(window_size=(3, 2))),
        (4, Q_SPEC, dict(causal=True, window_size=(4, 0)))]),
    "split-batch-only-8": (((8,), ("batch",)), 8, P("batch"), [
        (8, P("batch"), dict(softcap=4.0))]),
    "split-heads-axis-tuple": (((4, 2), ("x", "y")), B, P(None, None, ("x", "y")), [
        (8, P(None, None, ("x", "y")), dict(causal=True, softcap=4.0))]),
    "split-3d-mesh-batch-axis-tuple": (((2, 2, 2), ("pod", "row", "col")), B,
                                       P(("pod", "row"), None, "col"), [
        (2, P(("pod", "row"), None, "col"), dict(softcap=3.0))]),
    "sliced-gqa-2-kv-heads-and-mqa": (DATA_MODEL, B, Q_SPEC, [
        (2, P("data"), dict(causal=True)), (1, P("data"), dict(window_size=(2, 5), softcap=4.0))]),
}


@pytest.mark.parametrize("case", FUNC_CASES, ids=str)
def test_flash_attn_func(case):
    (shape, names), batch, spec, calls = FUNC_CASES[case]
    mesh = make_mesh(shape, names)
    q, _, _, do = qkv(batch=batch)
    args, specs, out_specs = [q, do], [spec, spec], []
    for i, (nheads_k, kv_spec, _) in enumerate(calls):
        _, k, v, _ = qkv(batch=batch, nheads_k=nheads_k, seed=10 * i)
        args += [k, v]
        specs += [kv_spec, kv_spec]
        out_specs += [spec, spec, kv_spec, kv_spec]

    def run(q, do, *kvs, grads=True):
        results = []
        for (_, _, opts), k, v in zip(calls, kvs[::2], kvs[1::2]):
            call = lambda q, k, v, opts=opts: jax_flash.flash_attn_func(q, k, v, **opts)
            results.append(with_grads(call, 3)(q, k, v, do) if grads else call(q, k, v))
        return results

    if case.startswith("split"):
        # One local call per device, forward and backward: no collective.
        check(run, args, specs, mesh, out_specs=out_specs)
    else:
        # Sliced K/V: no collective in the forward; the backward adds dK/dV
        # up over the head shards (documented: an all-reduce).
        fwd = lambda *args: run(*args, grads=False)
        assert collectives(fwd, *place(mesh, args, specs)) == []
        *_, found = check(run, args, specs, mesh, allow=("all-reduce",), out_specs=out_specs,
                          tol=SLICED_CLOSE * len(calls))
        assert found == ["all-reduce"]


def test_mha_heads_sharded_q_with_replicated_kv():
    mesh = make_mesh(*DATA_MODEL)
    q, k, v, _ = qkv()
    fwd = lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True)
    assert collectives(fwd, *place(mesh, [q, k, v], [Q_SPEC, P("data"), P("data")])) == []


def test_flash_attn_func_operands_sharded():
    # ALiBi slopes (batch, heads) and (heads,), segment ids (batch, seqlen)
    # sharded with q; return_attn_probs' LSE and probabilities sharded too.
    mesh = make_mesh(*DATA_MODEL)
    q, k, v, do = qkv(nheads_k=4)
    rng = np.random.default_rng(5)
    slopes2 = rng.uniform(0.05, 1.0, (B, H)).astype(np.float32)
    slopes1 = np.linspace(0.1, 1.0, H, dtype=np.float32)
    ids_q = np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32)
    ids_k = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
    f = jax_flash.flash_attn_func

    def fn(q, k, v, do, slopes2, slopes1, ids_q, ids_k):
        return [
            with_grads(lambda q, k, v: f(q, k, v, causal=True, alibi_slopes=slopes2), 3)(
                q, k, v, do),
            f(q, k, v, alibi_slopes=slopes1),
            with_grads(lambda q, k, v: f(q, k, v, causal=True, segment_ids=(ids_q, ids_k)), 3)(
                q, k, v, do),
            f(q, k, v, causal=True, return_attn_probs=True),  # out, lse, probs
            f(q, k, v),
        ]

    got, want, _ = check(
        fn, [q, k, v, do, slopes2, slopes1, ids_q, ids_k],
        [Q_SPEC] * 4 + [P("data", "model"), P("model"), P("data"), P("data")], mesh,
        out_specs=[Q_SPEC] * 9 + [Q_SPEC, P("data", "model"), P("data", "model"), Q_SPEC])
    # Each operand matters (the comparisons above could fail).
    causal_out, plain_out = _f32(want[9]), _f32(want[12])
    for i, ref in ((0, causal_out), (4, plain_out), (5, causal_out)):
        assert np.abs(_f32(want[i]) - ref).max() > 0.05


# ---- Dropout ------------------------------------------------------------------

P_DROP = 0.25

# id: (mesh, nheads_k, q spec, k/v spec, tolerance of (out, dq, dk, dv)).
# Bit for bit on the (2, 4) mesh (dK/dV of sliced K/V: partial sums). With a
# local head count of 1 XLA:CPU rounds the reference's float32 sums
# differently (dropout or not), so that case compares within an ulp, and the
# dropped entries bit for bit (one-hot values).
DROPOUT_CASES = {
    "mha-batch-heads": (DATA_MODEL, 8, Q_SPEC, Q_SPEC, EXACT4),
    "gqa-sliced": (DATA_MODEL, 2, Q_SPEC, P("data"), SLICED_EXACT),
    "mqa-heads-reversed-axis-tuple": (((4, 2), ("x", "y")), 1, P(None, None, ("y", "x")), P(),
                                      SLICED_CLOSE),
}


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=str)
def test_dropout_equals_unsharded(case):
    (shape, names), nheads_k, spec, kv_spec, tol = DROPOUT_CASES[case]
    mesh = make_mesh(shape, names)
    q, k, v, do = qkv(nheads_k=nheads_k)
    key = jax.random.key(7)
    # deterministic=True: dQ bit-reproducible on the GPU kernels too.
    drop = lambda q, k, v: jax_flash.flash_attn_func(
        q, k, v, dropout_p=P_DROP, causal=True, deterministic=True, dropout_key=key)
    plain = lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True)
    mask = tol[0] != "exact"  # else the exact output shows the same entries dropped

    def fn(q, k, v, do, v1):
        results = [*with_grads(drop, 3)(q, k, v, do), plain(q, k, v)]
        if mask:  # the dropped entries, and the visible ones without dropout
            results += [drop(q, k, v1), plain(q, k, v1)]
        return results

    split = nheads_k % _heads_size(mesh, spec) == 0
    got, want, _ = check(fn, [q, k, v, do, one_hot_values(k.shape)],
                         [spec, kv_spec, kv_spec, spec, kv_spec], mesh,
                         allow=() if split else ("all-reduce",),
                         tol=tol + ("close",) * (3 if mask else 1),
                         out_specs=[spec, spec, kv_spec, kv_spec] + [spec] * (3 if mask else 1))
    assert np.abs(_f32(want[0]) - _f32(want[4])).max() > 0.05  # dropout is on
    if mask:
        assert_same_dropped(got[5], want[5], want[6], P_DROP)


# ---- Packed inputs ------------------------------------------------------------

KV_SPEC = P("data", None, None, "model")  # (batch, seqlen, 2 or 3, heads, head_dim)


@pytest.mark.parametrize("nheads_k,kv_spec,opts", [
    (4, KV_SPEC, dict(dropout_p=0.2, window_size=(3, 3))),
    (2, P("data"), dict(softcap=4.0, causal=True)),  # sliced K/V
], ids=["gqa-split-dropout", "gqa-sliced"])
def test_flash_attn_kvpacked_func(nheads_k, kv_spec, opts):
    mesh = make_mesh(*DATA_MODEL)
    q, k, v, do = qkv(nheads_k=nheads_k)
    kv = np.stack([k, v], axis=2)
    if opts.get("dropout_p"):
        opts = dict(opts, dropout_key=jax.random.key(3), deterministic=True)
    call = lambda q, kv: jax_flash.flash_attn_kvpacked_func(q, kv, **opts)
    split = kv_spec == KV_SPEC
    if not split:
        assert collectives(call, *place(mesh, [q, kv], [Q_SPEC, kv_spec])) == []
    check(with_grads(call, 2), [q, kv, do], [Q_SPEC, kv_spec, Q_SPEC], mesh,
          allow=() if split else ("all-reduce",),
          tol=("close", "close", "close" if split else "partial-sums"),
          out_specs=[Q_SPEC, Q_SPEC, kv_spec])


def _qkvpacked():
    q, k, v, do = qkv(seqlen_k=S)
    key = jax.random.key(4)
    call = lambda qkv: jax_flash.flash_attn_qkvpacked_func(
        qkv, dropout_p=0.3, causal=True, softcap=5.0, dropout_key=key, deterministic=True)
    return call, [np.stack([q, k, v], axis=2), do], [KV_SPEC, Q_SPEC]


def test_flash_attn_qkvpacked_func_values():
    # Values, gradients and shardings, forward and backward without a
    # collective.
    mesh = make_mesh(*DATA_MODEL)
    call, args, specs = _qkvpacked()
    check(with_grads(call, 1), args, specs, mesh, out_specs=[Q_SPEC, KV_SPEC])


def test_flash_attn_qkvpacked_func_no_collective():
    mesh = make_mesh(*DATA_MODEL)
    call, args, specs = _qkvpacked()
    assert collectives(call, *place(mesh, args[:1], specs[:1])) == []


# ---- Varlen (heads sharded, packed token axis replicated) -----------------------

LENS_Q, LENS_K = [3, 5, 1, 7], [4, 2, 6, 5]


def _varlen(nheads_k=H, same_lengths=False, seed=10):
    lens_k = LENS_Q if same_lengths else LENS_K
    tq, tk = sum(LENS_Q), sum(lens_k)
    return (normal(seed, (tq, H, D)), normal(seed + 1, (tk, nheads_k, D)),
            normal(seed + 2, (tk, nheads_k, D)), normal(seed + 3, (tq, H, D)),
            cu_seqlens(LENS_Q), cu_seqlens(lens_k), max(LENS_Q), max(lens_k))


# id: (mesh, nheads_k, options)
VARLEN_CASES = {
    "mha-causal-alibi": (DATA_MODEL, 8, dict(causal=True, alibi=True)),
    "gqa-split-window-softcap": (DATA_MODEL, 4, dict(window_size=(2, 1), softcap=4.0)),
    "mha-heads-8-dropout": (((8,), ("model",)), 8, dict(dropout_p=0.25, causal=True)),
    "gqa-sliced": (DATA_MODEL, 2, dict(causal=True)),
}


@pytest.mark.parametrize("case", VARLEN_CASES, ids=str)
def test_flash_attn_varlen_func(case):
    (shape, names), nheads_k, opts = VARLEN_CASES[case]
    mesh = make_mesh(shape, names)
    heads = names[-1]
    q, k, v, do, cu_q, cu_k, max_q, max_k = _varlen(nheads_k)
    spec = P(None, heads)
    split = nheads_k % mesh.shape[heads] == 0
    kv_spec = spec if split else P()
    opts = dict(opts)
    p = opts.get("dropout_p", 0.0)
    args = [q, k, v, do, cu_q, cu_k, one_hot_values(k.shape)]
    specs = [spec, kv_spec, kv_spec, spec, None, None, kv_spec]
    if opts.pop("alibi", False):  # (sequences, heads), sharded over heads
        args.append(np.random.default_rng(8).uniform(0.1, 1.0, (len(LENS_Q), H))
                    .astype(np.float32))
        specs.append(P(None, heads))
    if p:
        opts.update(dropout_key=jax.random.key(9), deterministic=True)

    def fn(q, k, v, do, cu_q, cu_k, v1, slopes=None):
        call = lambda q, k, v, **extra: jax_flash.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes=slopes, **{**opts, **extra})
        results = [*with_grads(call, 3)(q, k, v, do)]
        if p:  # dropped entries, and the visible ones without dropout
            results += [call(q, k, v1), call(q, k, v1, dropout_p=0.0)]
        return results

    if not split:
        fwd = lambda q, k, v, cu_q, cu_k: jax_flash.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k, **opts)
        assert collectives(fwd, *place(mesh, args[:3] + args[4:6], specs[:3] + specs[4:6])) == []
    got, want, _ = check(fn, args, specs, mesh, allow=() if split else ("all-reduce",),
                         tol=("close",) * 2 + ("close" if split else "partial-sums",) * 2
                         + ("close",) * (2 if p else 0),
                         out_specs=[spec, spec, kv_spec, kv_spec] + [spec] * (2 if p else 0))
    if p:
        assert_same_dropped(got[4], want[4], want[5], p)


def test_varlen_alibi_sharded_along_sequences():
    mesh = make_mesh(*DATA_MODEL)
    q, k, v, _, cu_q, cu_k, max_q, max_k = _varlen()
    slopes = np.random.default_rng(8).uniform(0.1, 1.0, (len(LENS_Q), H)).astype(np.float32)
    call = lambda q, k, v, cu_q, cu_k, slopes: jax_flash.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, causal=True, alibi_slopes=slopes)
    check(call, [q, k, v, cu_q, cu_k, slopes],
          [P(None, "model")] * 3 + [None, None, P("data", "model")], mesh, allow=ANY_COLLECTIVE)


@pytest.mark.parametrize("packing", ["kv", "qkv"])
def test_flash_attn_varlen_packed(packing):
    mesh = make_mesh(*DATA_MODEL)
    q, k, v, do, cu_q, cu_k, max_q, max_k = _varlen(
        nheads_k=8 if packing == "qkv" else 4, same_lengths=packing == "qkv")
    spec, packed_spec = P(None, "model"), P(None, None, "model")
    if packing == "kv":
        call = lambda q, kv, cu_q, cu_k: jax_flash.flash_attn_varlen_kvpacked_func(
            q, kv, cu_q, cu_k, max_q, max_k, causal=True)
        check(with_grads(call, 2), [q, np.stack([k, v], axis=1), do, cu_q, cu_k],
              [spec, packed_spec, spec, None, None], mesh,
              out_specs=[spec, spec, packed_spec])
    else:
        call = lambda qkv, cu: jax_flash.flash_attn_varlen_qkvpacked_func(
            qkv, cu, max_q, softcap=3.0, window_size=(2, 2))
        check(with_grads(call, 1), [np.stack([q, k, v], axis=1), do, cu_q],
              [packed_spec, spec, None], mesh, out_specs=[spec, packed_spec])


# ---- flash_attn_with_kvcache --------------------------------------------------

CACHE_LEN, NEW = 17, 3


def _cache(nheads_k, batch=B, seed=20):
    rng = np.random.default_rng(seed)
    return dict(
        q=normal(seed, (batch, NEW, H, D)),
        k_cache=normal(seed + 1, (batch, CACHE_LEN, nheads_k, D)),
        v_cache=normal(seed + 2, (batch, CACHE_LEN, nheads_k, D)),
        k=normal(seed + 3, (batch, NEW, nheads_k, D)),
        v=normal(seed + 4, (batch, NEW, nheads_k, D)),
        cache_seqlens=rng.integers(0, CACHE_LEN - NEW + 1, batch).astype(np.int32),
    )


CONTIGUOUS = ["q", "k_cache", "v_cache", "k", "v", "cache_seqlens"]


def _rotary(rot_dim=16, seqlen=CACHE_LEN):
    angles = np.arange(seqlen)[:, None] * 0.3 / (1 + np.arange(rot_dim // 2))[None]
    return np.cos(angles).astype(BF16), np.sin(angles).astype(BF16)


def test_kvcache_contiguous():
    # Caches, new k/v, lengths, left padding and ALiBi slopes sharded on batch
    # (and heads), GQA (rotary, ALiBi, left padding) and MHA, with and
    # without append: out, LSE and the updated caches.
    mesh = make_mesh(*DATA_MODEL)
    gqa, mha = _cache(4), _cache(8, seed=30)
    cos, sin = _rotary()
    leftpad = np.minimum(gqa["cache_seqlens"], [0, 2, 1, 3]).astype(np.int32)
    slopes = np.random.default_rng(3).uniform(0.1, 1, (B, H)).astype(np.float32)
    common = dict(causal=True, return_softmax_lse=True)

    def fn(leftpad, slopes, *caches):
        g = dict(zip(CONTIGUOUS, caches[:6]))
        m = dict(zip(CONTIGUOUS, caches[6:]))
        return [
            jax_flash.flash_attn_with_kvcache(**g, rotary_cos=cos, rotary_sin=sin,
                                              cache_leftpad=leftpad, alibi_slopes=slopes,
                                              **common),
            jax_flash.flash_attn_with_kvcache(**m, **common),
            jax_flash.flash_attn_with_kvcache(m["q"], m["k_cache"], m["v_cache"], softcap=4.0,
                                              cache_seqlens=m["cache_seqlens"], **common),
        ]

    cache_specs = [Q_SPEC] * 5 + [P("data")]
    lse_spec = P("data", "model")
    got, _, _ = check(fn, [leftpad, slopes] + [gqa[n] for n in CONTIGUOUS]
                      + [mha[n] for n in CONTIGUOUS],
                      [P("data"), P("data", "model")] + cache_specs * 2, mesh,
                      out_specs=[Q_SPEC, lse_spec, Q_SPEC, Q_SPEC] * 2 + [Q_SPEC, lse_spec])
    assert not np.array_equal(_f32(got[2]), _f32(gqa["k_cache"]))  # appended


def test_vmap_of_sharded_kvcache():
    # vmap over caches whose rows are q's rows: the mapped axis sharded over
    # "data", heads over "model"; one call per device, no collective.
    mesh = make_mesh(*DATA_MODEL)
    parts = [_cache(4, seed=60 + 10 * i) for i in range(2)]
    args = [np.stack([p[n] for p in parts]) for n in CONTIGUOUS]
    heads = P("data", None, None, "model")
    specs = [heads] * 5 + [P("data")]
    fn = jax.vmap(lambda q, kc, vc, k, v, lens: jax_flash.flash_attn_with_kvcache(
        q, kc, vc, k, v, cache_seqlens=lens, causal=True, return_softmax_lse=True))
    check(fn, args, specs, mesh)


def test_kvcache_fewer_kv_heads_than_shards():
    # 2 K/V heads, head axis of 4: each shard writes its own cache heads, so
    # no K/V head may live on two shards; the heads are gathered (collectives
    # allowed), the values equal.
    mesh = make_mesh(*DATA_MODEL)
    data = _cache(2)
    fn = lambda *args: jax_flash.flash_attn_with_kvcache(
        **dict(zip(CONTIGUOUS, args)), causal=True)
    check(fn, [data[n] for n in CONTIGUOUS], [Q_SPEC] + [P("data")] * 5, mesh,
          allow=ANY_COLLECTIVE)


PAGE, BLOCKS_PER_SEQ, NUM_BLOCKS = 4, 5, 23
PAGED = CONTIGUOUS + ["block_table"]


def _paged(nheads_k, batch=B, seed=30):
    rng = np.random.default_rng(seed)
    table = rng.permutation(NUM_BLOCKS)[:batch * BLOCKS_PER_SEQ].reshape(batch, BLOCKS_PER_SEQ)
    return dict(
        q=normal(seed, (batch, NEW, H, D)),
        k_cache=normal(seed + 1, (NUM_BLOCKS, PAGE, nheads_k, D)),
        v_cache=normal(seed + 2, (NUM_BLOCKS, PAGE, nheads_k, D)),
        k=normal(seed + 3, (batch, NEW, nheads_k, D)),
        v=normal(seed + 4, (batch, NEW, nheads_k, D)),
        cache_seqlens=rng.integers(0, PAGE * BLOCKS_PER_SEQ - NEW + 1, batch).astype(np.int32),
        block_table=table.astype(np.int32),
    )


def test_kvcache_paged_heads_sharded():
    mesh = make_mesh(*DATA_MODEL)
    spec = P(None, None, "model")
    mha, gqa = _paged(8), _paged(4, seed=40)
    call = lambda *args: jax_flash.flash_attn_with_kvcache(
        **dict(zip(PAGED, args)), causal=True, softcap=5.0)
    fn = lambda *args: [call(*args[:7]), call(*args[7:])]
    got, _, _ = check(fn, [mha[n] for n in PAGED] + [gqa[n] for n in PAGED],
                      ([spec] * 5 + [None, None]) * 2, mesh, out_specs=[spec] * 6)
    assert not np.array_equal(_f32(got[1]), _f32(mha["k_cache"]))  # appended


# ---- jax_flash.attention (jax.nn-compatible) -------------------------------------


def test_nn_attention_sharded():
    mesh = make_mesh(*DATA_MODEL)
    q, k, v, do = qkv(seqlen_k=S, nheads_k=4)
    lengths = np.asarray([9, 4, 7, 1], np.int32)
    ids = np.sort(np.random.default_rng(11).integers(0, 3, (B, S)), axis=1).astype(np.int32)
    key = jax.random.key(12)
    attn = jax_flash.attention

    def fn(q, k, v, do, lengths, ids):
        return [
            with_grads(lambda q, k, v: attn(q, k, v, is_causal=True), 3)(q, k, v, do),
            attn(q, k, v, key_value_seq_lengths=lengths, local_window_size=(3, 1)),
            attn(q, k, v, segment_ids=(ids, ids), dropout_rate=0.2, dropout_rng=key),
        ]

    check(fn, [q, k, v, do, lengths, ids], [Q_SPEC] * 4 + [P("data"), P("data")], mesh,
          out_specs=[Q_SPEC] * 6)


# ---- Sequence / head-dim sharding: gathered, right results ----------------------


def test_sequence_and_head_dim_sharding():
    mesh = make_mesh(*DATA_MODEL)
    q, k, v, do = qkv(seqlen_q=16, seqlen_k=12, nheads_k=4)  # lengths divisible by 4
    call = with_grads(lambda q, k, v: jax_flash.flash_attn_func(
        q, k, v, causal=True, softcap=4.0), 3)
    fn = lambda *args: [call(*args[i:i + 4]) for i in range(0, len(args), 4)]
    specs = [P("data", "model"), P(None, None, None, "model")]  # (batch,) seqlen; head_dim
    check(fn, [q, k, v, do] * 2, [s for s in specs for _ in range(4)], mesh,
          allow=ANY_COLLECTIVE)


# ---- vmap of a sharded call -----------------------------------------------------


def test_vmap_of_sharded_call():
    # The mapped axis and the batch, each sharded over "data"; heads "model".
    mesh = make_mesh(*DATA_MODEL)
    q, k, v, do = (np.stack([x, x[::-1]]) for x in qkv(nheads_k=4))
    call = jax.vmap(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True))
    fn = lambda *args: [with_grads(call, 3)(*args[:4]), call(*args[4:])]
    specs = [P(None, "data", None, "model")] * 4 + [P("data", None, None, "model")] * 3
    # The mapped axis is a factor of its own ahead of the batch, folded into
    # the batch on each shard: either axis's sharding stays, no collective.
    check(fn, [q, k, v, do, q, k, v], specs, mesh)


def test_nested_vmap_of_sharded_call():
    # vmap of vmap: the outer axis merges into the mapped one (major), one
    # call; the outer axis sharded over "data", heads over "model".
    mesh = make_mesh(*DATA_MODEL)
    q, k, v, do = (np.stack([np.stack([x, x[::-1]]), np.stack([x[::-1], x])])
                   for x in qkv(nheads_k=4))
    call = jax.vmap(jax.vmap(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True)))
    fn = with_grads(call, 3)
    check(fn, [q, k, v, do], [P("data", None, None, None, "model")] * 4, mesh)


# ---- shard_map: local calls -----------------------------------------------------


def _per_shard_varlen(n_shards, seed=50):
    """n_shards packed buffers of 15 tokens, each with its own cu_seqlens,
    stacked to (n_shards, 4)."""
    rng = np.random.default_rng(seed)
    total, nseq = 15, 3
    cus = np.stack([np.concatenate([[0], np.sort(rng.choice(np.arange(1, total), nseq - 1,
                                                            replace=False)), [total]])
                    for _ in range(n_shards)]).astype(np.int32)
    max_len = int(np.max(np.diff(cus, axis=1)))
    shape = (n_shards * total, H, D)
    return (normal(seed, shape), normal(seed + 1, shape), normal(seed + 2, shape),
            normal(seed + 3, shape), cus, total, max_len)


def _stack_per_shard(fn, shard_args):
    """fn run alone (unsharded) on each shard's arguments, results stacked
    along axis 0 like shard_map's."""
    runs = [jax.tree.leaves(unsharded(fn, args)) for args in shard_args]
    return [np.concatenate([np.asarray(r[i]) for r in runs]) for i in range(len(runs[0]))]


def test_shard_map_varlen_own_buffers():
    mesh = make_mesh(*DATA_MODEL)
    q, k, v, _, cus, total, max_len = _per_shard_varlen(2)
    call = lambda q, k, v, cu: jax_flash.flash_attn_varlen_func(
        q, k, v, cu, cu, max_len, max_len, causal=True, softcap=4.0)
    tokens = P("data", "model")  # each data shard its own buffer, heads over model
    fn = shard_map(lambda q, k, v, cu: call(q, k, v, cu[0]), mesh=mesh,
                   in_specs=(tokens, tokens, tokens, P("data")), out_specs=tokens)
    args = place(mesh, [q, k, v, cus], [tokens] * 3 + [P("data")])
    assert collectives(fn, *args) == []
    rows = [slice(i * total, (i + 1) * total) for i in range(2)]
    want = _stack_per_shard(call, [[q[r], k[r], v[r], cus[i]] for i, r in enumerate(rows)])
    assert_same(jax.jit(fn)(*args), want)


def test_shard_map_varlen_grads():
    mesh = make_mesh((8,), ("x",))
    q, k, v, do, cus, total, max_len = _per_shard_varlen(8)
    call = with_grads(lambda q, k, v, cu: jax_flash.flash_attn_varlen_func(
        q, k, v, cu, cu, max_len, max_len, causal=True), 3)
    fn = shard_map(lambda q, k, v, do, cu: call(q, k, v, do, cu[0]), mesh=mesh,
                   in_specs=(P("x"),) * 5, out_specs=(P("x"),) * 4)
    args = place(mesh, [q, k, v, do, cus], [P("x")] * 5)
    assert collectives(fn, *args) == []
    rows = [slice(i * total, (i + 1) * total) for i in range(8)]
    want = _stack_per_shard(call, [[q[r], k[r], v[r], do[r], cus[i]]
                                   for i, r in enumerate(rows)])
    assert_same(jax.jit(fn)(*args), want)


def test_shard_map_partially_manual():
    # Manual over "data" only, heads sharded over the automatic "model" axis
    # inside: custom_partitioning gets no mesh there, so the heads are
    # gathered around the call (documented in jax_flash.sharding); values
    # and gradients stay those of the unsharded call.
    mesh = make_mesh(*DATA_MODEL)
    q, k, v, do = qkv(nheads_k=4)
    call = with_grads(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True), 3)
    fn = shard_map(call, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=(P("data"),) * 4,
                   axis_names={"data"})
    args = place(mesh, [q, k, v, do], [Q_SPEC] * 4)
    assert_same(jax.jit(fn)(*args), unsharded(call, [q, k, v, do]), tol=CLOSE4)


def test_shard_map_kvcache_own_caches_and_block_tables():
    n_shards = 4
    mesh = make_mesh((n_shards,), ("x",))
    # Each shard: 2 sequences, its own pages and a block table into them.
    shards = [_paged(4, batch=2, seed=60 + 10 * i) for i in range(n_shards)]
    stacked = [np.concatenate([s[n] for s in shards]) for n in PAGED]
    call = lambda *args: jax_flash.flash_attn_with_kvcache(
        **dict(zip(PAGED, args)), causal=True, return_softmax_lse=True)
    fn = shard_map(call, mesh=mesh, in_specs=(P("x"),) * len(PAGED), out_specs=(P("x"),) * 4)
    args = place(mesh, stacked, [P("x")] * len(PAGED))
    assert collectives(fn, *args) == []
    want = _stack_per_shard(call, [[s[n] for n in PAGED] for s in shards])
    assert_same(jax.jit(fn)(*args), want)


# ---- Explicit mesh axes -----------------------------------------------------------


def test_explicit_mesh_under_set_mesh():
    # jax.make_mesh's default in JAX 0.10: Explicit axes, here with the mesh
    # set; sliced K/V (GQA with 2 K/V heads) and split K/V (4).
    mesh = make_mesh((2, 4), ("data", "model"), axis_type=jax.sharding.AxisType.Explicit)
    q, k2, v2, do = qkv(nheads_k=2)
    _, k4, v4, _ = qkv(nheads_k=4, seed=10)
    call = with_grads(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True), 3)
    fn = lambda q, do, k2, v2, k4, v4: [call(q, k2, v2, do), call(q, k4, v4, do)]
    args = [q, do, k2, v2, k4, v4]
    specs = [Q_SPEC, Q_SPEC, P("data"), P("data"), Q_SPEC, Q_SPEC]
    sharded = place(mesh, args, specs)
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(*sharded).compile()
        got = compiled(*sharded)
    assert _collectives_in(compiled.as_text()) == ["all-reduce"]  # the sliced dK/dV only
    assert_same(got, unsharded(fn, args), tol=SLICED_CLOSE + CLOSE4)
    assert_sharded(mesh, jax.tree.leaves(got), [Q_SPEC, Q_SPEC, P("data"), P("data")]
                   + [Q_SPEC] * 4)
