"""Loads the compiled extension `jax_flash._C` and registers its XLA FFI
targets, once.

The extension is optional at import time: a CPU-only install has none, and the
public functions then run `jax_flash.reference`. On a GPU backend a missing or
broken extension is an error (`kernels_or_raise`), never a silent fallback.
"""

from __future__ import annotations

import functools

import jax

try:
    # Not `from jax_flash import _C`: when _C is missing, that form reports a
    # misleading "partially initialized module ... circular import" error;
    # this one says "No module named 'jax_flash._C'" (kept for jax_flash.info()).
    import jax_flash._C as _C
except ImportError as e:  # CPU-only install, or a broken build
    _C = None
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None


def has_kernels() -> bool:
    """Whether this install carries the compiled CUDA kernels."""
    return _C is not None


def import_error() -> str | None:
    """Why the extension did not load (the ImportError's text), or None."""
    return None if _IMPORT_ERROR is None else str(_IMPORT_ERROR)


def on_gpu() -> bool:
    """Whether JAX's default backend is a CUDA GPU (where our kernels run)."""
    return jax.default_backend() == "gpu"


@functools.cache
def compiled_head_dims() -> tuple[int, ...]:
    """Head dims with a compiled kernel (empty without the extension)."""
    return tuple(_C.compiled_head_dims()) if _C is not None else ()


@functools.cache
def num_sms() -> int:
    """Streaming multiprocessors of the first GPU (132 if JAX does not say)."""
    devices = jax.local_devices(backend="gpu")
    return int(getattr(devices[0], "core_count", 132) or 132)


@functools.cache
def _register() -> None:
    for name, capsule in _C.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")


def kernels_or_raise() -> None:
    """Registers the FFI targets, or explains why there are none."""
    if _C is None:
        raise RuntimeError(
            "jax_flash: JAX runs on a GPU but the jax_flash CUDA extension is not "
            "available (was the package built with JAX_FLASH_BUILD_CUDA=OFF, or "
            f"without nvcc?). Import error: {_IMPORT_ERROR}"
        )
    _register()
