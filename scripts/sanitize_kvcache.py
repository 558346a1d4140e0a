#!/usr/bin/env python3
"""flash_attn_with_kvcache's decode and append kernels on adversarial tables, for
compute-sanitizer (run on the GPU machine, from the repository root):

  compute-sanitizer --tool memcheck python scripts/sanitize_kvcache.py
  compute-sanitizer --tool racecheck --kernel-name kns=decode_ \
      python scripts/sanitize_kvcache.py --quick
  compute-sanitizer --tool initcheck --check-api-memory-access no \
      python scripts/sanitize_kvcache.py --quick
  compute-sanitizer --tool synccheck --kernel-name kns=decode_ \
      python scripts/sanitize_kvcache.py --quick

(`STEPS=sanitize scripts/gpu_run.sh` runs the first three.) The kernel-name
filter keeps the slow tools on our decode and combine kernels, except
initcheck: a kernel it does not check does not mark what it writes as
initialized (XLA's rotary output, read by our kernels, would be reported).

Every case feeds the kernels tables no caller should send: lengths past the
capacity and negative, block_table entries and cache_batch_idx out of range
(both signs), cache_leftpad past the length, empty sequences, windows wider
than everything, a one-row cache, pages of one row; contiguous and paged
caches (page sizes 1, 8, 16, 48, 256: cp.async and copy engine boxes), one
split, three, nine, and the automatic choice;
with and without an append and rotary. The result must be the reference's
clamped one (FlashAttention's error rule) and finite. Exit status 1 on any
mismatch; memcheck reports any read or write outside a buffer.

XLA normally sub-allocates every buffer from one big pool, where memcheck
only sees accesses past the pool. XLA_PYTHON_CLIENT_ALLOCATOR=platform
gives each buffer its own cudaMalloc, so a read one row past a cache is
caught; command buffers (CUDA graphs) are turned off so each kernel launch
is reported on its own; autotuning is off: it launches XLA's candidate
GEMM kernels, and under racecheck one of them raised a hardware exception
the tool could not attribute (our kernels are what is checked here).
`--only d64-page16,d40` runs the cases whose names contain one of the
strings; `--part 2/4` every fourth case from the second. Run one tool at a
time: several sanitized processes at once crashed the tools, and a
memcheck process that runs every case can crash (SIGSEGV in XLA's compile
after about 25 cases) where each part alone passes: gpu_run.sh runs
memcheck in four parts.
"""

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_gpu_enable_command_buffer= --xla_gpu_autotune_level=0").strip()
os.environ["JAX_FLASH_KVCACHE_KERNELS"] = "1"  # the kernels, not the reference
os.environ.setdefault("JAX_FLASH_KVCACHE_APPEND", "1")  # and the append kernel (0: JAX's)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_flash  # noqa: E402
from jax_flash.reference import kvcache_attention_ref  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from kvcache_cases import make_case  # noqa: E402


def cases(quick):
    """(name, make_case kwargs, options, num_splits) of every adversarial case."""
    dims = [d for d in (64, 128, 256) if any(c >= d for c in jax_flash.compiled_head_dims())]
    dims = dims[:1] if quick else dims
    for head_dim in dims:
        for page_size in (0, 1, 8, 16, 48, 256):
            for splits in ((3,) if quick else (1, 3, 0)):
                for seqlen_new, rotary in ((0, None), (2, (32, False))):
                    kw = dict(batch=4, head_dim=head_dim, heads=(6, 2), seqlen_q=3,
                              seqlen_cache=150, page_size=page_size, seqlen_new=seqlen_new,
                              rotary=rotary, batch_idx=not page_size, leftpad=not page_size,
                              alibi=True, adversarial=True)
                    yield (f"d{head_dim}-page{page_size}-splits{splits}-new{seqlen_new}", kw,
                           dict(causal=True), splits)
        # Edges: one-row cache; every sequence empty; windows wider than
        # everything; many rows per K/V head (several row blocks).
        yield f"d{head_dim}-one-row", dict(batch=2, head_dim=head_dim, seqlen_cache=1,
                                          page_size=1, adversarial=True), {}, 0
        yield f"d{head_dim}-wide-window", dict(batch=2, head_dim=head_dim, seqlen_cache=200,
                                              seqlen_q=5, adversarial=True), \
            dict(window_size=(10 ** 6, 10 ** 6), softcap=20.0), 3
        yield f"d{head_dim}-many-rows", dict(batch=2, head_dim=head_dim, heads=(32, 1),
                                            seqlen_q=16, seqlen_cache=300, page_size=16,
                                            adversarial=True), dict(causal=True), 0
        # Splits enough for the combine to merge groups of threads through
        # shared memory, rows that leave the last combine block a row short.
        yield f"d{head_dim}-many-splits", dict(batch=3, head_dim=head_dim, heads=(3, 1),
                                              seqlen_q=3, seqlen_cache=700,
                                              adversarial=True), dict(causal=True), 9
    yield "d40-padded", dict(batch=2, head_dim=40, seqlen_cache=100, seqlen_new=1,
                             adversarial=True), {}, 2


def check(name, kw, opts, splits):
    arrays, statics = make_case(11, **kw)
    opts = {**statics, **opts}
    empty = name.endswith("one-row")
    if empty:  # every sequence empty, however the lengths clamp
        arrays["cache_seqlens"] = jnp.asarray([-1, 0], jnp.int32)
    out, lse = jax_flash.flash_attn_with_kvcache(**arrays, **opts, num_splits=splits,
                                                 return_softmax_lse=True)[:2]
    ref32 = kvcache_attention_ref(**arrays, **opts)
    ref_lo = kvcache_attention_ref(**arrays, **opts, upcast=False)
    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    out32, out_lo = np.asarray(ref32[0], np.float32), np.asarray(ref_lo[0], np.float32)
    problems = []
    if not np.isfinite(out).all():
        problems.append("non-finite output")
    err, low = np.abs(out - out32).max(initial=0), np.abs(out_lo - out32).max(initial=0)
    if not err <= 2 * low + 1e-4:
        problems.append(f"out error {err:.3g} > 2 x {low:.3g} + 1e-4")
    if not (np.isposinf(lse) == np.isposinf(np.asarray(ref32[1]))).all():
        problems.append("rows without keys differ")
    print(f"{name:32} {'FAIL: ' + '; '.join(problems) if problems else 'ok'}", flush=True)
    return not problems


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="one head dim, three splits only (racecheck and initcheck are slow)")
    p.add_argument("--only", default="",
                   help="comma-separated substrings: run the cases whose names contain one")
    p.add_argument("--part", default="1/1",
                   help="K/N: of the selected cases, run every N-th from the K-th (1-based)")
    a = p.parse_args()
    k, _, n = a.part.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        p.error(f"--part: expected K/N with 1 <= K <= N, got {a.part!r}")
    k, n = int(k), int(n)
    if jax.default_backend() != "gpu" or not jax_flash.has_kernels():
        sys.exit("needs a GPU and the compiled extension")
    only = [s for s in a.only.split(",") if s]
    selected = [c for c in cases(a.quick) if not only or any(s in c[0] for s in only)]
    results = [check(*c) for c in selected[k - 1::n]]
    print(f"{sum(results)} / {len(results)} cases ok")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
