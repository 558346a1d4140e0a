"""The GPU test grid shared by the forward and backward kernel tests: the
issue's dtypes, head dims (odd ones included), sequence-length pairs and head
layouts, and the skip for head dims a narrowed build did not compile."""

import jax
import jax.numpy as jnp
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
