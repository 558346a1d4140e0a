"""Test-session setup, before any test module imports jax.

XLA reads XLA_FLAGS once, when JAX initialises its backends, so the flags are
set here. An existing XLA_FLAGS value is kept (appended to), and a flag
already given there wins.
- 8 host (CPU) devices for the sharding tests. On GPUs this only affects the
  host platform: the tests use jax.devices().
- No GEMM autotuning on GPUs: the references compile hundreds of matmul
  shapes, and timing candidates for each would dominate the run.
- No up-front GPU memory pool, so that `pytest -n 16` workers share one GPU.
"""

import os

_DEFAULT_FLAGS = {
    "--xla_force_host_platform_device_count": "8",
    "--xla_gpu_autotune_level": "0",
}
_flags = os.environ.get("XLA_FLAGS", "")
for _flag, _value in _DEFAULT_FLAGS.items():
    if _flag not in _flags:
        _flags = f"{_flags} {_flag}={_value}".strip()
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
