"""Where a backward result departs from the reference: per gradient, the max
error, the low-precision reference's error, and the (batch, row, head, col)
of the worst entry. Usage: debug_bwd.py d sq sk nheads nheads_k causal [dtype]"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_flash
from jax_flash import reference

d, sq, sk, h, hk, causal = (int(x) for x in sys.argv[1:7])
dtype = jnp.dtype(sys.argv[7] if len(sys.argv) > 7 else "float16")
ks = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(ks[0], (2, sq, h, d)).astype(dtype)
k = jax.random.normal(ks[1], (2, sk, hk, d)).astype(dtype)
v = jax.random.normal(ks[2], (2, sk, hk, d)).astype(dtype)
do = jax.random.normal(ks[3], (2, sq, h, d)).astype(dtype)


def vjp(f):
    return jax.vjp(f, q, k, v)[1](do)


for det in (False, True):
    g = vjp(lambda q, k, v: jax_flash.flash_attn_func(q, k, v, causal=bool(causal), deterministic=det))
    r = vjp(lambda q, k, v: reference.attention_ref(q, k, v, causal=bool(causal), upcast=True)[0])
    lo = vjp(lambda q, k, v: reference.attention_ref(q, k, v, causal=bool(causal), upcast=False)[0])
    for name, a, b, c in zip(("dq", "dk", "dv"), g, r, lo):
        a, b, c = (np.asarray(x, np.float32) for x in (a, b, c))
        err = np.abs(a - b)
        idx = np.unravel_index(err.argmax(), err.shape)
        rows_bad = np.unique(np.nonzero(err > 3 * np.abs(c - b).max() + 1e-5)[1])
        print(f"det={det} {name}: err {err.max():.4g} low {np.abs(c - b).max():.4g} at {idx} "
              f"kernel {a[idx]:.4g} ref {b[idx]:.4g}; bad rows {rows_bad[:10]} ({rows_bad.size})")
