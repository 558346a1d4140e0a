"""The parameter-free Flax layers behind `jax_flash.flax` (which re-exports
them; import them from there) and the argument checks every layer shares.

* `attention_fn`: the `attention_fn` of `flax.nnx.MultiHeadAttention` and
  `flax.linen.MultiHeadDotProductAttention`.
* `FlashSelfAttention`, `FlashCrossAttention`: FlashAttention-2's
  `flash_attn.modules.mha` layers as NNX modules without parameters.

`jax_flash.flax`'s docstring gives the conventions (kernel dtype, dropout,
masked rows) and compares them with `MultiHeadAttention`.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
from flax import linen, nnx

from jax_flash._src import validate
from jax_flash.flash_attn import flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from jax_flash.nn import attention
from jax_flash.varlen import flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func

_WARNED: set[str] = set()


def check_half_dtype(name: str, dtype):
    """dtype as a jnp.dtype if it is one the kernels take, else TypeError."""
    if dtype is None or jnp.dtype(dtype) not in validate.SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16 or bfloat16 (the kernels' dtypes), got {dtype}")
    return jnp.dtype(dtype)


def check_rate(name: str, value) -> float:
    """A static dropout rate in [0, 1)."""
    rate = validate.static_float(name, value, "a float in [0, 1)")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return rate


def dropout_key(stored, rngs, rate: float, deterministic: bool):
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


def fork_dropout(rngs, rate: float):
    """The constructor's dropout stream (None without dropout or rngs)."""
    if rate == 0.0 or rngs is None:
        return nnx.data(None)
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout.fork()
    if isinstance(rngs, nnx.RngStream):
        return rngs.fork()
    raise TypeError(f"rngs must be an nnx.Rngs or RngStream, got {type(rngs).__name__}")


def _rank(name: str, x, rank: int, layout: str) -> None:
    if not hasattr(x, "ndim") or x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape "
                         f"{tuple(getattr(x, 'shape', ()))}")


def _needs(name: str, value, other: str) -> None:
    if value is None:
        raise ValueError(f"{name}: expected a value with {other} (varlen), got None")


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
        kernel_dtype = check_half_dtype("kernel_dtype", kernel_dtype)
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
        self.drop_rate = check_rate("attention_dropout", attention_dropout)
        self.window_size = validate.window(window_size, False)
        self.alibi_slopes = nnx.data(alibi_slopes)
        self.deterministic = validate.static_bool("deterministic", deterministic)
        self.deterministic_backward = validate.static_bool("deterministic_backward",
                                                           deterministic_backward)
        self.rngs = fork_dropout(rngs, self.drop_rate)

    def set_view(self, deterministic: bool | None = None):
        """`nnx.view` hook: deterministic=True turns dropout off."""
        if deterministic is not None:
            self.deterministic = deterministic

    def _options(self, causal, deterministic, rngs) -> dict:
        deterministic = self.deterministic if deterministic is None else deterministic
        key = dropout_key(self.rngs, rngs, self.drop_rate, deterministic)
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
