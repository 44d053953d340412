import extensibility
from max.gpu.host import DeviceContext
from extensibility import InputTensor, InputVariadicTensors, OutputTensor, _MutableInputTensor
from max.algorithm import sync_parallelize
from std.atomic import Atomic
from std.runtime import parallelism_level

from .attention import D, QB, _attend_cpu_block
from .linear import LW, ROWS, _gemv_rows, _layer_norm

comptime MIN_ROWS = 16     # the shortest run of weight rows a phase hands out


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


def _gemv_phase[wt: DType, gelu: Bool, residual: Bool, biased: Bool = True](
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
    """One linear layer as a phase: contiguous runs of weight rows (`_guided_start`), claimed one
    at a time."""
    var p = parallelism_level()
    var n_items = 0
    while _guided_start(n, n_items, p) < n:
        n_items += 1
    var i = _claim(c, phase)
    while i < n_items:
        _gemv_rows[wt, gelu, residual, biased](o, x, w, bias, res, m_rows, k, n, _guided_start(n, i, p),
                                               _guided_start(n, i + 1, p))
        _done(c, phase)
        i = _claim(c, phase)
    _wait(c, phase, n_items)


def _guided_start(n: Int, i: Int, p: Int) -> Int:
    """First weight row of work item i of a phase of n rows on p cores: each round of p items
    covers half the rows left (long runs first, for the streams' sake), until its items would
    be under MIN_ROWS; then items of MIN_ROWS, so the cores end the phase close together."""
    var start = 0
    var k = i
    while True:
        var item = (n - start) // (2 * p) // ROWS * ROWS
        if item < MIN_ROWS:
            return min(n, start + k * MIN_ROWS)
        if k < p:
            return start + k * item
        start += item * p
        k -= p


def _self_attend_cpu(
    o: Pointer[Float32, MutAnyOrigin],
    qkv: Pointer[Float32, MutAnyOrigin],
    k_cache: Pointer[Float32, MutAnyOrigin],
    v_cache: Pointer[Float32, MutAnyOrigin],
    lengths: Pointer[Int64, MutAnyOrigin],
    heads: Int,
    n_tok: Int,
    n_ctx: Int,
    pos: Int,
    bh: Int,
    start: Int,
):
    """(batch, head) bh of n_tok new tokens: writes their keys and values (from their q|k|v
    rows) into the cache at pos .., then each attends over the cache rows from the sequence's
    ``start`` up to its own (lengths[t] = pos + t + 1: causal)."""
    var d = heads * D
    var src = qkv.unsafe_offset((bh // heads) * n_tok * 3 * d + (bh % heads) * D)
    for t in range(n_tok):
        var row = src.unsafe_offset(t * 3 * d)
        for j in range(D):
            k_cache[unsafe_offset=(bh * D + j) * n_ctx + pos + t] = row[unsafe_offset=d + j]
        v_cache.unsafe_offset((bh * n_ctx + pos + t) * D).unsafe_store(row.unsafe_offset(2 * d).unsafe_load[width=D]())
    for t0 in range(0, n_tok, QB):
        _attend_cpu_block[DType.float32](o, qkv, k_cache, v_cache, lengths, heads, n_tok, 3 * d, n_ctx, bh, t0, start)


def _layer_phases[wt: DType, kv: DType](
    c: Pointer[Int64, MutAnyOrigin],
    p0: Int,
    xs: Pointer[Float32, MutAnyOrigin],
    h: Pointer[Float32, MutAnyOrigin],
    vec: Pointer[Float32, MutAnyOrigin],
    mat: Pointer[Scalar[wt], MutAnyOrigin],
    kp: Pointer[Float32, MutAnyOrigin],
    vp: Pointer[Float32, MutAnyOrigin],
    ckp: Pointer[Scalar[kv], MutAnyOrigin],
    cvp: Pointer[Scalar[kv], MutAnyOrigin],
    lp: Pointer[Int64, MutAnyOrigin],
    fp: Pointer[Int64, MutAnyOrigin],
    sp: Pointer[Int64, MutAnyOrigin],
    scratch: Pointer[Float32, MutAnyOrigin],
    batch: Int,
    n_tok: Int,
    d: Int,
    heads: Int,
    n_ctx: Int,
    frames: Int,
    pos: Int,
) raises:
    """One decoder block, phases p0 .. p0 + 7, as one worker runs it: the residual stream xs
    [B * n_tok, d] in place (the n_tok new tokens of each sequence, at positions pos ..), the
    block's vectors ``vec`` (17 d floats) and matrices ``mat`` (14 d x d, `WhisperDecoderStep`
    gives the order); lp holds each new token's key count, fp each one's audio frames, sp each
    sequence's first cache slot."""
    var hidden = 4 * d
    var rows = batch * n_tok
    var qkv = scratch                                # [rows, 3d]
    var att = qkv.unsafe_offset(rows * 3 * d)       # [rows, d] self-attention, heads side by side
    var x1 = att.unsafe_offset(rows * d)
    var cq = x1.unsafe_offset(rows * d)
    var cat = cq.unsafe_offset(rows * d)            # cross-attention
    var x2 = cat.unsafe_offset(rows * d)
    var f = x2.unsafe_offset(rows * d)              # [rows, hidden]
    var w_o = mat.unsafe_offset(3 * d * d)
    var w_cq = w_o.unsafe_offset(d * d)
    var w_co = w_cq.unsafe_offset(d * d)
    var w_1 = w_co.unsafe_offset(d * d)
    var w_2 = w_1.unsafe_offset(hidden * d)
    var b_qkv = vec.unsafe_offset(2 * d)
    var b_o = b_qkv.unsafe_offset(3 * d)
    var ln2 = b_o.unsafe_offset(d)
    var b_cq = ln2.unsafe_offset(2 * d)
    var b_co = b_cq.unsafe_offset(d)
    var ln3 = b_co.unsafe_offset(d)
    var b_1 = ln3.unsafe_offset(2 * d)
    var b_2 = b_1.unsafe_offset(hidden)
    _layer_norm(h, xs, vec, vec.unsafe_offset(d), rows, d)
    _gemv_phase[wt, False, False](c, p0, qkv, h, mat, b_qkv, qkv, rows, d, 3 * d)
    var bh = _claim(c, p0 + 1)
    while bh < batch * heads:
        _self_attend_cpu(att, qkv, kp, vp, lp, heads, n_tok, n_ctx, pos, bh, Int(sp[unsafe_offset=bh // heads]))
        _done(c, p0 + 1)
        bh = _claim(c, p0 + 1)
    _wait(c, p0 + 1, batch * heads)
    _gemv_phase[wt, False, True](c, p0 + 2, x1, att, w_o, b_o, xs, rows, d, d)
    _layer_norm(h, x1, ln2, ln2.unsafe_offset(d), rows, d)
    _gemv_phase[wt, False, False](c, p0 + 3, cq, h, w_cq, b_cq, cq, rows, d, d)
    bh = _claim(c, p0 + 4)
    while bh < batch * heads:
        for t0 in range(0, n_tok, QB):
            _attend_cpu_block[kv](cat, cq, ckp, cvp, fp, heads, n_tok, d, frames, bh, t0)
        _done(c, p0 + 4)
        bh = _claim(c, p0 + 4)
    _wait(c, p0 + 4, batch * heads)
    _gemv_phase[wt, False, True](c, p0 + 5, x2, cat, w_co, b_co, x1, rows, d, d)
    _layer_norm(h, x2, ln3, ln3.unsafe_offset(d), rows, d)
    _gemv_phase[wt, True, False](c, p0 + 6, f, h, w_1, b_1, f, rows, d, hidden)
    _gemv_phase[wt, False, True](c, p0 + 7, xs, f, w_2, b_2, x2, rows, hidden, d)


@extensibility.register("whisper_decoder_step")
struct WhisperDecoderStep:
    """The cached decoder in one op (CPU): n_tok new tokens of each sequence — the prompt's
    prefill, or one token of a decoding step — through the embeddings, every block, the final
    norm and the logits of the tokens asked for.

    logits [B, n_out, V] float32 out, for the new tokens out_idx [n_out] int64 (indices into
    the n_tok); cache [2L, B, h, 64 * ctx] float32, layer i's keys (transposed, [64, ctx] per
    head) at 2i and values ([ctx, 64]) at 2i + 1, written at slots positions[0] ..
    positions[0] + n_tok - 1; tokens [B, n_tok] int64; starts [B] int64, each sequence's first
    slot: a batch of prompts of different lengths is left-padded to one length, and sequence
    b's slot j holds its token at position j - starts[b] (its pad slots are never attended
    to, and their own embeddings take position 0); vectors: float32, the positional
    embedding [ctx, d], then per block its norms' gamma and beta, the q|k|v bias, the out bias,
    the cross norm, the cross query and out biases, the MLP norm and its two biases (17 d
    floats), then the final norm (2 d); matrices, float32 or bfloat16: the token embedding
    [V, d], then per block W_qkv [3d, d], W_o, W_cq, W_co [d, d], W_1 [4d, d], W_2 [d, 4d];
    cross: 2L tensors, layer i's K^T [B, h, 64, S] and V [B, h, S, 64], float32 or bfloat16.
    """

    @staticmethod
    def execute[target: StaticString](
        logits: OutputTensor[dtype=DType.float32, rank=3, ...],
        cache: _MutableInputTensor[dtype=DType.float32, rank=4, ...],
        tokens: InputTensor[dtype=DType.int64, rank=2, ...],
        positions: InputTensor[dtype=DType.int64, rank=1, ...],
        starts: InputTensor[dtype=DType.int64, rank=1, ...],
        out_idx: InputTensor[dtype=DType.int64, rank=1, ...],
        vectors: InputTensor[dtype=DType.float32, rank=1, ...],
        matrices: InputTensor[rank=1, ...],
        cross: InputVariadicTensors[rank=4, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target == "gpu":
            raise Error("whisper_decoder_step is a CPU op; on a GPU the step graph uses MAX's matmul")
        comptime wt = matrices.dtype
        comptime kv = cross.dtype
        var n_layer = cache.shape()[0] // 2
        var batch = cache.shape()[1]
        var heads = cache.shape()[2]
        var n_ctx = cache.shape()[3] // D
        var d = heads * D
        var vocab = logits.shape()[2]
        var frames = cross[0].shape()[3]
        var n_tok = tokens.shape()[1]
        var n_out = out_idx.shape()[0]
        if cross.size != 2 * n_layer or tokens.shape()[0] != batch or logits.shape()[0] != batch \
                or logits.shape()[1] != n_out:
            raise Error("whisper_decoder_step: cache, cross K/V, tokens and logits disagree on layers or batch")
        if vectors.shape()[0] != n_ctx * d + 17 * d * n_layer + 2 * d or \
           matrices.shape()[0] != vocab * d + 14 * d * d * n_layer:
            raise Error("whisper_decoder_step: the vectors or matrices do not hold ", n_layer, " blocks of d = ", d)
        var pos = Int(positions.unsafe_ptr()[unsafe_offset=0])
        if n_tok < 1 or pos < 0 or pos + n_tok > n_ctx:
            raise Error("whisper_decoder_step: positions ", pos, " .. ", pos + n_tok - 1, " are outside the cache of ", n_ctx)
        var sp = starts.unsafe_ptr()
        if starts.shape()[0] != batch:
            raise Error("whisper_decoder_step: ", starts.shape()[0], " starts for a batch of ", batch)
        for b in range(batch):
            if sp[unsafe_offset=b] < 0 or sp[unsafe_offset=b] >= Int64(n_ctx):
                raise Error("whisper_decoder_step: start ", sp[unsafe_offset=b], " is outside the cache of ", n_ctx)
        var tp = tokens.unsafe_ptr()
        for b in range(batch * n_tok):
            if tp[unsafe_offset=b] < 0 or tp[unsafe_offset=b] >= Int64(vocab):
                raise Error("whisper_decoder_step: token ", tp[unsafe_offset=b], " is outside the vocabulary of ", vocab)
        var ip = out_idx.unsafe_ptr()
        for o in range(n_out):
            if ip[unsafe_offset=o] < 0 or ip[unsafe_offset=o] >= Int64(n_tok):
                raise Error("whisper_decoder_step: out_idx ", ip[unsafe_offset=o], " is not one of the ", n_tok, " tokens")
        var ck = List[Pointer[Scalar[kv], MutAnyOrigin]]()
        var cv = List[Pointer[Scalar[kv], MutAnyOrigin]]()
        comptime for i in range(cross.size // 2):
            ck.append(cross[2 * i].unsafe_ptr())
            cv.append(cross[2 * i + 1].unsafe_ptr())
        var rows = batch * n_tok
        var phases = 8 * n_layer + 2
        var state = List[Float32](length=rows * 13 * d, fill=0.0)
        var xs = state.unsafe_ptr().unsafe_origin_cast[MutAnyOrigin]()      # residual stream [rows, d]
        var scratch = xs.unsafe_offset(rows * d)         # a block's activations, 12 d per row
        var counters = List[Int64](length=2 * phases, fill=0)
        var c = counters.unsafe_ptr().unsafe_origin_cast[MutAnyOrigin]()
        var ints = List[Int64](length=2 * n_tok, fill=Int64(frames))       # keys, then frames, per token
        for t in range(n_tok):
            ints[t] = Int64(pos + t + 1)
        var lp = ints.unsafe_ptr().unsafe_origin_cast[MutAnyOrigin]()
        var fp = lp.unsafe_offset(n_tok)
        var ckp = ck.unsafe_ptr().unsafe_origin_cast[MutAnyOrigin]()
        var cvp = cv.unsafe_ptr().unsafe_origin_cast[MutAnyOrigin]()
        var cp = cache.unsafe_ptr()
        var vec = vectors.unsafe_ptr()
        var mat = matrices.unsafe_ptr()
        var op = logits.unsafe_ptr()
        var plane = batch * heads * D * n_ctx            # one layer's keys (or values)

        def worker(_w: Int) raises {var c, var xs, var scratch, var lp, var fp, var sp, var ckp, var cvp, var cp, var tp, var ip, var vec, var mat, var op, var n_layer, var batch, var n_tok, var n_out, var rows, var heads, var n_ctx, var d, var vocab, var frames, var pos, var plane}:
            var r = _claim(c, 0)                         # embeddings: a token per item
            while r < rows:
                var row = mat.unsafe_offset(Int(tp[unsafe_offset=r]) * d)
                var pe = vec.unsafe_offset(max(pos + r % n_tok - Int(sp[unsafe_offset=r // n_tok]), 0) * d)
                for j in range(0, d, LW):
                    xs.unsafe_offset(r * d + j).unsafe_store(row.unsafe_offset(j).unsafe_load[width=LW]().cast[DType.float32]()
                                                             + pe.unsafe_offset(j).unsafe_load[width=LW]())
                _done(c, 0)
                r = _claim(c, 0)
            _wait(c, 0, rows)
            var normed = List[Float32](length=max(rows, batch * n_out) * d, fill=0.0)   # then the rows asked for
            var h = normed.unsafe_ptr().unsafe_origin_cast[MutAnyOrigin]()
            for i in range(n_layer):
                _layer_phases[wt, kv](c, 1 + 8 * i, xs, h, vec.unsafe_offset(n_ctx * d + 17 * d * i),
                                      mat.unsafe_offset(vocab * d + 14 * d * d * i),
                                      cp.unsafe_offset(2 * i * plane), cp.unsafe_offset((2 * i + 1) * plane),
                                      ckp[unsafe_offset=i], cvp[unsafe_offset=i], lp, fp, sp, scratch,
                                      batch, n_tok, d, heads, n_ctx, frames, pos)
            var ln = vec.unsafe_offset(n_ctx * d + 17 * d * n_layer)
            for b in range(batch):                       # the final norm of the rows asked for
                for o in range(n_out):
                    var src = xs.unsafe_offset((b * n_tok + Int(ip[unsafe_offset=o])) * d)
                    _layer_norm(h.unsafe_offset((b * n_out + o) * d), src, ln, ln.unsafe_offset(d), 1, d)
            _gemv_phase[wt, False, False, False](c, 8 * n_layer + 1, op, h, mat, ln, op, batch * n_out, d, vocab)   # no bias

        sync_parallelize(worker, parallelism_level())
        _ = state^                                       # the buffers the workers used live to here
        _ = counters^
        _ = ints^
        _ = ck^
        _ = cv^
