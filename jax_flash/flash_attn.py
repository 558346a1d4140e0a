"""FlashAttention-2's fixed-shape functions in JAX form.

Each function binds its arguments once (`_src/spec.bind`: validation, a
hashable spec, the array operands) and runs them on the backend chosen for
the platform (`_src/backend.run`): our CUDA kernels on a GPU, the plain-JAX
reference elsewhere. Bad input raises `TypeError`/`ValueError` naming the
argument, what was expected and what arrived.
"""

from __future__ import annotations

from jax_flash._src.backend import run
from jax_flash._src.spec import bind

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func"]


def flash_attn_func(
    q,
    k,
    v,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes=None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    dropout_key=None,
    segment_ids=None,
):
    """Exact attention softmax(q k^T * scale) v, FlashAttention-2 style.

    On a CUDA GPU this runs jax_flash's own kernels through an XLA FFI custom
    call (forward and backward kernels); on any other backend it runs
    `jax_flash.reference.attention_ref`. Works under `jax.jit`, `jax.grad`,
    `jax.checkpoint` and `jax.vmap` (extra leading dims fold into the
    kernel's batch).

    Args:
      q: (batch, seqlen_q, nheads, headdim), float16 or bfloat16.
      k: (batch, seqlen_k, nheads_k, headdim), q's dtype; nheads % nheads_k == 0
        (MQA/GQA: query head h reads K/V head h // (nheads // nheads_k)).
      v: (batch, seqlen_k, nheads_k, headdim), q's dtype.
      dropout_p: static float; dropout probability in [0, 1) applied to the attention
        probabilities (kept ones scaled by 1 / (1 - dropout_p)); needs
        dropout_key. Honoured to 2^-17 (16-bit random numbers).
      softmax_scale: static float, scale of q.k (finite and > 0 in float32);
        default 1 / sqrt(headdim).
      causal: static bool; mask keys after the query, aligned to the bottom-right corner of
        the (seqlen_q, seqlen_k) score matrix when the lengths differ (query i
        sees keys j <= i + seqlen_k - seqlen_q).
      window_size: (left, right) static ints, a local window around that same
        diagonal; -1 is unbounded. causal=True sets right to 0. Entries of
        seqlen_q + seqlen_k or more can never bind and mean -1.
      softcap: if > 0, scores s = scale * q.k become softcap * tanh(s / softcap)
        before masking and softmax (Gemma-2 style); 0 is off.
      alibi_slopes: float32 (nheads,) or (batch, nheads); adds
        -slope * |i + seqlen_k - seqlen_q - j| to the score of query i and key
        j. A non-differentiable constant on every backend: the gradient with
        respect to the slopes is zero (jax.lax.stop_gradient), on the CPU
        path as on the GPU kernels.
      deterministic: make the backward pass bit-reproducible: the float32 dQ
        additions happen in a fixed order. Either each thread block adds into
        its own float32 slice and the slices are summed in order (about
        num_SMs / (batch * nheads_k) slices, at least one, each the size of dq
        in float32: that much extra scratch memory), or, with no causal
        mask, window or score modifier and more than two slices' worth of
        blocks, the K/V tiles add into one accumulator in turn. The forward
        pass is always deterministic.
      return_attn_probs: also return the softmax LSE and the attention
        probabilities (for testing, small sizes: they are materialised).
      dropout_key: a JAX PRNG key (`jax.random.key` or `jax.random.PRNGKey`),
        required when dropout_p > 0. Its bits seed the kernels' counter-based
        RNG (`jax_flash.reference.dropout_keep_mask` is the same mask in plain
        JAX); the forward and backward pass draw the same mask, the same key
        gives bit-identical results and the batch elements get independent
        masks. Under `vmap`, per-example keys give independent masks and an
        unbatched key gives each example the mask it would get alone.
      segment_ids: optional `(q_segment_ids, kv_segment_ids)`, integer arrays
        (batch, seqlen_q) and (batch, seqlen_k) of any integer dtype, compared
        exactly (int64 ids that differ only above bit 31 stay distinct: the
        kernels get dense int32 ranks): document masking for packed
        sequences. A query attends only keys with its own segment id, and
        causal / window / ALiBi positions count inside the segment: the last
        query of a segment lines up with the last key of that segment
        (`jax_flash.reference.segment_positions`). Computed in the kernels
        from O(seqlen) tables (no mask is materialised), skipping K/V tiles
        that share no segment with a Q tile; fastest when every id forms one
        contiguous run (packed documents). A query whose id no key has gets
        output 0 and LSE +inf.

    Returns:
      out: (batch, seqlen_q, nheads, headdim) in q's dtype; or, with
      return_attn_probs=True, `(out, softmax_lse, attn_probs)`: softmax_lse is
      (batch, nheads, seqlen_q) float32 (natural log; +inf for a query that
      sees no key, whose output is 0); attn_probs is (batch, nheads,
      seqlen_q, seqlen_k) float32, exp(score - softmax_lse) computed by XLA
      from q, k and the kernel's LSE, before dropout's rescaling, with the
      entries the kernel dropped negated (FlashAttention's convention). Neither
      is differentiable: gradients flow through `out` only.

    Raises:
      TypeError, ValueError: bad shapes, dtypes or options, before any kernel
        (the message names the argument, the expected and the actual). Static
        options (causal, softmax_scale, window_size, softcap, dropout_p,
        deterministic, return_attn_probs) must be Python / numpy scalars: a
        traced value raises TypeError.
    """
    spec, operands = bind(
        (q, k, v), layout="fixed", packing="", dropout_p=dropout_p,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, dropout_key=dropout_key, segment_ids=segment_ids)
    return run(spec, (q, k, v), operands)


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes=None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    dropout_key=None,
    segment_ids=None,
):
    """`flash_attn_func` with q, k, v packed in one array.

    Args:
      qkv: (batch, seqlen, 3, nheads, headdim).
      Other arguments and the return value: as `flash_attn_func`. The gradient
      is (batch, seqlen, 3, nheads, headdim). On a GPU the kernels read qkv in
      place and write the gradient straight into the packed layout: no
      slicing or concatenation copies.
    """
    spec, operands = bind(
        (qkv,), layout="fixed", packing="qkv", dropout_p=dropout_p,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, dropout_key=dropout_key, segment_ids=segment_ids)
    return run(spec, (qkv,), operands)


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes=None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    dropout_key=None,
    segment_ids=None,
):
    """`flash_attn_func` with k and v packed in one array.

    Args:
      q: (batch, seqlen_q, nheads, headdim).
      kv: (batch, seqlen_k, 2, nheads_k, headdim).
      Other arguments and the return value: as `flash_attn_func`. On a GPU
      kv is read in place and its gradient written in the packed layout.
    """
    spec, operands = bind(
        (q, kv), layout="fixed", packing="kv", dropout_p=dropout_p,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, dropout_key=dropout_key, segment_ids=segment_ids)
    return run(spec, (q, kv), operands)
