import extensibility
from max.gpu.host import DeviceContext
from extensibility import InputTensor, OutputTensor, _MutableInputTensor
from max.algorithm import sync_parallelize
from std.atomic import Atomic
from std.runtime import parallelism_level

from .attention import D, _attend_cpu_block, _self_attend_step_cpu
from .linear import _gemv_rows, _layer_norm, _rows_per_item

comptime PHASES = 8      # the layer's parallel phases (below); each ends when all its items are done


def _claim(c: Pointer[Int64, MutAnyOrigin], phase: Int) -> Int:
    """The next unclaimed item of ``phase`` (counters: claimed, done for each phase)."""
    return Int(Atomic[Int64].fetch_add(c.unsafe_offset(2 * phase), 1))


def _done(c: Pointer[Int64, MutAnyOrigin], phase: Int):
    """Counts one finished item of ``phase``."""
    _ = Atomic[Int64].fetch_add(c.unsafe_offset(2 * phase + 1), 1)


def _wait(c: Pointer[Int64, MutAnyOrigin], phase: Int, n_items: Int):
    """Spins until all n_items of ``phase`` are done. Only items a running worker has claimed
    are waited for, so a worker that starts late (or never) cannot hold the others up."""
    while Int(Atomic[Int64].load(c.unsafe_offset(2 * phase + 1))) < n_items:
        pass


def _gemv_phase[wt: DType, gelu: Bool, residual: Bool](
    c: Pointer[Int64, MutAnyOrigin],
    phase: Int,
    o: Pointer[Float32, MutAnyOrigin],
    x: Pointer[Float32, _],
    w: Pointer[Scalar[wt], MutAnyOrigin],
    bias: Pointer[Float32, MutAnyOrigin],
    res: Pointer[Float32, MutAnyOrigin],
    m_rows: Int,
    k: Int,
    n: Int,
):
    """One linear layer as a phase: contiguous runs of weight rows (`_rows_per_item`), claimed one
    at a time."""
    var per_item = _rows_per_item(n)
    var n_items = (n + per_item - 1) // per_item
    var i = _claim(c, phase)
    while i < n_items:
        _gemv_rows[wt, gelu, residual](o, x, w, bias, res, m_rows, k, n, i * per_item, min(n, (i + 1) * per_item))
        _done(c, phase)
        i = _claim(c, phase)
    _wait(c, phase, n_items)


@extensibility.register("whisper_decoder_layer")
struct WhisperDecoderLayer:
    """One decoder block of a one-token step, whole, in one op (CPU).

        x1  = x  + SelfAttention(LN1(x) . Wqkv^T + bqkv) . Wo^T + bo   (K/V appended to the cache)
        x2  = x1 + CrossAttention(LN2(x1) . Wq^T + bq) . Wco^T + bco
        out = x2 + GELU(LN3(x2) . W1^T + b1) . W2^T + b2

    x, out [B, 1, d] float32; norms' gamma/beta [d] float32; the six matrices [N, K] float32 or
    bfloat16 (widened as read), their biases [N] float32 (qkv: the fused query|key|value
    projection [3d, d]); k_cache [B, h, 64, ctx] and v_cache [B, h, ctx, 64] float32, written at
    position lengths[0] - 1; cross k_t [B, h, 64, S] and v [B, h, S, 64] float32 or bfloat16.

    The op starts one worker per core once; the workers go through eight phases
    (the six linear layers and the two attentions) claiming items — runs of weight rows,
    (batch, head) pairs — from atomic counters, and wait at the end of each phase for its last
    item. Each worker computes the norm before its phase itself (d floats per row). Against one
    op per piece of the block, this drops the runtime's op dispatch and the wake-up of its
    worker threads between pieces (a quarter of a step's thread time in a profile).
    """

    @staticmethod
    def execute[target: StaticString](
        output: OutputTensor[dtype=DType.float32, rank=3, ...],
        x: InputTensor[dtype=DType.float32, rank=3, ...],
        ln1_g: InputTensor[dtype=DType.float32, rank=1, ...],
        ln1_b: InputTensor[dtype=DType.float32, rank=1, ...],
        w_qkv: InputTensor[rank=2, ...],
        b_qkv: InputTensor[dtype=DType.float32, rank=1, ...],
        w_o: InputTensor[dtype=w_qkv.dtype, rank=2, ...],
        b_o: InputTensor[dtype=DType.float32, rank=1, ...],
        ln2_g: InputTensor[dtype=DType.float32, rank=1, ...],
        ln2_b: InputTensor[dtype=DType.float32, rank=1, ...],
        w_cq: InputTensor[dtype=w_qkv.dtype, rank=2, ...],
        b_cq: InputTensor[dtype=DType.float32, rank=1, ...],
        w_co: InputTensor[dtype=w_qkv.dtype, rank=2, ...],
        b_co: InputTensor[dtype=DType.float32, rank=1, ...],
        ln3_g: InputTensor[dtype=DType.float32, rank=1, ...],
        ln3_b: InputTensor[dtype=DType.float32, rank=1, ...],
        w_fc1: InputTensor[dtype=w_qkv.dtype, rank=2, ...],
        b_fc1: InputTensor[dtype=DType.float32, rank=1, ...],
        w_fc2: InputTensor[dtype=w_qkv.dtype, rank=2, ...],
        b_fc2: InputTensor[dtype=DType.float32, rank=1, ...],
        k_cache: _MutableInputTensor[dtype=DType.float32, rank=4, ...],
        v_cache: _MutableInputTensor[dtype=DType.float32, rank=4, ...],
        cross_k: InputTensor[rank=4, ...],
        cross_v: InputTensor[dtype=cross_k.dtype, rank=4, ...],
        lengths: InputTensor[dtype=DType.int64, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target == "gpu":
            raise Error("whisper_decoder_layer is a CPU op; on a GPU the step graph uses MAX's matmul")
        var batch = x.shape()[0]
        var d = x.shape()[2]
        var heads = k_cache.shape()[1]
        var n_ctx = k_cache.shape()[3]
        var frames = cross_k.shape()[3]
        var hidden = w_fc1.shape()[0]
        if x.shape()[1] != 1 or heads * D != d or cross_k.shape()[1] != heads:
            raise Error("whisper_decoder_layer takes one token [B, 1, ", heads * D, "] per row")
        if w_qkv.shape()[0] != 3 * d or w_qkv.shape()[1] != d or w_fc2.shape()[1] != hidden or d % 32 != 0:
            raise Error("whisper_decoder_layer: the layer's matrices do not match d = ", d)
        var pos = Int(lengths.unsafe_ptr()[unsafe_offset=0]) - 1
        if pos < 0 or pos >= n_ctx:
            raise Error("whisper_decoder_layer: position ", pos, " is outside the cache of ", n_ctx)

        var scratch = List[Float32](length=batch * (9 * d + hidden), fill=0.0)
        var qkv = scratch.unsafe_ptr().unsafe_origin_cast[MutAnyOrigin]()    # [B, 3d]
        var att = qkv.unsafe_offset(batch * 3 * d)       # [B, d] self-attention, heads side by side
        var x1 = att.unsafe_offset(batch * d)
        var cq = x1.unsafe_offset(batch * d)
        var cat = cq.unsafe_offset(batch * d)            # cross-attention
        var x2 = cat.unsafe_offset(batch * d)
        var f = x2.unsafe_offset(batch * d)              # [B, hidden]
        var counters = List[Int64](length=2 * PHASES, fill=0)
        var c = counters.unsafe_ptr().unsafe_origin_cast[MutAnyOrigin]()
        var n_frames = List[Int64](length=1, fill=Int64(frames))
        var fp = n_frames.unsafe_ptr().unsafe_origin_cast[MutAnyOrigin]()
        var xp = x.unsafe_ptr()
        var op = output.unsafe_ptr()
        var kp = k_cache.unsafe_ptr()
        var vp = v_cache.unsafe_ptr()
        var ckp = cross_k.unsafe_ptr()
        var cvp = cross_v.unsafe_ptr()
        var lp = lengths.unsafe_ptr()
        var g1 = ln1_g.unsafe_ptr()
        var e1 = ln1_b.unsafe_ptr()
        var g2 = ln2_g.unsafe_ptr()
        var e2 = ln2_b.unsafe_ptr()
        var g3 = ln3_g.unsafe_ptr()
        var e3 = ln3_b.unsafe_ptr()
        var wqkv = w_qkv.unsafe_ptr()
        var bqkv = b_qkv.unsafe_ptr()
        var wo = w_o.unsafe_ptr()
        var bo = b_o.unsafe_ptr()
        var wcq = w_cq.unsafe_ptr()
        var bcq = b_cq.unsafe_ptr()
        var wco = w_co.unsafe_ptr()
        var bco = b_co.unsafe_ptr()
        var w1 = w_fc1.unsafe_ptr()
        var b1 = b_fc1.unsafe_ptr()
        var w2 = w_fc2.unsafe_ptr()
        var b2 = b_fc2.unsafe_ptr()
        comptime wt = w_qkv.dtype
        comptime kv = cross_k.dtype

        def worker(_w: Int) raises {var c, var fp, var xp, var op, var kp, var vp, var ckp, var cvp, var lp, var g1, var e1, var g2, var e2, var g3, var e3, var wqkv, var bqkv, var wo, var bo, var wcq, var bcq, var wco, var bco, var w1, var b1, var w2, var b2, var qkv, var att, var x1, var cq, var cat, var x2, var f, var batch, var d, var heads, var n_ctx, var frames, var hidden, var pos}:
            var normed = List[Float32](length=batch * d, fill=0.0)
            var h = normed.unsafe_ptr()
            _layer_norm(h, xp, g1, e1, batch, d)
            _gemv_phase[wt, False, False](c, 0, qkv, h, wqkv, bqkv, qkv, batch, d, 3 * d)
            var bh = _claim(c, 1)
            while bh < batch * heads:
                _self_attend_step_cpu(att, qkv, kp, vp, lp, heads, n_ctx, pos, bh)
                _done(c, 1)
                bh = _claim(c, 1)
            _wait(c, 1, batch * heads)
            _gemv_phase[wt, False, True](c, 2, x1, att, wo, bo, xp, batch, d, d)
            _layer_norm(h, x1, g2, e2, batch, d)
            _gemv_phase[wt, False, False](c, 3, cq, h, wcq, bcq, cq, batch, d, d)
            bh = _claim(c, 4)
            while bh < batch * heads:
                _attend_cpu_block[kv](cat, cq, ckp, cvp, fp, heads, 1, d, frames, bh, 0)
                _done(c, 4)
                bh = _claim(c, 4)
            _wait(c, 4, batch * heads)
            _gemv_phase[wt, False, True](c, 5, x2, cat, wco, bco, x1, batch, d, d)
            _layer_norm(h, x2, g3, e3, batch, d)
            _gemv_phase[wt, True, False](c, 6, f, h, w1, b1, f, batch, d, hidden)
            _gemv_phase[wt, False, True](c, 7, op, f, w2, b2, x2, batch, hidden, d)

        sync_parallelize(worker, parallelism_level())
        _ = scratch^                                     # the buffers the workers used live to here
        _ = counters^
        _ = n_frames^
