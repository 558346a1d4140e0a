"""Test-session setup: 8 host (CPU) devices for the sharding tests.

XLA reads XLA_FLAGS once, when JAX initialises its backends, so the flag is
set here, before any test module imports jax. An existing XLA_FLAGS value is
kept (appended to), and a device count already given there wins. On GPUs the
flag only affects the host platform: the tests use jax.devices().
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
_flags = os.environ.get("XLA_FLAGS", "")
if _FLAG not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} {_FLAG}=8".strip()
