"""`flash_attn_with_kvcache` on our CUDA decode kernels (csrc/decode/).

The decode kernels only read the caches. An append (and the rotary
embedding) runs before them, one of two ways:

* the append kernel (csrc/host/kvcache_append.h): one launch rotates q and
  the new keys and writes the new rows into the caches, which the call
  aliases in and out;
* JAX, with the reference's own code (`kvcache_ref.update`): the rotary as
  XLA fusions, the new rows one scatter per cache.

Either way XLA updates the caches in place when they are donated under
`jax.jit`, so an appending decode step moves only the new rows besides the
decode kernel's read.

FFI contracts (csrc/ffi/kvcache_ffi.cc): jax_flash_kvcache_fwd(q, k_cache,
v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
alibi_slopes) -> (out, lse, out_accum, lse_accum), attributes softmax_scale
f32, window_left/right i32, softcap f32, seqlen_new i32, paged bool; the
split scratch out_accum/lse_accum is sized by `_C.kvcache_plan` (plan.py).
jax_flash_kvcache_append(q, k, v, k_cache, v_cache, cache_seqlens,
cache_batch_idx, cache_leftpad, block_table, rotary_cos, rotary_sin) ->
(q_out, k_cache, v_cache), attributes paged, rotary_interleaved,
rotary_q_per_row (bools); q_out is empty without rotary.

Head dims 32 and 64 with several K/V heads run folded: f = 128 / head_dim
neighbouring K/V heads are read as one head of dim 128 (a free reshape of
the caches, whose rows hold the heads side by side), and each query head
is widened to 128 with zeros outside its K/V head's columns, so q.k sees
only its own head; of the output's 128 columns each head keeps its own. A
K/V tile row is then 256 contiguous bytes instead of 64 or 128, and the
d=128 kernel serves the call (`fold_factor` and `kernel_spec_and_fold` say
when). One consequence: a NaN or inf in a visible key of one head reaches
the heads folded with it (0 * inf); visible keys are expected to be finite.

Switches (environment variables, read when a call is traced):
JAX_FLASH_KVCACHE_KERNELS="1" selects the decode kernels, "0" the plain-JAX
reference, unset DEFAULT (on: the kernels pass the GPU tests and
compute-sanitizer's memcheck and racecheck on adversarial tables, and
initcheck on the shared-memory layout before entry 38's;
notes/kernel_experiments.md, entries 36-38). JAX_FLASH_KVCACHE_APPEND="1"
runs appends on the append kernel, "0" in JAX, unset APPEND_DEFAULT (off:
it passes the GPU tests but was not faster than XLA's fused update; the
README's kv-cache section). JAX_FLASH_KVCACHE_FOLD unset folds head dim
64 under the rule of `kernel_spec_and_fold`, fitted to the timed rows
(notes entries 44-45, 47-48, 50), "1" folds head dims 32 and 64 wherever
`fold_factor` allows (d = 32 is not yet timed), "0" never. Any other
value of a switch raises a ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash._src import extension
from jax_flash._src import kvcache_ref
from jax_flash._src import plan as plan_lib
from jax_flash._src.kvcache import KVCacheOperands, KVCacheSpec

ENV_VAR = "JAX_FLASH_KVCACHE_KERNELS"
DEFAULT = True  # whether the kernels serve kv-cache calls with ENV_VAR unset
APPEND_ENV_VAR = "JAX_FLASH_KVCACHE_APPEND"
APPEND_DEFAULT = False  # whether appends run on the append kernel with APPEND_ENV_VAR unset
FOLD_ENV_VAR = "JAX_FLASH_KVCACHE_FOLD"
FOLD_HEAD_DIMS = (32, 64)  # the head dims that may run folded (FOLD_ENV_VAR "1")
FOLD_AUTO_HEAD_DIMS = (64,)  # those that do where faster, FOLD_ENV_VAR unset
_FOLD_DIM = 128  # the head dim a folded call runs at
_NARROW_ROWS = 16  # query rows of the narrow decode tile (csrc/decode/tile.h kNarrowRows)
# Mode "auto" folds (kernel_spec_and_fold) a call of at most this many
# splits per block an SM holds, each of at least this many keys of the
# cache, on pages (if paged) of at least this many keys: _FOLD_MIN_PAGE_SIZE
# where the plan puts one block on an SM, _FOLD_MIN_PAGE_SIZE_TWO_BLOCKS
# where it puts two or more.
_FOLD_MAX_SPLITS = 4
_FOLD_MIN_KEYS_PER_SPLIT = 4096
_FOLD_MIN_PAGE_SIZE = 64
_FOLD_MIN_PAGE_SIZE_TWO_BLOCKS = 16
# Where two new rows may share a slot (cache_batch_idx, block_table), each
# of the append kernel's rows compares its slot with every later row's: up
# to this many rows in all; beyond, the append runs in JAX (a sort).
APPEND_KERNEL_MAX_CHECKED_ROWS = 1024
# The append kernel's rows and row widths stay below this (csrc/host/kvcache.cc).
_APPEND_KERNEL_MAX_SIZE = 1 << 29
# Its launch: a block per (new row, K/V head) and per (q row, head) with rotary.
_APPEND_KERNEL_MAX_BLOCKS = 1 << 31


def _setting(name: str, values: dict[str, Any]) -> Any:
    """What environment variable `name` selects among `values` (keyed by
    the variable's text, "" for unset).

    Raises:
      ValueError: any other text (a misspelt switch must not silently pick
        a path).
    """
    value = os.environ.get(name, "")
    if value not in values:
        expected = ", ".join(repr(v) for v in values if v) + " or unset"
        raise ValueError(f"environment variable {name}: expected {expected}, got {value!r}")
    return values[value]


def _switch(name: str, default: bool) -> bool:
    return _setting(name, {"": default, "1": True, "0": False})


def enabled() -> bool:
    """Whether kv-cache calls may run on the decode kernels: ENV_VAR "1" yes,
    "0" no, unset DEFAULT."""
    return _switch(ENV_VAR, DEFAULT)


def append_enabled() -> bool:
    """Whether appends may run on the append kernel: APPEND_ENV_VAR "1" yes,
    "0" no, unset APPEND_DEFAULT."""
    return _switch(APPEND_ENV_VAR, APPEND_DEFAULT)


class Switches(NamedTuple):
    """The kernel switches of a kv-cache call, read once when the call is
    traced (`switches()`) and carried with it: under a mesh the call's
    shards are traced again when XLA partitions it, and must take the same
    path."""

    append: bool  # the append kernel (append_enabled)
    fold: str  # fold_mode()


def fold_mode() -> str:
    """FOLD_ENV_VAR as a mode: unset "auto", "1" "always", "0" "never"."""
    return _setting(FOLD_ENV_VAR, {"": "auto", "1": "always", "0": "never"})


def switches() -> Switches:
    """The switches as the environment sets them now."""
    enabled()  # not carried (it picks the backend), but checked on every platform
    return Switches(append=append_enabled(), fold=fold_mode())


def fold_factor(spec: KVCacheSpec, compiled: tuple[int, ...] | None = None,
                mode: str | None = None) -> int:
    """K/V heads the decode kernel reads as one (1: none): 128 / head_dim
    where `mode` (Switches.fold; the environment's when None) lets the head
    dim fold (FOLD_HEAD_DIMS "always", FOLD_AUTO_HEAD_DIMS "auto"), the K/V
    heads divide by it, the folded query rows (fold x query heads per K/V
    head x seqlen_q) still fit the narrow tile (beyond it the extra columns
    cost MMA work where the kernel is no longer bound by its reads), and a
    d=128 kernel is compiled (`compiled`: the build's head dims, asked when
    None)."""
    mode = fold_mode() if mode is None else mode
    dims = {"always": FOLD_HEAD_DIMS, "auto": FOLD_AUTO_HEAD_DIMS}.get(mode, ())
    if spec.head_dim not in dims:
        return 1
    fold = _FOLD_DIM // spec.head_dim
    rows = fold * spec.nheads // spec.nheads_k * spec.seqlen_q
    if spec.nheads_k % fold or rows > _NARROW_ROWS:
        return 1
    if _FOLD_DIM not in (extension.compiled_head_dims() if compiled is None else compiled):
        return 1
    return fold


def fold_spec(spec: KVCacheSpec, fold: int) -> KVCacheSpec:
    """The spec the kernel sees: fold K/V heads as one, head dim x fold."""
    if fold == 1:
        return spec
    return dataclasses.replace(spec, nheads_k=spec.nheads_k // fold,
                               head_dim=spec.head_dim * fold)


def fold_q(q, fold: int, nheads_k: int):
    """(b, s, nheads, d) -> (b, s, nheads, fold * d): query head i of K/V
    head k keeps its values in column block k % fold, zeros elsewhere."""
    if fold == 1:
        return q
    b, s, nheads, d = q.shape
    x = q.reshape(b, s, nheads_k // fold, fold, nheads // nheads_k, 1, d)
    # (fold, 1, fold, 1): k % fold == block. Traced, not a NumPy constant:
    # the kernel call's custom_partitioning body may close over none.
    iota = lambda axis: jax.lax.broadcasted_iota(jnp.int32, (fold, 1, fold, 1), axis)
    own = iota(0) == iota(2)
    return jnp.where(own, x, jnp.zeros((), q.dtype)).reshape(b, s, nheads, fold * d)


def fold_cache(cache, fold: int):
    """(rows, slots, nheads_k, d) -> (rows, slots, nheads_k / fold, fold * d), a reshape."""
    if fold == 1:
        return cache
    rows, slots, nheads_k, d = cache.shape
    return cache.reshape(rows, slots, nheads_k // fold, fold * d)


def unfold_out(out, fold: int, nheads_k: int):
    """(b, s, nheads, fold * d) -> (b, s, nheads, d): each head's own block."""
    if fold == 1:
        return out
    b, s, nheads, width = out.shape
    d = width // fold
    x = out.reshape(b, s, nheads_k // fold, fold, nheads // nheads_k, fold, d)
    x = jnp.diagonal(x, axis1=3, axis2=5)  # (b, s, nheads_k / fold, group, d, fold)
    return jnp.moveaxis(x, -1, 3).reshape(b, s, nheads, d)


def kernel_spec_and_fold(spec: KVCacheSpec, compiled: tuple[int, ...] | None = None,
                         plan_of=None, mode: str | None = None) -> tuple[KVCacheSpec, int]:
    """The spec the decode kernel runs and its fold factor (fold_factor).

    A folded call, paged or not, splits as the plan (`plan_of`, by default
    `plan.kvcache_plan` on the current device) splits the folded problem
    (fewer K/V heads on the d=128 tile) on a contiguous cache. On pages of
    64 and 256 keys that beats the unfolded call (notes, entry 50). In mode
    "auto" a call with more than _FOLD_MAX_SPLITS splits per block the plan
    puts on an SM (batch 1, or few sequences of long caches), splits of
    fewer than _FOLD_MIN_KEYS_PER_SPLIT keys, or pages of fewer than
    _FOLD_MIN_PAGE_SIZE keys does not fold: the folded blocks are too few,
    too short or too scattered to beat the unfolded call (notes, entries
    45, 47, 50). The bound on splits scales with the blocks an SM holds
    (one on an H100, where it was fitted; two on an H200, where the plan
    gives the same shapes twice the splits: entry 57). With two blocks an
    SM, pages from _FOLD_MIN_PAGE_SIZE_TWO_BLOCKS keys fold too: on an H200
    pages of 16 read 1.2x faster folded, where an H100 lost 8% (entries
    55, 58)."""
    mode = fold_mode() if mode is None else mode
    fold = fold_factor(spec, compiled, mode)
    if fold == 1:
        return spec, 1
    folded = fold_spec(spec, fold)
    plan = (plan_of or plan_lib.kvcache_plan)(dataclasses.replace(folded, paged=False, page_size=0))
    splits = plan.num_splits
    min_page = _FOLD_MIN_PAGE_SIZE if plan.blocks_per_sm < 2 else _FOLD_MIN_PAGE_SIZE_TWO_BLOCKS
    if mode == "auto" and (splits > _FOLD_MAX_SPLITS * plan.blocks_per_sm
                           or spec.seqlen_cache < splits * _FOLD_MIN_KEYS_PER_SPLIT
                           or 0 < spec.page_size < min_page):
        return spec, 1
    return dataclasses.replace(folded, num_splits=splits), fold


def append_in_kernel(spec: KVCacheSpec, on: bool | None = None) -> bool:
    """Whether spec's append runs on the append kernel (else in JAX): the
    switch is on (`on`, Switches.append; the environment's when None), there
    is something to write, the head dim needs no padding (padded caches are
    copies anyway), the sizes fit the kernel's int offsets and grid, and the
    duplicate-slot check is small."""
    if on is None:
        on = append_enabled()
    if not (spec.append and spec.batch and on):
        return False
    rows = spec.batch * spec.seqlen_new
    if spec.head_dim % 8 or max(rows, spec.batch * spec.seqlen_q,
                                spec.nheads * spec.head_dim) >= _APPEND_KERNEL_MAX_SIZE:
        return False
    blocks = rows * spec.nheads_k + (spec.batch * spec.seqlen_q * spec.nheads
                                     if spec.rotary_dim else 0)
    if blocks >= _APPEND_KERNEL_MAX_BLOCKS:
        return False
    return not (spec.paged or spec.has_batch_idx) or rows <= APPEND_KERNEL_MAX_CHECKED_ROWS


def _append_kernel(spec: KVCacheSpec, xs, operands: KVCacheOperands):
    """(q, k_cache, v_cache) after the append kernel: q rotated, the caches
    written in place (aliased through the call)."""
    q, k_cache, v_cache, k, v = xs
    rotary = spec.rotary_dim > 0
    out_types = (
        jax.ShapeDtypeStruct(q.shape if rotary else (0,), q.dtype),
        jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
        jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
    )
    q_out, k_cache, v_cache = jax.ffi.ffi_call(
        "jax_flash_kvcache_append", out_types, input_output_aliases={3: 1, 4: 2})(
        q, k, v, k_cache, v_cache, operands.cache_seqlens, operands.cache_batch_idx,
        operands.cache_leftpad, operands.block_table, operands.rotary_cos,
        operands.rotary_sin, paged=bool(spec.paged),
        rotary_interleaved=bool(spec.rotary_interleaved),
        rotary_q_per_row=bool(spec.rotary_q_per_row))
    return (q_out if rotary else q), k_cache, v_cache


def _pad_head_dim(kernel_dim: int, *xs):
    """Zero-pads the last dim to kernel_dim (a multiple of 8): zero columns
    add nothing to q.k and give zero output columns. For the caches this is
    a copy of the whole cache: head dims that are not a multiple of 8 work,
    but slowly."""
    return tuple(
        jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, kernel_dim - x.shape[-1])])
        if kernel_dim != x.shape[-1] else x
        for x in xs
    )


def forward(spec: KVCacheSpec, xs, operands: KVCacheOperands, switched: Switches):
    """(out, lse, k_cache, v_cache) of one shard, like the reference backend:
    xs = (q, k_cache, v_cache, k, v), k/v None without an append."""
    if append_in_kernel(spec, switched.append):
        q, k_cache, v_cache = _append_kernel(spec, tuple(jnp.asarray(x) for x in xs), operands)
    else:
        q, k_cache, v_cache = kvcache_ref.update(spec, xs, operands)
    kernel_spec, fold = kernel_spec_and_fold(spec, mode=switched.fold)
    plan = plan_lib.kvcache_plan(kernel_spec)
    q_in, k_in, v_in = _pad_head_dim(
        plan.head_dim_padded, fold_q(q, fold, spec.nheads_k), fold_cache(k_cache, fold),
        fold_cache(v_cache, fold))
    out_types = (
        jax.ShapeDtypeStruct(q_in.shape, q_in.dtype),  # out
        jax.ShapeDtypeStruct((spec.batch, spec.nheads, spec.seqlen_q), jnp.float32),  # lse
        # Split scratch, allocated by XLA and dropped here.
        jax.ShapeDtypeStruct(plan.out_accum_shape, jnp.float32),
        jax.ShapeDtypeStruct(plan.lse_accum_shape, jnp.float32),
    )
    out, lse, _, _ = jax.ffi.ffi_call("jax_flash_kvcache_fwd", out_types)(
        q_in, k_in, v_in, operands.cache_seqlens, operands.cache_batch_idx,
        operands.cache_leftpad, operands.block_table, operands.alibi,
        softmax_scale=np.float32(spec.softmax_scale),
        window_left=np.int32(spec.window_left),
        window_right=np.int32(spec.window_right),
        softcap=np.float32(spec.softcap),
        seqlen_new=np.int32(spec.seqlen_new),
        paged=bool(spec.paged),
    )
    out = unfold_out(out[..., :kernel_spec.head_dim], fold, spec.nheads_k)
    return out, lse, k_cache, v_cache
