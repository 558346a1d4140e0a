#!/usr/bin/env python3
"""One decode call of bench_decode's cases, fenced by cuProfilerStart /
cuProfilerStop, for `ncu --profile-from-start off` to profile that call's
kernels alone (ours: the split kernel and the combine; cuDNN's: its own):

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis python scripts/decode_profile.py \\
        --impl cudnn --batch 32 --context 32768

It prints the K/V bytes the call must read, to set against ncu's
dram__bytes_read.sum. `STEPS=ncudecode scripts/gpu_run.sh` runs it for
jax_flash and cuDNN.
"""

import argparse
import ctypes
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_decode import decode_case, kv_bytes  # noqa: E402


def profiler(start: bool):
    """cuProfilerStart/Stop on the device's primary context (XLA's)."""
    cuda = ctypes.CDLL("libcuda.so.1")
    device, ctx = ctypes.c_int(), ctypes.c_void_p()
    for status in (cuda.cuDeviceGet(ctypes.byref(device), 0),
                   cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device),
                   cuda.cuCtxPushCurrent_v2(ctx),
                   (cuda.cuProfilerStart if start else cuda.cuProfilerStop)(),
                   cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p())),
                   cuda.cuDevicePrimaryCtxRelease_v2(device)):
        if status != 0:
            sys.exit(f"CUDA driver call failed with status {status}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impl", default="jax_flash", choices=["jax_flash", "cudnn", "xla"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--nheads", type=int, default=32)
    p.add_argument("--nheads-k", type=int, default=8)
    p.add_argument("--page-size", type=int, default=0)
    a = p.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit("needs a GPU (ncu profiles CUDA kernels)")
    fn, sets = decode_case(a.impl, a.batch, a.context, a.nheads, a.nheads_k, a.headdim,
                           a.page_size, jnp.bfloat16, 0)
    fn = jax.jit(fn)
    for _ in range(3):  # compile, then settle
        jax.block_until_ready(fn(*sets[0]))
    profiler(True)
    jax.block_until_ready(fn(*sets[0]))
    profiler(False)
    print(f"impl={a.impl} batch={a.batch} context={a.context} d={a.headdim} "
          f"page_size={a.page_size} kv_bytes={kv_bytes(a.batch, a.context, a.nheads_k, a.headdim)}")


if __name__ == "__main__":
    main()
