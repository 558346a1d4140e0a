"""Flax layers on FlashAttention-2: NNX modules and an `attention_fn` for
Flax's own attention modules. Flax is optional: `import jax_flash.flax`.

* `MultiHeadAttention`: NNX self-attention with parameters (fused qkv and
  output projections), rotary and a KV cache for decoding.
* `attention_fn`: the `attention_fn` of `flax.nnx.MultiHeadAttention` and
  `flax.linen.MultiHeadDotProductAttention`.
* `FlashSelfAttention`, `FlashCrossAttention`: FlashAttention-2's
  `flash_attn.modules.mha` layers as NNX modules without parameters.

The last three are defined in `jax_flash._src.flax_modules`; import them
from here.

| | `MultiHeadAttention` | `attention_fn` | `FlashSelf/CrossAttention` |
|---|---|---|---|
| runs | `flash_attn_{qkv,kv}packed_func` | `jax_flash.attention` | `flash_attn_{,varlen_}` |
| | `flash_attn_with_kvcache`, | | `{qkv,kv}packed_func` |
| | paged `flash_attn_varlen_func` | | |
| MHA / GQA / MQA | yes | yes | yes |
| causal | `causal` | `is_causal` | `causal` |
| local window | `sliding_window` | XLA (a mask) | `window_size` |
| soft cap | `logits_soft_cap` | - | - |
| ALiBi | - | - | `alibi_slopes` |
| dropout | `dropout_rate` | `dropout_rate` | `attention_dropout` |
| documents | `segment_ids` | XLA (a mask) | varlen `cu_seqlens` |
| padding | `padding_mask` | XLA (a mask) | varlen `cu_seqlens` |
| rotary | `rope_theta` (NeoX) | - | - |
| KV cache | `init_cache`, `decode`, | - | - |
| | varlen prefill `lengths` | | |
| `mask`, `bias` | - | XLA, one-time warning | - |
| `sow_weights` | - | Flax's function, warned | - |
| float32 | parameters; compute | cast to `kernel_dtype` | TypeError |
| | in `dtype` (16-bit) | (bfloat16) | |

Conventions shared by the layers:

* Kernel dtype: the kernels take float16 / bfloat16 only. `MultiHeadAttention`
  computes in `dtype` (bfloat16 by default) with parameters in `param_dtype`
  (float32 by default); `attention_fn` casts float32 inputs to its
  `kernel_dtype` (bfloat16) and its output back.
* Dropout (`dropout_rate`, `attention_dropout`) is the kernels' own: a Philox
  mask drawn independently for every batch element and head from a key of an
  `nnx.Rngs` stream (`rngs.dropout()`; the Rngs given at construction unless
  one is given to the call). It is on unless `deterministic` is True; the
  `deterministic` attribute is what `model.eval()` / `model.train()` and
  `nnx.view(model, deterministic=...)` set, a call's `deterministic` argument
  wins over it. The same key gives the same output.
* Masked rows: a query that sees no key (a padded row, a segment without
  keys) gets attention output 0.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_flash._src import validate
from jax_flash._src.flax_modules import (FlashCrossAttention, FlashSelfAttention, attention_fn,
                                         check_half_dtype, check_rate, dropout_key, fork_dropout)
from jax_flash.flash_attn import flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from jax_flash.kvcache import flash_attn_with_kvcache
from jax_flash.padding import pad_input, unpad_input
from jax_flash.varlen import flash_attn_varlen_func

__all__ = ["FlashCrossAttention", "FlashSelfAttention", "MultiHeadAttention", "apply_rope",
           "attention_fn"]


def _positive_int(name: str, value, minimum: int = 1) -> int:
    value = validate.static_int(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _token_array(name: str, x, shape, kind: str, layout: str = "(batch, seqlen)"):
    """An integer (kind "an integer") or bool (kind "a bool") array of exactly
    shape (named layout in the message)."""
    if x is None:
        return None
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be {kind} array of shape {shape}, got "
                        f"{type(x).__name__}")
    ok = x.dtype == jnp.bool_ if kind == "a bool" else jnp.issubdtype(x.dtype, jnp.integer)
    if not ok:
        raise TypeError(f"{name} must be {kind} array of shape {shape}, got dtype {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape}, got "
                         f"{tuple(x.shape)}")
    return x


def apply_rope(x, positions, theta: float):
    """Rotary embedding, GPT-NeoX / Hugging Face Llama style (half-split).

    Dims [0, d/2) and [d/2, d) form the pairs: (x1, x2) at position p becomes
    (x1 cos - x2 sin, x2 cos + x1 sin) with angle p * theta^(-2i/d) for pair i.

    Args:
      x: (batch, seqlen, nheads, d), d even.
      positions: integer (batch, seqlen).
      theta: the base, > 0.

    Returns:
      x rotated, computed in float32, in x's dtype.
    """
    half = x.shape[-1] // 2
    inv_freq = jnp.asarray(theta ** (-np.arange(half, dtype=np.float64) * 2 / x.shape[-1]),
                           jnp.float32)
    angle = positions.astype(jnp.float32)[..., None, None] * inv_freq  # (b, s, 1, half)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class MultiHeadAttention(nnx.Module):
    """Self-attention on FlashAttention-2 (NNX): fused qkv projection,
    rotary, the kernels, output projection; KV-cache decoding.

    Parameters: `qkv` (nnx.LinearGeneral, kernel (in_features, num_heads + 2 *
    num_kv_heads, head_dim): query heads, then key heads, then value heads)
    and `out` (kernel (num_heads, head_dim, out_features)). With num_kv_heads
    == num_heads the projection reshapes for free to the packed (batch,
    seqlen, 3, nheads, head_dim) array of `flash_attn_qkvpacked_func`, whose
    backward writes one dqkv; with GQA/MQA q and the packed kv go to
    `flash_attn_kvpacked_func`.

    Masking, with i the query's and j the key's index in the sequence:

    * causal: j <= i. sliding_window=w (needs causal): i - w <= j <= i, that
      is the query itself and its w previous keys (kernel window_size=(w, 0)).
    * segment_ids (batch, seqlen): a query sees only keys of its own segment
      (the kernels get segment_ids=(ids, ids)); causal and window still count
      the indices i and j of the whole sequence.
    * padding_mask (batch, seqlen) bool, True = a real token: padded tokens
      are never attended to, and the output at padded rows is 0. Any pattern
      (left or right padding) works. Padding becomes a segment id one and two
      above the largest id of the batch, so segment ids must stay below
      int max - 2 of their dtype.
    * rotary (rope_theta set): `apply_rope`, GPT-NeoX half-split over the whole
      head_dim, at `positions` (default 0 .. seqlen - 1; give segment-relative
      positions for packed documents if the model was trained that way).
      Decoding rotates at the cached positions in the same function, so
      prefill-then-decode equals one forward over the whole sequence.

    Decoding: `init_cache(batch, max_len, page_size)`, then calls with
    decode=True take x (batch, n_new, in_features), rotate the new rows at
    positions cache_seqlens .. cache_seqlens + n_new - 1 and append them
    through `flash_attn_with_kvcache` (causal and window as the module's,
    bottom-right aligned: new row i is position cache_seqlens + i), then
    advance cache_seqlens by n_new. No dropout when decoding. Overflow is not
    an error (cache_seqlens may be traced): as `flash_attn_with_kvcache`
    clamps the write position into [0, capacity - n_new], the rows land at
    the end of the cache, overwriting the last ones, and cache_seqlens
    saturates at the capacity (max_len rounded up to whole pages).

    Prefill of prompts of different lengths (varlen): decode=True with
    lengths (batch,) takes x right-padded, the first lengths[b] rows of x[b]
    being sequence b's new tokens. They are rotated at positions
    cache_seqlens[b] + t, written into sequence b's cache rows (its pages; a
    contiguous cache counts as one page of max_len rows per sequence) and
    attend to its cache in one `flash_attn_varlen_func` call: the real rows
    packed (cu_seqlens_q the prefix sums of lengths), block_table, seqused_k
    = cache_seqlens + lengths, aligned bottom-right as above. cache_seqlens
    advances by lengths. Padded rows are not written and output 0. Lengths
    may be traced, so they are clamped, not checked: into [0, seqlen], and
    sequence b's write position into [0, capacity - lengths[b]] (overflow as
    above, per sequence).

    Args:
      num_heads: query heads.
      in_features: features of x.
      num_kv_heads: key/value heads (GQA/MQA), dividing num_heads; default
        num_heads.
      head_dim: in [1, 256]; default in_features // num_heads.
      out_features: default in_features.
      causal: causal masking.
      sliding_window: None or an int >= 0 (needs causal).
      logits_soft_cap: None or a float > 0: scores s become cap * tanh(s / cap).
      softmax_scale: default 1 / sqrt(head_dim).
      rope_theta: None (no rotary) or the rotary base (e.g. 10000.0).
      dropout_rate: attention dropout in [0, 1).
      deterministic: no dropout when True (module attribute, see the module
        docstring).
      use_bias: biases in both projections.
      dtype: the compute dtype, float16 or bfloat16.
      param_dtype: the parameters' dtype.
      kernel_init, bias_init: initializers of both projections.
      rngs: nnx.Rngs: `params` initializes, the `dropout` stream is kept for
        dropout.

    Raises:
      TypeError, ValueError: naming the argument, the expected and the actual.
    """

    def __init__(self, num_heads: int, in_features: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, out_features: int | None = None,
                 causal: bool = False, sliding_window: int | None = None,
                 logits_soft_cap: float | None = None, softmax_scale: float | None = None,
                 rope_theta: float | None = None, dropout_rate: float = 0.0,
                 deterministic: bool = False, use_bias: bool = True, dtype=jnp.bfloat16,
                 param_dtype=jnp.float32, kernel_init=nnx.initializers.lecun_normal(),
                 bias_init=nnx.initializers.zeros_init(), rngs: nnx.Rngs):
        self.num_heads = _positive_int("num_heads", num_heads)
        self.in_features = _positive_int("in_features", in_features)
        self.num_kv_heads = self.num_heads if num_kv_heads is None else \
            _positive_int("num_kv_heads", num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads must be a multiple of num_kv_heads, got num_heads="
                             f"{self.num_heads} and num_kv_heads={self.num_kv_heads}")
        if head_dim is None and self.in_features % self.num_heads:
            raise ValueError(f"head_dim: expected an int when in_features ({self.in_features}) "
                             f"is not a multiple of num_heads ({self.num_heads}), got None")
        self.head_dim = self.in_features // self.num_heads if head_dim is None else \
            _positive_int("head_dim", head_dim)
        if self.head_dim > validate.MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be in [1, {validate.MAX_HEAD_DIM}], got "
                             f"{self.head_dim}")
        self.out_features = self.in_features if out_features is None else \
            _positive_int("out_features", out_features)
        self.causal = validate.static_bool("causal", causal)
        if sliding_window is not None:
            sliding_window = _positive_int("sliding_window", sliding_window, minimum=0)
            if not self.causal:
                raise ValueError(f"sliding_window needs causal=True (the window is (w, 0): "
                                 f"each query sees its w previous keys), got causal=False "
                                 f"with sliding_window={sliding_window}")
        self.sliding_window = sliding_window
        if logits_soft_cap is not None:
            cap = validate.static_float("logits_soft_cap", logits_soft_cap, "None or a float > 0")
            if not (math.isfinite(cap) and cap > 0):
                raise ValueError(f"logits_soft_cap must be None or a finite float > 0, got "
                                 f"{logits_soft_cap!r}")
        self.logits_soft_cap = logits_soft_cap
        self.softmax_scale = validate.softmax_scale(softmax_scale, self.head_dim)
        if rope_theta is not None:
            theta = validate.static_float("rope_theta", rope_theta, "None or a float > 0")
            if not (math.isfinite(theta) and theta > 0):
                raise ValueError(f"rope_theta must be None or a finite float > 0, got "
                                 f"{rope_theta!r}")
            if self.head_dim % 2:
                raise ValueError(f"head_dim must be even with rope_theta (rotary pairs), got "
                                 f"{self.head_dim}")
        self.rope_theta = rope_theta
        self.dropout_rate = check_rate("dropout_rate", dropout_rate)
        self.deterministic = validate.static_bool("deterministic", deterministic)
        self.dtype = check_half_dtype("dtype", dtype)
        self.param_dtype = param_dtype
        heads = self.num_heads + 2 * self.num_kv_heads
        common = dict(use_bias=use_bias, dtype=self.dtype, param_dtype=param_dtype,
                      kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
        self.qkv = nnx.LinearGeneral(self.in_features, (heads, self.head_dim), **common)
        self.out = nnx.LinearGeneral((self.num_heads, self.head_dim), self.out_features,
                                     axis=(-2, -1), **common)
        self.rngs = fork_dropout(rngs, self.dropout_rate)
        self.k_cache = nnx.data(None)
        self.v_cache = nnx.data(None)
        self.cache_seqlens = nnx.data(None)
        self.block_table = nnx.data(None)

    def set_view(self, deterministic: bool | None = None):
        """`nnx.view` hook: deterministic=True turns dropout off."""
        if deterministic is not None:
            self.deterministic = deterministic

    @property
    def _window(self) -> tuple[int, int]:
        return (-1, -1) if self.sliding_window is None else (self.sliding_window, 0)

    @property
    def _softcap(self) -> float:
        return 0.0 if self.logits_soft_cap is None else float(self.logits_soft_cap)

    def init_cache(self, batch: int, max_len: int, page_size: int | None = None, dtype=None):
        """Creates the decoding state (nnx.Cache variables), empty.

        k_cache, v_cache: contiguous (batch, max_len, num_kv_heads, head_dim),
        or with page_size paged (num_blocks, page_size, num_kv_heads,
        head_dim) with num_blocks = batch * blocks_per_seq and blocks_per_seq
        = ceil(max_len / page_size); block_table int32 (batch,
        blocks_per_seq) gives sequence b pages i * batch + b (interleaved, so
        one sequence's pages are not adjacent). cache_seqlens: int32 (batch,)
        zeros.

        Args:
          batch, max_len: ints >= 1.
          page_size: None (contiguous) or an int >= 1.
          dtype: the caches' dtype, float16 or bfloat16; default the module's.
        """
        batch = _positive_int("batch", batch)
        max_len = _positive_int("max_len", max_len)
        dtype = self.dtype if dtype is None else check_half_dtype("dtype", dtype)
        tail = (self.num_kv_heads, self.head_dim)
        if page_size is None:
            shape = (batch, max_len) + tail
            self.block_table = nnx.data(None)
        else:
            page_size = _positive_int("page_size", page_size)
            blocks = -(-max_len // page_size)
            shape = (batch * blocks, page_size) + tail
            table = jnp.arange(blocks, dtype=jnp.int32)[None, :] * batch + \
                jnp.arange(batch, dtype=jnp.int32)[:, None]
            self.block_table = nnx.Cache(table)
        self.k_cache = nnx.Cache(jnp.zeros(shape, dtype))
        self.v_cache = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_seqlens = nnx.Cache(jnp.zeros((batch,), jnp.int32))

    def __call__(self, x, *, segment_ids=None, padding_mask=None, positions=None,
                 decode: bool = False, lengths=None, deterministic: bool | None = None,
                 rngs=None):
        """Self-attention of x.

        Args:
          x: (batch, seqlen, in_features).
          segment_ids: optional integer (batch, seqlen) document ids.
          padding_mask: optional bool (batch, seqlen), True = a real token.
          positions: optional integer (batch, seqlen) rotary positions.
          decode: append x to the cache and attend to it (see the class).
          lengths: optional integer (batch,), with decode=True: the real rows
            of each sequence of a right-padded x (varlen prefill, see the
            class), clamped into [0, seqlen].
          deterministic: overrides the attribute (True: no dropout).
          rngs: nnx.Rngs, RngStream or key for this call's dropout.

        Returns:
          (batch, seqlen, out_features) in `dtype`; 0 at the rows that
          padding_mask or lengths mark as padding.

        Raises:
          TypeError, ValueError: naming the argument, the expected and the
            actual (shapes, dtypes, arrays given without the option they
            need, decode=True without a cache or beyond its capacity).
        """
        if not hasattr(x, "shape") or x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (batch, seqlen, in_features={self.in_features})"
                             f", got shape {tuple(getattr(x, 'shape', ()))}")
        batch, seqlen, _ = x.shape
        segment_ids = _token_array("segment_ids", segment_ids, (batch, seqlen), "an integer")
        padding_mask = _token_array("padding_mask", padding_mask, (batch, seqlen), "a bool")
        positions = _token_array("positions", positions, (batch, seqlen), "an integer")
        lengths = _token_array("lengths", lengths, (batch,), "an integer", "(batch,)")
        if positions is not None and self.rope_theta is None:
            raise ValueError("positions are rotary positions and need rope_theta, got "
                             "rope_theta=None")
        if lengths is not None and not decode:
            raise ValueError("lengths (the rows each sequence appends to the cache) needs "
                             "decode=True, got decode=False")
        y = self.qkv(x)  # (batch, seqlen, H + 2K, head_dim): q heads, k heads, v heads
        if decode:
            given = [n for n, a in (("segment_ids", segment_ids), ("padding_mask", padding_mask),
                                    ("positions", positions)) if a is not None]
            if given:
                raise ValueError(f"{', '.join(given)} must be None with decode=True (decoding "
                                 "positions come from cache_seqlens), got an array")
            if lengths is None:
                return self.out(self._decode(y))
            o, padding_mask = self._prefill(y, lengths)
        else:
            pos = (jnp.broadcast_to(jnp.arange(seqlen, dtype=jnp.int32), (batch, seqlen))
                   if positions is None else positions)
            o = self._attend(self._rotate(y, pos), segment_ids, padding_mask, deterministic,
                             rngs)
        out = self.out(o)
        if padding_mask is not None:
            out = jnp.where(padding_mask[..., None], out, jnp.zeros((), out.dtype))
        return out

    def _rotate(self, y, pos):
        """y (batch, seqlen, H + 2K, head_dim) with its q and k heads rotated
        to pos (batch, seqlen); unchanged without rope_theta."""
        if self.rope_theta is None:
            return y
        qk = self.num_heads + self.num_kv_heads
        return jnp.concatenate([apply_rope(y[:, :, :qk], pos, self.rope_theta), y[:, :, qk:]],
                               axis=2)

    def _attend(self, y, segment_ids, padding_mask, deterministic, rngs):
        """The kernels on the rotated projections y (no cache)."""
        batch, seqlen = y.shape[:2]
        H, K = self.num_heads, self.num_kv_heads
        ids = None
        if segment_ids is not None or padding_mask is not None:
            seg = jnp.zeros((batch, seqlen), jnp.int32) if segment_ids is None else segment_ids
            if padding_mask is not None:
                # Padded keys: an id no real token has; padded queries: one no key has.
                top = jnp.max(seg)
                ids = (jnp.where(padding_mask, seg, top + 2), jnp.where(padding_mask, seg, top + 1))
            else:
                ids = (seg, seg)
        deterministic = self.deterministic if deterministic is None else deterministic
        key = dropout_key(self.rngs, rngs, self.dropout_rate, deterministic)
        opts = dict(dropout_p=self.dropout_rate if key is not None else 0.0,
                    softmax_scale=self.softmax_scale, causal=self.causal,
                    window_size=self._window, softcap=self._softcap, dropout_key=key,
                    segment_ids=ids)
        if H == K:
            return flash_attn_qkvpacked_func(y.reshape(batch, seqlen, 3, H, self.head_dim),
                                             **opts)
        kv = y[:, :, H:].reshape(batch, seqlen, 2, K, self.head_dim)
        return flash_attn_kvpacked_func(y[:, :, :H], kv, **opts)

    def _cache(self, batch: int, n_new: int):
        """(k_cache, v_cache, cache_seqlens, block_table or None, capacity)
        after checking that x's batch and n_new rows fit the cache."""
        if self.k_cache is None:
            raise ValueError("decode=True needs the cache: call init_cache(batch, max_len) "
                             "first, got no cache")
        seqlens = self.cache_seqlens[...]
        if batch != seqlens.shape[0]:
            raise ValueError(f"x must have the cache's batch {seqlens.shape[0]} with "
                             f"decode=True, got batch {batch}")
        k_cache, v_cache = self.k_cache[...], self.v_cache[...]
        table = None if self.block_table is None else self.block_table[...]
        # Logical rows per sequence: max_len, or whole pages when paged.
        capacity = k_cache.shape[1] * (1 if table is None else table.shape[1])
        if n_new > capacity:
            raise ValueError(f"x must have seqlen <= the cache's capacity {capacity} with "
                             f"decode=True, got seqlen {n_new}")
        return k_cache, v_cache, seqlens, table, capacity

    def _store(self, k_cache, v_cache, seqlens) -> None:
        self.k_cache[...] = k_cache
        self.v_cache[...] = v_cache
        self.cache_seqlens[...] = seqlens

    def _decode(self, y):
        """Attention of the new rows y (batch, n_new, H + 2K, head_dim)
        against the cache, which they are appended to."""
        batch, n_new = y.shape[:2]
        H, K = self.num_heads, self.num_kv_heads
        k_cache, v_cache, seqlens, table, capacity = self._cache(batch, n_new)
        # Where flash_attn_with_kvcache writes (it clamps the same way).
        start = jnp.clip(seqlens, 0, capacity - n_new)
        y = self._rotate(y.astype(k_cache.dtype),
                         start[:, None] + jnp.arange(n_new, dtype=jnp.int32))
        q, k, v = y[:, :, :H], y[:, :, H:H + K], y[:, :, H + K:]
        o, k_cache, v_cache = flash_attn_with_kvcache(
            q, k_cache, v_cache, k=k, v=v, cache_seqlens=start, block_table=table,
            softmax_scale=self.softmax_scale, causal=self.causal, window_size=self._window,
            softcap=self._softcap)
        self._store(k_cache, v_cache, start + n_new)
        return o.astype(self.dtype)

    def _prefill(self, y, lengths):
        """Varlen prefill: the first lengths[b] rows of y[b] (y: (batch,
        seqlen, H + 2K, head_dim)) appended to sequence b's cache and attending
        to it. Returns the attention output (batch, seqlen, H, head_dim) and
        the bool (batch, seqlen) mask of the real rows."""
        batch, seqlen = y.shape[:2]
        H, K = self.num_heads, self.num_kv_heads
        k_cache, v_cache, seqlens, table, capacity = self._cache(batch, seqlen)
        wide = jnp.promote_types(lengths.dtype, jnp.int32)  # clamp before narrowing
        lengths = jnp.clip(lengths.astype(wide), 0, seqlen).astype(jnp.int32)
        start = jnp.clip(seqlens, 0, capacity - lengths)
        t = jnp.arange(seqlen, dtype=jnp.int32)
        real = t < lengths[:, None]
        pos = start[:, None] + t  # logical cache position of each row
        y = self._rotate(y.astype(k_cache.dtype), pos)
        if table is None:  # contiguous: sequence b is page b, of max_len rows
            table = jnp.arange(batch, dtype=jnp.int32)[:, None]
        num_blocks, page_size = k_cache.shape[:2]
        # Page and row of each position (entries clamped as the kernels read
        # them); padded rows go past the cache's rows and are dropped.
        page = jnp.clip(jnp.take_along_axis(table, pos // page_size, 1, mode="clip"), 0,
                        num_blocks - 1)
        dest = jnp.where(real, page * page_size + pos % page_size, num_blocks * page_size)

        def write(cache, new):  # new: (batch, seqlen, K, head_dim)
            flat = cache.reshape(num_blocks * page_size, K, self.head_dim)
            flat = flat.at[dest.reshape(-1)].set(new.reshape(-1, K, self.head_dim), mode="drop")
            return flat.reshape(cache.shape)

        k_cache, v_cache = write(k_cache, y[:, :, H:H + K]), write(v_cache, y[:, :, H + K:])
        q, rows, cu_seqlens, _ = unpad_input(y[:, :, :H], real, total=batch * seqlen)
        o = flash_attn_varlen_func(
            q, k_cache, v_cache, cu_seqlens, None, seqlen, capacity,
            softmax_scale=self.softmax_scale, causal=self.causal, window_size=self._window,
            softcap=self._softcap, block_table=table, seqused_k=start + lengths)
        self._store(k_cache, v_cache, start + lengths)
        return pad_input(o, rows, batch, seqlen).astype(self.dtype), real
