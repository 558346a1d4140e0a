"""The kernel plan of one call, asked from the compiled extension.

`_C.plan` (csrc) owns every sizing rule: the padded head dim, which compiled
kernel serves it, the variant, and the backward's dQ accumulator and counters
(deterministic slices or ordered additions). Python sizes nothing itself, so
these rules cannot drift from the kernels'.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from jax_flash._src import extension
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
