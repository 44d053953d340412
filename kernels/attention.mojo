import extensibility
from max.gpu import WARP_SIZE, barrier, block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.gpu.memory import AddressSpace
from max.gpu.primitives import warp
from extensibility import InputTensor, OutputTensor, _MutableInputTensor
from max.algorithm import sync_parallelize
from std.math import exp
from std.memory import stack_allocation
from std.utils.numerics import min_or_neg_inf

comptime W = 16          # SIMD width over key positions (float32: one AVX-512 register)
comptime D = 64          # head dimension of every released Whisper size
comptime QB = 4          # queries per work item in prefill: each key vector loaded serves 4
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
    heads32: Int32,
    n_tok32: Int32,
    q_stride32: Int32,
    keys32: Int32,
):
    """One GPU block computes one query row; block index = (batch * heads + head) * n_tok + t.

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
    var n = min(Int(lengths[unsafe_offset=t]), keys)
    if tid < D:
        qs[unsafe_offset=tid] = q[unsafe_offset=token * Int(q_stride32) + (bh % heads) * D + tid] * 0.125
    barrier()
    var kbase = k_t.unsafe_offset(bh * D * keys)
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
    var vbase = v.unsafe_offset(bh * keys * D)
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


def _softmax_row(row: Pointer[mut=True, Float32, _], n: Int, longest: Int):
    """row[:n] = softmax(row[:n]) in place, W lanes at a time; row[n:longest] = 0."""
    var n_vec = n // W * W
    var mv = SIMD[DType.float32, W](min_or_neg_inf[DType.float32]())
    for j in range(0, n_vec, W):
        mv = max(mv, row.unsafe_offset(j).unsafe_load[width=W]())
    var m = mv.reduce_max()
    for j in range(n_vec, n):
        m = max(m, row[unsafe_offset=j])
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
):
    """Queries t0 .. t0 + QB - 1 (those below n_tok) of (batch, head) bh on one CPU core.

    One query streams each row of K^T once (the step is memory-bound); a block of queries keeps
    QB score vectors in registers while it walks K^T, so each key is read once per block.
    """
    var nq = min(QB, n_tok - t0)
    var lens = List[Int](length=QB, fill=0)
    var longest = 0
    for r in range(QB):                      # rows past the block's end repeat its last
        var n = Int(lengths[unsafe_offset=t0 + min(r, nq - 1)])
        lens[r] = n
        longest = max(longest, n)
    var scores = List[Float32](length=QB * keys, fill=0.0)
    var sp = scores.unsafe_ptr()
    var kbase = k_t.unsafe_offset(bh * D * keys)
    var token = (bh // heads) * n_tok + t0   # the block's first row of q and of the output
    var qrow = q.unsafe_offset(token * q_stride + (bh % heads) * D)
    var n_vec = longest // W * W
    if nq == 1:
        for d in range(D):
            var qd = qrow[unsafe_offset=d] * 0.125
            var krow = kbase.unsafe_offset(d * keys)
            for j in range(0, n_vec, W):
                var acc = sp.unsafe_offset(j).unsafe_load[width=W]()
                var kv = krow.unsafe_offset(j).unsafe_load[width=W]().cast[DType.float32]()
                sp.unsafe_offset(j).unsafe_store(acc + kv * qd)
            for j in range(n_vec, longest):
                sp[unsafe_offset=j] += qd * krow[unsafe_offset=j].cast[DType.float32]()
    else:
        var q1 = qrow.unsafe_offset(min(1, nq - 1) * q_stride)
        var q2 = qrow.unsafe_offset(min(2, nq - 1) * q_stride)
        var q3 = qrow.unsafe_offset(min(3, nq - 1) * q_stride)
        for j in range(0, n_vec, W):
            var a0 = SIMD[DType.float32, W](0)
            var a1 = SIMD[DType.float32, W](0)
            var a2 = SIMD[DType.float32, W](0)
            var a3 = SIMD[DType.float32, W](0)
            for d in range(D):
                var kv = kbase.unsafe_offset(d * keys + j).unsafe_load[width=W]().cast[DType.float32]()
                a0 += kv * qrow[unsafe_offset=d]
                a1 += kv * q1[unsafe_offset=d]
                a2 += kv * q2[unsafe_offset=d]
                a3 += kv * q3[unsafe_offset=d]
            sp.unsafe_offset(j).unsafe_store(a0 * 0.125)
            sp.unsafe_offset(keys + j).unsafe_store(a1 * 0.125)
            sp.unsafe_offset(2 * keys + j).unsafe_store(a2 * 0.125)
            sp.unsafe_offset(3 * keys + j).unsafe_store(a3 * 0.125)
        for j in range(n_vec, longest):
            for r in range(QB):
                var qr = qrow.unsafe_offset(min(r, nq - 1) * q_stride)
                var s: Float32 = 0.0
                for d in range(D):
                    s += qr[unsafe_offset=d] * kbase[unsafe_offset=d * keys + j].cast[DType.float32]()
                sp[unsafe_offset=r * keys + j] = s * 0.125
    # softmax of each row over its own length; weights past it are zero
    var rows = 1 if nq == 1 else QB
    for r in range(rows):
        _softmax_row(sp.unsafe_offset(r * keys), lens[r], longest)
    var vbase = v.unsafe_offset(bh * keys * D)
    var out = o.unsafe_offset((token * heads + bh % heads) * D)
    var o_stride = heads * D
    if nq == 1:
        var acc = SIMD[DType.float32, D](0)
        for j in range(longest):
            acc += vbase.unsafe_offset(j * D).unsafe_load[width=D]().cast[DType.float32]() * sp[unsafe_offset=j]
        out.unsafe_store(acc)
    else:
        var c0 = SIMD[DType.float32, D](0)
        var c1 = SIMD[DType.float32, D](0)
        var c2 = SIMD[DType.float32, D](0)
        var c3 = SIMD[DType.float32, D](0)
        for j in range(longest):
            var vv = vbase.unsafe_offset(j * D).unsafe_load[width=D]().cast[DType.float32]()
            c0 += vv * sp[unsafe_offset=j]
            c1 += vv * sp[unsafe_offset=keys + j]
            c2 += vv * sp[unsafe_offset=2 * keys + j]
            c3 += vv * sp[unsafe_offset=3 * keys + j]
        out.unsafe_store(c0)
        if nq > 1:
            out.unsafe_offset(o_stride).unsafe_store(c1)
        if nq > 2:
            out.unsafe_offset(2 * o_stride).unsafe_store(c2)
        if nq > 3:
            out.unsafe_offset(3 * o_stride).unsafe_store(c3)


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
):
    """(batch, head) bh of a one-token step: writes the token's key and value (from its q|k|v
    row) into the cache at pos, then attends over the first lengths[0] cache rows."""
    var d = heads * D
    var src = qkv.unsafe_offset((bh // heads) * 3 * d + (bh % heads) * D)
    for j in range(D):
        k_cache[unsafe_offset=(bh * D + j) * n_ctx + pos] = src[unsafe_offset=d + j]
    v_cache.unsafe_offset((bh * n_ctx + pos) * D).unsafe_store(src.unsafe_offset(2 * d).unsafe_load[width=D]())
    _attend_cpu_block[DType.float32](o, qkv, k_cache, v_cache, lengths, heads, 1, 3 * d, n_ctx, bh, 0)


@extensibility.register("whisper_attention")
struct WhisperAttention:
    """Attention softmax(q . K / 8) . V where query t sees only the first lengths[t] keys.

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
                           lengths.unsafe_ptr(), k_t.shape()[0], k_t.shape()[1], q.shape()[1],
                           q.shape()[2], k_t.shape()[3], ctx)


@extensibility.register("whisper_self_attention")
struct WhisperSelfAttention:
    """One decoding step of self-attention over the KVCache, in place: the new token's key and
    value (columns h*64 .. 2h*64 and 2h*64 .. 3h*64 of qkv [B, 1, 3 * h * 64], float32) are
    written into k_cache [B, h, 64, ctx] and v_cache [B, h, ctx, 64] at position lengths[0] - 1,
    then its query (the first h * 64 columns) attends over the first lengths[0] cache rows.
    Output [B, 1, h * 64] float32. No copy op, no mask over the empty slots.
    """

    @staticmethod
    def execute[target: StaticString](
        output: OutputTensor[dtype=DType.float32, rank=3, ...],
        qkv: InputTensor[dtype=DType.float32, rank=3, ...],
        k_cache: _MutableInputTensor[dtype=DType.float32, rank=4, ...],
        v_cache: _MutableInputTensor[dtype=DType.float32, rank=4, ...],
        lengths: InputTensor[dtype=DType.int64, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var batch = k_cache.shape()[0]
        var heads = k_cache.shape()[1]
        var n_ctx = k_cache.shape()[3]
        if qkv.shape()[1] != 1 or qkv.shape()[2] != 3 * heads * D:
            raise Error("whisper_self_attention takes one token's q|k|v [B, 1, ", 3 * heads * D, "]")
        var qp = qkv.unsafe_ptr()
        var kp = k_cache.unsafe_ptr()
        var vp = v_cache.unsafe_ptr()
        var lp = lengths.unsafe_ptr()
        comptime if target == "gpu":
            ctx.enqueue_function[_append_gpu](qp, kp, vp, lp, Int32(heads), Int32(n_ctx),
                                              grid_dim=batch * heads, block_dim=D)
            _attention[target](output.unsafe_ptr(), qp, kp, vp, lp, batch, heads, 1, 3 * heads * D, n_ctx, ctx)
            return
        var op = output.unsafe_ptr()
        var pos = Int(lp[unsafe_offset=0]) - 1
        if pos < 0 or pos >= n_ctx:
            raise Error("whisper_self_attention: position ", pos, " is outside the cache of ", n_ctx)

        def work(bh: Int) raises {var qp, var kp, var vp, var lp, var op, var heads, var n_ctx, var pos}:
            _self_attend_step_cpu(op, qp, kp, vp, lp, heads, n_ctx, pos, bh)

        sync_parallelize(work, batch * heads)


def _attention[target: StaticString, kv: DType](
    o: Pointer[Float32, MutAnyOrigin],
    q: Pointer[Float32, MutAnyOrigin],
    k_t: Pointer[Scalar[kv], MutAnyOrigin],
    v: Pointer[Scalar[kv], MutAnyOrigin],
    lengths: Pointer[Int64, MutAnyOrigin],
    batch: Int,
    heads: Int,
    n_tok: Int,
    q_stride: Int,
    keys: Int,
    ctx: DeviceContext,
) raises:
    """Both ops' attention: queries in rows of q (q_stride floats apart, heads side by side)
    against k_t / v, output rows of heads * 64 floats."""
    comptime if target == "gpu":
        if keys > GPU_MAX_KEYS:
            raise Error("whisper_attention on a GPU takes at most 2048 keys, got ", keys)
        ctx.enqueue_function[_attend_gpu[kv]](
            o, q, k_t, v, lengths, Int32(heads), Int32(n_tok), Int32(q_stride), Int32(keys),
            grid_dim=batch * heads * n_tok, block_dim=GPU_THREADS)
        return
    var n_blocks = (n_tok + QB - 1) // QB

    def work(i: Int) raises {var o, var q, var k_t, var v, var lengths, var heads, var n_tok, var q_stride, var keys, var n_blocks}:
        _attend_cpu_block[kv](o, q, k_t, v, lengths, heads, n_tok, q_stride, keys, i // n_blocks, (i % n_blocks) * QB)

    sync_parallelize(work, batch * heads * n_blocks)
