"""`jax_flash.attention`: a drop-in for `jax.nn.dot_product_attention`.

Same arguments, shapes (`BTNH` or `TNH`), GQA/MQA rule, defaults and
semantics as the installed `jax.nn.dot_product_attention` (causal is
top-left, `tril`; `local_window_size` is relative to the diagonal i == j;
padded query rows give 0; a query row that sees no key gives the mean of
all values, as jax.nn's finite mask value makes it), run through
FlashAttention-2 (`flash_attn_func`: our kernels on an NVIDIA GPU, the
reference elsewhere) whenever the call can be expressed there.

| What the call needs | `implementation=None` | `"cuda"` | `"xla"` / `"cudnn"` |
|---|---|---|---|
| fp16 / bf16, `is_causal`, `scale`, GQA/MQA, T != S | FlashAttention | kernels | jax.nn |
| `query_seq_lengths`, `key_value_seq_lengths` | FlashAttention | kernels | jax.nn |
| `local_window_size` (int or (left, right)) | FlashAttention | kernels | jax.nn |
| `return_residual` (logsumexp, BTN, input dtype) | FlashAttention | kernels | jax.nn |
| `logits_soft_cap`, `segment_ids`, `dropout_rate` | FlashAttention | kernels | ValueError |
| `bias`, `mask` (general) | jax.nn XLA, one-time warning | ValueError | jax.nn |
| window whose left + right < 0 (no key at all) | jax.nn XLA, one-time warning | ValueError | jax.nn |
| float32 (any non fp16/bf16) inputs | jax.nn XLA, silently | ValueError | jax.nn |
| not on a GPU with the compiled extension | reference (plain JAX) | ValueError | jax.nn |

Mapping onto the kernels (shift = S - T, the kernels' bottom-right diagonal;
Lb / Rb: the top-left window bounds, key j visible to row i iff
i - Lb <= j <= i + Rb, Rb = min(R, 0) with `is_causal`): with no
key lengths and -Lb <= shift <= Rb, the kernels' window is
(Lb + shift, Rb - shift). Otherwise (key lengths with a causal mask or a
window, or a shift outside those bounds) keys at or after the key length get
a padding segment id and one zero key (plus, where needed, zero query rows)
is appended in segment 0 so that the segment's diagonal lands where
jax.nn's is; the appended rows and keys are outside every real row's window
and are cut off again. With `segment_ids`, causal and windows count inside
each segment (as `flash_attn_func`: segment ends aligned), which equals
jax.nn's top-left alignment when a segment has as many queries as keys.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash._src import extension
from jax_flash._src import segments as segments_lib
from jax_flash._src.backend import attention as attention_call, select
from jax_flash._src.spec import bind
from jax_flash._src.validate import MAX_HEAD_DIM

__all__ = ["attention"]

_IMPLEMENTATIONS = (None, "cuda", "xla", "cudnn")
_WARNED: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"jax_flash.attention: {reason} is not supported by FlashAttention; "
            "running jax.nn.dot_product_attention(implementation='xla') instead",
            stacklevel=3)


def _large_negative(dtype):
    """jax.nn's masked logit (`_get_large_negative` of the float32 logits)."""
    return -0.7 * float(np.finfo(np.float32).max)


def _check(t, shape, dtype, name):
    """jax.nn's `_check_shape_and_dtype`, same messages."""
    if t is None:
        return
    if t.ndim != len(shape):
        raise ValueError(f"{name} ndim should be {len(shape)}, but got {t.ndim}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} dtype should be {dtype}, but got {t.dtype}")
    for i in range(t.ndim):
        if shape[i] != -1 and t.shape[i] != shape[i]:
            raise ValueError(f"{name} shape should be {shape}: but got {t.shape}")


# Option names of jax_flash's functions -> this function's names, for the
# messages of the shared validation (it names the options it checks).
_OUR_NAMES = {"softmax_scale": "scale", "softcap": "logits_soft_cap",
              "dropout_p": "dropout_rate", "dropout_key": "dropout_rng"}
_OUR_NAMES_RE = re.compile(r"\b(" + "|".join(_OUR_NAMES) + r")\b")


def _bind(xs, **options):
    """`bind` whose errors speak of this function's arguments."""
    try:
        return bind(xs, **options)
    except (TypeError, ValueError) as e:
        message = _OUR_NAMES_RE.sub(lambda m: _OUR_NAMES[m.group(1)], str(e))
        raise type(e)(message) from None


def _bound(x, limit):
    """None for an unbounded window side (or one that never binds)."""
    return None if x is None or x >= limit else int(x)


def attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
              query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
              implementation=None, return_residual=False, logits_soft_cap=None,
              segment_ids=None, dropout_rate=0.0, dropout_rng=None):
    """Scaled dot-product attention, `jax.nn.dot_product_attention`'s contract.

    Shapes: B batch, T query length, S key length, N query heads, K key/value
    heads (N % K == 0), H head dim; the batch dim may be left out (`TNH`).

    Args:
      query: (B, T, N, H) or (T, N, H).
      key, value: (B, S, K, H) or (S, K, H), query's dtype.
      bias: optional additive bias broadcastable to (B, N, T, S) (4-D): runs
        on XLA (see the module's table).
      mask: optional bool mask broadcastable to (B, N, T, S), True = attend:
        runs on XLA.
      scale: logit scale; default 1 / sqrt(H).
      is_causal: top-left causal mask (query i sees keys j <= i).
      query_seq_lengths, key_value_seq_lengths: int32 (B,); rows >= the query
        length give 0, keys >= the key length are masked.
      local_window_size: int w (= (w, w)) or (left, right): query i sees keys
        i - left <= j <= i + right.
      implementation: None (FlashAttention where possible, else XLA), "cuda"
        (our kernels or ValueError), "xla" or "cudnn" (jax.nn's).
      return_residual: also return the logsumexp of the masked logits, shape
        (B, T, N) / (T, N), in the inputs' dtype (rows without keys: jax.nn's
        masked value -0.7 * float32 max).
      logits_soft_cap: float > 0: logits s = scale * q.k become
        cap * tanh(s / cap) (jax_flash's softcap).
      segment_ids: (q_ids (B, T), kv_ids (B, S)) integer document ids: a query
        sees only keys with its id (rank-3 inputs: (T,), (S,)).
      dropout_rate, dropout_rng: dropout on the attention probabilities; a
        JAX PRNG key is required when dropout_rate > 0.

    Returns:
      The output, query's shape and dtype; with return_residual, (output,
      residual).

    Raises:
      ValueError / TypeError: what jax.nn rejects (shapes, dtypes, lengths,
        implementation), naming the argument, before anything runs; "cuda"
        when the call needs what the kernels lack or no kernels are present;
        "xla"/"cudnn" with jax_flash's own options set.
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"Unsupported implementation option: {implementation}")
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim not in (3, 4):
            raise ValueError(f"{name} ndim should be 4 (BTNH) or 3 (TNH), but got {x.ndim}")
    if not (query.ndim == key.ndim == value.ndim):
        raise ValueError(f"query, key and value must have one rank, got "
                         f"{query.ndim}, {key.ndim} and {value.ndim}")
    unbatched = query.ndim == 3
    q4, k4, v4 = (x[None] if unbatched else x for x in (query, key, value))
    bias4 = None if bias is None else jnp.asarray(bias)
    mask4 = None if mask is None else jnp.asarray(mask)
    bias4 = None if bias4 is None else bias4.reshape((1,) * max(0, 4 - bias4.ndim) + bias4.shape)
    mask4 = None if mask4 is None else mask4.reshape((1,) * max(0, 4 - mask4.ndim) + mask4.shape)
    qlen = None if query_seq_lengths is None else jnp.asarray(query_seq_lengths)
    kvlen = None if key_value_seq_lengths is None else jnp.asarray(key_value_seq_lengths)
    B, S, K, H = k4.shape
    _check(v4, [B, S, K, H], k4.dtype, "value")
    _check(q4, [B, -1, -1, H], k4.dtype, "query")
    _check(mask4, [-1] * 4, np.dtype(bool), "mask")
    _check(bias4, [-1] * 4, None, "bias")
    _check(qlen, [B], np.dtype("int32"), "query_seq_lengths")
    _check(kvlen, [B], np.dtype("int32"), "key_value_seq_lengths")
    T, N = q4.shape[1], q4.shape[2]
    if K == 0 or N % K != 0:
        raise ValueError(f"The number of query heads must be a multiple of "
                         f"key/value heads, but got {N} vs {K}")
    window = local_window_size
    if window is not None:
        if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
            window = (int(window), int(window))
        if not (isinstance(window, (tuple, list)) and len(window) == 2
                and all(isinstance(w, (int, np.integer)) for w in window)):
            raise TypeError(f"local_window_size must be an int or a (left, right) pair of "
                            f"ints, got {local_window_size!r}")
        window = tuple(int(w) for w in window)
    extras = {"logits_soft_cap": logits_soft_cap not in (None, 0, 0.0),
              "segment_ids": segment_ids is not None,
              "dropout_rate": dropout_rate not in (None, 0, 0.0)}

    def via_jax_nn(impl):
        used = [n for n, on in extras.items() if on]
        if used:
            raise ValueError(f"{', '.join(used)} cannot run on jax.nn.dot_product_attention "
                             f"(implementation={impl!r}); use fp16/bf16 inputs without "
                             "bias/mask, implementation=None or 'cuda'")
        return jax.nn.dot_product_attention(
            query, key, value, bias, mask, scale=scale, is_causal=is_causal,
            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=local_window_size, implementation=impl,
            return_residual=return_residual)

    if implementation in ("xla", "cudnn"):
        return via_jax_nn(implementation)

    # Top-left bounds (None: unbounded): key j visible to row i iff
    # i - lb <= j <= i + rb.
    lb = rb = None
    if window is not None:
        lb, rb = window
    if is_causal:
        rb = 0 if rb is None else min(rb, 0)
    lb, rb = _bound(lb, max(T - 1, 0)), _bound(rb, max(S - 1, 0))

    unsupported = None
    if bias is not None:
        unsupported = "bias"
    elif mask is not None:
        unsupported = "a general mask"
    elif lb is not None and rb is not None and lb + rb < 0:
        unsupported = f"a local window that sees no key ({window}, is_causal={is_causal})"
    elif segment_ids is not None and ((lb is not None and lb < 0) or (rb is not None and rb < 0)):
        unsupported = "a window with a negative side together with segment_ids"
    elif H > MAX_HEAD_DIM:
        unsupported = f"head dim {H} (> {MAX_HEAD_DIM})"
    silent = query.dtype not in (jnp.float16, jnp.bfloat16)
    if implementation == "cuda":
        if unsupported is not None:
            raise ValueError(f"implementation='cuda': {unsupported} is not supported by "
                             "the FlashAttention kernels")
        if silent:
            raise ValueError(f"implementation='cuda': query dtype {query.dtype} is not "
                             "supported by the kernels (float16 or bfloat16)")
        if not (extension.on_gpu() and extension.has_kernels()):
            raise ValueError("implementation='cuda' needs an NVIDIA GPU and the compiled "
                             "jax_flash extension (jax_flash.info() says why not)")
    elif silent or unsupported is not None:
        if unsupported is not None:
            _warn_once(unsupported)
        return via_jax_nn("xla")

    if segment_ids is not None:
        if not (isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2):
            raise TypeError("segment_ids must be a pair (q_segment_ids, kv_segment_ids), "
                            f"got {type(segment_ids).__name__}")
        seg = tuple(jnp.asarray(s) for s in segment_ids)
        if unbatched:
            seg = tuple(s[None] for s in seg)
        for name, s, n in (("q_segment_ids", seg[0], T), ("kv_segment_ids", seg[1], S)):
            if not jnp.issubdtype(s.dtype, jnp.integer) or s.shape != (B, n):
                raise ValueError(f"segment_ids: {name} must be an integer array of shape "
                                 f"{(B, n) if not unbatched else (n,)}, got "
                                 f"{s.dtype}{tuple(s.shape)}")
    else:
        seg = None

    rows = jnp.arange(T, dtype=jnp.int32)
    cols = jnp.arange(S, dtype=jnp.int32)
    shift = S - T
    pk = pq = 0
    if seg is not None:
        # Ours: positions count inside each segment; padding gets its own ids.
        qs, ks = segments_lib.dense_ranks(*seg)
        if kvlen is not None:
            ks = jnp.where(cols[None] < kvlen[:, None], ks, -1)
        if qlen is not None:
            qs = jnp.where(rows[None] < qlen[:, None], qs, -2)
        win = (-1 if lb is None else lb, -1 if rb is None else rb)
        ids = (qs, ks)
    elif ((kvlen is not None and (lb is not None or rb is not None))
          or (lb is not None and lb + shift < 0) or (rb is not None and rb - shift < 0)):
        # Segment 0 with an appended zero key (and zero query rows) so that its
        # diagonal i + sh sits where jax.nn's is: sh in [-lb, rb].
        lo_sh = -np.inf if lb is None else -lb
        hi_sh = np.inf if rb is None else rb
        sh = int(min(max(shift, lo_sh), hi_sh))
        r_eff = S - 1 if rb is None else rb  # bounded, so the added key stays unseen
        d = sh - shift
        pk = max(1, T + r_eff - S + 1, d)
        pq = pk - d
        ks = jnp.zeros((B, S), jnp.int32) if kvlen is None else \
            jnp.where(cols[None] < kvlen[:, None], 0, 1).astype(jnp.int32)
        ks = jnp.concatenate([ks, jnp.ones((B, pk - 1), jnp.int32),
                              jnp.zeros((B, 1), jnp.int32)], axis=1)
        qs = jnp.zeros((B, T), jnp.int32)
        if pq:
            qs = jnp.concatenate([qs, jnp.full((B, pq - 1), 2, jnp.int32),
                                  jnp.zeros((B, 1), jnp.int32)], axis=1)
        ids = (qs, ks)
        win = (-1 if lb is None else lb + sh, r_eff - sh)
    else:
        if kvlen is not None:
            ks = jnp.where(cols[None] < kvlen[:, None], 0, 1).astype(jnp.int32)
            ids = (jnp.zeros((B, T), jnp.int32), ks)
        else:
            ids = None
        win = (-1 if lb is None else lb + shift, -1 if rb is None else rb - shift)

    def pad(x, n):
        return x if n == 0 else jnp.concatenate(
            [x, jnp.zeros((x.shape[0], n) + x.shape[2:], x.dtype)], axis=1)

    xs = (pad(q4, pq), pad(k4, pk), pad(v4, pk))
    spec, operands = _bind(
        xs, layout="fixed", packing="", dropout_p=dropout_rate or 0.0, softmax_scale=scale,
        causal=False, window_size=win, softcap=logits_soft_cap or 0.0, alibi_slopes=None,
        deterministic=False, return_attn_probs=False, dropout_key=dropout_rng,
        segment_ids=ids)
    out, lse = attention_call(select(spec), spec, xs, operands)
    out, lse = out[:, :T], lse[..., :T]

    # jax.nn's rows without a key: uniform softmax over all S keys (its mask
    # value is finite), i.e. the mean of every value row.
    lo = jnp.zeros((T,), jnp.int32) if lb is None else jnp.maximum(rows - lb, 0)
    hi = jnp.full((T,), S - 1, jnp.int32) if rb is None else jnp.minimum(rows + rb, S - 1)
    hi = jnp.broadcast_to(hi, (B, T)) if kvlen is None else jnp.minimum(hi, kvlen[:, None] - 1)
    dead = lo[None] > hi  # (B, T)
    mean_v = jnp.repeat(jnp.mean(v4.astype(jnp.float32), axis=1), N // K, axis=1)
    out = jnp.where(dead[:, :, None, None], mean_v[:, None].astype(out.dtype), out)
    if qlen is not None:
        valid = rows[None] < qlen[:, None]
        out = jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))
    else:
        valid = jnp.ones((B, T), bool)
    out = out[0] if unbatched else out
    if not return_residual:
        return out
    lse = jnp.swapaxes(jax.lax.stop_gradient(lse), 1, 2)  # (B, T, N)
    no_key = (dead | ~valid)[:, :, None] | jnp.isinf(lse)
    res = jnp.where(no_key, _large_negative(None), lse).astype(key.dtype)
    return out, (res[0] if unbatched else res)
