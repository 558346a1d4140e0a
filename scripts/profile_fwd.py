"""One forward launch of jax_flash and of PyTorch's FlashAttention-2 on the
same shape, for `ncu` to compare (scripts/gpu_check.sh profile)."""

import sys

which = sys.argv[1]
d = int(sys.argv[2]) if len(sys.argv) > 2 else 128
b, s, h = 4, 4096, 2048 // d
if which == "jax":
    import jax
    import jax.numpy as jnp

    import jax_flash

    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in ks)
    f = jax.jit(lambda q, k, v: jax_flash.flash_attn_func(q, k, v))
    for _ in range(3):
        f(q, k, v).block_until_ready()
else:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for _ in range(3):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.cuda.synchronize()

if which == "jax" and len(sys.argv) > 3 and sys.argv[3] == "time":
    # Per-call time with dispatch overhead (one jit call per kernel) against
    # ten dependent kernels inside one jit call.
    import time

    def chain(q, k, v):
        return jax.lax.fori_loop(0, 10, lambda i, x: jax_flash.flash_attn_func(x, k, v), q)

    g = jax.jit(chain)
    g(q, k, v).block_until_ready()
    for name, fn, calls in (("per-call", f, 1), ("in-jit x10", g, 10)):
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            for _ in range(5):
                out = fn(q, k, v)
            out.block_until_ready()
            times.append((time.perf_counter() - t0) / (5 * calls))
        times.sort()
        print(f"d={d} {name}: median {times[5] * 1e3:.3f} ms per kernel")
