"""jax_flash: FlashAttention-2 for JAX.

Our own CUDA (CuTe) kernels behind XLA FFI custom calls on NVIDIA GPUs, and the
plain-JAX reference (`jax_flash.reference`) on every other backend.
"""

from jax_flash import reference
from jax_flash._ffi import compiled_head_dims, has_kernels
from jax_flash.flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
)

__all__ = [
    "compiled_head_dims",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "has_kernels",
    "reference",
]

__version__ = "0.1.0"
