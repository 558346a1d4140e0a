"""Is a training step's wall time the GPU's, or the host's?

    python scripts/dispatch_check.py [SEQLEN ...]

For each seqlen (batch * seqlen = 16384 tokens, 16 heads, d = 128, bf16):
  per-call   median wall time of one jitted forward + backward, calls back to back
  enqueue    host time to enqueue one such call (no waiting)
  chained    per step, 10 steps chained inside one jit (q += 0 * dq between
             steps, one small elementwise kernel), so no host work between steps
If enqueue approaches per-call, the host limits the step; if chained is well
below per-call, time goes between calls.
"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jax_flash


def main(seqlens):
    for seqlen in seqlens:
        batch = max(1, 16384 // seqlen)
        ks = jax.random.split(jax.random.key(0), 4)
        q, k, v, do = (jax.random.normal(kk, (batch, seqlen, 16, 128), jnp.bfloat16) for kk in ks)

        def step(q, k, v, do):
            out, vjp = jax.vjp(jax_flash.flash_attn_func, q, k, v)
            return out, vjp(do)

        one = jax.jit(step)

        def chained(q, k, v, do):
            def body(_, q):
                _, (dq, _, _) = step(q, k, v, do)
                return q + dq * 0

            return jax.lax.fori_loop(0, 10, body, q)

        chain = jax.jit(chained)
        jax.block_until_ready(one(q, k, v, do))
        jax.block_until_ready(chain(q, k, v, do))
        per_call, enqueue, chained_ms = [], [], []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(20):
                out = one(q, k, v, do)
            t1 = time.perf_counter()
            jax.block_until_ready(out)
            t2 = time.perf_counter()
            per_call.append((t2 - t0) / 20)
            enqueue.append((t1 - t0) / 20)
            t0 = time.perf_counter()
            jax.block_until_ready(chain(q, k, v, do))
            chained_ms.append((time.perf_counter() - t0) / 10)
        ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
        print(f"seqlen {seqlen:5d} batch {batch:2d}: per-call {ms(per_call):.3f} ms, "
              f"enqueue {ms(enqueue):.3f} ms, chained {ms(chained_ms):.3f} ms per step")


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [2048, 4096, 16384])
