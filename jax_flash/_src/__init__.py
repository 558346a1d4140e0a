"""jax_flash's internals: argument binding and validation, the kernel plan,
the backends and the extension loader. Nothing here is public API."""
