"""`python -m jax_flash`: prints `jax_flash.info()`, one `key: value` a line
(paste it into bug reports). Exits 0, also on a CPU-only install."""

from jax_flash._src.info import format_info, info

if __name__ == "__main__":
    print(format_info(info()))
