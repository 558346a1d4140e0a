"""`flash_attn_with_kvcache`, described once: `bind` turns the public
function's arguments into a `KVCacheSpec` (static, validated, canonical,
hashable) and `KVCacheOperands` (the integer tables and rotary tables).

Sizes: ``seqlen_cache`` is the logical length of one sequence's cache (the
contiguous cache's dim 1; paged: ``max_blocks_per_seq * page_size``) and
``seqlen_new`` the rows of the new ``k``/``v`` (0 without them).

Inconsistent values are clamped, never read or written outside a buffer (the
reference implements these rules, `_src/kvcache_ref.py`):

* ``cache_seqlens[b]`` is clamped into ``[0, seqlen_cache - seqlen_new]``, so
  every write of the new rows lands inside the cache;
* ``cache_leftpad[b]`` into ``[0, cache_seqlens[b]]`` (after that clamp);
* ``cache_batch_idx[b]`` into ``[0, batch_cache - 1]``;
* ``block_table`` entries into ``[0, num_blocks - 1]``;
* rotary positions into ``[0, seqlen_ro - 1]``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash._src import validate
from jax_flash._src.validate import shape_str


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    """The static description of one `flash_attn_with_kvcache` call.

    Options are canonical as in `AttentionSpec`: causal is folded in as
    window_right = 0, a window side that can never bind is -1 (left >=
    seqlen_cache, right >= seqlen_q), softcap 0 is off.
    """

    batch: int
    seqlen_q: int
    nheads: int
    nheads_k: int
    head_dim: int
    dtype: str
    seqlen_cache: int  # logical positions per sequence
    batch_cache: int  # contiguous: rows of the cache; paged: num_blocks
    softmax_scale: float
    layout: str = "kvcache"
    paged: bool = False
    page_size: int = 0  # paged only
    seqlen_new: int = 0  # rows of k/v appended (0: none)
    rotary_dim: int = 0  # 0: no rotary
    rotary_interleaved: bool = True
    # q's rotary positions: one per row (causal or local, FlashAttention-2's
    # rule) or cache_seqlens[b] for every row.
    rotary_q_per_row: bool = False
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    has_alibi: bool = False
    has_batch_idx: bool = False
    has_leftpad: bool = False
    num_splits: int = 0
    return_lse: bool = False

    @property
    def append(self) -> bool:
        return self.seqlen_new > 0

    @property
    def window(self) -> tuple[int, int]:
        return self.window_left, self.window_right


class KVCacheOperands(NamedTuple):
    """Array operands besides q, the caches and k/v; empty arrays when off."""

    cache_seqlens: jax.Array  # int32 (batch,), as given (clamped where used)
    cache_batch_idx: jax.Array  # int32 (batch,)
    cache_leftpad: jax.Array  # int32 (batch,)
    block_table: jax.Array  # int32 (batch, max_blocks_per_seq)
    rotary_cos: jax.Array  # (seqlen_ro, rotary_dim / 2), q's dtype
    rotary_sin: jax.Array
    alibi: jax.Array  # float32 (batch, nheads), a constant (stop_gradient)


def _array(name: str, x, expected: str):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be {expected}, got {type(x).__name__}")


def _int32(name: str, x, shape: tuple, shape_desc: str):
    """An int32 array of exactly `shape`, or None."""
    if x is None:
        return None
    _array(name, x, f"an int32 array of shape {shape_desc}")
    if x.dtype != jnp.int32:
        raise TypeError(f"{name} must be int32, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_desc} = {shape}, got {shape_str(x)}")
    return x


def _rank4(name: str, x, layout: str, dtype) -> None:
    _array(name, x, f"a JAX array {layout}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have rank 4 {layout}, got shape {shape_str(x)}")
    if dtype is None:
        if x.dtype not in validate.SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16 or bfloat16, got {x.dtype}")
    elif x.dtype != dtype:
        raise TypeError(f"{name} must have q's dtype {dtype}, got {x.dtype}")


def _caches(q, k_cache, v_cache, block_table, names=("k_cache", "v_cache")):
    """(batch_cache, seqlen_cache, page_size) after checking the caches;
    `names` are the caller's argument names for them."""
    batch, _, nheads, head_dim = q.shape
    k_name, v_name = names
    paged = block_table is not None
    layout = ("(num_blocks, page_size, nheads_k, headdim)" if paged
              else "(batch_cache, seqlen_cache, nheads_k, headdim)")
    for name, x in ((k_name, k_cache), (v_name, v_cache)):
        _rank4(name, x, layout, q.dtype)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{k_name} and {v_name} must have the same shape {layout}, got "
                         f"{k_name} {shape_str(k_cache)} and {v_name} {shape_str(v_cache)}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"{k_name} must have headdim {head_dim} like q, "
                         f"got {k_name} {shape_str(k_cache)}")
    nheads_k = k_cache.shape[2]
    if nheads < 1:
        raise ValueError(f"q must have nheads >= 1, got q {shape_str(q)}")
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(
            f"nheads of q ({nheads}) must be a multiple of nheads of {k_name}/{v_name} "
            f"({nheads_k})")
    if not paged:
        return k_cache.shape[0], k_cache.shape[1], 0
    _array("block_table", block_table, "an int32 array (batch, max_blocks_per_seq)")
    if block_table.dtype != jnp.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.ndim != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must have shape (batch, max_blocks_per_seq) with batch "
                         f"{batch}, got {shape_str(block_table)}")
    num_blocks, page_size = k_cache.shape[:2]
    if num_blocks < 1 or page_size < 1:
        raise ValueError(f"{k_name} must have num_blocks >= 1 and page_size >= 1 when paged "
                         f"(num_blocks, page_size, nheads_k, headdim), got {shape_str(k_cache)}")
    return num_blocks, block_table.shape[1] * page_size, page_size


def _new_kv(q, k_cache, k, v) -> int:
    """seqlen_new after checking k and v (0 when both are None)."""
    if (k is None) != (v is None):
        raise ValueError(f"k and v must be given together, got k={'set' if k is not None else None}"
                         f", v={'set' if v is not None else None}")
    if k is None:
        return 0
    layout = "(batch, seqlen_new, nheads_k, headdim)"
    for name, x in (("k", k), ("v", v)):
        _rank4(name, x, layout, q.dtype)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {layout}, got k {shape_str(k)} and "
                         f"v {shape_str(v)}")
    expected = (q.shape[0], k.shape[1], k_cache.shape[2], k_cache.shape[3])
    if k.shape != expected:
        raise ValueError(f"k must have shape {layout} = {expected} (batch from q, nheads_k and "
                         f"headdim from k_cache), got {shape_str(k)}")
    if k.shape[1] < 1:  # nothing to append: pass k=None, v=None
        raise ValueError(f"k and v must have seqlen_new >= 1 when given, got k {shape_str(k)}")
    return k.shape[1]


def _rotary(q, rotary_cos, rotary_sin, head_dim: int, seqlen_cache: int, append: bool) -> int:
    """rotary_dim (0: off) after checking the tables."""
    if rotary_cos is None and rotary_sin is None:
        return 0
    if rotary_cos is None or rotary_sin is None:
        raise ValueError(
            "rotary_cos and rotary_sin must be given together, got "
            f"rotary_cos={'set' if rotary_cos is not None else None}, "
            f"rotary_sin={'set' if rotary_sin is not None else None}")
    if not append:
        raise ValueError("rotary_cos/rotary_sin need the new k and v (rotary is applied to the "
                         "appended keys, as in FlashAttention-2), got k=None")
    layout = "(seqlen_ro, rotary_dim / 2)"
    for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        _array(name, x, f"a JAX array {layout}")
        if x.ndim != 2:
            raise ValueError(f"{name} must have rank 2 {layout}, got shape {shape_str(x)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    if rotary_cos.shape != rotary_sin.shape:
        raise ValueError(f"rotary_cos and rotary_sin must have the same shape {layout}, got "
                         f"rotary_cos {shape_str(rotary_cos)} and rotary_sin "
                         f"{shape_str(rotary_sin)}")
    seqlen_ro, half = rotary_cos.shape
    rotary_dim = 2 * half
    if rotary_dim == 0 or rotary_dim % 16 != 0 or rotary_dim > head_dim:
        raise ValueError(
            f"rotary_dim = 2 * rotary_cos.shape[1] must be a multiple of 16 in [16, headdim="
            f"{head_dim}], got {rotary_dim} (rotary_cos {shape_str(rotary_cos)})")
    if seqlen_ro < seqlen_cache:
        raise ValueError(f"rotary_cos/rotary_sin must have seqlen_ro >= seqlen_cache "
                         f"({seqlen_cache}), got {shape_str(rotary_cos)}")
    return rotary_dim


def _cache_seqlens(cache_seqlens, batch: int, seqlen_cache: int, seqlen_new: int):
    """int32 (batch,): None is the whole cache, a Python int every sequence's."""
    if cache_seqlens is None:
        if seqlen_new:
            raise ValueError("cache_seqlens must be given when k/v are (where to write them), "
                             "got None")
        return jnp.full((batch,), seqlen_cache, jnp.int32)
    if isinstance(cache_seqlens, (int, np.integer)) and not isinstance(
            cache_seqlens, (bool, np.bool_)):
        # Clamped here already: a Python int may exceed int32.
        value = min(max(int(cache_seqlens), 0), seqlen_cache - seqlen_new)
        return jnp.full((batch,), value, jnp.int32)
    _array("cache_seqlens", cache_seqlens, f"an int or an int32 array of shape ({batch},)")
    if cache_seqlens.dtype != jnp.int32:
        raise TypeError(f"cache_seqlens must be an int or int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) not in ((), (batch,)):
        raise ValueError(f"cache_seqlens must have shape (batch,) = ({batch},), got "
                         f"{shape_str(cache_seqlens)}")
    return jnp.broadcast_to(cache_seqlens, (batch,))


def bind(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
         cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
         softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
         rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
         cache_names=("k_cache", "v_cache")):
    """The public function's arguments -> (spec, operands), validating all;
    `cache_names` name the caches in messages (flash_attn_varlen_func's k, v).

    Raises:
      TypeError, ValueError: naming the argument, the expected and the actual.
    """
    _rank4("q", q, "(batch, seqlen_q, nheads, headdim)", None)
    batch, seqlen_q, nheads, head_dim = q.shape
    if head_dim > validate.MAX_HEAD_DIM or head_dim < 1:
        raise ValueError(f"headdim must be in [1, {validate.MAX_HEAD_DIM}], got {head_dim}")
    batch_cache, seqlen_cache, page_size = _caches(q, k_cache, v_cache, block_table,
                                                    cache_names)
    paged = block_table is not None
    seqlen_new = _new_kv(q, k_cache, k, v)
    if seqlen_new > seqlen_cache:
        raise ValueError(f"k must have seqlen_new <= seqlen_cache ({seqlen_cache}), got k "
                         f"{shape_str(k)}")
    if paged and cache_batch_idx is not None:
        raise ValueError("cache_batch_idx must be None with block_table (a paged cache is "
                         "indexed by block_table), got an array")
    if paged and cache_leftpad is not None:
        raise ValueError("cache_leftpad must be None with block_table (left padding needs a "
                         "contiguous cache), got an array")
    batch_idx = _int32("cache_batch_idx", cache_batch_idx, (batch,), "(batch,)")
    if batch_idx is None and not paged and batch_cache != batch:
        raise ValueError(f"k_cache must have batch {batch} like q without cache_batch_idx, got "
                         f"k_cache {shape_str(k_cache)}")
    if batch_idx is not None and batch_cache < 1:
        raise ValueError(f"k_cache must have batch_cache >= 1, got {shape_str(k_cache)}")
    leftpad = _int32("cache_leftpad", cache_leftpad, (batch,), "(batch,)")
    seqlens = _cache_seqlens(cache_seqlens, batch, seqlen_cache, seqlen_new)
    rotary_dim = _rotary(q, rotary_cos, rotary_sin, head_dim, seqlen_cache, seqlen_new > 0)
    interleaved = validate.static_bool("rotary_interleaved", rotary_interleaved)
    left, right = validate.window(window_size, causal)
    # FlashAttention-2's rule for q's rotary positions: one per row when
    # causal or a window (an entry < seqlen_cache) is set.
    per_row = any(0 <= w < seqlen_cache for w in (left, right))
    # A query sits at most seqlen_cache - 1 positions right of a visible key
    # and at most seqlen_q - 1 left of one: wider windows never bind.
    left = -1 if left >= max(seqlen_cache, 1) else left
    right = -1 if right >= max(seqlen_q, 1) else right
    scale = validate.softmax_scale(softmax_scale, head_dim)
    cap = validate.softcap(softcap, scale)
    alibi = validate.alibi(alibi_slopes, batch, nheads)
    splits = validate.static_int("num_splits", num_splits)
    if splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0: automatic), got {num_splits!r}")
    spec = KVCacheSpec(
        batch=batch, seqlen_q=seqlen_q, nheads=nheads, nheads_k=k_cache.shape[2],
        head_dim=head_dim, dtype=str(q.dtype), seqlen_cache=seqlen_cache,
        batch_cache=batch_cache, softmax_scale=scale, paged=paged, page_size=page_size,
        seqlen_new=seqlen_new, rotary_dim=rotary_dim,
        rotary_interleaved=interleaved if rotary_dim else True,
        rotary_q_per_row=per_row if rotary_dim else False,
        window_left=left, window_right=right, softcap=cap, has_alibi=alibi is not None,
        has_batch_idx=batch_idx is not None, has_leftpad=leftpad is not None,
        num_splits=splits,
        return_lse=validate.static_bool("return_softmax_lse", return_softmax_lse),
    )

    def operand(x, dtype):
        return jnp.zeros((0,), dtype) if x is None else x

    operands = KVCacheOperands(
        cache_seqlens=seqlens, cache_batch_idx=operand(batch_idx, jnp.int32),
        cache_leftpad=operand(leftpad, jnp.int32), block_table=operand(block_table, jnp.int32),
        rotary_cos=operand(rotary_cos if rotary_dim else None, q.dtype),
        rotary_sin=operand(rotary_sin if rotary_dim else None, q.dtype),
        alibi=operand(None if alibi is None else jax.lax.stop_gradient(alibi), jnp.float32),
    )
    return spec, operands
