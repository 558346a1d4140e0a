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

import os
import statistics
import sys
import time

import jax

import jax_flash

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_attention import jax_benchmark_fn, make_jax_inputs  # noqa: E402


def main(seqlens):
    for seqlen in seqlens:
        batch = max(1, 16384 // seqlen)
        q, k, v, do = make_jax_inputs(0, (batch, seqlen, 16, 128), n_sets=1)[0]
        one = jax_benchmark_fn(jax_flash.flash_attn_func, "fwd_bwd")

        def chained(q, k, v, do):
            def body(_, q):
                _, (dq, _, _) = one(q, k, v, do)
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
