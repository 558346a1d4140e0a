"""FlashAttention-2's variable-length functions: sequences packed along the
rows of (total, nheads, headdim) buffers, described by cu_seqlens.

Same pattern as `flash_attn`: bind once (`_src/spec.bind`), run on the
platform's backend (`_src/backend.run`).
"""

from __future__ import annotations

from jax_flash._src import paged_varlen
from jax_flash._src.backend import run
from jax_flash._src.spec import bind

__all__ = [
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]

_VARLEN_DOC = """
    Sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and
    cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v; every mask, ALiBi and the
    dropout RNG work per sequence as flash_attn_func does per batch element
    (bottom-right aligned: the last query of a sequence lines up with its last
    key). Works under jit with traced cu_seqlens; max_seqlen_* are static.

    Robustness: the kernels never read or write outside the buffers. A
    sequence's start is clamped into the buffer and its length to
    max_seqlen_* and to the buffer's end, so lengths above max_seqlen_*
    truncate the sequence to its first max_seqlen rows/keys (masks align to
    the truncated lengths). Rows no (truncated) sequence covers — past
    cu_seqlens[-1], or cut off — get output 0, LSE +inf and gradient 0.
    Zero-length sequences are allowed. Decreasing cu_seqlens stay in bounds,
    but outputs and gradients are then unspecified unless every sequence
    after the decrease is empty (later sequences can share rows with earlier
    ones, and rows are assigned to sequences by a search that assumes
    nondecreasing prefix sums). Under vmap, each element runs in turn.
"""


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q: int,
    max_seqlen_k: int,
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
    block_table=None,
    seqused_k=None,
):
    """`flash_attn_func` over packed variable-length sequences, with K/V
    packed too or in pages (chunked prefill).

    Args:
      q: (total_q, nheads, headdim), float16 or bfloat16.
      k, v: (total_k, nheads_k, headdim).
      cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) prefix sums of the
        sequence lengths, starting at 0.
      max_seqlen_q, max_seqlen_k: static Python ints >= every length, < 2**31.
        A loose bound costs no memory on the CPU path (sequences are padded to
        at most the buffer's rows there).
      alibi_slopes: float32 (nheads,) or (batch, nheads), batch = sequences.
      Other arguments: as `flash_attn_func` (dropout masks are drawn per
        sequence, as per batch element there).
      block_table: optional int32 (batch, max_blocks_per_seq): k and v are
        then paged caches (num_blocks, page_size, nheads_k, headdim) of any
        page_size >= 1, and logical key position p of sequence b lives in
        page block_table[b, p // page_size], row p % page_size. Pass
        cu_seqlens_k=None and seqused_k. The queries of sequence b are its
        last cu_seqlens_q[b + 1] - cu_seqlens_q[b] positions (causal and
        windows align bottom-right, as for packed K/V): chunked prefill of
        new tokens against their cached context. Forward only (no
        gradient), no dropout or return_attn_probs. Runs
        `flash_attn_with_kvcache`'s computation, with its clamping rules
        (block_table entries into [0, num_blocks - 1]).
      seqused_k: int32 (batch,) with block_table: sequence b's keys are its
        first seqused_k[b] logical positions, clamped into [0,
        min(max_seqlen_k, max_blocks_per_seq * page_size)].

    Returns:
      out (total_q, nheads, headdim); with return_attn_probs=True
      `(out, softmax_lse, attn_probs)` with softmax_lse (nheads, total_q)
      float32 and attn_probs (batch, nheads, max_seqlen_q, max_seqlen_k), each
      sequence's probabilities padded with zeros (testing only). Gradients
      flow through `out` only.

    Raises:
      TypeError, ValueError: bad shapes, dtypes or options (as
        `flash_attn_func`); cu_seqlens not int32 (batch + 1,); max_seqlen_*
        traced, negative or >= 2**31.
    """
    if block_table is not None or seqused_k is not None:
        if block_table is None:
            raise ValueError("seqused_k is only supported with block_table (paged K/V), got "
                             "block_table=None")
        if cu_seqlens_k is not None:
            raise ValueError("cu_seqlens_k must be None with block_table (seqused_k gives the "
                             "keys of each sequence), got an array")
        return paged_varlen.run(
            q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, block_table=block_table,
            seqused_k=seqused_k, dropout_p=dropout_p, softmax_scale=softmax_scale,
            causal=causal, window_size=window_size, softcap=softcap,
            alibi_slopes=alibi_slopes, return_attn_probs=return_attn_probs)
    spec, operands = bind(
        (q, k, v), layout="varlen", packing="", cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        deterministic=deterministic, return_attn_probs=return_attn_probs,
        dropout_key=dropout_key)
    return run(spec, (q, k, v), operands)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen: int,
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
):
    """`flash_attn_varlen_func` with q, k, v packed in one (total, 3, nheads,
    headdim) array and one cu_seqlens / max_seqlen for both. The kernels read
    qkv in place and write the gradient in the packed layout."""
    spec, operands = bind(
        (qkv,), layout="varlen", packing="qkv", cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        deterministic=deterministic, return_attn_probs=return_attn_probs,
        dropout_key=dropout_key)
    return run(spec, (qkv,), operands)


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q: int,
    max_seqlen_k: int,
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
):
    """`flash_attn_varlen_func` with k and v packed in one (total_k, 2,
    nheads_k, headdim) array, read and differentiated in place."""
    spec, operands = bind(
        (q, kv), layout="varlen", packing="kv", cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        deterministic=deterministic, return_attn_probs=return_attn_probs,
        dropout_key=dropout_key)
    return run(spec, (q, kv), operands)


# The shared robustness notes follow each varlen docstring's own text.
for _fn in (flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
            flash_attn_varlen_qkvpacked_func):
    _fn.__doc__ += _VARLEN_DOC
del _fn
