"""Flax layers on FlashAttention-2: NNX modules and an `attention_fn` for
Flax's own attention modules. Flax is optional: `import jax_flash.flax`.

* `MultiHeadAttention`: NNX self-attention with parameters (fused qkv and
  output projections), rotary and a KV cache for decoding.
* `attention_fn`: the `attention_fn` of `flax.nnx.MultiHeadAttention` and
  `flax.linen.MultiHeadDotProductAttention`.
* `FlashSelfAttention`, `FlashCrossAttention`: FlashAttention-2's
  `flash_attn.modules.mha` layers as NNX modules without parameters.

| | `MultiHeadAttention` | `attention_fn` | `FlashSelf/CrossAttention` |
|---|---|---|---|
| runs | `flash_attn_{qkv,kv}packed_func` | `jax_flash.attention` | `flash_attn_{,varlen_}` |
| | `flash_attn_with_kvcache` | | `{qkv,kv}packed_func` |
| MHA / GQA / MQA | yes | yes | yes |
| causal | `causal` | `is_causal` | `causal` |
| local window | `sliding_window` | XLA (a mask) | `window_size` |
| soft cap | `logits_soft_cap` | - | - |
| ALiBi | - | - | `alibi_slopes` |
| dropout | `dropout_rate` | `dropout_rate` | `attention_dropout` |
| documents | `segment_ids` | XLA (a mask) | varlen `cu_seqlens` |
| padding | `padding_mask` | XLA (a mask) | varlen `cu_seqlens` |
| rotary | `rope_theta` (NeoX) | - | - |
| KV cache | `init_cache`, `decode` | - | - |
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
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from jax_flash._src import validate
from jax_flash.flash_attn import flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from jax_flash.kvcache import flash_attn_with_kvcache
from jax_flash.nn import attention
from jax_flash.varlen import flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func

__all__ = ["FlashCrossAttention", "FlashSelfAttention", "MultiHeadAttention", "apply_rope",
           "attention_fn"]

_WARNED: set[str] = set()


def _positive_int(name: str, value, minimum: int = 1) -> int:
    value = validate.static_int(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _half_dtype(name: str, dtype):
    if dtype is None or jnp.dtype(dtype) not in validate.SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16 or bfloat16 (the kernels' dtypes), got {dtype}")
    return jnp.dtype(dtype)


def _dropout_rate(name: str, value) -> float:
    rate = validate.static_float(name, value, "a float in [0, 1)")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return rate


def _dropout_key(stored, rngs, rate: float, deterministic: bool):
    """The dropout key of one call, or None when dropout is off. rngs (the
    call's) wins over stored (the constructor's stream)."""
    if rate == 0.0 or deterministic:
        return None
    rngs = stored if rngs is None else rngs
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    if rngs is None:
        raise ValueError("rngs: expected an nnx.Rngs, an RngStream or a key when dropout is on "
                         f"(dropout rate {rate}, deterministic=False), got None; pass rngs to "
                         "the constructor or the call, or deterministic=True")
    return rngs


def _fork(rngs, rate: float):
    """The constructor's dropout stream (None without dropout or rngs)."""
    if rate == 0.0 or rngs is None:
        return nnx.data(None)
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout.fork()
    if isinstance(rngs, nnx.RngStream):
        return rngs.fork()
    raise TypeError(f"rngs must be an nnx.Rngs or RngStream, got {type(rngs).__name__}")


def _token_array(name: str, x, shape, kind: str):
    """An integer (kind "an integer") or bool (kind "a bool") array of exactly shape."""
    if x is None:
        return None
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be {kind} array of shape {shape}, got "
                        f"{type(x).__name__}")
    ok = x.dtype == jnp.bool_ if kind == "a bool" else jnp.issubdtype(x.dtype, jnp.integer)
    if not ok:
        raise TypeError(f"{name} must be {kind} array of shape {shape}, got dtype {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape (batch, seqlen) = {shape}, got "
                         f"{tuple(x.shape)}")
    return x


def _rank(name: str, x, rank: int, layout: str) -> None:
    if not hasattr(x, "ndim") or x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape "
                         f"{tuple(getattr(x, 'shape', ()))}")


def _needs(name: str, value, other: str) -> None:
    if value is None:
        raise ValueError(f"{name}: expected a value with {other} (varlen), got None")


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
        self.dropout_rate = _dropout_rate("dropout_rate", dropout_rate)
        self.deterministic = validate.static_bool("deterministic", deterministic)
        self.dtype = _half_dtype("dtype", dtype)
        self.param_dtype = param_dtype
        heads = self.num_heads + 2 * self.num_kv_heads
        common = dict(use_bias=use_bias, dtype=self.dtype, param_dtype=param_dtype,
                      kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
        self.qkv = nnx.LinearGeneral(self.in_features, (heads, self.head_dim), **common)
        self.out = nnx.LinearGeneral((self.num_heads, self.head_dim), self.out_features,
                                     axis=(-2, -1), **common)
        self.rngs = _fork(rngs, self.dropout_rate)
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
        dtype = self.dtype if dtype is None else _half_dtype("dtype", dtype)
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
                 decode: bool = False, deterministic: bool | None = None, rngs=None):
        """Self-attention of x.

        Args:
          x: (batch, seqlen, in_features).
          segment_ids: optional integer (batch, seqlen) document ids.
          padding_mask: optional bool (batch, seqlen), True = a real token.
          positions: optional integer (batch, seqlen) rotary positions.
          decode: append x to the cache and attend to it (see the class).
          deterministic: overrides the attribute (True: no dropout).
          rngs: nnx.Rngs, RngStream or key for this call's dropout.

        Returns:
          (batch, seqlen, out_features) in `dtype`.
        """
        if not hasattr(x, "shape") or x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (batch, seqlen, in_features={self.in_features})"
                             f", got shape {tuple(getattr(x, 'shape', ()))}")
        batch, seqlen, _ = x.shape
        H, K = self.num_heads, self.num_kv_heads
        segment_ids = _token_array("segment_ids", segment_ids, (batch, seqlen), "an integer")
        padding_mask = _token_array("padding_mask", padding_mask, (batch, seqlen), "a bool")
        positions = _token_array("positions", positions, (batch, seqlen), "an integer")
        if positions is not None and self.rope_theta is None:
            raise ValueError("positions are rotary positions and need rope_theta, got "
                             "rope_theta=None")
        y = self.qkv(x)  # (batch, seqlen, H + 2K, head_dim): q heads, k heads, v heads
        if decode:
            given = [n for n, a in (("segment_ids", segment_ids), ("padding_mask", padding_mask),
                                    ("positions", positions)) if a is not None]
            if given:
                raise ValueError(f"{', '.join(given)} must be None with decode=True (decoding "
                                 "positions come from cache_seqlens), got an array")
            return self.out(self._decode(y))
        if self.rope_theta is not None:
            pos = (jnp.broadcast_to(jnp.arange(seqlen, dtype=jnp.int32), (batch, seqlen))
                   if positions is None else positions)
            y = jnp.concatenate(
                [apply_rope(y[:, :, :H + K], pos, self.rope_theta), y[:, :, H + K:]], axis=2)
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
        key = _dropout_key(self.rngs, rngs, self.dropout_rate, deterministic)
        opts = dict(dropout_p=self.dropout_rate if key is not None else 0.0,
                    softmax_scale=self.softmax_scale, causal=self.causal,
                    window_size=self._window, softcap=self._softcap, dropout_key=key,
                    segment_ids=ids)
        if H == K:
            o = flash_attn_qkvpacked_func(y.reshape(batch, seqlen, 3, H, self.head_dim), **opts)
        else:
            kv = y[:, :, H:].reshape(batch, seqlen, 2, K, self.head_dim)
            o = flash_attn_kvpacked_func(y[:, :, :H], kv, **opts)
        out = self.out(o)
        if padding_mask is not None:
            out = jnp.where(padding_mask[..., None], out, jnp.zeros((), out.dtype))
        return out

    def _decode(self, y):
        """Attention of the new rows y (batch, n_new, H + 2K, head_dim)
        against the cache, which they are appended to."""
        if self.k_cache is None:
            raise ValueError("decode=True needs the cache: call init_cache(batch, max_len) "
                             "first, got no cache")
        batch, n_new = y.shape[:2]
        H, K = self.num_heads, self.num_kv_heads
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
        # Where flash_attn_with_kvcache writes (it clamps the same way).
        start = jnp.clip(seqlens, 0, capacity - n_new)
        y = y.astype(k_cache.dtype)
        if self.rope_theta is not None:
            pos = start[:, None] + jnp.arange(n_new, dtype=jnp.int32)
            y = jnp.concatenate(
                [apply_rope(y[:, :, :H + K], pos, self.rope_theta), y[:, :, H + K:]], axis=2)
        q, k, v = y[:, :, :H], y[:, :, H:H + K], y[:, :, H + K:]
        o, k_cache, v_cache = flash_attn_with_kvcache(
            q, k_cache, v_cache, k=k, v=v, cache_seqlens=start, block_table=table,
            softmax_scale=self.softmax_scale, causal=self.causal, window_size=self._window,
            softcap=self._softcap)
        self.k_cache[...] = k_cache
        self.v_cache[...] = v_cache
        self.cache_seqlens[...] = start + n_new
        return o.astype(self.dtype)


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"jax_flash.flax.attention_fn: {reason} is not supported by "
                      "FlashAttention; running Flax's dot_product_attention instead",
                      stacklevel=3)


def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout: bool = True,
                 dropout_rng=None, dropout_rate: float = 0.0, deterministic: bool = False,
                 dtype=None, precision=None, module=None, promote_dtype=None,
                 is_causal: bool = False, force_fp32_for_softmax: bool = False,
                 einsum_dot_general=None, qk_attn_weights_einsum=None,
                 attn_weights_value_einsum=None, *, kernel_dtype=jnp.bfloat16):
    """FlashAttention as the `attention_fn` of Flax's attention modules.

    `nnx.MultiHeadAttention(..., attention_fn=jax_flash.flax.attention_fn)`
    and `linen.MultiHeadDotProductAttention(attention_fn=...)` run
    `jax_flash.attention` (our kernels on a GPU, the reference elsewhere).
    Every keyword those modules pass is accepted (the signature is
    `flax.nnx.dot_product_attention`'s and `flax.linen`'s together).

    Routing:

    * No mask/bias: `jax_flash.attention`, with `is_causal` (top-left, as
      jax.nn), GQA/MQA, and dropout (`dropout_rate` / `dropout_rng` unless
      `deterministic`). Float32 (any non 16-bit) inputs are cast to
      `kernel_dtype` and the output back: pass
      `functools.partial(attention_fn, kernel_dtype=jnp.float16)` for float16
      or `kernel_dtype=None` to keep float32 (then XLA runs it).
    * `mask` (a traced array: a causal one cannot be recognised) or `bias`:
      `jax_flash.attention`'s XLA fallback (jax.nn, one-time warning), in the
      inputs' own dtype. With dropout on as well, Flax's own
      `dot_product_attention` (one-time warning), as also for `module`
      (sow_weights: the weights must be materialised) and custom einsums.

    Differences from Flax's function on the kernel path: the dropout mask is
    the kernels' (independent per batch element and head, so
    `broadcast_dropout` has no effect, and a different mask than Flax's for
    the same key); `precision` is ignored (the kernels accumulate in float32);
    the softmax is always float32 (`force_fp32_for_softmax` is implied).

    Args:
      query: [batch..., q_length, num_heads, head_dim].
      key, value: [batch..., kv_length, num_kv_heads, head_dim].
      bias, mask: broadcastable to [batch..., num_heads, q_length, kv_length];
        mask True (or nonzero) = attend.
      dtype: the computation's dtype (default: the inputs' promoted dtype);
        promote_dtype: as Flax's, applied to (query, key, value).
      kernel_dtype: keyword-only, float16, bfloat16 or None (see above).
      Other arguments: Flax's.

    Returns:
      [batch..., q_length, num_heads, head_dim] in the computation's dtype.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if jnp.ndim(x) < 3:
            raise ValueError(f"{name} must have shape [batch..., length, num_heads, head_dim] "
                             f"(rank >= 3), got shape {jnp.shape(x)}")
    if promote_dtype is not None:
        query, key, value = promote_dtype((query, key, value), dtype=dtype)
    else:
        dt = jnp.result_type(query, key, value) if dtype is None else dtype
        query, key, value = (jnp.asarray(x, dt) for x in (query, key, value))
    if kernel_dtype is not None:
        kernel_dtype = _half_dtype("kernel_dtype", kernel_dtype)
    dropping = not deterministic and dropout_rate > 0
    in_dtype = query.dtype
    half = in_dtype in validate.SUPPORTED_DTYPES
    general = bias is not None or mask is not None
    cast = not half and kernel_dtype is not None and not general
    custom = [n for n, a in (("module (sow_weights)", module),
                             ("einsum_dot_general", einsum_dot_general),
                             ("qk_attn_weights_einsum", qk_attn_weights_einsum),
                             ("attn_weights_value_einsum", attn_weights_value_einsum))
              if a is not None]
    if custom or (dropping and (general or not (half or cast))):
        reason = ", ".join(custom) or "dropout with a mask, a bias or float32 inputs"
        _warn_once(reason)
        linen_only = (einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum)
        if force_fp32_for_softmax or isinstance(module, linen.Module) or any(
                a is not None for a in linen_only):
            if is_causal:  # linen's function has no is_causal
                causal = jnp.tril(jnp.ones((query.shape[-3], key.shape[-3]), bool))
                mask = causal if mask is None else jnp.logical_and(mask, causal)
            return linen.dot_product_attention(
                query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
                deterministic, dtype, precision, module, force_fp32_for_softmax,
                einsum_dot_general=einsum_dot_general,
                qk_attn_weights_einsum=qk_attn_weights_einsum,
                attn_weights_value_einsum=attn_weights_value_einsum)
        return nnx.dot_product_attention(
            query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
            deterministic, dtype, precision, module, is_causal=is_causal)
    if dropping and dropout_rng is None:
        raise ValueError(f"dropout_rng: expected a JAX PRNG key when dropout_rate > 0 "
                         f"({dropout_rate}) and deterministic=False, got None")

    batch_shape = query.shape[:-3]
    if len(batch_shape) > 1:  # jax_flash.attention takes one batch dim

        def flat(x, full):
            x = jnp.asarray(x)
            x = x.reshape((1,) * (full - x.ndim) + x.shape)
            x = jnp.broadcast_to(x, batch_shape + x.shape[len(batch_shape):])
            return x.reshape((-1,) + x.shape[len(batch_shape):])

        nd = len(batch_shape) + 3
        query, key, value = (flat(x, nd) for x in (query, key, value))
        bias = None if bias is None else flat(bias, nd)
        mask = None if mask is None else flat(mask, nd)
    if mask is not None:
        mask = jnp.asarray(mask).astype(jnp.bool_)
    if cast:
        query, key, value = (x.astype(kernel_dtype) for x in (query, key, value))
    out = attention(query, key, value, bias, mask, is_causal=is_causal,
                    dropout_rate=dropout_rate if dropping else 0.0,
                    dropout_rng=dropout_rng if dropping else None)
    return out.astype(in_dtype).reshape(batch_shape + out.shape[-3:])


class FlashSelfAttention(nnx.Module):
    """FlashAttention-2's `flash_attn.modules.mha.FlashSelfAttention` (NNX,
    no parameters) on packed qkv.

    Args:
      causal: default causal masking (a call's causal wins).
      softmax_scale: default 1 / sqrt(head_dim).
      attention_dropout: dropout on the attention probabilities, in [0, 1).
      window_size: (left, right) local window, -1 unbounded.
      alibi_slopes: optional float32 (nheads,) or (batch, nheads).
      deterministic: no dropout when True (nnx.Dropout's meaning, set by
        model.eval() / model.train()). PyTorch's `deterministic` (a
        reproducible backward) is `deterministic_backward` here.
      deterministic_backward: the kernels' bit-reproducible backward.
      rngs: nnx.Rngs whose `dropout` stream draws the dropout keys.
    """

    def __init__(self, causal: bool = False, softmax_scale: float | None = None,
                 attention_dropout: float = 0.0, window_size: tuple[int, int] = (-1, -1),
                 alibi_slopes=None, deterministic: bool = False, *,
                 deterministic_backward: bool = False, rngs: nnx.Rngs | None = None):
        self.causal = validate.static_bool("causal", causal)
        self.softmax_scale = softmax_scale
        self.drop_rate = _dropout_rate("attention_dropout", attention_dropout)
        self.window_size = validate.window(window_size, False)
        self.alibi_slopes = nnx.data(alibi_slopes)
        self.deterministic = validate.static_bool("deterministic", deterministic)
        self.deterministic_backward = validate.static_bool("deterministic_backward",
                                                           deterministic_backward)
        self.rngs = _fork(rngs, self.drop_rate)

    def set_view(self, deterministic: bool | None = None):
        """`nnx.view` hook: deterministic=True turns dropout off."""
        if deterministic is not None:
            self.deterministic = deterministic

    def _options(self, causal, deterministic, rngs) -> dict:
        deterministic = self.deterministic if deterministic is None else deterministic
        key = _dropout_key(self.rngs, rngs, self.drop_rate, deterministic)
        return dict(dropout_p=self.drop_rate if key is not None else 0.0,
                    softmax_scale=self.softmax_scale,
                    causal=self.causal if causal is None else causal,
                    window_size=self.window_size, alibi_slopes=self.alibi_slopes,
                    deterministic=self.deterministic_backward, dropout_key=key)

    def __call__(self, qkv, causal: bool | None = None, cu_seqlens=None,
                 max_seqlen: int | None = None, *, deterministic: bool | None = None,
                 rngs=None):
        """Attention of packed q, k, v.

        Args:
          qkv: (batch, seqlen, 3, nheads, head_dim), or with cu_seqlens
            (total, 3, nheads, head_dim), float16 or bfloat16.
          causal: overrides the constructor's.
          cu_seqlens: optional int32 (batch + 1,) prefix sums (varlen).
          max_seqlen: static int >= every length, with cu_seqlens.
          deterministic: overrides the attribute; rngs: this call's dropout.

        Returns:
          qkv's shape without the 3, in qkv's dtype.
        """
        opts = self._options(causal, deterministic, rngs)
        if cu_seqlens is None:
            _rank("qkv", qkv, 5, "(batch, seqlen, 3, nheads, head_dim)")
            return flash_attn_qkvpacked_func(qkv, **opts)
        _rank("qkv", qkv, 4, "(total, 3, nheads, head_dim) with cu_seqlens")
        _needs("max_seqlen", max_seqlen, "cu_seqlens")
        return flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, **opts)


class FlashCrossAttention(FlashSelfAttention):
    """FlashAttention-2's `flash_attn.modules.mha.FlashCrossAttention` (NNX,
    no parameters): q against packed kv. Constructor: `FlashSelfAttention`'s.
    Causal masks are bottom-right aligned when the lengths differ."""

    def __call__(self, q, kv, causal: bool | None = None, cu_seqlens=None,
                 max_seqlen: int | None = None, cu_seqlens_k=None,
                 max_seqlen_k: int | None = None, *, deterministic: bool | None = None,
                 rngs=None):
        """Attention of q against packed k, v.

        Args:
          q: (batch, seqlen_q, nheads, head_dim), or with cu_seqlens
            (total_q, nheads, head_dim).
          kv: (batch, seqlen_k, 2, nheads_k, head_dim), or with cu_seqlens
            (total_k, 2, nheads_k, head_dim).
          cu_seqlens, cu_seqlens_k: int32 (batch + 1,) prefix sums of q's and
            kv's lengths (varlen: both or neither).
          max_seqlen, max_seqlen_k: static ints, with them.
          causal, deterministic, rngs: as `FlashSelfAttention`.

        Returns:
          q's shape and dtype.
        """
        opts = self._options(causal, deterministic, rngs)
        if cu_seqlens is None:
            if cu_seqlens_k is not None:
                raise ValueError("cu_seqlens: expected an int32 array with cu_seqlens_k "
                                 "(varlen needs both), got None")
            _rank("q", q, 4, "(batch, seqlen_q, nheads, head_dim)")
            _rank("kv", kv, 5, "(batch, seqlen_k, 2, nheads_k, head_dim)")
            return flash_attn_kvpacked_func(q, kv, **opts)
        _rank("q", q, 3, "(total_q, nheads, head_dim) with cu_seqlens")
        _rank("kv", kv, 4, "(total_k, 2, nheads_k, head_dim) with cu_seqlens")
        _needs("cu_seqlens_k", cu_seqlens_k, "cu_seqlens")
        _needs("max_seqlen", max_seqlen, "cu_seqlens")
        _needs("max_seqlen_k", max_seqlen_k, "cu_seqlens")
        return flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, cu_seqlens_k, max_seqlen,
                                               max_seqlen_k, **opts)
