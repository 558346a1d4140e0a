"""The kernels' dropout mask (csrc/score_mods.h) in plain JAX, bit for bit,
so that the reference, the CPU path and the GPU kernels drop the same
entries. Public as `jax_flash.reference.<name>`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: int, b):
    """(hi, lo) 32-bit halves of the 64-bit product of constant a and uint32 b."""
    b = b.astype(jnp.uint32)
    lo = b * jnp.uint32(a)
    a0, a1 = jnp.uint32(a & 0xFFFF), jnp.uint32(a >> 16)
    b0, b1 = b & jnp.uint32(0xFFFF), b >> jnp.uint32(16)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1  # each < 2^32
    mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)  # < 3 * 2^16
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
    return hi, lo


def philox4x32_10(counter, key):
    """Philox-4x32 with 10 rounds (Salmon et al., SC 2011).

    Args:
      counter: four uint32 arrays (broadcastable to each other).
      key: two uint32 arrays.

    Returns:
      Four uint32 arrays: the random words.
    """
    c0, c1, c2, c3 = (jnp.asarray(c, jnp.uint32) for c in counter)
    k0, k1 = (jnp.asarray(k, jnp.uint32) for k in key)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_MUL[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + jnp.uint32(_PHILOX_WEYL[0])
        k1 = k1 + jnp.uint32(_PHILOX_WEYL[1])
    return c0, c1, c2, c3


def dropout_threshold(dropout_p: float) -> int:
    """An entry is dropped when its 16-bit random number is below this:
    ``round(dropout_p * 65536)``, so dropout_p is honoured to 2^-17."""
    return int(np.rint(np.float64(np.float32(dropout_p)) * 65536.0))


def dropout_rng(key, batch: int):
    """The kernels' per-batch-element RNG state from a JAX PRNG key.

    Returns uint32 ``(batch, 4)``: the key's 64-bit seed (two words drawn with
    ``jax.random.bits``), the batch index and the index of head 0 (0 here; a
    shard of a call split over heads adds its first global head, see
    `jax_flash.sharding`). The batch index is part of every counter, so the
    elements of a batch get independent masks; under ``vmap`` with
    per-example keys each example gets its own seed.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.arange(batch, dtype=jnp.uint32)
    return jnp.stack([jnp.broadcast_to(seed[0], (batch,)), jnp.broadcast_to(seed[1], (batch,)),
                      index, jnp.zeros_like(index)], axis=-1)


def dropout_keep_mask(rng, nheads: int, seqlen_q: int, seqlen_k: int, dropout_p: float):
    """Which attention probabilities survive dropout, as the kernels draw them.

    Entries are grouped in 16 x 16 blocks. Entry ``(i, j)`` of head ``h`` and
    batch element ``b`` takes 16 bits of the Philox-4x32-10 call with counter
    ``(j // 16, (i // 16) * 32 + lane, h + rng[b, 3], rng[b, 2])`` and key
    ``rng[b, :2]``,
    where ``lane = (i % 8) * 4 + (j % 8) // 2``; the bits are number
    ``slot = ((i % 16) // 8) * 4 + ((j % 16) // 8) * 2 + j % 2`` of the eight
    16-bit halves of the 128-bit result (low half of a word first). The entry
    is kept when that number is ``>= dropout_threshold(dropout_p)``.

    Args:
      rng: uint32 ``(batch, 4)`` from ``dropout_rng``.

    Returns:
      bool ``(batch, nheads, seqlen_q, seqlen_k)``, True = kept.
    """
    rng = jnp.asarray(rng, jnp.uint32)
    i = jnp.arange(seqlen_q, dtype=jnp.uint32)[None, None, :, None]
    j = jnp.arange(seqlen_k, dtype=jnp.uint32)[None, None, None, :]
    h = jnp.arange(nheads, dtype=jnp.uint32)[None, :, None, None]
    seed0, seed1, index, head0 = (rng[:, w][:, None, None, None] for w in range(4))
    lane = (i % 8) * 4 + (j % 8) // 2
    words = philox4x32_10((j // 16, (i // 16) * 32 + lane, h + head0, index), (seed0, seed1))
    slot = ((i % 16) // 8) * 4 + ((j % 16) // 8) * 2 + j % 2
    word = jnp.select([slot // 2 == w for w in range(3)], list(words[:3]), words[3])
    bits = jnp.where(slot % 2 == 1, word >> 16, word & jnp.uint32(0xFFFF))
    return bits >= jnp.uint32(dropout_threshold(dropout_p))
