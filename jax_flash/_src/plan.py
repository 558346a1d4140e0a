"""The kernel plan of one call, asked from the compiled extension.

`_C.plan` (csrc) owns every sizing rule: the padded head dim, which compiled
kernel serves it, the variant, and the backward's dQ accumulator and counters
(deterministic slices or ordered additions); `_C.kvcache_plan` the same for
the kv-cache decode kernels (splits and their scratch). Python sizes nothing
itself, so these rules cannot drift from the kernels'.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from jax_flash._src import extension
from jax_flash._src.kvcache import KVCacheSpec
from jax_flash._src.spec import AttentionSpec


class KernelPlan(NamedTuple):
    head_dim_padded: int  # the head dim the kernels read: q/k/v/out/d_out are zero-padded to it
    kernel_head_dim: int  # the compiled head dim that serves it
    variant: str  # "full", "local", "mods", "dropout" or "segs"
    family: str  # "sm80"
    # Backward float32 dQ accumulator: fixed layout, per leading batch element
    # (the caller prepends the leading dims); varlen, the whole shape.
    dq_accum_shape: tuple[int, ...]
    # int32 counters of ordered deterministic mode, same convention; (0,) unused.
    dq_semaphore_shape: tuple[int, ...]
    dq_accum_splits: int  # informative: accumulator slices
    dq_ordered: bool  # informative: K/V tiles add into dQ in order


@functools.lru_cache(maxsize=None)
def plan_for(batch: int, seqlen_q: int, seqlen_k: int, nheads: int, nheads_k: int,
             head_dim: int, total_q: int, local: bool, softcap: bool, alibi: bool,
             dropout: bool, segments: bool, deterministic: bool, num_sms: int) -> KernelPlan:
    """`_C.plan` for these arguments (see csrc), cached.

    Args:
      batch, seqlen_q, seqlen_k: the fixed shape; varlen: the number of
        sequences and max_seqlen_q / max_seqlen_k.
      total_q: varlen: rows of q's packed buffer; -1: fixed layout.
      local: a window is set (causal included); False with segment ids (the
        window is folded into the segment tables).
      num_sms: streaming multiprocessors of the GPU.

    Raises:
      RuntimeError: the extension is absent.
      ValueError: the head dim has no compiled kernel in this build.
    """
    if extension._C is None:
        extension.kernels_or_raise()  # raises, explaining why there are no kernels
    raw = extension._C.plan(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, total_q,
                            local, softcap, alibi, dropout, segments, deterministic, num_sms)
    return KernelPlan(
        head_dim_padded=int(raw["head_dim_padded"]),
        kernel_head_dim=int(raw["kernel_head_dim"]),
        variant=str(raw["variant"]),
        family=str(raw["family"]),
        dq_accum_shape=tuple(int(n) for n in raw["dq_accum_shape"]),
        dq_semaphore_shape=tuple(int(n) for n in raw["dq_semaphore_shape"]),
        dq_accum_splits=int(raw["dq_accum_splits"]),
        dq_ordered=bool(raw["dq_ordered"]),
    )


def plan(spec: AttentionSpec, num_sms: int | None = None) -> KernelPlan:
    """The plan of a bound call (num_sms: the GPU's, unless given)."""
    return plan_for(
        spec.batch,
        spec.max_seqlen_q if spec.varlen else spec.seqlen_q,
        spec.max_seqlen_k if spec.varlen else spec.seqlen_k,
        spec.nheads, spec.nheads_k, spec.head_dim,
        spec.seqlen_q if spec.varlen else -1,
        spec.local and not spec.segments,
        spec.softcap > 0, spec.has_alibi, spec.dropout_p > 0, spec.segments,
        spec.deterministic,
        extension.num_sms() if num_sms is None else num_sms,
    )


class KVCachePlan(NamedTuple):
    head_dim_padded: int  # the head dim the kernel reads: q and the caches are padded to it
    kernel_head_dim: int  # the compiled head dim that serves it
    num_splits: int  # thread blocks sharing one sequence's keys (1: no combine)
    blocks_per_sm: int  # blocks a SM holds in the split count's model of rounds
    copy_engine: bool  # K/V tiles by sm_90's bulk tensor copies (csrc/decode/tma.h)
    m_blocks: int  # row blocks (block_m query rows) per K/V head
    narrow: bool  # the tile: one 16-row slab with a deeper pipeline, or wide
    block_m: int  # query rows per thread block
    block_n: int  # keys per K/V tile
    stages: int  # K/V tiles in shared memory
    # float32 scratch of the split kernel, whole shapes; (0,) with one split.
    out_accum_shape: tuple[int, ...]
    lse_accum_shape: tuple[int, ...]
    num_sms: int  # informative: the device the tile and split count were made for
    smem_per_sm: int
    smem_per_block: int
    dram_gbps: int  # 0: unknown
    cc_major: int  # compute capability's major number; 0: unknown


@functools.lru_cache(maxsize=None)
def kvcache_plan_for(batch: int, seqlen_q: int, nheads: int, nheads_k: int, head_dim: int,
                     seqlen_cache: int, num_splits: int, num_sms: int = 0,
                     smem_per_sm: int = 0, smem_per_block: int = 0,
                     page_size: int = 0, dram_gbps: int = 0,
                     cc_major: int = 0) -> KVCachePlan:
    """`_C.kvcache_plan` for these arguments (see csrc/host/plan.h), cached.

    The tile and (num_splits 0) the split count are chosen for num_sms
    multiprocessors with smem_per_sm / smem_per_block bytes of shared memory
    and dram_gbps GB/s of DRAM bandwidth (0: unknown) and compute capability
    cc_major (0: unknown; sm_90's copy engine needs 9), or for the current
    CUDA device (asked from the CUDA runtime) when num_sms is 0; page_size is
    the keys per page of a paged cache, 0 contiguous.

    Raises:
      RuntimeError: the extension is absent, or the device could not be asked.
      ValueError: the head dim has no compiled kernel in this build.
    """
    if extension._C is None:
        extension.kernels_or_raise()
    raw = extension._C.kvcache_plan(batch, seqlen_q, nheads, nheads_k, head_dim, seqlen_cache,
                                    num_splits, num_sms, smem_per_sm, smem_per_block,
                                    page_size, dram_gbps, cc_major)
    return KVCachePlan(
        head_dim_padded=int(raw["head_dim_padded"]),
        kernel_head_dim=int(raw["kernel_head_dim"]),
        num_splits=int(raw["num_splits"]),
        blocks_per_sm=int(raw["blocks_per_sm"]),
        copy_engine=bool(raw["copy_engine"]),
        m_blocks=int(raw["m_blocks"]),
        narrow=bool(raw["narrow"]),
        block_m=int(raw["block_m"]),
        block_n=int(raw["block_n"]),
        stages=int(raw["stages"]),
        out_accum_shape=tuple(int(n) for n in raw["out_accum_shape"]),
        lse_accum_shape=tuple(int(n) for n in raw["lse_accum_shape"]),
        num_sms=int(raw["num_sms"]),
        smem_per_sm=int(raw["smem_per_sm"]),
        smem_per_block=int(raw["smem_per_block"]),
        dram_gbps=int(raw["dram_gbps"]),
        cc_major=int(raw["cc_major"]),
    )


def kvcache_plan(spec: KVCacheSpec) -> KVCachePlan:
    """The plan of a bound kv-cache call on the current CUDA device."""
    return kvcache_plan_for(spec.batch, spec.seqlen_q, spec.nheads, spec.nheads_k,
                            spec.head_dim, spec.seqlen_cache, spec.num_splits,
                            page_size=spec.page_size if spec.paged else 0)
