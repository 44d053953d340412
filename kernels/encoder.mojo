import extensibility
from max.gpu.host import DeviceContext
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from std.math import erf, exp
from std.runtime import parallelism_level
from std.sys import simd_width_of
from std.utils import StaticTuple
from std.utils.numerics import min_or_neg_inf

from .attention import D
from .linear import _layer_norm

comptime V = simd_width_of[DType.float32]()  # float32 lanes of one register: 16 (AVX-512), 8 (AVX2)
comptime MR = 6          # rows of x per register tile
# Column vectors per register tile: 6 x 4 sums fill 24 of AVX-512's 32 registers, 6 x 2 fill 12
# of AVX2's 16 (with the row of W and a broadcast). A wider tile on AVX2 spills every step.
comptime NV = 4 if V >= 16 else 2
comptime TW = NV * V     # columns per register tile
comptime NT = 64         # columns per packed panel of W (every Whisper width is a multiple of 64)
comptime MB = 96         # rows per work item: its rows of x stay in cache while W's columns stream by
comptime LN_ROWS = 64    # rows per layer-norm work item
comptime Tile = StaticTuple[SIMD[DType.float32, V], MR * NV]


@always_inline
def _tile_sums(mut acc: Tile, x: Pointer[Float32, MutAnyOrigin], xo: StaticTuple[Int, MR],
               w: Pointer[Float32, MutAnyOrigin], ldw: Int, k0: Int, k1: Int):
    """acc[r, c] += sum over k0 <= kk < k1 of x[xo[r] + kk] * w[kk * ldw + c]: the register tile
    every product here runs on. Per step NV vectors of w and MR broadcasts of x feed MR x NV FMAs."""
    for kk in range(k0, k1):
        var wrow = w.unsafe_offset(kk * ldw)
        var wv = StaticTuple[SIMD[DType.float32, V], NV](SIMD[DType.float32, V](0))
        comptime for c in range(NV):
            wv[c] = wrow.unsafe_offset(c * V).unsafe_load[width=V]()
        comptime for r in range(MR):
            var xs = SIMD[DType.float32, V](x[unsafe_offset=xo[r] + kk])
            comptime for c in range(NV):
                acc[r * NV + c] += xs * wv[c]


@always_inline
def _row_offsets(m: Int, rows: Int, ld: Int) -> StaticTuple[Int, MR]:
    """Offsets of rows m .. m + MR - 1, rows past the first ``rows`` repeating the last one."""
    var xo = StaticTuple[Int, MR](0)
    comptime for r in range(MR):
        xo[r] = (m + min(r, rows - 1)) * ld
    return xo


def _gemm_rows[gelu: Bool, residual: Bool, biased: Bool](
    o: Pointer[Float32, MutAnyOrigin],
    ldo: Int,
    x: Pointer[Float32, MutAnyOrigin],
    ldx: Int,
    panel: Pointer[Float32, MutAnyOrigin],
    bias: Pointer[Float32, MutAnyOrigin],
    res: Pointer[Float32, MutAnyOrigin],
    ldr: Int,
    m0: Int,
    m1: Int,
    k: Int,
):
    """o[m, :64] = act(x[m] . w + bias) (+ res[m]) for rows m0 .. m1 - 1, w a [k, 64] panel of W
    packed as 64 / TW column strips, each [k, TW] contiguous. A strip (k x TW floats: 24 KB
    for k = 384 on AVX2) stays in L1 while every row tile passes it."""
    for t in range(0, NT, TW):
        var strip = panel.unsafe_offset(t * k)
        var m = m0
        while m < m1:
            var rows = min(MR, m1 - m)
            var acc = Tile(SIMD[DType.float32, V](0))
            _tile_sums(acc, x, _row_offsets(m, rows, ldx), strip, TW, 0, k)
            comptime for r in range(MR):
                if r < rows:
                    comptime for c in range(NV):
                        var col = t + c * V
                        var y = acc[r * NV + c]
                        comptime if biased:
                            y += bias.unsafe_offset(col).unsafe_load[width=V]()
                        comptime if gelu:
                            y = 0.5 * y * (1.0 + erf(y * 0.7071067811865476))
                        comptime if residual:
                            y += res.unsafe_offset((m + r) * ldr + col).unsafe_load[width=V]()
                        o.unsafe_offset((m + r) * ldo + col).unsafe_store(y)
            m += MR


def _gemm[gelu: Bool, residual: Bool, biased: Bool](
    o: Pointer[Float32, MutAnyOrigin],
    ldo: Int,
    x: Pointer[Float32, MutAnyOrigin],
    ldx: Int,
    w: Pointer[Float32, MutAnyOrigin],
    n: Int,
    bias: Pointer[Float32, MutAnyOrigin],
    res: Pointer[Float32, MutAnyOrigin],
    ldr: Int,
    m: Int,
    k: Int,
    pk: Pointer[Float32, MutAnyOrigin],
) raises:
    """o = act(x w + bias) (+ res) for x [m, k] (rows ldx apart), w [k, n]; pk (k x n floats)
    receives W's 64-column panels, each as `_gemm_rows` reads it, packed once and read by every
    row block; the cores share work items of MB rows x 64 columns."""
    var panels = n // NT
    var blocks = (m + MB - 1) // MB

    def pack(p: Int) raises {var w, var n, var k, var pk}:
        for t in range(0, NT, TW):
            var dst = pk.unsafe_offset(p * k * NT + t * k)
            for kk in range(k):
                comptime for c in range(NV):
                    dst.unsafe_offset(kk * TW + c * V).unsafe_store(w.unsafe_offset(kk * n + p * NT + t + c * V).unsafe_load[width=V]())

    sync_parallelize(pack, panels)

    def work(i: Int) raises {var o, var ldo, var x, var ldx, var n, var bias, var res, var ldr, var m, var k, var panels, var pk}:
        var b = i // panels
        var n0 = (i % panels) * NT
        _gemm_rows[gelu, residual, biased](o.unsafe_offset(n0), ldo, x, ldx, pk.unsafe_offset(n0 * k), bias.unsafe_offset(n0),
                                           res.unsafe_offset(n0), ldr, b * MB, min(m, b * MB + MB), k)

    sync_parallelize(work, blocks * panels)


def _norm_rows(dst: Pointer[Float32, MutAnyOrigin], x: Pointer[Float32, MutAnyOrigin],
               gamma: Pointer[Float32, MutAnyOrigin], m: Int, d: Int) raises:
    """dst = LayerNorm(x) for m rows of d, with gamma then beta at ``gamma``."""
    def work(i: Int) raises {var dst, var x, var gamma, var m, var d}:
        var r0 = i * LN_ROWS
        _layer_norm(dst.unsafe_offset(r0 * d), x.unsafe_offset(r0 * d), gamma, gamma.unsafe_offset(d),
                    min(LN_ROWS, m - r0), d)

    sync_parallelize(work, (m + LN_ROWS - 1) // LN_ROWS)


def _heads_t[kv: DType](dst: Pointer[Scalar[kv], MutAnyOrigin], src: Pointer[Float32, MutAnyOrigin],
                        batch: Int, heads: Int, s: Int, transposed: Bool) raises:
    """Rows src [batch * s, heads * 64] to per-head planes: keys transposed [batch, heads, 64, s]
    (``transposed``), values [batch, heads, s, 64]."""
    var d = heads * D

    def work(bh: Int) raises {var dst, var src, var heads, var s, var d, var transposed}:
        var b = bh // heads
        var col = (bh % heads) * D
        var plane = dst.unsafe_offset(bh * D * s)
        for t in range(s):
            var row = src.unsafe_offset((b * s + t) * d + col)
            if transposed:
                for j in range(D):
                    plane[unsafe_offset=j * s + t] = row[unsafe_offset=j].cast[kv]()
            else:
                plane.unsafe_offset(t * D).unsafe_store(row.unsafe_load[width=D]().cast[kv]())

    sync_parallelize(work, batch * heads)


comptime QE = 48         # queries per encoder attention block: their scores (QE x keys) stay in L2
comptime KC = 128        # keys per chunk of the output product: 32 KB of values stay in L1


def _key_panels(kp: Pointer[Float32, MutAnyOrigin], k: Pointer[Float32, MutAnyOrigin],
                batch: Int, heads: Int, s: Int, sp: Int) raises:
    """Keys, rows [batch * s, heads * 64], to per-head panels of 64 keys, dim-major:
    kp[bh, key // 64, dim, key % 64]; keys s .. sp - 1 (sp: s rounded up to 64) are zero."""
    var d = heads * D
    var panels = sp // NT

    def work(i: Int) raises {var kp, var k, var heads, var s, var d, var panels}:
        var bh = i // panels
        var p = i % panels
        var src = k.unsafe_offset((bh // heads) * s * d + (bh % heads) * D)
        var dst = kp.unsafe_offset(i * D * NT)
        for t in range(NT):
            var key = p * NT + t
            if key < s:
                var row = src.unsafe_offset(key * d)
                for j in range(D):
                    dst[unsafe_offset=j * NT + t] = row[unsafe_offset=j]
            else:
                for j in range(D):
                    dst[unsafe_offset=j * NT + t] = 0.0

    sync_parallelize(work, batch * heads * panels)


def _attend_rows(o: Pointer[Float32, MutAnyOrigin], q: Pointer[Float32, MutAnyOrigin],
                 kp: Pointer[Float32, MutAnyOrigin], v: Pointer[Float32, MutAnyOrigin],
                 sc: Pointer[Float32, MutAnyOrigin], heads: Int, s: Int, sp: Int, bh: Int, q0: Int):
    """softmax(q k^T / 8) v for queries q0 .. q0 + QE - 1 (those below s) of (batch, head) bh,
    into o's head columns; q, v and o rows [batch * s, heads * 64], keys as `_key_panels`, sc a
    QE x sp scratch. Both products run on `_tile_sums`: scores 6 queries x 64 keys over the 64
    dims, outputs 6 queries x 64 dims over the keys; the softmax's division is applied to the
    outputs."""
    var d = heads * D
    var nq = min(QE, s - q0)
    var col = (bh // heads) * s * d + (bh % heads) * D
    var qb = q.unsafe_offset(col + q0 * d)
    var vb = v.unsafe_offset(col)
    var kb = kp.unsafe_offset(bh * sp * D)
    var inv = StaticTuple[Float32, QE](0)
    for p in range(sp // NT):                    # a panel of 64 keys (16 KB) serves every query tile
        var panel = kb.unsafe_offset(p * D * NT)
        var m = 0
        while m < nq:
            var rows = min(MR, nq - m)
            var xo = _row_offsets(m, rows, d)
            for t in range(0, NT, TW):
                var acc = Tile(SIMD[DType.float32, V](0))
                _tile_sums(acc, qb, xo, panel.unsafe_offset(t), NT, 0, D)
                comptime for r in range(MR):
                    if r < rows:
                        comptime for c in range(NV):
                            sc.unsafe_offset((m + r) * sp + p * NT + t + c * V).unsafe_store(acc[r * NV + c] * 0.125)
            m += MR
    var n_vec = s // V * V
    for r in range(nq):
        var row = sc.unsafe_offset(r * sp)
        var mv = SIMD[DType.float32, V](min_or_neg_inf[DType.float32]())
        for j in range(0, n_vec, V):
            mv = max(mv, row.unsafe_offset(j).unsafe_load[width=V]())
        var mx = mv.reduce_max()
        for j in range(n_vec, s):
            mx = max(mx, row[unsafe_offset=j])
        var tv = SIMD[DType.float32, V](0)
        for j in range(0, n_vec, V):
            var e = exp(row.unsafe_offset(j).unsafe_load[width=V]() - mx)
            row.unsafe_offset(j).unsafe_store(e)
            tv += e
        var total = tv.reduce_add()
        for j in range(n_vec, s):
            var e = exp(row[unsafe_offset=j] - mx)
            row[unsafe_offset=j] = e
            total += e
        inv[r] = 1.0 / total
    var cacc = sc.unsafe_offset(QE * sp)         # QE x 64 sums while the keys go by in chunks
    for j0 in range(0, s, KC):
        var j1 = min(s, j0 + KC)
        var m = 0
        while m < nq:
            var po = _row_offsets(m, min(MR, nq - m), sp)
            for t in range(0, NT, TW):
                var acc = Tile(SIMD[DType.float32, V](0))
                if j0 > 0:
                    comptime for r in range(MR):
                        comptime for c in range(NV):
                            acc[r * NV + c] = cacc.unsafe_offset((m + r) * NT + t + c * V).unsafe_load[width=V]()
                _tile_sums(acc, sc, po, vb.unsafe_offset(t), d, j0, j1)
                comptime for r in range(MR):
                    comptime for c in range(NV):
                        cacc.unsafe_offset((m + r) * NT + t + c * V).unsafe_store(acc[r * NV + c])
            m += MR
    for r in range(nq):
        comptime for c in range(NT // V):
            o.unsafe_offset(col + (q0 + r) * d + c * V).unsafe_store(cacc.unsafe_offset(r * NT + c * V).unsafe_load[width=V]() * inv[r])


def _attend_all(o: Pointer[Float32, MutAnyOrigin], q: Pointer[Float32, MutAnyOrigin],
                kp: Pointer[Float32, MutAnyOrigin], v: Pointer[Float32, MutAnyOrigin],
                batch: Int, heads: Int, s: Int, sp: Int) raises:
    """Self-attention of every query block (`_attend_rows`); each core takes a contiguous run
    of blocks with one scratch."""
    var blocks = (s + QE - 1) // QE
    var items = batch * heads * blocks
    var runs = min(items, parallelism_level())

    def work(i: Int) raises {var o, var q, var kp, var v, var heads, var s, var sp, var blocks, var items, var runs}:
        var scratch = List[Float32](unsafe_uninit_length=QE * sp + (QE + MR) * NT)
        var sc = scratch.unsafe_ptr().unsafe_origin_cast[MutAnyOrigin]()
        for item in range(i * items // runs, (i + 1) * items // runs):
            _attend_rows(o, q, kp, v, sc, heads, s, sp, item // blocks, (item % blocks) * QE)
        _ = scratch^

    sync_parallelize(work, runs)


@extensibility.register("whisper_encoder")
struct WhisperEncoder:
    """Whisper's audio encoder in one op (CPU, float32): the two convolutions (as matrix
    products over overlapping rows of the transposed mel, no copies), the positional embedding,
    every block (attention by `_attend_all`, the rest by `_gemm` with its bias, GELU and
    residual folded into the stores), the final norm, then each decoder layer's cross-attention
    keys and values.

    features [B, S, d] float32 out (after ln_post); cross [2L, B, h, 64 * S] out, layer i's keys
    transposed ([64, S] per head) at 2i and values ([S, 64]) at 2i + 1, float32 or bfloat16;
    mel [B, n_mels, 2S] float32; weights: float32, every encoder-graph parameter of
    ``weight_spec`` in its order and graph layout (convolutions [3, in, out], matrices [in, out]),
    flattened end to end.

    Against the same encoder built from MAX ops it gives the same numbers to float32 rounding,
    and compiles in the time of one op (MAX's matmul and conv kernels are most of a cold start).
    """

    @staticmethod
    def execute[target: StaticString](
        features: OutputTensor[dtype=DType.float32, rank=3, ...],
        cross: OutputTensor[rank=4, ...],
        mel: InputTensor[dtype=DType.float32, rank=3, ...],
        weights: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target == "gpu":
            raise Error("whisper_encoder is a CPU op; on a GPU the encoder graph is MAX ops")
        comptime kv = cross.dtype
        var batch = mel.shape()[0]
        var n_mels = mel.shape()[1]
        var s = features.shape()[1]
        var d = features.shape()[2]
        var heads = d // D
        var n_text = cross.shape()[0] // 2
        var m = batch * s
        if mel.shape()[2] != 2 * s or features.shape()[0] != batch or cross.shape()[1] != batch \
                or cross.shape()[2] != heads or cross.shape()[3] != D * s or d % NT != 0:
            raise Error("whisper_encoder: mel [B, n_mels, 2S], features [B, S, d] and cross [2L, B, d / 64, 64 S] disagree")
        # the positional embedding has a row per frame of a 30 s window (n_pos); a shorter
        # window reads its first s. A block's weights outnumber the embedding's (n_pos < 12 d),
        # so the weight count modulo a block's size tells n_pos.
        var fixed = 3 * n_mels * d + d + 3 * d * d + d + 2 * d + n_text * (2 * d * d + d)
        var block = 12 * d * d + 12 * d
        var size = weights.shape()[0]
        var rest = (size - fixed) % block if size >= fixed else 0     # the embedding's n_pos * d
        var n_pos = rest // d
        if size < fixed or rest % d != 0 or n_pos < s:
            raise Error("whisper_encoder: ", size, " weights are not an encoder of width ", d, " and ", n_mels,
                        " mels with a positional embedding of at least ", s, " frames")
        var n_layer = (size - fixed) // block

        var buf = List[Float32](length=10 * m * d + (2 * s + 2) * (n_mels + d) + 4 * d * d, fill=0.0)
        var x = buf.unsafe_ptr().unsafe_origin_cast[MutAnyOrigin]()     # residual stream [m, d]
        var h = x.unsafe_offset(m * d)                   # normed rows
        var q = h.unsafe_offset(m * d)
        var k = q.unsafe_offset(m * d)
        var v = k.unsafe_offset(m * d)
        var att = v.unsafe_offset(m * d)
        var f = att.unsafe_offset(m * d)                 # [m, 4d] MLP hidden; the keys' panels first
        var kt = f
        var tmel = f.unsafe_offset(4 * m * d)            # one window's mel, transposed, a zero frame each side
        var c1 = tmel.unsafe_offset((2 * s + 2) * n_mels)    # conv1's output, a zero row each side
        var pk = c1.unsafe_offset((2 * s + 2) * d)         # a matrix's packed panels
        var wp = weights.unsafe_ptr()
        var mp = mel.unsafe_ptr()

        var conv1 = wp
        var conv1_b = conv1.unsafe_offset(3 * n_mels * d)
        var conv2 = conv1_b.unsafe_offset(d)
        var conv2_b = conv2.unsafe_offset(3 * d * d)
        var pos = conv2_b.unsafe_offset(d)
        for b in range(batch):                           # the stem, a window at a time
            var src = mp.unsafe_offset(b * n_mels * 2 * s)
            for c in range(n_mels):
                for t in range(2 * s):
                    tmel[unsafe_offset=(t + 1) * n_mels + c] = src[unsafe_offset=c * 2 * s + t]
            # conv1 (kernel 3, pad 1): output t reads frames t-1, t, t+1 = rows t .. t+2 of tmel
            _gemm[True, False, True](c1.unsafe_offset(d), d, tmel, n_mels, conv1, d, conv1_b, c1, d, 2 * s, 3 * n_mels, pk)
            # conv2 (stride 2): output t reads conv1 rows 2t-1 .. 2t+1 = 3d floats from c1 + 2t d
            _gemm[True, True, True](x.unsafe_offset(b * s * d), d, c1, 2 * d, conv2, d, conv2_b, pos, d, s, 3 * d, pk)

        var p = pos.unsafe_offset(n_pos * d)
        var sp = (s + NT - 1) // NT * NT
        for _ in range(n_layer):
            var wq = p.unsafe_offset(2 * d)
            var bq = wq.unsafe_offset(d * d)
            var wk = bq.unsafe_offset(d)
            var wv = wk.unsafe_offset(d * d)
            var bv = wv.unsafe_offset(d * d)
            var wo = bv.unsafe_offset(d)
            var bo = wo.unsafe_offset(d * d)
            var ln2 = bo.unsafe_offset(d)
            var w1 = ln2.unsafe_offset(2 * d)
            var b1 = w1.unsafe_offset(4 * d * d)
            var w2 = b1.unsafe_offset(4 * d)
            var b2 = w2.unsafe_offset(4 * d * d)
            _norm_rows(h, x, p, m, d)
            _gemm[False, False, True](q, d, h, d, wq, d, bq, q, d, m, d, pk)
            _gemm[False, False, False](k, d, h, d, wk, d, bq, k, d, m, d, pk)
            _gemm[False, False, True](v, d, h, d, wv, d, bv, v, d, m, d, pk)
            _key_panels(kt, k, batch, heads, s, sp)

            _attend_all(att, q, kt, v, batch, heads, s, sp)
            _gemm[False, True, True](x, d, att, d, wo, d, bo, x, d, m, d, pk)
            _norm_rows(h, x, ln2, m, d)
            _gemm[True, False, True](f, 4 * d, h, d, w1, 4 * d, b1, f, 4 * d, m, d, pk)
            _gemm[False, True, True](x, d, f, 4 * d, w2, d, b2, x, d, m, 4 * d, pk)
            p = b2.unsafe_offset(d)

        var out = features.unsafe_ptr()
        _norm_rows(out, x, p, m, d)
        var cw = p.unsafe_offset(2 * d)
        var cp = cross.unsafe_ptr()
        var plane = batch * heads * D * s
        for i in range(n_text):
            var wk = cw
            var wv = wk.unsafe_offset(d * d)
            var bv = wv.unsafe_offset(d * d)
            _gemm[False, False, False](k, d, out, d, wk, d, bv, k, d, m, d, pk)
            _gemm[False, False, True](v, d, out, d, wv, d, bv, v, d, m, d, pk)
            _heads_t[kv](cp.unsafe_offset(2 * i * plane), k, batch, heads, s, True)
            _heads_t[kv](cp.unsafe_offset((2 * i + 1) * plane), v, batch, heads, s, False)
            cw = bv.unsafe_offset(d)
        _ = buf^                                         # the scratch the workers used lives to here
