"""The Triton kernels of the decode step, their launch shapes, and one thin launch wrapper per kernel.

At batch 1 each new token reads every weight once, so the step is bound by memory bandwidth, in principle. The
compiled step (torch.compile, CUDA graphs) runs hundreds of small generated kernels a token, each reading a few
MB far below the bandwidth (see docs/RESULTS.md#decode-speed). Here a layer is five kernels, each issuing the loads
of its whole weight matrix at once:

  1. norm_1 folded into the QKV matrix-vector product (+ bias)                          -> qkv
  2. attention of the new token: QK-norm and RoPE (llama), its key and value written to
     the cache, softmax over the filled slots (optionally split over programs)          -> y
  3. output projection (+ bias) + residual, in place                                    -> x
  4. norm_2 folded into the MLP up projection (+ bias), GELU or SwiGLU                  -> h
  5. MLP down projection (+ bias) + residual, in place                                  -> x

then the final norm folded into the output head, and greedy sampling in `greedy_kernel` (other sampling is
`generate`'s own torch code). The norm folds as in `decode.folded_norm_gemv`:
W @ ((x - mean) * rstd * g + b) = rstd * (W@(g*x) - mean * W@g) + W@b, with W@g and W@b precomputed per output
row (`MatVec.refresh`) and the statistics of x summed in the loop that reads W, so no program waits for a
statistics pass before its first weight load. A batch of left-padded prompts runs the same five kernels: the
products as small tensor-core matmuls (`matmul_kernel`), attention one program per row and head, each row
masking its padding.

What lives here is everything that knows a kernel's arguments: the @triton.jit functions, the launch shapes
tuned among (block shapes, attention's slots per iteration and splits), and the wrappers that launch each
kernel from tensors (grids, constexpr flags, placeholders for absent tensors, scratch buffers). Which tensors
a step passes, which shape wins and the CUDA graph that replays the step are `triton_decoder.py`'s. Apart,
the kernels can be compiled for Hopper on a machine without a GPU (tests/compile_decode_kernels.py) and
launched alone (tests, benchmarks). Without a GPU they run in Triton's interpreter (TRITON_INTERPRET=1),
which is how the tests check them against the model.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from antimatter.model.gpt import RMSNorm

NORM_NONE, NORM_LAYER, NORM_RMS = 0, 1, 2
ACT_NONE, ACT_GELU, ACT_SWIGLU = 0, 1, 2


@triton.jit
def _row_constants(rows, row_ok, bias_ptr, wg_ptr, wb_ptr, N, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                   ACT: tl.constexpr):
    """The per-output-row constants of a product's epilogue, in fp32: W@g and W@b of a folded LayerNorm
    (zeros without one), the bias (zeros without one), each also for SwiGLU's up rows n + N (zeros without
    SwiGLU). The products load them before waiting for the previous kernel: they depend only on the weights."""
    zero = tl.zeros(rows.shape, dtype=tl.float32)
    wg, wb, wg_up, wb_up, bias, bias_up = zero, zero, zero, zero, zero, zero
    if NORM == 1:
        wg = tl.load(wg_ptr + rows, mask=row_ok, other=0.0)
        wb = tl.load(wb_ptr + rows, mask=row_ok, other=0.0)
        if ACT == 2:
            wg_up = tl.load(wg_ptr + N + rows, mask=row_ok, other=0.0)
            wb_up = tl.load(wb_ptr + N + rows, mask=row_ok, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if ACT == 2:
            bias_up = tl.load(bias_ptr + N + rows, mask=row_ok, other=0.0).to(tl.float32)
    return wg, wb, wg_up, wb_up, bias, bias_up


# One body: its loads before the PDL wait and the next weight tile carried across iterations, in order.
@triton.jit
def matvec_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr, g_ptr, wg_ptr, wb_ptr, N, K, eps, NORM: tl.constexpr,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """out[n] = act(W[n] . norm(x) + bias[n]) (+ res[n]) for the BLOCK_N rows n of this program.
    SwiGLU reads rows n (gate) and n + N (up) of W: silu(gate) * up. `out` may be `res` (in place): each
    program reads and writes only its own rows. With PDL (programmatic dependent launch) the program lets the
    next kernel launch at once and loads what never changes during a step before waiting for the previous
    kernel: its first weight tile, the norm's gain and the epilogue's per-row bias and folds, so their memory
    latency overlaps the previous kernel's tail instead of adding to this one's; every read of activations
    and every store comes after the wait (the residual right after it, not after the loop)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    ok = row_ok[:, None] & (cols < K)[None, :]
    w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=ok, other=0.0)
    w_up = w
    if ACT == 2:
        w_up = tl.load(w_ptr + (rows[:, None] + N) * K + cols[None, :], mask=ok, other=0.0)
    g = tl.load(g_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)  # the norm's gain (unused without one)
    wg, wb, wg_up, wb_up, bias, bias_up = _row_constants(rows, row_ok, bias_ptr, wg_ptr, wb_ptr, N, NORM, HAS_BIAS,
                                                         ACT)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    res = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_RES:
        res = tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_K], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        col_ok = k0 + cols < K
        x = tl.load(x_ptr + k0 + cols, mask=col_ok, other=0.0).to(tl.float32)
        if NORM != 0:
            s1 += x
            s2 += x * x
            x = x * g
        acc += w.to(tl.float32) * x[None, :]
        if ACT == 2:
            acc_up += w_up.to(tl.float32) * x[None, :]
        nxt = k0 + BLOCK_K + cols  # the next tile, loaded while this one is summed (none after the last)
        ok = row_ok[:, None] & (nxt < K)[None, :]
        w = tl.load(w_ptr + rows[:, None] * K + nxt[None, :], mask=ok, other=0.0)
        if ACT == 2:
            w_up = tl.load(w_ptr + (rows[:, None] + N) * K + nxt[None, :], mask=ok, other=0.0)
        if NORM != 0:
            g = tl.load(g_ptr + nxt, mask=nxt < K, other=0.0).to(tl.float32)
    y = tl.sum(acc, axis=1)
    y_up = tl.sum(acc_up, axis=1)
    if NORM == 1:  # LayerNorm: rstd * (W@(g*x) - mean * W@g) + W@b
        mean = tl.sum(s1, axis=0) / K
        rstd = 1.0 / tl.sqrt(tl.sum(s2, axis=0) / K - mean * mean + eps)
        y = rstd * (y - mean * wg) + wb
        y_up = rstd * (y_up - mean * wg_up) + wb_up
    if NORM == 2:  # RMSNorm: rstd * W@(g*x)
        rstd = 1.0 / tl.sqrt(tl.sum(s2, axis=0) / K + eps)
        y = rstd * y
        y_up = rstd * y_up
    y += bias
    y_up += bias_up
    if ACT == 1:  # GELU, tanh approximation: 0.5 * (1 + tanh(z)) = sigmoid(2z)
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    if ACT == 2:
        y = y * tl.sigmoid(y) * y_up
    y += res
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _matmul_epilogue(y, y_up, s1, s2, rows, cols, row_ok, col_ok, out_ptr, res_ptr, wg, wb, wg_up, wb_up, bias,
                     bias_up, N, K, eps, NORM: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr):
    """matmul_kernel's end, on out^T (BLOCK_N, BLOCK_M) summed over all of K: the norm fold with the row
    statistics s1 = sum x, s2 = sum x^2 and the column constants of `_row_constants`, bias, activation,
    residual, store."""
    if NORM == 1:  # LayerNorm, per row of x: rstd * (W@(g*x) - mean * W@g) + W@b
        mean = s1 / K
        rstd = 1.0 / tl.sqrt(s2 / K - mean * mean + eps)
        y = rstd[None, :] * (y - wg[:, None] * mean[None, :]) + wb[:, None]
        y_up = rstd[None, :] * (y_up - wg_up[:, None] * mean[None, :]) + wb_up[:, None]
    if NORM == 2:  # RMSNorm: rstd * W@(g*x)
        rstd = 1.0 / tl.sqrt(s2 / K + eps)
        y = rstd[None, :] * y
        y_up = rstd[None, :] * y_up
    y += bias[:, None]
    y_up += bias_up[:, None]
    if ACT == 1:
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    if ACT == 2:
        y = y * tl.sigmoid(y) * y_up
    out_ok = col_ok[:, None] & row_ok[None, :]
    at = rows[None, :] * N + cols[:, None]
    if HAS_RES:
        y += tl.load(res_ptr + at, mask=out_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, y.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _matmul_tile(acc, acc_up, s1, s2, w, x_ptr, w_ptr, g_ptr, rows, cols, row_ok, col_ok, kk, k_hi, N, K,
                 NORM: tl.constexpr, ACT: tl.constexpr):
    """One BLOCK_K slice kk of matmul_kernel's product: acc += W[cols, kk] @ norm-scaled x[rows, kk]^T (and
    SwiGLU's up rows into acc_up), the row statistics of x summed into s1, s2."""
    xt = tl.load(x_ptr + rows[None, :] * K + kk[:, None], mask=row_ok[None, :] & (kk < k_hi)[:, None],
                 other=0.0).to(tl.float32)  # x^T (BLOCK_K, BLOCK_M)
    if NORM != 0:
        s1 += tl.sum(xt, axis=0)
        s2 += tl.sum(xt * xt, axis=0)
        xt = xt * tl.load(g_ptr + kk, mask=kk < k_hi, other=0.0).to(tl.float32)[:, None]
    if w_ptr.dtype.element_ty == tl.float32:
        acc = tl.dot(w, xt, acc, input_precision="ieee")
    else:
        x_hi = xt.to(w_ptr.dtype.element_ty)
        x_lo = (xt - x_hi.to(tl.float32)).to(w_ptr.dtype.element_ty)
        acc = tl.dot(w, x_hi, acc)
        if NORM != 0 or x_ptr.dtype.element_ty != w_ptr.dtype.element_ty:  # else x_lo is 0
            acc = tl.dot(w, x_lo, acc)
    if ACT == 2:
        w_up = tl.load(w_ptr + (cols[:, None] + N) * K + kk[None, :], mask=col_ok[:, None] & (kk < k_hi)[None, :],
                       other=0.0)
        if w_ptr.dtype.element_ty == tl.float32:
            acc_up = tl.dot(w_up, xt, acc_up, input_precision="ieee")
        else:
            acc_up = tl.dot(w_up, x_hi, acc_up)
            if NORM != 0 or x_ptr.dtype.element_ty != w_ptr.dtype.element_ty:
                acc_up = tl.dot(w_up, x_lo, acc_up)
    return acc, acc_up, s1, s2


# One body: the PDL wait, the peeled first split-K tile and the arrival count share its registers and order.
@triton.jit
def matmul_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr, g_ptr, wg_ptr, wb_ptr, part_ptr, count_ptr, M, N, K,
                  K_SPLIT, eps, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                  HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  STAGES: tl.constexpr, PDL: tl.constexpr, SPLIT_K: tl.constexpr = 1):
    """matvec_kernel for a few rows at once (batched decoding): out[m, n] for the rows m of x (M, K) in
    program_id(1)'s block and the BLOCK_N columns n of program_id(0), with the same norm fold, bias,
    activation and in-place residual. Computed transposed, W (BLOCK_N, K) @ x^T (K, BLOCK_M), so the weight
    rows fill the tensor cores' large M side and the few rows of x their small N side. The products run in
    the weights' dtype with the normalised x split into a high and a low part (two products): the fold
    subtracts mean * W@g after the product, so x * g must keep more than 8 bits. An x that is not normalised
    is already in the weights' dtype (its low part is zero): one product. fp32 weights (tests)
    multiply in full fp32. The loop is software-pipelined over STAGES tiles; with PDL the next kernel launches
    early, the epilogue's per-column constants are loaded before waiting for the previous kernel, and under
    split-K the first weight tile too.

    Split-K: a decode matrix has few column blocks (QKV: 48 of 64 columns, fewer programs than an H100 has
    SMs), so with SPLIT_K > 1 program_id(2) takes only K_SPLIT of the K dimension. It writes its fp32 partial
    product and partial row statistics to `part` and counts itself in `count`; the last program of a block
    to arrive adds the SPLIT_K partials in split order (the same sum whichever arrives last), finishes the
    block and sets the count back to zero for the next step."""
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok, row_ok = cols < N, rows < M
    k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    if SPLIT_K > 1:  # short loops: the first weight tile loads before the wait (weights never change in a step)
        w_first = tl.load(w_ptr + cols[:, None] * K + (k_lo + k)[None, :],
                          mask=col_ok[:, None] & (k_lo + k < k_hi)[None, :], other=0.0)
    wg, wb, wg_up, wb_up, bias, bias_up = _row_constants(cols, col_ok, bias_ptr, wg_ptr, wb_ptr, N, NORM, HAS_BIAS,
                                                         ACT)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out^T
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    start = k_lo
    if SPLIT_K > 1:  # the first tile outside the loop: no register copy of a next tile held across the loop
        acc, acc_up, s1, s2 = _matmul_tile(acc, acc_up, s1, s2, w_first, x_ptr, w_ptr, g_ptr, rows, cols, row_ok,
                                           col_ok, k_lo + k, k_hi, N, K, NORM, ACT)
        start = k_lo + BLOCK_K
    for k0 in tl.range(start, k_hi, BLOCK_K, num_stages=STAGES):
        kk = k0 + k
        w = tl.load(w_ptr + cols[:, None] * K + kk[None, :], mask=col_ok[:, None] & (kk < k_hi)[None, :], other=0.0)
        acc, acc_up, s1, s2 = _matmul_tile(acc, acc_up, s1, s2, w, x_ptr, w_ptr, g_ptr, rows, cols, row_ok, col_ok,
                                           kk, k_hi, N, K, NORM, ACT)
    if SPLIT_K == 1:
        _matmul_epilogue(acc, acc_up, s1, s2, rows, cols, row_ok, col_ok, out_ptr, res_ptr, wg, wb, wg_up, wb_up,
                         bias, bias_up, N, K, eps, NORM, ACT, HAS_RES)
    else:
        # one record per (split, block): acc, acc_up, s1, s2
        tile = pid_m * tl.num_programs(0) + pid_n
        tiles = tl.num_programs(0) * tl.num_programs(1)
        RECORD = 2 * BLOCK_N * BLOCK_M + 2 * BLOCK_M
        at = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        m = tl.arange(0, BLOCK_M)
        mine = part_ptr + (pid_k * tiles + tile) * RECORD
        tl.store(mine + at, acc)
        if ACT == 2:
            tl.store(mine + BLOCK_N * BLOCK_M + at, acc_up)
        if NORM != 0:
            tl.store(mine + 2 * BLOCK_N * BLOCK_M + m, s1)
            tl.store(mine + 2 * BLOCK_N * BLOCK_M + BLOCK_M + m, s2)
        tl.debug_barrier()  # every thread's partial stored before the count says so (release below)
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
            s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            for j in tl.static_range(SPLIT_K):  # ".cg": from L2, where the other programs' stores are
                rec = part_ptr + (j * tiles + tile) * RECORD
                acc += tl.load(rec + at, cache_modifier=".cg")
                if ACT == 2:
                    acc_up += tl.load(rec + BLOCK_N * BLOCK_M + at, cache_modifier=".cg")
                if NORM != 0:
                    s1 += tl.load(rec + 2 * BLOCK_N * BLOCK_M + m, cache_modifier=".cg")
                    s2 += tl.load(rec + 2 * BLOCK_N * BLOCK_M + BLOCK_M + m, cache_modifier=".cg")
            _matmul_epilogue(acc, acc_up, s1, s2, rows, cols, row_ok, col_ok, out_ptr, res_ptr, wg, wb, wg_up,
                             wb_up, bias, bias_up, N, K, eps, NORM, ACT, HAS_RES)
            tl.atomic_xchg(count_ptr + tile, 0)


@triton.jit
def _head_vector(ptr, pos, w_ptr, cos_ptr, sin_ptr, eps, D: tl.constexpr, ROPE: tl.constexpr,
                 QK_NORM: tl.constexpr):
    """One head's query or key as the model computes it: RMS-normalised (QK-norm) and rotated (RoPE, the
    Hugging Face halves convention), rounded to the activations' dtype after each step as the model is."""
    d = tl.arange(0, D)
    x = tl.load(ptr + d).to(tl.float32)
    half = D // 2
    if ROPE:
        partner = (d + half) % D
        xp = tl.load(ptr + partner).to(tl.float32)
    if QK_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        x = (x * rstd * tl.load(w_ptr + d).to(tl.float32)).to(ptr.dtype.element_ty).to(tl.float32)
        if ROPE:
            xp = (xp * rstd * tl.load(w_ptr + partner).to(tl.float32)).to(ptr.dtype.element_ty).to(tl.float32)
    if ROPE:
        cos = tl.load(cos_ptr + pos * half + d % half)
        sin = tl.load(sin_ptr + pos * half + d % half)
        x = (x * cos + tl.where(d < half, -xp, xp) * sin).to(ptr.dtype.element_ty).to(tl.float32)
    return x


# One body: the cache block loaded before the PDL wait feeds the softmax loop, which loads each next one ahead.
@triton.jit
def attend_kernel(qkv_ptr, kv_ptr, pos_ptr, pad_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, qn_ptr, kn_ptr,
                  cos_ptr, sin_ptr, kv_stride, batch_stride, head_stride, slot_stride, scale, eps,
                  Q_DIM: tl.constexpr, KV_DIM: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                  ROPE: tl.constexpr, QK_NORM: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                  PDL: tl.constexpr):
    """Attention of the new token of row program_id(2) for query head program_id(0), over the cache slots of
    split program_id(1) (every SPLITS-th block of BLOCK_S slots below `pos`) plus, in split 0, the new token
    itself. Rows are left-padded: the row's first `pad` slots are masked out and its positions count from
    there. The first query head of each key/value group writes the new key and value into cache slot `pos`;
    no program reads that slot in this step, so there is no race. Slots below `pos` were written by earlier
    steps, so with PDL the first block is loaded before waiting for the QKV kernel. With SPLITS > 1 each
    split writes its partial softmax (max, sum, weighted values) and combine_kernel merges them."""
    h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP
    pos = tl.load(pos_ptr).to(tl.int32)
    pad = tl.load(pad_ptr + b).to(tl.int32)
    d = tl.arange(0, D)
    k_base = kv_ptr + b * batch_stride + hk * head_stride
    v_base = k_base + kv_stride
    s = split * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = (s < pos) & (s >= pad)
    k = tl.load(k_base + s[:, None] * slot_stride + d[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(v_base + s[:, None] * slot_stride + d[None, :], mask=ok[:, None], other=0.0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = qkv_ptr + b * (Q_DIM + 2 * KV_DIM)
    q = _head_vector(row + h * D, pos - pad, qn_ptr, cos_ptr, sin_ptr, eps, D, ROPE, QK_NORM)
    k_new = _head_vector(row + Q_DIM + hk * D, pos - pad, kn_ptr, cos_ptr, sin_ptr, eps, D, ROPE, QK_NORM)
    k_new = k_new.to(kv_ptr.dtype.element_ty)
    v_new = tl.load(row + Q_DIM + KV_DIM + hk * D + d).to(kv_ptr.dtype.element_ty)
    if (h % GROUP == 0) & (split == 0):
        tl.store(k_base + pos * slot_stride + d, k_new)
        tl.store(v_base + pos * slot_stride + d, v_new)
    first = split == 0
    m_i = tl.where(first, tl.sum(q * k_new.to(tl.float32), axis=0) * scale, float("-inf"))
    l_i = tl.where(first, 1.0, 0.0)
    acc = tl.where(first, v_new.to(tl.float32), 0.0)
    for s0 in range(split * BLOCK_S, pos, SPLITS * BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = (s < pos) & (s >= pad)
        scores = tl.where(ok, tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of padding only, nothing before it
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(scores - m_ref)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
        s = s0 + SPLITS * BLOCK_S + tl.arange(0, BLOCK_S)  # this split's next block, loaded ahead
        ok = (s < pos) & (s >= pad)
        k = tl.load(k_base + s[:, None] * slot_stride + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_base + s[:, None] * slot_stride + d[None, :], mask=ok[:, None], other=0.0)
    out = out_ptr + b * Q_DIM + h * D
    if SPLITS == 1:
        tl.store(out + d, (acc / l_i).to(out_ptr.dtype.element_ty))
    else:
        part = (b * tl.num_programs(0) + h) * SPLITS + split
        tl.store(part_m_ptr + part, m_i)
        tl.store(part_l_ptr + part, l_i)
        tl.store(part_acc_ptr + part * D + d, acc)


@triton.jit
def combine_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, Q_DIM: tl.constexpr, D: tl.constexpr,
                   SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Merge the SPLITS partial softmaxes of query head program_id(0) of row program_id(1): the weighted sum
    of the splits' values, each split weighed by e^(its max - the max of all); a split with no slots has
    max -inf and weighs nothing."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    h = tl.program_id(0)
    b = tl.program_id(1)
    j = (b * tl.num_programs(0) + h) * SPLITS + tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    m = tl.load(part_m_ptr + j)
    weight = tl.exp(m - tl.max(m, axis=0))
    l_sum = tl.sum(tl.load(part_l_ptr + j) * weight, axis=0)
    acc = tl.load(part_acc_ptr + j[:, None] * D + d[None, :])
    y = tl.sum(acc * weight[:, None], axis=0) / l_sum
    tl.store(out_ptr + b * Q_DIM + h * D + d, y.to(out_ptr.dtype.element_ty))


@triton.jit
def embed_kernel(token_ptr, pos_ptr, pad_ptr, wte_ptr, wpe_ptr, x_ptr, D: tl.constexpr, BLOCK: tl.constexpr,
                 POS_EMB: tl.constexpr, PDL: tl.constexpr):
    """The step's input for row program_id(0): x = wte[token] (+ wpe[pos - pad], GPT-2), one kernel where
    the indexing, subtraction and sum in torch were four."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    d = tl.arange(0, BLOCK)
    ok = d < D
    x = tl.load(wte_ptr + tl.load(token_ptr + b) * D + d, mask=ok, other=0.0)
    if POS_EMB:
        p = tl.load(pos_ptr) - tl.load(pad_ptr + b)
        x = x.to(tl.float32) + tl.load(wpe_ptr + p * D + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(x_ptr + b * D + d, x.to(x_ptr.dtype.element_ty), mask=ok)


@triton.jit
def greedy_kernel(logits_ptr, token_ptr, seen_ptr, pos_ptr, V, logits_stride, BLOCK: tl.constexpr,
                  PDL: tl.constexpr):
    """Greedy sampling's tail for row program_id(0): the next token is the first index of the row's largest
    logit (as torch.argmax picks), written to `token` and marked in `seen`; program 0 advances `pos`. One
    kernel where argmax, scatter, copy and the increment in torch were five."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.zeros([], tl.int32)
    for v0 in range(0, V, BLOCK):
        v = v0 + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + b * logits_stride + v, mask=v < V, other=float("-inf"))
        m = tl.max(x, axis=0)
        take = m > best  # strictly: an equal maximum in a later block does not replace an earlier one
        best_i = tl.where(take, v0 + tl.argmax(x, axis=0), best_i)
        best = tl.where(take, m, best)
    tl.store(token_ptr + b, best_i.to(tl.int64))
    tl.store(seen_ptr + b * V + best_i, tl.full([], 1, tl.uint8))
    if b == 0:
        tl.store(pos_ptr, tl.load(pos_ptr) + 1)


# ------------------------------------------------------------------------------------- launch shapes

# (BLOCK_N, BLOCK_K, num_warps) tried per matrix shape on the GPU (those with BLOCK_K <= K); the first that
# fits is used until tuned. Only the fastest few of each seed-300m shape from a wider sweep on Hopper (see
# docs/RESULTS.md#decode-speed): fewer compilations in the first call.
MATVEC_CONFIGS = [(4, 512, 4), (4, 1024, 4), (8, 512, 4), (16, 512, 8), (2, 1024, 2), (2, 1024, 4),
                  (2, 2048, 8), (2, 4096, 8), (16, 256, 4), (8, 256, 4)]
# (BLOCK_N, BLOCK_K, num_warps, stages, split-K) for the batched kernel (BLOCK_M follows the batch):
# tensor-core tiles. Without split-K: the fastest few of a wider sweep at batch 32 on Hopper (see
# docs/RESULTS.md#decode-speed); split-K ones are tried for matrices of few column blocks, also with one stage: a
# split of one or two tiles gains nothing from a pipeline, and a smaller shared-memory footprint lets the next
# kernel's programs start beside this one's (programmatic launch).
MATMUL_CONFIGS = [(64, 256, 4, 3, 1), (16, 256, 4, 3, 1), (128, 128, 8, 3, 1), (64, 128, 4, 4, 1),
                  (128, 128, 8, 4, 1), (64, 256, 4, 3, 4), (64, 128, 4, 3, 4), (16, 256, 4, 3, 4),
                  (32, 256, 4, 3, 8), (64, 128, 4, 3, 8), (16, 128, 4, 3, 8), (16, 256, 4, 3, 16),
                  (64, 256, 4, 3, 16), (64, 256, 4, 1, 4), (64, 128, 4, 1, 4), (16, 256, 4, 1, 4),
                  (16, 128, 4, 1, 8), (32, 128, 4, 1, 8), (64, 256, 4, 1, 16)]
MATMUL_SMALL = (16, 64, 4, 2, 1)  # for matrices narrower than every candidate's BLOCK_K (tiny test models)
SPLIT_K_MAX_BLOCKS = 256  # split K only for matrices of fewer column blocks than this (not the output head)

ATTN_BLOCK_S = 64  # cache slots an attention program reads per iteration, until tuned
ATTN_WARPS = 4  # and its warps, until tuned
MAX_SPLITS = 16  # attention programs per head, at most
# (cache slots per iteration, warps) tried for attention on a GPU, each with attention_splits' split count.
# A program holds its block of keys and values in registers: at batch 32 (512 programs) the register
# footprint decides how many programs fit on the GPU at once, at batch 1 (16 heads) the splits do.
ATTN_CONFIGS = [(64, 4), (64, 8), (32, 4), (32, 2), (128, 4), (128, 8)]


def attention_splits(max_seq: int, heads: int = 16, block: int = ATTN_BLOCK_S) -> int:
    """Programs per head in attention: enough that each reads one block of the cache up to 1,024 slots,
    at most MAX_SPLITS (a power of two), and not more than make ~512 programs over all `heads` (rows x query
    heads) of a batch. Splits with no slot below the position return at once. This count was the fastest at
    batch 1 and at batch 32 on Hopper (see docs/RESULTS.md#decode-speed)."""
    n = max(1, math.ceil(max_seq / block))
    by_length = min(MAX_SPLITS, 1 << (n - 1).bit_length())
    return max(1, min(by_length, 1 << max(0, (512 // heads).bit_length() - 1)))


# ------------------------------------------------------------------------------------- launch wrappers

def pdl_launch(device: torch.device, on: bool = True) -> dict:
    """Launch options for programmatic dependent launch: Hopper and newer GPUs (not the interpreter). Every
    wrapper below takes them as `launch`; an empty dict launches plainly."""
    if on and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return {"launch_pdl": True}
    return {}


class SplitScratch:
    """The fp32 partial sums and per-block arrival counts of split-K matmuls. One per decoder: its kernels run
    one after another, and each leaves every count at zero when it ends."""

    def __init__(self, device: torch.device):
        self.part = torch.zeros(0, dtype=torch.float32, device=device)
        self.count = torch.zeros(0, dtype=torch.int32, device=device)

    def reserve(self, floats: int, blocks: int) -> None:
        """Grow to hold this much (before a CUDA graph records the kernels that use it: never during)."""
        if self.part.numel() < floats:
            self.part = torch.zeros(floats, dtype=torch.float32, device=self.part.device)
        if self.count.numel() < blocks:
            self.count = torch.zeros(blocks, dtype=torch.int32, device=self.count.device)


class MatVec:
    """One fused matrix-vector product: a norm folded in front (optional), bias, activation, residual; for
    each of the M rows of x (M, K) -> out (M, N), one row by matvec_kernel, several by matmul_kernel. Holds
    the per-row norm folds (W@g, W@b) the kernels read, and its block shape `config` (the first candidate
    until `TritonDecoder.tune` has timed them)."""

    def __init__(self, linear: torch.nn.Linear, x: torch.Tensor, out: torch.Tensor, launch: dict,
                 norm: torch.nn.Module | None = None, act: int = ACT_NONE, residual: torch.Tensor | None = None,
                 scratch: SplitScratch | None = None, split_k: bool = True):
        self.launch = launch  # pdl_launch's options, shared by the decoder's kernels
        self.scratch = scratch or SplitScratch(x.device)
        self.split_k = split_k  # try split-K block shapes (False: only whole-K ones)
        self.w, self.x, self.out = linear.weight, x, out
        self.bias, self.res, self.norm, self.act = linear.bias, residual, norm, act
        self.N = self.w.shape[0] // (2 if act == ACT_SWIGLU else 1)
        self.K = self.w.shape[1]
        self.M = x.shape[0]
        self.block_m = min(64, max(16, triton.next_power_of_2(self.M)))
        self.kind = NORM_NONE if norm is None else NORM_RMS if isinstance(norm, RMSNorm) else NORM_LAYER
        self.eps = float(getattr(norm, "eps", 0.0) or 0.0)
        rows = self.w.shape[0]
        self.wg = torch.zeros(rows, dtype=torch.float32, device=self.w.device)  # W @ g (LayerNorm's mean term)
        self.wb = torch.zeros(rows, dtype=torch.float32, device=self.w.device)  # W @ b (LayerNorm's bias term)
        self._versions: tuple | None = None  # the weights' versions the folds were computed from
        if self.w.is_cuda:
            self.config = self.candidates()[0]
        else:  # the interpreter (tests): few, large programs
            self.config = (64, min(1024, triton.next_power_of_2(self.K)), 4) if self.M == 1 else (32, 64, 4, 2, 1)

    def refresh(self) -> None:
        """Per-row folds of the norm's weight and bias into W, from the weights as they are now (recomputed
        only when one of them was modified in place since, e.g. by an optimizer step). Inference tensors (made
        under torch.inference_mode) keep no version counter, so for them the folds are recomputed every time."""
        if self.kind != NORM_LAYER:
            return
        tensors = [t for t in (self.w, self.norm.weight, self.norm.bias) if t is not None]
        versions = None if any(t.is_inference() for t in tensors) else tuple(t._version for t in tensors)
        if versions is not None and versions == self._versions:
            return
        self._versions = versions
        w = self.w
        for i in range(0, w.shape[0], 8192):  # fp32 in slices: bounded memory for the output head
            wi = w[i: i + 8192].float()
            self.wg[i: i + 8192] = wi @ self.norm.weight.float()
            if self.norm.bias is not None:
                self.wb[i: i + 8192] = wi @ self.norm.bias.float()

    def candidates(self) -> list[tuple[int, ...]]:
        if self.M == 1:
            return [c for c in MATVEC_CONFIGS if c[1] <= max(self.K, 256)]
        fits = [c for c in MATMUL_CONFIGS if c[1] <= self.K and (c[4] == 1 or (
            self.split_k and c[4] * c[1] <= self.K and triton.cdiv(self.N, c[0]) < SPLIT_K_MAX_BLOCKS))]
        return fits or [MATMUL_SMALL]

    def split_layout(self, config: tuple[int, ...]) -> tuple[int, int, int]:
        """(K per split, floats of partials, column x row blocks) of a batched config."""
        block_n, block_k, *_, split = config
        k_split = triton.cdiv(triton.cdiv(self.K, split), block_k) * block_k
        blocks = triton.cdiv(self.N, block_n) * triton.cdiv(self.M, self.block_m)
        return k_split, split * blocks * (2 * block_n * self.block_m + 2 * self.block_m), blocks

    def signature(self) -> tuple:
        return self.M, self.N, self.K, self.kind, self.act, self.bias is not None, self.res is not None

    def __call__(self, config: tuple[int, ...] | None = None) -> None:
        """Launch at `config` (None: at `self.config`). Absent tensors are passed as placeholders the flags
        tell the kernel never to read."""
        block_n, block_k, warps, *stages = config or self.config
        g = self.norm.weight if self.norm is not None else self.w
        args = (self.x, self.w, self.out, self.bias if self.bias is not None else self.w,
                self.res if self.res is not None else self.out, g, self.wg, self.wb)
        flags = dict(NORM=self.kind, HAS_BIAS=self.bias is not None, ACT=self.act, HAS_RES=self.res is not None,
                     BLOCK_N=block_n, BLOCK_K=block_k, PDL=bool(self.launch), num_warps=warps, **self.launch)
        if self.M == 1:
            matvec_kernel[(triton.cdiv(self.N, block_n),)](*args, self.N, self.K, self.eps, **flags)
        else:
            stages, split = stages
            k_split, floats, blocks = self.split_layout(config or self.config)
            if split > 1:
                self.scratch.reserve(floats, blocks)
            grid = (triton.cdiv(self.N, block_n), triton.cdiv(self.M, self.block_m), split)
            matmul_kernel[grid](*args, self.scratch.part, self.scratch.count, self.M, self.N, self.K, k_split,
                                self.eps, BLOCK_M=self.block_m, STAGES=stages, SPLIT_K=split, **flags)


class AttentionPartials:
    """The partial softmaxes (max, sum, weighted values) that split attention's programs write and
    combine_kernel merges: room for MAX_SPLITS splits of each of `heads` (rows x query heads), so any split
    count runs (profile_kernels.py tries several)."""

    def __init__(self, heads: int, head_dim: int, device: torch.device):
        n = heads * MAX_SPLITS
        self.maxima = torch.zeros(n, dtype=torch.float32, device=device)
        self.sums = torch.zeros(n, dtype=torch.float32, device=device)
        self.values = torch.zeros(n, head_dim, dtype=torch.float32, device=device)


def launch_attention(qkv: torch.Tensor, kv: torch.Tensor, pos: torch.Tensor, left_pad: torch.Tensor,
                     out: torch.Tensor, partials: AttentionPartials, q_gain: torch.Tensor | None,
                     k_gain: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor] | None, *, heads: int,
                     eps: float, shape: tuple[int, int, int], launch: dict) -> None:
    """One layer's attention of each row's new token: attend_kernel, then combine_kernel when split.
    `qkv` (B, Q + 2 KV) is the QKV product, `kv` the layer's cache (2, B, H_kv, slots, D), `out` (B, Q);
    `q_gain`, `k_gain`: QK-norm's gains (None: no QK-norm); `rope`: the (cos, sin) tables (None: no RoPE);
    `shape`: (cache slots per iteration, warps, splits)."""
    block, warps, splits = shape
    batch, q_dim = out.shape
    D = kv.shape[-1]
    cos, sin = rope if rope is not None else (out, out)  # placeholders: the flags say they are never read
    qn = q_gain if q_gain is not None else out
    kn = k_gain if k_gain is not None else out
    attend_kernel[(heads, splits, batch)](
        qkv, kv, pos, left_pad, out, partials.maxima, partials.sums, partials.values, qn, kn, cos, sin,
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), 1.0 / math.sqrt(D), eps, Q_DIM=q_dim,
        KV_DIM=kv.shape[2] * D, GROUP=heads // kv.shape[2], D=D, ROPE=rope is not None,
        QK_NORM=q_gain is not None, SPLITS=splits, BLOCK_S=block, PDL=bool(launch), num_warps=warps, **launch)
    if splits > 1:
        combine_kernel[(heads, batch)](partials.maxima, partials.sums, partials.values, out, Q_DIM=q_dim, D=D,
                                       SPLITS=splits, PDL=bool(launch), num_warps=1, **launch)


def launch_embed(token: torch.Tensor, pos: torch.Tensor, left_pad: torch.Tensor, wte: torch.Tensor,
                 wpe: torch.Tensor | None, x: torch.Tensor, launch: dict) -> None:
    """x (B, D) = wte[token] (+ wpe[pos - left_pad] where `wpe` is given: GPT-2), one program per row."""
    batch, D = x.shape
    embed_kernel[(batch,)](token, pos, left_pad, wte, wpe if wpe is not None else x, x, D=D,
                           BLOCK=triton.next_power_of_2(D), POS_EMB=wpe is not None, PDL=bool(launch), num_warps=4,
                           **launch)


def launch_greedy(logits: torch.Tensor, token: torch.Tensor, seen: torch.Tensor, pos: torch.Tensor, vocab: int,
                  launch: dict) -> None:
    """Each row's next token, the argmax of its first `vocab` logits, into `token` and `seen` (bool); `pos`
    advances by one."""
    greedy_kernel[(token.shape[0],)](logits, token, seen.view(torch.uint8), pos, vocab, logits.stride(0),
                                     BLOCK=4096, PDL=bool(launch), num_warps=8, **launch)
