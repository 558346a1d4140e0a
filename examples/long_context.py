"""A sequence sharded over devices: ring attention in `jax.shard_map`,
checked against one device attending to the whole sequence.

The sequence axis of q, k and v is split over a mesh axis "sp" of n devices
in the zigzag layout (`jax_flash.zigzag_shard`: device i holds chunks i and
2n - 1 - i of 2n, so causal work is even). Two layers' worth of attention
run on that layout, forward and backward under one `jax.jit`:

1. causal attention over the whole sequence (`jax_flash.ring_attention`,
   K/V blocks passed round the ring: collective-permutes);
2. causal sliding-window attention, window 96, on the same layout: the ring
   runs only the steps whose keys some query can see.

Each output and gradient is compared with `flash_attn_func` on one device
over the natural-order sequence, and the compiled program's collectives are
counted. It prints the mesh, the per-device length, the max differences and
`ring attention matches the attention on one device: yes` (exit 1 otherwise).

On a machine without several accelerators it runs on 8 CPU host devices (the
plain-JAX reference computes each block; 11.7-12.5 s for the whole command
on a 2-core CPU in three runs, mostly compiling). Usage, from the repository
root:

  python examples/long_context.py
  python examples/long_context.py --tokens 8192 --devices 4
"""

from __future__ import annotations

import argparse
import os
import re
import sys

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    # 8 CPU host devices; it only affects the host platform (XLA reads it once,
    # before jax initialises), not a GPU run.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_flash  # noqa: E402

WINDOW = 96
_COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|collective-permute|all-reduce|"
                         r"reduce-scatter)(?:-start)?\(")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="global sequence length")
    p.add_argument("--devices", type=int, default=0, help="ring size (default: all)")
    a = p.parse_args()
    devices = jax.devices()
    n = a.devices or len(devices)
    if n > len(devices) or a.tokens % (2 * n):
        p.error(f"--devices {n} needs <= {len(devices)} devices and --tokens divisible by {2 * n}")
    mesh = jax.sharding.Mesh(np.asarray(devices[:n]), ("sp",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    print(f"mesh: {n} x {devices[0].platform} devices on axis 'sp'; {a.tokens} tokens, "
          f"{a.tokens // n} per device (zigzag layout)")

    batch, nheads, nheads_k, head_dim = 1, 8, 2, 64
    keys = jax.random.split(jax.random.key(0), 4)
    shapes = [(batch, a.tokens, h, head_dim) for h in (nheads, nheads_k, nheads_k, nheads)]
    q, k, v, d_out = (jax.random.normal(key, s, jnp.bfloat16) for key, s in zip(keys, shapes))

    def ring(window):
        local = lambda q, k, v: jax_flash.ring_attention(  # noqa: E731
            q, k, v, axis_name="sp", causal=True, layout="zigzag", window_size=window,
            kv_exchange="ring")
        return jax.shard_map(local, mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"))

    def single(window):
        return lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=True,
                                                         window_size=window)

    def out_and_grads(fn, q, k, v, d_out):
        out, pullback = jax.vjp(fn, q, k, v)
        return out, pullback(d_out)

    # Reordering into the zigzag layout belongs in the data pipeline: done
    # here on the host, outside the jitted step.
    to_zz = lambda x: jax.device_put(jax_flash.zigzag_shard(x, n),  # noqa: E731
                                     jax.sharding.NamedSharding(mesh, P(None, "sp")))
    ok = True
    for name, window in (("causal", (-1, -1)), (f"window {WINDOW}", (WINDOW, 0))):
        step = jax.jit(lambda q, k, v, d, fn=ring(window): out_and_grads(fn, q, k, v, d))
        compiled = step.lower(*(to_zz(x) for x in (q, k, v, d_out))).compile()
        counts = {}
        for m in _COLLECTIVE.finditer(compiled.as_text()):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        got = compiled(*(to_zz(x) for x in (q, k, v, d_out)))
        got = jax.tree.map(lambda x: jax_flash.zigzag_unshard(x, n), got)
        want = jax.jit(lambda q, k, v, d, fn=single(window): out_and_grads(fn, q, k, v, d))(
            q, k, v, d_out)
        diffs = [float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
                 for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
        scale = [float(jnp.max(jnp.abs(y.astype(jnp.float32)))) for y in jax.tree.leaves(want)]
        # bf16 outputs and per-block partials: a few bf16 ulps of the largest value.
        good = all(d <= 0.05 * s + 1e-3 for d, s in zip(diffs, scale))
        ok &= good
        print(f"{name:>10}: max |ring - single| out {diffs[0]:.2e}, dq {diffs[1]:.2e}, "
              f"dk {diffs[2]:.2e}, dv {diffs[3]:.2e}; collectives in the step: "
              + (", ".join(f"{k} x{c}" for k, c in sorted(counts.items())) or "none"))
    print(f"ring attention matches the attention on one device: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
