"""How jax_flash calls split across devices under `jax.jit`.

Every backend call (forward, backward, kv-cache; kernels or the plain-JAX
reference alike) goes through `call`, which wraps it in
`jax.experimental.custom_partitioning` with a Shardy rule built from the
call's spec. Under `jax.jit` with sharded inputs:

* the batch and head axes of q/k/v (and of everything indexed by them: LSE,
  ALiBi slopes, dropout RNG, segment tables, cache lengths) keep their
  sharding, over any mesh and axis names: each device runs one call on its
  own shard, with no collective around it, forward and backward;
* MQA/GQA: K/V head h_k serves query heads [h_k * r, (h_k + 1) * r), r =
  nheads / nheads_k. A K/V head shard must hold the K/V heads of its query
  heads: the K/V heads are sharded like the query heads' major part (with
  fewer K/V heads than shards, each K/V head is split over its query heads'
  devices, and with one K/V head (MQA) it is replicated);
* the sequence and head-dim axes, the packing axis of qkv/kv, varlen's
  packed token axis, and the pages of a paged cache are gathered first
  (correct, not fast: for long sequences use `jax_flash.ring_attention`).
  A kv-cache is sharded along its batch only when it is contiguous and its
  rows are q's rows (no cache_batch_idx);
* dropout draws each shard's mask from its global (batch, head) indices, so
  the result equals the unsharded call bit for bit.

Inside `jax.shard_map` (every mesh axis manual) the call is local: each
shard passes its own arrays (its own varlen buffer and `cu_seqlens`, its own
cache and block table) and gets what a call on those arrays alone gives.
A shard_map that leaves some axes automatic (`axis_names=`) gives correct
results, but the partitioning rule sees no mesh there: inputs sharded over
the automatic axes are gathered around the call. Make every axis manual
(and split batch or heads in the shard_map's specs) to keep them local; the
legacy `with mesh:` context does not help (with it, XLA's partitioner
aborts on such a call in JAX 0.10).

`vmap` over a call whose mapped inputs all lead with the batch (fixed-shape
calls; kv-cache calls whose cache rows are q's rows) gives the partitioned
call the mapped axis as a factor of its own, ahead of the batch: the
partitioner keeps the sharding of either axis, and each shard folds its
part of the mapped axis into its batch (the kernels' batch), so a vmapped
call with its mapped or batch axis sharded compiles to one call per device
with no collective. A vmap of that merges its axis into the mapped one.
Otherwise (varlen; kv-cache calls with cache_batch_idx, pages or mapped
rotary tables) the call runs once per mapped element.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["call"]

# Factor names: batch, query heads, K/V heads (MHA: the query heads' factor
# too). Every other factor of a signature is replicated (gathered when an
# input arrives sharded along it).
# A vmapped call gets the mapped axis as a factor of its own ahead of the
# batch, folded into the batch on each shard.
_BATCH, _HEADS, _KV_HEADS, _MAPPED = "b", "h", "g", "v"
_SHARDABLE = (_BATCH, _HEADS, _KV_HEADS, _MAPPED)

Factors = tuple[str, ...]  # one factor name per dim of an array


@dataclasses.dataclass(frozen=True)
class Signature:
    """Which factor each dim of each input and output of a call is."""

    ins: tuple[Factors, ...]
    outs: tuple[Factors, ...]
    group: int  # query heads per K/V head
    # Whether a shard may hold all K/V heads and use the slice its query
    # heads need (the gradients of K/V then add up over the head shards).
    slices_kv: bool = True

    def rule(self) -> tuple[str, dict]:
        """The Shardy rule string and its keyword arguments."""
        def dims(fs):
            # MHA: one head factor, so Shardy splits q and k/v alike.
            return " ".join(_KV_HEADS if f == _HEADS and self.group == 1 else f for f in fs)

        text = ", ".join(dims(fs) for fs in self.ins) + " -> " + \
            ", ".join(dims(fs) for fs in self.outs)
        # Factors in order of first appearance (Shardy wants them sorted so).
        names = dict.fromkeys(f for fs in self.ins + self.outs for f in fs)
        return text, dict(need_replication_factors=tuple(
            f for f in names if f not in _SHARDABLE))


def _unique_factors(prefix: str):
    counter = iter(range(1 << 30))
    return lambda: f"{prefix}{next(counter)}"


def attention_signature(spec, xs, operands, backward: bool) -> Signature:
    """Factors of a fixed or varlen call: forward (*xs, *operands) -> (out,
    lse); backward (*xs, *operands, out, lse, d_out) -> grads of xs. Varlen
    buffers arrive as (1, total, ...) with the batch in cu_seqlens."""
    other = _unique_factors("z")
    b = _BATCH if spec.layout == "fixed" else "o"
    s, t = "s", "t"
    q = (b, s, _HEADS, "d")
    if spec.packing == "qkv":
        x_factors = ((b, s, "p3", _HEADS, "d"),)
    elif spec.packing == "kv":
        x_factors = (q, (b, t, "p2", _KV_HEADS, "d"))
    else:
        x_factors = (q, (b, t, _KV_HEADS, "d"), (b, t, _KV_HEADS, "d"))
    # Operands, in Operands' order, empty ones (shape (0,)) get their own factor.
    # Varlen: the sequences live in cu_seqlens and the packed buffers, so the
    # operands' sequence axis is replicated.
    n = _BATCH if spec.layout == "fixed" else "n"
    full = ((n, _HEADS), (n, "w"), ("c",), ("c",), (n, s, "w"), (n, t, "w"))
    op_factors = []
    for x, fs in zip(operands, full):
        if x.size == 0 and x.shape == (0,):
            op_factors.append((other(),))
        elif x.ndim == len(fs):
            op_factors.append(fs)
        else:  # segment ids as given (batch, seqlen), before the tables
            op_factors.append(fs[:x.ndim])
    lse = (b, _HEADS, s)
    group = spec.nheads // spec.nheads_k
    if backward:
        return Signature(x_factors + tuple(op_factors) + (q, lse, q), x_factors, group)
    return Signature(x_factors + tuple(op_factors), (q, lse), group)


def kvcache_signature(spec, xs, operands) -> Signature:
    """Factors of a kv-cache call (q, k_cache, v_cache, k, v, *operands) ->
    (out, lse, k_cache, v_cache); k/v may be None (no factors)."""
    other = _unique_factors("z")
    # The caches follow q's batch only when row b of the cache is sequence b.
    aligned = not spec.paged and not spec.has_batch_idx
    b = _BATCH if aligned else "n"  # "n" is replicated: so is the batch then
    cache = (b, "t", _KV_HEADS, "d") if aligned else ("n", "t", _KV_HEADS, "d")
    q = (_BATCH, "s", _HEADS, "d")
    new = (_BATCH, "u", _KV_HEADS, "d")
    x_factors = [q, cache, cache]
    x_factors += [new, new] if spec.append else []
    full = ((_BATCH,), (_BATCH,), (_BATCH,), (_BATCH, "m"), ("ro", "rd"), ("ro", "rd"),
            (_BATCH, _HEADS))
    op_factors = [(other(),) if x.shape == (0,) else fs for x, fs in zip(operands, full)]
    ins = tuple(x_factors + op_factors)
    if not aligned:
        # Replicate the batch everywhere: a device's sequences could touch
        # any cache row or page.
        ins = tuple(tuple("n" if f == _BATCH else f for f in fs) for fs in ins)
        q = tuple("n" if f == _BATCH else f for f in q)
    outs = (q, (q[0], _HEADS, "s"), cache, cache)
    # Every shard writes its cache heads: no K/V head may live on two shards.
    return Signature(ins, outs, spec.nheads // spec.nheads_k, slices_kv=False)


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


@dataclasses.dataclass(frozen=True)
class _Shard:
    """How a call's batch and heads are split: mesh axes per factor."""

    batch: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()  # query heads
    kv_heads: tuple[str, ...] = ()  # K/V heads: heads, or () with sliced K/V
    # K/V heads per shard when every shard holds all K/V heads and slices
    # those of its query heads (0: no slicing).
    kv_slice: int = 0
    mapped: tuple[str, ...] = ()  # a vmapped call's mapped axis


def _choose(sig: Signature, spec, mesh, shardings, mapped_size: int = 0) -> _Shard:
    """The batch/head split from the shardings the partitioner proposes,
    kept where it is consistent and divides the sizes; the rest replicated.
    mapped_size: a vmapped call's mapped axis (factor _MAPPED)."""
    found = _found(sig, shardings)
    shard = _choose_batch_heads(sig, spec, mesh, found)
    mapped = found.get(_MAPPED, ())
    used = set(shard.batch) | set(shard.heads) | set(shard.kv_heads)
    if not mapped or set(mapped) & used or mapped_size % _size(mesh, mapped):
        return shard
    return dataclasses.replace(shard, mapped=mapped)


def _found(sig: Signature, shardings) -> dict:
    """Factor -> the mesh axes its first sharded occurrence proposes."""
    found = {}
    for fs, sharding in zip(sig.ins, shardings):
        if not isinstance(sharding, NamedSharding):
            continue
        entries = tuple(sharding.spec) + (None,) * (len(fs) - len(sharding.spec))
        for f, entry in zip(fs, entries):
            found.setdefault(f, _axes(entry))
    return found


def _choose_batch_heads(sig: Signature, spec, mesh, found: dict) -> _Shard:
    batch = found.get(_BATCH, ())
    if not batch or spec.batch % _size(mesh, batch):
        batch = ()
    # The query heads' split decides (MHA: either side's; qkv-packed inputs
    # have only the query factor).
    heads = found.get(_HEADS) or found.get(_KV_HEADS, ()) if sig.group == 1 else \
        found.get(_HEADS, ())
    if set(heads) & set(batch) or spec.nheads % _size(mesh, heads):
        return _Shard(batch)
    if not heads:
        return _Shard(batch)
    n = _size(mesh, heads)
    if spec.nheads_k % n == 0:
        # K/V heads split like the query heads: shard i holds query heads
        # [i * H / n, (i + 1) * H / n) and exactly their K/V heads.
        return _Shard(batch, heads, heads)
    local = spec.nheads // n
    if sig.slices_kv and (local % sig.group == 0 or sig.group % local == 0):
        return _Shard(batch, heads, (), max(1, local // sig.group))
    return _Shard(batch)


def _spec_of(shard: _Shard, factors: Factors) -> PartitionSpec:
    entries = []
    for f in factors:
        axes = {_BATCH: shard.batch, _HEADS: shard.heads, _KV_HEADS: shard.kv_heads,
                _MAPPED: shard.mapped}.get(f, ())
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def _local_spec(spec, mesh, shard: _Shard):
    changes = dict(nheads=spec.nheads // _size(mesh, shard.heads),
                   nheads_k=shard.kv_slice or spec.nheads_k // _size(mesh, shard.kv_heads))
    if shard.batch:
        changes["batch"] = spec.batch // _size(mesh, shard.batch)
        if hasattr(spec, "batch_cache"):
            changes["batch_cache"] = spec.batch_cache // _size(mesh, shard.batch)
    return dataclasses.replace(spec, **changes)


def _run_shard(fn, sig: Signature, shard: _Shard, local, nheads_k: int, treedef, leaves):
    """One shard's call: the head offset for dropout and, with sliced K/V,
    the K/V heads of this shard's query heads in, their gradients (summed
    over the head shards) out."""
    if not shard.heads:
        return fn(local, jax.tree.unflatten(treedef, leaves), None)
    offset = jax.lax.axis_index(shard.heads) * local.nheads
    if shard.kv_slice:
        first = offset // sig.group
        leaves = [jax.lax.dynamic_slice_in_dim(x, first, shard.kv_slice, fs.index(_KV_HEADS))
                  if _KV_HEADS in fs else x for x, fs in zip(leaves, sig.ins)]
    outs = fn(local, jax.tree.unflatten(treedef, leaves), offset)
    if shard.kv_slice:
        full = []
        for y, fs in zip(outs, sig.outs):
            if _KV_HEADS in fs:
                axis = fs.index(_KV_HEADS)
                shape = y.shape[:axis] + (nheads_k,) + y.shape[axis + 1:]
                # Summed in float32: partial gradients rounded once, at the end.
                y = jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(
                    jnp.zeros(shape, jnp.float32), y.astype(jnp.float32), first, axis),
                    shard.heads).astype(y.dtype)
            full.append(y)
        outs = tuple(full)
    return outs


@functools.lru_cache(maxsize=4096)
def _partitioned(fn: Callable, spec, sig: Signature, treedef):
    """fn(spec, args, head_offset) under custom_partitioning for this spec."""
    def body(*leaves):
        return fn(spec, jax.tree.unflatten(treedef, leaves), None)

    op = custom_partitioning(body)

    def shardings(mesh, shard):
        return (tuple(NamedSharding(mesh, _spec_of(shard, fs)) for fs in sig.outs),
                tuple(NamedSharding(mesh, _spec_of(shard, fs)) for fs in sig.ins))

    # A vmapped call's mapped axis: the leading dim of its first such input.
    mapped_at = next((i for i, fs in enumerate(sig.ins) if fs[:1] == (_MAPPED,)), None)

    def choose(mesh, arg_shapes):
        size = 0 if mapped_at is None else arg_shapes[mapped_at].shape[0]
        return _choose(sig, spec, mesh, [a.sharding for a in arg_shapes], size)

    def partition(mesh, arg_shapes, result_shape):
        shard = choose(mesh, arg_shapes)
        local = _local_spec(spec, mesh, shard)
        outs, ins = shardings(mesh, shard)
        return mesh, lambda *leaves: _run_shard(fn, sig, shard, local, spec.nheads_k, treedef, leaves), outs, ins

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, choose(mesh, arg_shapes))[0]

    text, kwargs = sig.rule()
    op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=text, **kwargs)
    return op


def _leaves_with_factors(args, sig: Signature):
    leaves, treedef = jax.tree.flatten(args)
    if len(leaves) != len(sig.ins):
        raise AssertionError(f"{len(leaves)} arrays for a signature of {len(sig.ins)}")
    return leaves, treedef


def call(fn: Callable, spec, args, sig: Signature):
    """fn(spec, args, head_offset) -> tuple of arrays, partitioned by sig.

    fn computes one shard: spec is the shard's (batch and heads local),
    head_offset its first global query head (None when the heads are not
    split; dropout needs it). args is a pytree whose leaves match sig.ins.
    """
    leaves, treedef = _leaves_with_factors(args, sig)
    mesh = _explicit_mesh(leaves)
    if mesh is not None:
        return _shard_mapped(fn, spec, sig, treedef, leaves, mesh)
    return _vmappable(fn, spec, sig, treedef)(*leaves)


def _explicit_mesh(leaves):
    """The mesh of inputs whose types carry an explicit sharding (a mesh
    with Explicit axes, `jax.set_mesh`), else None."""
    for x in leaves:
        sharding = getattr(jax.typeof(x), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or mesh.empty:
            continue
        if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
            return mesh
    return None


def _shard_mapped(fn, spec, sig: Signature, treedef, leaves, mesh):
    """Explicit sharding: the split is known while tracing, so the call is a
    shard_map over the mesh, each input resharded to the chosen split first
    (a no-op when it already is)."""
    shard = _choose(sig, spec, mesh, [jax.typeof(x).sharding for x in leaves])
    local = _local_spec(spec, mesh, shard)
    in_specs = tuple(_spec_of(shard, fs) for fs in sig.ins)
    out_specs = tuple(_spec_of(shard, fs) for fs in sig.outs)
    leaves = [x if jax.typeof(x).sharding.spec == p else jax.reshard(x, p)
              for x, p in zip(leaves, in_specs)]
    body = jax.shard_map(
        lambda *xs: tuple(_run_shard(fn, sig, shard, local, spec.nheads_k, treedef, xs)),
        mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    return body(*leaves)


@functools.lru_cache(maxsize=4096)
def _vmappable(fn: Callable, spec, sig: Signature, treedef):
    op = _partitioned(fn, spec, sig, treedef)

    @custom_vmap
    def run(*leaves):
        return tuple(op(*leaves))

    # The axis a new mapped axis folds into: the batch, or the mapped axis
    # of a call that is already vmapped.
    lead = _MAPPED if any(fs[:1] == (_MAPPED,) for fs in sig.ins) else _BATCH

    @run.def_vmap
    def rule(axis_size, in_batched, *leaves):
        # Fixed-shape calls, and kv-cache calls whose cache rows are q's rows.
        folds = (getattr(spec, "layout", None) in ("fixed", "kvcache")
                 and all(fs[0] == lead for fs in sig.outs)
                 and all(fs[:1] == (lead,) for fs, batched in zip(sig.ins, in_batched)
                         if batched))
        if folds and lead == _MAPPED:
            outs = _merged(fn, spec, sig, treedef, axis_size, in_batched, leaves)
        elif folds:
            outs = _folded(fn, spec, sig, treedef, axis_size, in_batched, leaves)
        else:
            outs = _per_element(fn, spec, sig, treedef, in_batched, leaves)
        return tuple(outs), (True,) * len(outs)

    return run


def _folded(fn, spec, sig, treedef, n, in_batched, leaves):
    """One call for the whole mapped axis: the batch-led arrays get the
    mapped axis as a factor of its own (_MAPPED, ahead of the batch), so
    the partitioner can keep either axis's sharding, and each shard folds
    its part of the mapped axis into its batch (`_fold_mapped`)."""
    mapped = _broadcast_unmapped(leaves, sig, in_batched, n, _BATCH)
    lead = lambda fs: (_MAPPED, *fs) if fs[:1] == (_BATCH,) else fs
    sig_mapped = dataclasses.replace(sig, ins=tuple(map(lead, sig.ins)),
                                     outs=tuple(map(lead, sig.outs)))
    return list(_vmappable(_mapped_fn(fn, sig), spec, sig_mapped, treedef)(*mapped))


@functools.lru_cache(maxsize=4096)
def _mapped_fn(fn: Callable, sig: Signature) -> Callable:
    """`_fold_mapped` for fn, one object per (fn, sig) so the caches of
    `_vmappable` and `_partitioned` keep hitting."""
    return functools.partial(_fold_mapped, fn, sig)


def _broadcast_unmapped(leaves, sig, in_batched, n, factor):
    """The leaves led by `factor` that the vmap does not map, given the
    mapped axis (size n) by broadcasting; the others as they are."""
    return [jnp.broadcast_to(x, (n, *x.shape)) if fs[:1] == (factor,) and not batched else x
            for x, fs, batched in zip(leaves, sig.ins, in_batched)]


def _merged(fn, spec, sig, treedef, n, in_batched, leaves):
    """vmap of a vmapped call: the new axis merged into the mapped one
    (major), one call."""
    merged = [x.reshape(n * x.shape[1], *x.shape[2:]) if fs[:1] == (_MAPPED,) else x
              for x, fs in zip(_broadcast_unmapped(leaves, sig, in_batched, n, _MAPPED), sig.ins)]
    outs = _vmappable(fn, spec, sig, treedef)(*merged)
    return [y.reshape(n, y.shape[0] // n, *y.shape[1:]) for y in outs]


def _fold_mapped(fn, sig: Signature, spec, args, head_offset):
    """fn on one shard of a vmapped call: the mapped axis (its local part)
    folded into the batch, and unfolded from the outputs."""
    leaves, treedef = jax.tree.flatten(args)
    n = next(x.shape[0] for x, fs in zip(leaves, sig.ins) if fs[:1] == (_BATCH,))
    leaves = [x.reshape(n * x.shape[1], *x.shape[2:]) if fs[:1] == (_BATCH,) else x
              for x, fs in zip(leaves, sig.ins)]
    wide = dataclasses.replace(spec, batch=n * spec.batch)
    if hasattr(spec, "batch_cache"):  # a kv-cache whose rows are q's rows
        wide = dataclasses.replace(wide, batch_cache=n * spec.batch_cache)
    outs = fn(wide, jax.tree.unflatten(treedef, leaves), head_offset)
    return tuple(y.reshape(n, y.shape[0] // n, *y.shape[1:]) for y in outs)


def _per_element(fn, spec, sig, treedef, in_batched, leaves):
    """One call per element of the mapped axis (lax.map)."""
    mapped = [x for x, batched in zip(leaves, in_batched) if batched]

    def one(xs):
        it = iter(xs)
        full = [next(it) if batched else x for x, batched in zip(leaves, in_batched)]
        return call(fn, spec, jax.tree.unflatten(treedef, full), sig)

    return list(jax.lax.map(one, mapped))
