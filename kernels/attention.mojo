import extensibility
from max.gpu import WARP_SIZE, barrier, block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.gpu.memory import AddressSpace
from max.gpu.primitives import warp
from extensibility import InputTensor, OutputTensor, _MutableInputTensor
from max.algorithm import sync_parallelize
from std.math import exp
from std.memory import bitcast, stack_allocation
from std.utils.numerics import min_or_neg_inf
from std.utils import StaticTuple
from std.sys import CompilationTarget, llvm_intrinsic, simd_width_of
from std.runtime import parallelism_level

comptime W = 16          # SIMD width over key positions (float32: one AVX-512 register)
comptime D = 64          # head dimension of every released Whisper size
comptime QB = 8          # queries per work item in prefill: each key vector loaded serves 8
comptime KB = 2          # key vectors per bfloat16 score tile: QB x KB accumulators in registers
# The float32 prefill tiles' width: one register (16 lanes on AVX-512, 8 on AVX2). Key vectors per
# score tile and value vectors per output pass: QB x 2 sums fill 16 of AVX-512's 32 registers;
# AVX2 has 16 in all, so there QB x 1 (QB x 2 spills every step).
comptime AV = simd_width_of[DType.float32]()
comptime AK = 2 if AV >= 16 else 1
comptime GPU_THREADS = 256       # threads per GPU block; one block per (batch, head, query)
comptime GPU_MAX_KEYS = 2048     # a block keeps its scores in shared memory (Whisper: <= 1500)


def _append_gpu(
    qkv: Pointer[Float32, MutAnyOrigin],
    k_cache: Pointer[Float32, MutAnyOrigin],
    v_cache: Pointer[Float32, MutAnyOrigin],
    lengths: Pointer[Int64, MutAnyOrigin],
    heads32: Int32,
    ctx32: Int32,
):
    """Block (batch * heads + head), thread d: writes dim d of the new token's key and value
    (the middle and last thirds of its q|k|v row) into the cache at position lengths[0] - 1."""
    var heads = Int(heads32)
    var n_ctx = Int(ctx32)
    var bh = Int(block_idx.x)
    var d = Int(thread_idx.x)
    var pos = Int(lengths[unsafe_offset=0]) - 1
    var src = qkv.unsafe_offset((bh // heads) * 3 * heads * D + (bh % heads) * D + d)
    k_cache[unsafe_offset=(bh * D + d) * n_ctx + pos] = src[unsafe_offset=heads * D]
    v_cache[unsafe_offset=(bh * n_ctx + pos) * D + d] = src[unsafe_offset=2 * heads * D]


def _attend_gpu[kv: DType](
    o: Pointer[Float32, MutAnyOrigin],
    q: Pointer[Float32, MutAnyOrigin],
    k_t: Pointer[Scalar[kv], MutAnyOrigin],
    v: Pointer[Scalar[kv], MutAnyOrigin],
    lengths: Pointer[Int64, MutAnyOrigin],
    starts: Pointer[Int64, MutAnyOrigin],
    padded32: Int32,
    heads32: Int32,
    n_tok32: Int32,
    q_stride32: Int32,
    keys32: Int32,
):
    """One GPU block computes one query row; block index = (batch * heads + head) * n_tok + t.
    Query t sees keys start .. lengths[t] - 1, where start is starts[batch] if padded32 (a
    left-padded row of the cache, `whisper_self_attention`) and else 0, at least one key.

    Scores: thread i takes keys i, i + 256, ...; for each of the 64 dims a warp reads 32
    consecutive entries of a K^T row (coalesced). Block-wide max and sum go through warp
    shuffles and one shared slot per warp. Values: the 256 threads split as 4 key strides x 64
    dims, so a warp reads 32 consecutive floats of a V row; the 4 partial sums meet in shared
    memory.
    """
    comptime WARPS = GPU_THREADS // WARP_SIZE
    comptime PARTS = GPU_THREADS // D
    var heads = Int(heads32)
    var n_tok = Int(n_tok32)
    var keys = Int(keys32)
    var row = Int(block_idx.x)
    var bh = row // n_tok
    var t = row % n_tok
    var token = (bh // heads) * n_tok + t                 # the query's row of q and of the output
    var tid = Int(thread_idx.x)
    var lane = tid % WARP_SIZE
    var w = tid // WARP_SIZE
    var qs = stack_allocation[D, Float32, address_space=AddressSpace.SHARED]()
    var scores = stack_allocation[GPU_MAX_KEYS, Float32, address_space=AddressSpace.SHARED]()
    var red = stack_allocation[WARPS, Float32, address_space=AddressSpace.SHARED]()
    var parts = stack_allocation[GPU_THREADS, Float32, address_space=AddressSpace.SHARED]()
    var first = Int(starts[unsafe_offset=bh // heads]) if padded32 != 0 else 0
    var n = max(min(Int(lengths[unsafe_offset=t]), keys) - first, 1)
    if tid < D:
        qs[unsafe_offset=tid] = q[unsafe_offset=token * Int(q_stride32) + (bh % heads) * D + tid] * 0.125
    barrier()
    var kbase = k_t.unsafe_offset(bh * D * keys + first)
    var m = min_or_neg_inf[DType.float32]()
    for j in range(tid, n, GPU_THREADS):
        var s: Float32 = 0.0
        for d in range(D):
            s += qs[unsafe_offset=d] * kbase[unsafe_offset=d * keys + j].cast[DType.float32]()
        scores[unsafe_offset=j] = s
        m = max(m, s)
    m = warp.max(m)
    if lane == 0:
        red[unsafe_offset=w] = m
    barrier()
    m = red[unsafe_offset=0]
    for i in range(1, WARPS):
        m = max(m, red[unsafe_offset=i])
    barrier()                                   # every thread has read the maxima
    var total: Float32 = 0.0
    for j in range(tid, n, GPU_THREADS):
        var e = exp(scores[unsafe_offset=j] - m)
        scores[unsafe_offset=j] = e
        total += e
    total = warp.sum(total)
    if lane == 0:
        red[unsafe_offset=w] = total
    barrier()
    total = 0.0
    for i in range(WARPS):
        total += red[unsafe_offset=i]
    var vbase = v.unsafe_offset((bh * keys + first) * D)
    var d = tid % D
    var acc: Float32 = 0.0
    for j in range(tid // D, n, PARTS):
        acc += scores[unsafe_offset=j] * vbase[unsafe_offset=j * D + d].cast[DType.float32]()
    parts[unsafe_offset=tid] = acc
    barrier()
    if tid < D:
        var r: Float32 = 0.0
        for p in range(PARTS):
            r += parts[unsafe_offset=p * D + tid]
        o[unsafe_offset=(token * heads + bh % heads) * D + tid] = r / total


def _row_max(row: Pointer[Float32, _], n: Int) -> Float32:
    """The largest of row[:n], n >= 1, kept in four running maxima: with one, each vector's
    NaN-aware max (a compare, then a masked max) waits on the last vector's, and an encoder's
    score rows spent a twelfth of their attention's time in that chain."""
    var mv = StaticTuple[SIMD[DType.float32, W], 4](SIMD[DType.float32, W](min_or_neg_inf[DType.float32]()))
    var n4 = n // (4 * W) * (4 * W)
    for j in range(0, n4, 4 * W):
        comptime for c in range(4):
            mv[c] = max(mv[c], row.unsafe_offset(j + c * W).unsafe_load[width=W]())
    var n_vec = n // W * W
    for j in range(n4, n_vec, W):
        mv[0] = max(mv[0], row.unsafe_offset(j).unsafe_load[width=W]())
    var m = max(max(mv[0], mv[1]), max(mv[2], mv[3])).reduce_max()
    for j in range(n_vec, n):
        m = max(m, row[unsafe_offset=j])
    return m


def _softmax_row(row: Pointer[mut=True, Float32, _], n: Int, longest: Int):
    """row[:n] = softmax(row[:n]) in place, W lanes at a time; row[n:longest] = 0."""
    var n_vec = n // W * W
    var m = _row_max(row, n)
    var tv = SIMD[DType.float32, W](0)
    for j in range(0, n_vec, W):
        var e = exp(row.unsafe_offset(j).unsafe_load[width=W]() - m)
        row.unsafe_offset(j).unsafe_store(e)
        tv += e
    var total = tv.reduce_add()
    for j in range(n_vec, n):
        var e = exp(row[unsafe_offset=j] - m)
        row[unsafe_offset=j] = e
        total += e
    var inv = 1.0 / total
    for j in range(0, n_vec, W):
        row.unsafe_offset(j).unsafe_store(row.unsafe_offset(j).unsafe_load[width=W]() * inv)
    for j in range(n_vec, n):
        row[unsafe_offset=j] = row[unsafe_offset=j] * inv
    for j in range(n, longest):
        row[unsafe_offset=j] = 0.0


def _score_tile[kv: DType, n_vec: Int](
    sp: Pointer[mut=True, Float32, _],
    qs: Pointer[Float32, _],
    kbase: Pointer[Scalar[kv], MutAnyOrigin],
    keys: Int,
    j: Int,
):
    """Scores of QB queries against keys j .. j + n_vec * AV - 1: QB x n_vec accumulators in
    registers while the 64 rows of K^T stream by; qs holds the queries, scaled, dim-major."""
    var acc = StaticTuple[SIMD[DType.float32, AV], QB * n_vec](SIMD[DType.float32, AV](0))
    for d in range(D):
        var krow = kbase.unsafe_offset(d * keys + j)
        comptime for c in range(n_vec):
            var kv_ = krow.unsafe_offset(c * AV).unsafe_load[width=AV]().cast[DType.float32]()
            comptime for r in range(QB):
                acc[r * n_vec + c] += kv_ * qs[unsafe_offset=d * QB + r]
    comptime for r in range(QB):
        comptime for c in range(n_vec):
            sp.unsafe_offset(r * keys + j + c * AV).unsafe_store(acc[r * n_vec + c])


def _attend_cpu_block[kv: DType](
    o: Pointer[Float32, MutAnyOrigin],
    q: Pointer[Float32, MutAnyOrigin],
    k_t: Pointer[Scalar[kv], MutAnyOrigin],
    v: Pointer[Scalar[kv], MutAnyOrigin],
    lengths: Pointer[Int64, MutAnyOrigin],
    heads: Int,
    n_tok: Int,
    q_stride: Int,
    keys: Int,
    bh: Int,
    t0: Int,
    start: Int = 0,
):
    """Queries t0 .. t0 + QB - 1 (those below n_tok) of (batch, head) bh on one CPU core.

    ``start``: the row's first key (`whisper_decoder_step` left-pads a batch's shorter
    prompts; no query of the row attends to its pad slots): query t sees keys start ..
    lengths[t] - 1, at least one (a pad slot's own query sees key ``start``: finite, and
    never read). The keys are addressed from ``start`` on, so a padded row computes what the
    row alone computes, in the same order.

    One query streams each row of K^T once (the step is memory-bound). A block of queries is
    register-tiled: QB queries x AK key vectors of scores (`_score_tile`), then QB queries x AK
    value vectors of output, so each key or value vector loaded serves QB queries.
    """
    var nq = min(QB, n_tok - t0)
    var lens = List[Int](length=QB, fill=0)
    var longest = 0
    for r in range(QB):                      # rows past the block's end repeat its last
        var n = max(min(Int(lengths[unsafe_offset=t0 + min(r, nq - 1)]), keys) - start, 1)
        lens[r] = n
        longest = max(longest, n)
    var scores = List[Float32](unsafe_uninit_length=(1 if nq == 1 else QB) * keys)   # written before read
    var sp = scores.unsafe_ptr()
    var kbase = k_t.unsafe_offset(bh * D * keys + start)
    var token = (bh // heads) * n_tok + t0   # the block's first row of q and of the output
    var qrow = q.unsafe_offset(token * q_stride + (bh % heads) * D)
    var vbase = v.unsafe_offset((bh * keys + start) * D)
    var out = o.unsafe_offset((token * heads + bh % heads) * D)
    var o_stride = heads * D
    if nq == 1:
        var n_vec = longest // W * W
        for j in range(0, n_vec, W):
            sp.unsafe_offset(j).unsafe_store(SIMD[DType.float32, W](0))
        for j in range(n_vec, longest):
            sp[unsafe_offset=j] = 0.0
        for d in range(D):
            var qd = qrow[unsafe_offset=d] * 0.125
            var krow = kbase.unsafe_offset(d * keys)
            for j in range(0, n_vec, W):
                var acc = sp.unsafe_offset(j).unsafe_load[width=W]()
                var kv = krow.unsafe_offset(j).unsafe_load[width=W]().cast[DType.float32]()
                sp.unsafe_offset(j).unsafe_store(acc + kv * qd)
            for j in range(n_vec, longest):
                sp[unsafe_offset=j] += qd * krow[unsafe_offset=j].cast[DType.float32]()
        _softmax_row(sp, lens[0], longest)
        var acc = SIMD[DType.float32, D](0)
        for j in range(longest):
            acc += vbase.unsafe_offset(j * D).unsafe_load[width=D]().cast[DType.float32]() * sp[unsafe_offset=j]
        out.unsafe_store(acc)
        return
    var qs = stack_allocation[D * QB, Float32]()          # the queries / 8, dim-major
    for r in range(QB):
        var qr = qrow.unsafe_offset(min(r, nq - 1) * q_stride)
        for d in range(D):
            qs[unsafe_offset=d * QB + r] = qr[unsafe_offset=d] * 0.125
    var tiled = longest // (AK * AV) * (AK * AV)
    for j in range(0, tiled, AK * AV):
        _score_tile[kv, AK](sp, qs, kbase, keys, j)
    if longest >= AV:                        # the rest a vector at a time, the last one ending at longest
        for j in range(tiled, longest, AV):
            _score_tile[kv, 1](sp, qs, kbase, keys, min(j, longest - AV))
    else:
        for j in range(longest):
            for r in range(QB):
                var s: Float32 = 0.0
                for d in range(D):
                    s += qs[unsafe_offset=d * QB + r] * kbase[unsafe_offset=d * keys + j].cast[DType.float32]()
                sp[unsafe_offset=r * keys + j] = s
    # softmax of each row over its own length; weights past it are zero
    for r in range(nq):
        _softmax_row(sp.unsafe_offset(r * keys), lens[r], longest)
    comptime for part in range(D // (AK * AV)):  # AK * AV of the 64 dims at a time: QB x AK sums
        var acc = StaticTuple[SIMD[DType.float32, AV], QB * AK](SIMD[DType.float32, AV](0))
        for j in range(longest):
            var vrow = vbase.unsafe_offset(j * D + part * AK * AV)
            var vv = StaticTuple[SIMD[DType.float32, AV], AK](SIMD[DType.float32, AV](0))
            comptime for c in range(AK):
                vv[c] = vrow.unsafe_offset(c * AV).unsafe_load[width=AV]().cast[DType.float32]()
            comptime for r in range(QB):
                var p = sp[unsafe_offset=r * keys + j]
                comptime for c in range(AK):
                    acc[AK * r + c] += vv[c] * p
        comptime for r in range(QB):
            if r < nq:
                comptime for c in range(AK):
                    out.unsafe_offset(r * o_stride + part * AK * AV + c * AV).unsafe_store(acc[AK * r + c])


def _dot_pairs(
    acc: SIMD[DType.float32, W], a: SIMD[DType.bfloat16, 2 * W], b: SIMD[DType.bfloat16, 2 * W]
) -> SIMD[DType.float32, W]:
    """acc[i] + a[2i] b[2i] + a[2i+1] b[2i+1]: one vdpbf16ps on CPUs with avx512_bf16."""
    comptime if CompilationTarget._has_feature["avx512bf16"]():
        return llvm_intrinsic["llvm.x86.avx512bf16.dpbf16ps.512", SIMD[DType.float32, W]](acc, a, b)
    else:
        var ad = a.deinterleave()
        var bd = b.deinterleave()
        var first = ad[0].cast[DType.float32]().fma(bd[0].cast[DType.float32](), acc)
        return ad[1].cast[DType.float32]().fma(bd[1].cast[DType.float32](), first)


def _pair(a: Float32, b: Float32) -> UInt32:
    """Two floats as the bfloat16 pair one 32-bit broadcast hands to `_dot_pairs`."""
    return bitcast[DType.uint32, 1](SIMD[DType.float32, 2](a, b).cast[DType.bfloat16]())


def _exp_approx(x: SIMD[DType.float32, W]) -> SIMD[DType.float32, W]:
    """e^x for x <= 0 to ~5e-5 relative, 0 below -87: x log2(e) = n + f, 2^f by its degree-4
    Taylor polynomial in f ln 2 (|f| <= 1/2), 2^n added to the exponent bits. Enough for
    probabilities rounded to bfloat16 (2^-9), at a third of `exp`'s instructions."""
    var t = max(x, -87.0) * 1.4426950408889634
    var n = round(t)
    var f = (t - n) * 0.6931471805599453
    var p = 1.0 + f * (1.0 + f * (0.5 + f * (0.16666666666666666 + f * 0.041666666666666664)))
    return bitcast[DType.float32, W](bitcast[DType.int32, W](p) + (n.cast[DType.int32]() << 23))


def _exp_pairs(dst: Pointer[mut=True, UInt32, _], row: Pointer[Float32, _], n: Int, m: Float32) -> Float32:
    """dst[i] = the bfloat16 pair of e^(row[2i] - m), e^(row[2i+1] - m) for n even (m the
    row's maximum); returns the sum of the exponentials."""
    var n_vec = n // (2 * W) * (2 * W)
    var tv = SIMD[DType.float32, W](0)
    for j in range(0, n_vec, 2 * W):
        var e0 = _exp_approx(row.unsafe_offset(j).unsafe_load[width=W]() - m)
        var e1 = _exp_approx(row.unsafe_offset(j + W).unsafe_load[width=W]() - m)
        tv += e0 + e1
        dst.unsafe_offset(j // 2).unsafe_store(bitcast[DType.uint32, W](e0.join(e1).cast[DType.bfloat16]()))
    var total = tv.reduce_add()
    for j in range(n_vec, n, 2):
        var e0 = exp(row[unsafe_offset=j] - m)
        var e1 = exp(row[unsafe_offset=j + 1] - m)
        total += e0 + e1
        dst[unsafe_offset=j // 2] = _pair(e0, e1)
    return total


def _score_tile_bf16[n_vec: Int](
    sp: Pointer[mut=True, Float32, _],
    rmax: Pointer[mut=True, Float32, _],
    qs: Pointer[UInt32, _],
    kbase: Pointer[UInt32, MutAnyOrigin],
    keys: Int,
    j: Int,
):
    """`_score_tile` in bfloat16 pairs: K in dim pairs [32, keys, 2], qs [32, QB] pairs; each
    row's running maximum kept lane-wise in rmax [QB, W] (reduced once, after the last tile:
    a reduction per tile cost a tenth of the scores' time)."""
    var acc = StaticTuple[SIMD[DType.float32, W], QB * n_vec](SIMD[DType.float32, W](0))
    for p in range(D // 2):
        var krow = kbase.unsafe_offset(p * keys + j)
        comptime for c in range(n_vec):
            var kv = bitcast[DType.bfloat16, 2 * W](krow.unsafe_offset(c * W).unsafe_load[width=W]())
            comptime for r in range(QB):
                var qv = bitcast[DType.bfloat16, 2 * W](SIMD[DType.uint32, W](qs[unsafe_offset=p * QB + r]))
                acc[r * n_vec + c] = _dot_pairs(acc[r * n_vec + c], kv, qv)
    comptime for r in range(QB):
        var m = rmax.unsafe_offset(r * W).unsafe_load[width=W]()
        comptime for c in range(n_vec):
            sp.unsafe_offset(r * keys + j + c * W).unsafe_store(acc[r * n_vec + c])
            m = max(m, acc[r * n_vec + c])
        rmax.unsafe_offset(r * W).unsafe_store(m)


def _attend_bf16_block(
    o: Pointer[Float32, MutAnyOrigin],
    q: Pointer[Float32, MutAnyOrigin],
    kpk: Pointer[UInt32, MutAnyOrigin],
    vpk: Pointer[UInt32, MutAnyOrigin],
    heads: Int,
    n_tok: Int,
    q_stride: Int,
    keys: Int,
    bh: Int,
    t0: Int,
    sp: Pointer[mut=True, Float32, _],
    pp: Pointer[mut=True, UInt32, _],
):
    """Queries t0 .. t0 + QB - 1 of (batch, head) bh against all keys, in bfloat16 products
    with float32 sums: the queries (/ 8), keys, probabilities and values rounded to bfloat16,
    multiplied two at a time (`_dot_pairs`). Scratch: sp QB * keys floats, pp QB * keys / 2."""
    var nq = min(QB, n_tok - t0)
    var token = (bh // heads) * n_tok + t0
    var qrow = q.unsafe_offset(token * q_stride + (bh % heads) * D)
    var qs = stack_allocation[(D // 2) * QB, UInt32]()      # [dim pair, query]
    for r in range(QB):
        var qr = qrow.unsafe_offset(min(r, nq - 1) * q_stride)
        for p in range(D // 2):
            qs[unsafe_offset=p * QB + r] = _pair(qr[unsafe_offset=2 * p] * 0.125, qr[unsafe_offset=2 * p + 1] * 0.125)
    var kbase = kpk.unsafe_offset(bh * (D // 2) * keys)
    var rmax = stack_allocation[QB * W, Float32]()
    for r in range(QB):
        rmax.unsafe_offset(r * W).unsafe_store(SIMD[DType.float32, W](min_or_neg_inf[DType.float32]()))
    var tiled = keys // (KB * W) * (KB * W)
    for j in range(0, tiled, KB * W):
        _score_tile_bf16[KB](sp, rmax, qs, kbase, keys, j)
    for j in range(tiled, keys, W):          # the last vector ends at keys (keys >= W)
        _score_tile_bf16[1](sp, rmax, qs, kbase, keys, min(j, keys - W))
    var half_keys = keys // 2
    var inv = stack_allocation[QB, Float32]()     # 1 / each row's sum: applied to the output
    for r in range(QB):                      # rows past nq repeat a query: finite, not stored
        inv[unsafe_offset=r] = 1.0 / _exp_pairs(pp.unsafe_offset(r * half_keys), sp.unsafe_offset(r * keys),
                                                keys, rmax.unsafe_offset(r * W).unsafe_load[width=W]().reduce_max())
    var vbase = vpk.unsafe_offset(bh * half_keys * D)
    var out = o.unsafe_offset((token * heads + bh % heads) * D)
    comptime for half in range(2):           # 32 of the 64 dims at a time: QB x 2 accumulators
        var acc = StaticTuple[SIMD[DType.float32, W], QB * 2](SIMD[DType.float32, W](0))
        for m in range(half_keys):
            var vrow = vbase.unsafe_offset(m * D + half * 2 * W)
            var v0 = bitcast[DType.bfloat16, 2 * W](vrow.unsafe_load[width=W]())
            var v1 = bitcast[DType.bfloat16, 2 * W](vrow.unsafe_offset(W).unsafe_load[width=W]())
            comptime for r in range(QB):
                var pv = bitcast[DType.bfloat16, 2 * W](SIMD[DType.uint32, W](pp[unsafe_offset=r * half_keys + m]))
                acc[2 * r] = _dot_pairs(acc[2 * r], v0, pv)
                acc[2 * r + 1] = _dot_pairs(acc[2 * r + 1], v1, pv)
        comptime for r in range(QB):
            if r < nq:
                var scale = inv[unsafe_offset=r]
                out.unsafe_offset(r * heads * D + half * 2 * W).unsafe_store(acc[2 * r] * scale)
                out.unsafe_offset(r * heads * D + half * 2 * W + W).unsafe_store(acc[2 * r + 1] * scale)


def _pack_head(
    kpk: Pointer[mut=True, UInt32, _],
    vpk: Pointer[mut=True, UInt32, _],
    k: Pointer[Float32, MutAnyOrigin],
    v: Pointer[Float32, MutAnyOrigin],
    heads: Int,
    keys: Int,
    k_stride: Int,
    v_stride: Int,
    bh: Int,
):
    """Head bh's keys as bfloat16 dim pairs [32, keys] and values as key pairs [keys / 2, 64]
    (each UInt32 one pair), from rows of k and v with the heads side by side."""
    var b = bh // heads
    var col = (bh % heads) * D
    var kdst = kpk.unsafe_offset(bh * (D // 2) * keys)
    for j in range(keys):
        var row = k.unsafe_offset((b * keys + j) * k_stride + col).unsafe_load[width=D]()
        var pairs = bitcast[DType.uint32, D // 2](row.cast[DType.bfloat16]())
        comptime for p in range(D // 2):
            kdst[unsafe_offset=p * keys + j] = pairs[p]
    var vdst = vpk.unsafe_offset(bh * (keys // 2) * D)
    for m in range(keys // 2):
        var even = v.unsafe_offset((b * keys + 2 * m) * v_stride + col).unsafe_load[width=D]()
        var odd = v.unsafe_offset((b * keys + 2 * m + 1) * v_stride + col).unsafe_load[width=D]()
        vdst.unsafe_offset(m * D).unsafe_store(bitcast[DType.uint32, D](even.interleave(odd).cast[DType.bfloat16]()))


def _attention_bf16(
    op: Pointer[Float32, MutAnyOrigin],
    qp: Pointer[Float32, MutAnyOrigin],
    kp: Pointer[Float32, MutAnyOrigin],
    vp: Pointer[Float32, MutAnyOrigin],
    batch: Int,
    heads: Int,
    n_tok: Int,
    q_stride: Int,
    keys: Int,
    k_stride: Int,
    v_stride: Int,
) raises:
    """`WhisperAttentionBF16` on pointers (the whisper_encoder_bf16 op's self-attention too):
    q rows [batch * n_tok, q_stride], k and v rows [batch * keys, k_stride / v_stride], output
    rows [batch * n_tok, heads * 64]; keys even and at least W."""
    var packed = List[UInt32](unsafe_uninit_length=2 * batch * heads * keys * (D // 2))
    var kpk = packed.unsafe_ptr().unsafe_origin_cast[MutAnyOrigin]()
    var vpk = kpk.unsafe_offset(batch * heads * keys * (D // 2))

    def pack(bh: Int) raises {var kpk, var vpk, var kp, var vp, var heads, var keys, var k_stride, var v_stride}:
        _pack_head(kpk, vpk, kp, vp, heads, keys, k_stride, v_stride, bh)

    sync_parallelize(pack, batch * heads)
    var n_blocks = (n_tok + QB - 1) // QB
    var items = batch * heads * n_blocks
    var runs = min(items, 4 * parallelism_level())   # contiguous runs of items, scratch per run

    def work(w: Int) raises {var op, var qp, var kpk, var vpk, var heads, var n_tok, var q_stride, var keys, var n_blocks, var items, var runs}:
        var scores = List[Float32](unsafe_uninit_length=QB * keys)      # written before read
        var probs = List[UInt32](unsafe_uninit_length=QB * keys // 2)   # [query, key pair]
        for i in range(w * items // runs, (w + 1) * items // runs):
            _attend_bf16_block(op, qp, kpk, vpk, heads, n_tok, q_stride, keys, i // n_blocks,
                               (i % n_blocks) * QB, scores.unsafe_ptr(), probs.unsafe_ptr())

    sync_parallelize(work, runs)
    _ = packed^                                      # the pairs the workers read live to here


@extensibility.register("whisper_attention_bf16")
struct WhisperAttentionBF16:
    """Attention softmax(q . K / 8) . V over all keys with bfloat16 products and float32 sums
    (CPU; vdpbf16ps where the CPU has avx512_bf16): the encoder's self-attention when its
    weights are quantized. q [B, T, Cq], k and v [B, S, Ck / Cv] float32, each with the h heads
    side by side in its first h * 64 columns (the linear layers' own layout); output
    [B, T, h * 64] float32 (h from its width). S even and at least 16.

    Two passes: each (batch, head)'s keys and values are rounded to bfloat16 pairs in scratch
    (`_pack_head`), then blocks of QB queries run `_attend_bf16_block` in contiguous runs.
    """

    @staticmethod
    def execute[target: StaticString](
        output: OutputTensor[dtype=DType.float32, rank=3, ...],
        q: InputTensor[dtype=DType.float32, rank=3, ...],
        k: InputTensor[dtype=DType.float32, rank=3, ...],
        v: InputTensor[dtype=DType.float32, rank=3, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target == "gpu":
            raise Error("whisper_attention_bf16 is a CPU op")
        var batch = q.shape()[0]
        var heads = output.shape()[2] // D
        var keys = k.shape()[1]
        var n_tok = q.shape()[1]
        var q_stride = q.shape()[2]
        var k_stride = k.shape()[2]
        var v_stride = v.shape()[2]
        if keys % 2 != 0 or keys < W or v.shape()[1] != keys or min(q_stride, k_stride, v_stride) < heads * D:
            raise Error("whisper_attention_bf16: q [B, T, >= h*64], k and v [B, S, >= h*64] with an even S >= ", W)
        _attention_bf16(output.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(), batch, heads,
                        n_tok, q_stride, keys, k_stride, v_stride)


def _self_attend_step_cpu(
    o: Pointer[Float32, MutAnyOrigin],
    qkv: Pointer[Float32, MutAnyOrigin],
    k_cache: Pointer[Float32, MutAnyOrigin],
    v_cache: Pointer[Float32, MutAnyOrigin],
    lengths: Pointer[Int64, MutAnyOrigin],
    heads: Int,
    n_ctx: Int,
    pos: Int,
    bh: Int,
    start: Int,
):
    """(batch, head) bh of a one-token step: writes the token's key and value (from its q|k|v
    row) into the cache at pos, then attends over cache rows start .. lengths[0] - 1."""
    var d = heads * D
    var src = qkv.unsafe_offset((bh // heads) * 3 * d + (bh % heads) * D)
    for j in range(D):
        k_cache[unsafe_offset=(bh * D + j) * n_ctx + pos] = src[unsafe_offset=d + j]
    v_cache.unsafe_offset((bh * n_ctx + pos) * D).unsafe_store(src.unsafe_offset(2 * d).unsafe_load[width=D]())
    _attend_cpu_block[DType.float32](o, qkv, k_cache, v_cache, lengths, heads, 1, 3 * d, n_ctx, bh, 0, start)


@extensibility.register("whisper_attention")
struct WhisperAttention:
    """Attention softmax(q . K / 8) . V where query t sees only the first lengths[t] keys (all
    S of them where lengths[t] >= S).

    q [B, T, C] float32 holds the h query heads side by side in its first h * 64 columns (C may
    be wider: a fused q|k|v row); keys given transposed, k_t [B, h, 64, S], and v [B, h, S, 64],
    both float32 or bfloat16 (widened as read); output [B, T, h * 64] float32, heads side by
    side — the layout of the linear layers around it, so the graph needs no transposes.
    CPU: one work item per (batch, head, block of QB queries), `_attend_cpu_block`.
    GPU: one block of GPU_THREADS threads per (batch, head, query), `_attend_gpu`.
    """

    @staticmethod
    def execute[target: StaticString](
        output: OutputTensor[dtype=DType.float32, rank=3, ...],
        q: InputTensor[dtype=DType.float32, rank=3, ...],
        k_t: InputTensor[rank=4, ...],
        v: InputTensor[dtype=k_t.dtype, rank=4, ...],
        lengths: InputTensor[dtype=DType.int64, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        if q.shape()[0] != k_t.shape()[0] or q.shape()[2] < k_t.shape()[1] * D:
            raise Error("whisper_attention: q [B, T, C] needs the B of k_t and C >= heads * ", D)
        _attention[target](output.unsafe_ptr(), q.unsafe_ptr(), k_t.unsafe_ptr(), v.unsafe_ptr(),
                           lengths.unsafe_ptr(), lengths.unsafe_ptr(), False, k_t.shape()[0], k_t.shape()[1],
                           q.shape()[1], q.shape()[2], k_t.shape()[3], ctx)


@extensibility.register("whisper_self_attention")
struct WhisperSelfAttention:
    """One decoding step of self-attention over the KVCache, in place: the new token's key and
    value (columns h*64 .. 2h*64 and 2h*64 .. 3h*64 of qkv [B, 1, 3 * h * 64], float32) are
    written into k_cache [B, h, 64, ctx] and v_cache [B, h, ctx, 64] at position lengths[0] - 1,
    then its query (the first h * 64 columns) attends over cache rows starts[b] .. lengths[0] - 1
    (starts [B] int64: each row's first slot, past the pad slots of a left-padded prompt).
    Output [B, 1, h * 64] float32. No copy op, no mask over the empty slots.
    """

    @staticmethod
    def execute[target: StaticString](
        output: OutputTensor[dtype=DType.float32, rank=3, ...],
        qkv: InputTensor[dtype=DType.float32, rank=3, ...],
        k_cache: _MutableInputTensor[dtype=DType.float32, rank=4, ...],
        v_cache: _MutableInputTensor[dtype=DType.float32, rank=4, ...],
        lengths: InputTensor[dtype=DType.int64, rank=1, ...],
        starts: InputTensor[dtype=DType.int64, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var batch = k_cache.shape()[0]
        var heads = k_cache.shape()[1]
        var n_ctx = k_cache.shape()[3]
        if qkv.shape()[1] != 1 or qkv.shape()[2] != 3 * heads * D:
            raise Error("whisper_self_attention takes one token's q|k|v [B, 1, ", 3 * heads * D, "]")
        if starts.shape()[0] != batch:
            raise Error("whisper_self_attention: ", starts.shape()[0], " starts for a batch of ", batch)
        var qp = qkv.unsafe_ptr()
        var kp = k_cache.unsafe_ptr()
        var vp = v_cache.unsafe_ptr()
        var lp = lengths.unsafe_ptr()
        var sp = starts.unsafe_ptr()
        comptime if target == "gpu":
            ctx.enqueue_function[_append_gpu](qp, kp, vp, lp, Int32(heads), Int32(n_ctx),
                                              grid_dim=batch * heads, block_dim=D)
            _attention[target](output.unsafe_ptr(), qp, kp, vp, lp, sp, True, batch, heads, 1, 3 * heads * D, n_ctx, ctx)
            return
        var op = output.unsafe_ptr()
        var pos = Int(lp[unsafe_offset=0]) - 1
        if pos < 0 or pos >= n_ctx:
            raise Error("whisper_self_attention: position ", pos, " is outside the cache of ", n_ctx)
        for b in range(batch):
            if Int(sp[unsafe_offset=b]) < 0 or Int(sp[unsafe_offset=b]) > pos:
                raise Error("whisper_self_attention: start ", sp[unsafe_offset=b], " is past the position ", pos)

        def work(bh: Int) raises {var qp, var kp, var vp, var lp, var sp, var op, var heads, var n_ctx, var pos}:
            _self_attend_step_cpu(op, qp, kp, vp, lp, heads, n_ctx, pos, bh, Int(sp[unsafe_offset=bh // heads]))

        sync_parallelize(work, batch * heads)


def _attention[target: StaticString, kv: DType](
    o: Pointer[Float32, MutAnyOrigin],
    q: Pointer[Float32, MutAnyOrigin],
    k_t: Pointer[Scalar[kv], MutAnyOrigin],
    v: Pointer[Scalar[kv], MutAnyOrigin],
    lengths: Pointer[Int64, MutAnyOrigin],
    starts: Pointer[Int64, MutAnyOrigin],
    padded: Bool,
    batch: Int,
    heads: Int,
    n_tok: Int,
    q_stride: Int,
    keys: Int,
    ctx: DeviceContext,
) raises:
    """Both ops' attention: queries in rows of q (q_stride floats apart, heads side by side)
    against k_t / v, output rows of heads * 64 floats; where ``padded``, batch row b's keys
    start at starts[b] (else at 0, and ``starts`` is not read)."""
    comptime if target == "gpu":
        if keys > GPU_MAX_KEYS:
            raise Error("whisper_attention on a GPU takes at most 2048 keys, got ", keys)
        ctx.enqueue_function[_attend_gpu[kv]](
            o, q, k_t, v, lengths, starts, Int32(1 if padded else 0), Int32(heads), Int32(n_tok), Int32(q_stride),
            Int32(keys), grid_dim=batch * heads * n_tok, block_dim=GPU_THREADS)
        return
    var n_blocks = (n_tok + QB - 1) // QB

    def work(i: Int) raises {var o, var q, var k_t, var v, var lengths, var starts, var padded, var heads, var n_tok, var q_stride, var keys, var n_blocks}:
        var bh = i // n_blocks
        var start = Int(starts[unsafe_offset=bh // heads]) if padded else 0
        _attend_cpu_block[kv](o, q, k_t, v, lengths, heads, n_tok, q_stride, keys, bh, (i % n_blocks) * QB, start)

    sync_parallelize(work, batch * heads * n_blocks)
