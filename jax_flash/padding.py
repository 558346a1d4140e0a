"""Padded batch <-> packed rows, for the varlen functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash._src import validate

__all__ = ["pad_input", "unpad_input"]


def unpad_input(x, padding_mask, total: int | None = None):
    """Packs the valid tokens of a padded batch for the varlen functions.

    Args:
      x: (batch, seqlen, ...).
      padding_mask: bool (batch, seqlen), True for real tokens (any order
        inside a row; rows keep their token order).
      total: static number of rows of the result. None: the number of valid
        tokens, which needs a concrete padding_mask; inside jit pass an upper
        bound (e.g. batch * seqlen): rows past the valid tokens are zero and
        belong to no sequence (the kernels give them output 0).
        With a concrete padding_mask it must be >= the number of valid tokens
        (fewer rows would drop tokens).

    Returns:
      x_unpadded: (total, ...).
      indices: int32 (total,) position of each row in the flattened (batch *
        seqlen) input; batch * seqlen for filler rows.
      cu_seqlens: int32 (batch + 1,) prefix sums of the per-row token counts.
      max_seqlen: static int, the longest row when padding_mask is concrete,
        else seqlen (an upper bound, valid for the varlen functions).

    Raises:
      ValueError: x is not (batch, seqlen, ...); padding_mask is not bool
        (batch, seqlen); total is missing with a traced mask, negative, or
        below the number of valid tokens.
      TypeError: total is not a static int.
    """
    padding_mask = validate.padding_mask(x, padding_mask)
    batch, seqlen = x.shape[:2]
    lengths = jnp.sum(padding_mask, axis=1, dtype=jnp.int32)
    try:
        concrete = np.asarray(lengths)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None
    total = validate.unpad_total(total, None if concrete is None else int(concrete.sum()))
    max_seqlen = int(concrete.max(initial=0)) if concrete is not None else seqlen
    flat = padding_mask.reshape(-1)
    (indices,) = jnp.nonzero(flat, size=total, fill_value=batch * seqlen)
    indices = indices.astype(jnp.int32)
    x_unpadded = jnp.take(x.reshape(batch * seqlen, *x.shape[2:]), indices, axis=0,
                          mode="fill", fill_value=0)
    cu_seqlens = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(lengths, dtype=jnp.int32)])
    return x_unpadded, indices, cu_seqlens, max_seqlen


def pad_input(x_unpadded, indices, batch: int, seqlen: int):
    """Inverse of `unpad_input`: (total, ...) rows back to (batch, seqlen,
    ...), zeros at the padding. Filler rows (index batch * seqlen) are
    dropped."""
    x_unpadded = jnp.asarray(x_unpadded)
    indices = jnp.asarray(indices)
    if indices.shape != x_unpadded.shape[:1]:
        raise ValueError(
            f"indices must have shape ({x_unpadded.shape[0]},) like x_unpadded's rows, got "
            f"{validate.shape_str(indices)}"
        )
    out = jnp.zeros((batch * seqlen, *x_unpadded.shape[1:]), x_unpadded.dtype)
    out = out.at[indices].set(x_unpadded, mode="drop")
    return out.reshape(batch, seqlen, *x_unpadded.shape[1:])
