"""jax_flash: FlashAttention-2 for JAX.

Our own CUDA (CuTe) kernels behind XLA FFI custom calls on NVIDIA GPUs, and the
plain-JAX reference (`jax_flash.reference`) on every other backend.
"""

from jax_flash import reference
from jax_flash._src.extension import compiled_head_dims, has_kernels
from jax_flash._src.info import info
from jax_flash.flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
)
from jax_flash.kvcache import flash_attn_with_kvcache
from jax_flash.nn import attention
from jax_flash.padding import pad_input, unpad_input
from jax_flash.ring import ring_attention, zigzag_shard, zigzag_unshard
from jax_flash.varlen import (
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)

__all__ = [
    "attention",
    "compiled_head_dims",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "has_kernels",
    "info",
    "pad_input",
    "reference",
    "ring_attention",
    "unpad_input",
    "zigzag_shard",
    "zigzag_unshard",
]

__version__ = "0.1.0"
