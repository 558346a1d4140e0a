"""The GPU test grid shared by the forward and backward kernel tests: the
issue's dtypes, head dims (odd ones included), sequence-length pairs and head
layouts, and the skip for head dims a narrowed build did not compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash

requires_gpu = pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="needs a CUDA GPU (kernels run on GPU only)"
)

DTYPES = [jnp.float16, jnp.bfloat16]
HEAD_DIMS = [32, 40, 59, 64, 96, 111, 128, 160, 192, 224, 256]
SEQLENS = [(1, 147), (113, 203), (108, 256), (512, 256), (1023, 1024), (2048, 2048)]
# (nheads, nheads_k): MHA, GQA, MQA
HEADS = {"mha": (4, 4), "gqa": (6, 2), "mqa": (4, 1)}


def skip_if_not_compiled(head_dim):
    padded = -(-head_dim // 8) * 8
    if not any(d >= padded for d in jax_flash.compiled_head_dims()):
        pytest.skip(f"head dim {head_dim}: no kernel in this build (JAX_FLASH_HEADDIMS)")


def check_fa_rule(results, atol):
    """FlashAttention's rule on [(out, grads) of the kernel, of the float32
    reference, of the low-precision reference]: the kernel's max error vs
    float32 within 2x (out) / 3x (dq, dk, dv) the low-precision reference's,
    plus atol; everything finite."""
    (out, grads), (out32, grads32), (out_lo, grads_lo) = results
    pairs = [("out", out, out32, out_lo, 2.0)]
    pairs += [(n, g, r, lo, 3.0) for n, g, r, lo in zip(("dq", "dk", "dv"), grads, grads32, grads_lo)]
    for name, x, r, lo, factor in pairs:
        x, r, lo = (np.asarray(a, np.float32) for a in (x, r, lo))
        assert np.isfinite(x).all(), f"{name} has NaN/inf"
        err, low_err = np.abs(x - r).max(initial=0), np.abs(lo - r).max(initial=0)
        assert err <= factor * low_err + atol, (name, err, low_err)
