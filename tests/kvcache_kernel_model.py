"""A NumPy model of the kv-cache decode kernels (csrc/decode/), block by
block: the clamping and key ranges of decode/sequence.h, the split of a
sequence's 64-key tiles, the warps' 16-row slabs and 16-key steps with their
own online softmax (exp2 units, P rounded to the input dtype), the warps'
merge (decode/kernel.h, write_rows) and the split combine (decode/combine.h).

It runs on the CPU, so the CPU tests check the kernels' decomposition (which
keys each block reads and masks, how partial results merge) against the
reference before any GPU run; the GPU tests then check the CUDA code itself.
Keep it in step with csrc/decode/ when either changes.
"""

import math

import numpy as np

LOG2E = np.float32(1.4426950408889634)
LN2 = np.float32(0.6931471805599453)
WARPS = 4


def _clamp(x, lo, hi):
    return min(max(int(x), lo), hi)


class Params:
    """DecodeParams from a bound call (spec, operands) and its arrays."""

    def __init__(self, spec, ops, num_splits, block_n=64, block_m=64):
        self.spec = spec
        self.num_splits = num_splits
        self.block_n, self.block_m = block_n, block_m
        self.seqlens = np.asarray(ops.cache_seqlens)
        self.batch_idx = np.asarray(ops.cache_batch_idx) if spec.has_batch_idx else None
        self.leftpad = np.asarray(ops.cache_leftpad) if spec.has_leftpad else None
        self.table = np.asarray(ops.block_table) if spec.paged else None
        self.alibi = np.asarray(ops.alibi) if spec.has_alibi else None
        self.page_size = spec.page_size if spec.paged else spec.seqlen_cache
        self.group = spec.nheads // spec.nheads_k
        # The host's clamp of the window (host/kvcache.cc).
        never = spec.seqlen_cache + spec.seqlen_q
        self.left = min(spec.window_left, never)
        self.right = min(spec.window_right, never)
        if spec.softcap > 0:
            self.premul, self.scale_log2 = spec.softmax_scale / spec.softcap, spec.softcap * LOG2E
        else:
            self.premul, self.scale_log2 = 0.0, spec.softmax_scale * LOG2E


class Sequence:
    """decode/sequence.h's SequenceInfo."""

    def __init__(self, p, b, split, row0, block_rows):
        s = p.spec
        c = _clamp(p.seqlens[b], 0, s.seqlen_cache - s.seqlen_new)
        self.length = c + s.seqlen_new
        self.leftpad = _clamp(p.leftpad[b], 0, c) if p.leftpad is not None else 0
        first_pos = self.length - s.seqlen_q + row0 // p.group
        last_pos = self.length - s.seqlen_q + (row0 + block_rows - 1) // p.group
        self.key_begin = self.leftpad
        if p.left >= 0:
            self.key_begin = max(self.key_begin, first_pos - p.left)
        self.key_end = self.length
        if p.right >= 0:
            self.key_end = min(self.key_end, last_pos + p.right + 1)
        self.tile_begin = self.tile_end = 0
        if self.key_begin < self.key_end:
            first = self.key_begin // p.block_n
            last = -(-self.key_end // p.block_n)
            per = -(-(last - first) // p.num_splits)
            self.tile_begin = min(first + split * per, last)
            self.tile_end = min(self.tile_begin + per, last)
        if p.table is not None:
            self.row = None
        else:
            row = _clamp(p.batch_idx[b], 0, s.batch_cache - 1) if p.batch_idx is not None else b
            self.first_row = row * s.seqlen_cache
        self.b = b

    def cache_row(self, p, j):
        if p.table is None:
            return self.first_row + j
        page = _clamp(p.table[self.b, j // p.page_size], 0, p.spec.batch_cache - 1)
        return page * p.page_size + j % p.page_size


def _row_bounds(p, seq, b, hk, m):
    """(lo, hi, pos, slope_log2) of row m; a padding row sees nothing."""
    s = p.spec
    if m >= p.group * s.seqlen_q:
        return 0, 0, 0, np.float32(0)
    i, head = m // p.group, hk * p.group + m % p.group
    pos = seq.length - s.seqlen_q + i
    lo = seq.leftpad if p.left < 0 else max(seq.leftpad, pos - p.left)
    hi = seq.length if p.right < 0 else min(seq.length, pos + p.right + 1)
    slope = np.float32(p.alibi[b, head]) * LOG2E if p.alibi is not None else np.float32(0)
    return lo, hi, pos, slope


def _scores(p, s_raw, keys, bounds):
    """ScoreMods on a (16 rows, 16 keys) float32 block."""
    x = np.tanh(s_raw * np.float32(p.premul)) if p.premul else s_raw
    x = (x * np.float32(p.scale_log2)).astype(np.float32)
    lo, hi, pos, slope = (np.array(v)[:, None] for v in zip(*bounds))
    if p.alibi is not None:
        x = x - slope.astype(np.float32) * np.abs(keys[None, :] - pos).astype(np.float32)
    visible = (keys[None, :] >= lo) & (keys[None, :] < hi)
    return np.where(visible, x, -np.inf).astype(np.float32)


def run(spec, ops, q, k_cache, v_cache, num_splits, block_n=64, block_m=64):
    """(out, lse) of the kernels for a bound call whose q and caches are
    already rotated and appended (`kvcache_ref.update`)."""
    p = Params(spec, ops, num_splits, block_n, block_m)
    dtype = q.dtype
    q = np.asarray(q).astype(np.float32)
    k_flat = np.asarray(k_cache).astype(np.float32).reshape(-1, spec.nheads_k, spec.head_dim)
    v_flat = np.asarray(v_cache).astype(np.float32).reshape(-1, spec.nheads_k, spec.head_dim)
    rows_total = p.group * spec.seqlen_q
    m_blocks = max(1, -(-rows_total // block_m))
    shape = (num_splits, spec.batch, spec.nheads, spec.seqlen_q)
    o_acc = np.zeros(shape + (spec.head_dim,), np.float32)
    lse_acc = np.full(shape, -np.inf, np.float32)
    for b in range(spec.batch):
        for hk in range(spec.nheads_k):
            for split in range(num_splits):
                for mb in range(m_blocks):
                    row0 = mb * block_m
                    seq = Sequence(p, b, split, row0, min(block_m, rows_total - row0))
                    _block(p, seq, b, hk, split, mb, q, k_flat, v_flat, dtype, o_acc, lse_acc)
    if num_splits == 1:
        out, lse = o_acc[0], lse_acc[0]
        lse = np.where(lse == -np.inf, np.inf, lse)
    else:
        out, lse = _combine(o_acc, lse_acc)
    return np.moveaxis(out, 2, 1).astype(dtype), lse.astype(np.float32)


def _block(p, seq, b, hk, split, mb, q, k_flat, v_flat, dtype, o_acc, lse_acc):
    s = p.spec
    d = s.head_dim
    rows_total = p.group * s.seqlen_q
    row0 = mb * p.block_m
    block_rows = min(p.block_m, rows_total - row0)
    warps_m = 1 if block_rows <= 16 else 2 if block_rows <= 32 else 4
    warps_n = WARPS // warps_m
    keys_per_warp = p.block_n // warps_n
    # Q rows of the block, zero past the group's rows.
    q_rows = np.zeros((16 * warps_m, d), np.float32)
    for r in range(min(block_rows, 16 * warps_m)):
        m = row0 + r
        q_rows[r] = q[b, m // p.group, hk * p.group + m % p.group]
    state = []
    for w in range(WARPS):
        slab = w // warps_n
        bounds = [_row_bounds(p, seq, b, hk, row0 + slab * 16 + r) for r in range(16)]
        state.append(dict(max=np.full(16, -np.inf, np.float32), sum=np.zeros(16, np.float32),
                          acc=np.zeros((16, d), np.float32), bounds=bounds, slab=slab))
    for tile in range(seq.tile_begin, seq.tile_end):
        keys = tile * p.block_n + np.arange(p.block_n)
        k_tile = np.zeros((p.block_n, d), np.float32)
        v_tile = np.zeros((p.block_n, d), np.float32)
        for r, key in enumerate(keys):
            if seq.key_begin <= key < seq.key_end:
                row = seq.cache_row(p, int(key))
                k_tile[r], v_tile[r] = k_flat[row, hk], v_flat[row, hk]
        for w, st in enumerate(state):
            wn = w % warps_n
            for step in range(keys_per_warp // 16):
                sl = slice(wn * keys_per_warp + step * 16, wn * keys_per_warp + step * 16 + 16)
                qs = q_rows[st["slab"] * 16:st["slab"] * 16 + 16]
                x = _scores(p, (qs @ k_tile[sl].T).astype(np.float32), keys[sl], st["bounds"])
                new_max = np.maximum(st["max"], x.max(axis=1))
                off = np.where(new_max == -np.inf, 0, new_max).astype(np.float32)
                rescale = np.exp2(st["max"] - off).astype(np.float32)
                prob = np.exp2(x - off[:, None]).astype(np.float32)
                st["sum"] = st["sum"] * rescale + prob.sum(axis=1)
                p16 = prob.astype(dtype).astype(np.float32)  # P in the input dtype
                st["acc"] = st["acc"] * rescale[:, None] + p16 @ v_tile[sl]
                st["max"] = new_max
    # write_rows: merge the warps of each slab, normalise, store.
    for br in range(block_rows):
        slab, r = divmod(br, 16)
        parts = [state[slab * warps_n + wn] for wn in range(warps_n)]
        mx = max(st["max"][r] for st in parts)
        m = row0 + br
        i, head = m // p.group, hk * p.group + m % p.group
        if mx == -np.inf:
            o, lse = np.zeros(d, np.float32), -np.inf
        else:
            scales = [np.exp2(st["max"][r] - mx) for st in parts]
            total = sum(st["sum"][r] * f for st, f in zip(parts, scales))
            o = sum(st["acc"][r] * f for st, f in zip(parts, scales)) / total
            lse = (mx + math.log2(total)) * LN2
        o_acc[split, b, head, i] = o
        lse_acc[split, b, head, i] = lse


def _combine(o_acc, lse_acc):
    mx = lse_acc.max(axis=0)
    safe = np.where(mx == -np.inf, 0, mx)
    total = np.exp(lse_acc - safe).sum(axis=0)
    lse = np.where(mx == -np.inf, np.inf, safe + np.log(np.where(total > 0, total, 1)))
    w = np.where(np.isfinite(lse), np.exp(lse_acc - np.where(np.isfinite(lse), lse, 0)), 0)
    out = (w[..., None] * o_acc).sum(axis=0)
    return out.astype(np.float32), lse.astype(np.float32)
