import extensibility
from max.gpu.host import DeviceContext
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from std.math import erf, exp
from std.memory import bitcast
from std.runtime import parallelism_level
from std.sys import simd_width_of
from std.utils import StaticTuple

from .attention import D, _attention_bf16, _dot_pairs, _row_max
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


@always_inline
def _store_tile[gelu: Bool, residual: Bool, biased: Bool, L: Int, N: Int](
    acc: StaticTuple[SIMD[DType.float32, L], MR * N],
    o: Pointer[Float32, MutAnyOrigin],
    ldo: Int,
    bias: Pointer[Float32, MutAnyOrigin],
    res: Pointer[Float32, MutAnyOrigin],
    ldr: Int,
    m: Int,
    rows: Int,
    col0: Int,
):
    """o[m + r, col0 : col0 + N L] = act(acc[r] + bias) (+ res) for the tile's first ``rows``
    rows: a matrix product's epilogue, folded into its stores."""
    comptime for r in range(MR):
        if r < rows:
            comptime for c in range(N):
                var col = col0 + c * L
                var y = acc[r * N + c]
                comptime if biased:
                    y += bias.unsafe_offset(col).unsafe_load[width=L]()
                comptime if gelu:
                    y = 0.5 * y * (1.0 + erf(y * 0.7071067811865476))
                comptime if residual:
                    y += res.unsafe_offset((m + r) * ldr + col).unsafe_load[width=L]()
                o.unsafe_offset((m + r) * ldo + col).unsafe_store(y)


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
            _store_tile[gelu, residual, biased, V, NV](acc, o, ldo, bias, res, ldr, m, rows, t)
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


comptime PW = 16         # lanes of a bfloat16-pair tile's sums: one vdpbf16ps (AVX512-BF16)
comptime PairTile = StaticTuple[SIMD[DType.float32, PW], MR * (NT // PW)]
comptime PAIRS = 8192    # pairs of x rounded to bfloat16 per work item


@always_inline
def _tile_dots(mut acc: PairTile, x: Pointer[UInt32, MutAnyOrigin], xo: StaticTuple[Int, MR],
               w: Pointer[UInt32, MutAnyOrigin], k2: Int):
    """acc[r, c] += x[r] . w[:, c] over k2 pairs of inputs: x's rows and w's columns as
    bfloat16 pairs (a UInt32 each), products summed in float32 two at a time (`_dot_pairs`).
    w: a 64-column panel, [k2, 64] pairs."""
    comptime NP = NT // PW
    for kk in range(k2):
        var wrow = w.unsafe_offset(kk * NT)
        var wv = StaticTuple[SIMD[DType.bfloat16, 2 * PW], NP](SIMD[DType.bfloat16, 2 * PW](0))
        comptime for c in range(NP):
            wv[c] = bitcast[DType.bfloat16, 2 * PW](wrow.unsafe_offset(c * PW).unsafe_load[width=PW]())
        comptime for r in range(MR):
            var xs = bitcast[DType.bfloat16, 2 * PW](SIMD[DType.uint32, PW](x[unsafe_offset=xo[r] + kk]))
            comptime for c in range(NP):
                acc[r * NP + c] = _dot_pairs(acc[r * NP + c], xs, wv[c])


def _gemm_bf16[gelu: Bool, residual: Bool, biased: Bool](
    o: Pointer[Float32, MutAnyOrigin],
    ldo: Int,
    x: Pointer[Float32, MutAnyOrigin],
    ldx: Int,
    w: Pointer[UInt32, MutAnyOrigin],
    n: Int,
    bias: Pointer[Float32, MutAnyOrigin],
    res: Pointer[Float32, MutAnyOrigin],
    ldr: Int,
    m: Int,
    k: Int,
    xp: Pointer[UInt32, MutAnyOrigin],
) raises:
    """`_gemm` with bfloat16 products and float32 sums: w is W [k, n] as the loader packs it
    (``_encoder_pairs``: 64-column panels, each [k / 2, 64] pairs of rows), and x's rows are
    rounded to bfloat16 pairs into xp first, kept in x's own layout (ldx and k even)."""
    var count = ((m - 1) * ldx + k) // 2

    def round_pairs(i: Int) raises {var x, var xp, var count}:
        var j0 = i * PAIRS
        var j1 = min(count, j0 + PAIRS)
        var j = j0
        while j + PW <= j1:
            var f = x.unsafe_offset(2 * j).unsafe_load[width=2 * PW]()
            xp.unsafe_offset(j).unsafe_store(bitcast[DType.uint32, PW](f.cast[DType.bfloat16]()))
            j += PW
        while j < j1:
            var f = x.unsafe_offset(2 * j).unsafe_load[width=2]()
            xp[unsafe_offset=j] = bitcast[DType.uint32, 1](f.cast[DType.bfloat16]())
            j += 1

    sync_parallelize(round_pairs, (count + PAIRS - 1) // PAIRS)
    var panels = n // NT
    var blocks = (m + MB - 1) // MB

    def work(i: Int) raises {var o, var ldo, var xp, var ldx, var w, var bias, var res, var ldr, var m, var k, var panels}:
        var n0 = (i % panels) * NT
        var panel = w.unsafe_offset(n0 * k // 2)
        var m1 = min(m, (i // panels) * MB + MB)
        var r = (i // panels) * MB
        while r < m1:
            var rows = min(MR, m1 - r)
            var acc = PairTile(SIMD[DType.float32, PW](0))
            _tile_dots(acc, xp, _row_offsets(r, rows, ldx // 2), panel, k // 2)
            _store_tile[gelu, residual, biased, PW, NT // PW](acc, o, ldo, bias, res, ldr, r, rows, n0)
            r += MR

    sync_parallelize(work, blocks * panels)


def _linear[gelu: Bool, residual: Bool, biased: Bool, bf16: Bool](
    o: Pointer[Float32, MutAnyOrigin],
    ldo: Int,
    x: Pointer[Float32, MutAnyOrigin],
    ldx: Int,
    wf: Pointer[Float32, MutAnyOrigin],
    wb: Pointer[UInt32, MutAnyOrigin],
    at: Int,
    n: Int,
    bias: Pointer[Float32, MutAnyOrigin],
    res: Pointer[Float32, MutAnyOrigin],
    ldr: Int,
    m: Int,
    k: Int,
    scratch: Pointer[Float32, MutAnyOrigin],
) raises:
    """A linear layer of the encoder: W at offset ``at`` of the float32 weights wf (`_gemm`,
    scratch its packed panels) or, ``bf16``, of the bfloat16 pairs wb (`_gemm_bf16`, scratch
    x's rounded rows)."""
    comptime if bf16:
        _gemm_bf16[gelu, residual, biased](o, ldo, x, ldx, wb.unsafe_offset(at), n, bias, res, ldr, m, k,
                                           scratch.unsafe_bitcast[UInt32]())
    else:
        _gemm[gelu, residual, biased](o, ldo, x, ldx, wf.unsafe_offset(at), n, bias, res, ldr, m, k, scratch)


@always_inline
def _matrix[bf16: Bool](mut fo: Int, mut bo: Int, size: Int) -> Int:
    """The next matrix of ``size`` elements: its offset among the float32 weights, or, ``bf16``,
    among the bfloat16 pairs (the weights then hold the vectors only)."""
    comptime if bf16:
        var at = bo
        bo += size // 2
        return at
    else:
        var at = fo
        fo += size
        return at


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
        var mx = _row_max(row, s)
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


def _encode[kv: DType, bf16: Bool](
    feats: Pointer[Float32, MutAnyOrigin],
    cp: Pointer[Scalar[kv], MutAnyOrigin],
    mp: Pointer[Float32, MutAnyOrigin],
    wp: Pointer[Float32, MutAnyOrigin],
    n_weights: Int,
    bp: Pointer[UInt32, MutAnyOrigin],
    n_pairs: Int,
    batch: Int,
    n_mels: Int,
    s: Int,
    d: Int,
    n_text: Int,
) raises:
    """The encoder ops' body: features ``feats`` [batch, s, d] and cross K/V ``cp`` from the mel
    ``mp``; every parameter in the float32 weights ``wp`` (n_weights), or, ``bf16``, the
    linear layers' matrices as the bfloat16 pairs ``bp`` (n_pairs) and the rest in ``wp``."""
    var heads = d // D
    var m = batch * s
    # the positional embedding has a row per frame of a 30 s window (n_pos); a shorter
    # window reads its first s. A block's weights outnumber the embedding's (n_pos < 12 d),
    # so the weight count modulo a block's size tells n_pos.
    var fixed = 3 * n_mels * d + d + 3 * d * d + d + 2 * d + n_text * (2 * d * d + d)
    var block = 12 * d * d + 12 * d
    var size = n_weights + 2 * n_pairs
    var rest = (size - fixed) % block if size >= fixed else 0     # the embedding's n_pos * d
    var n_pos = rest // d
    var n_layer = (size - fixed) // block if size >= fixed else 0
    if size < fixed or rest % d != 0 or n_pos < s or (bf16 and 2 * n_pairs != 12 * d * d * n_layer + 2 * d * d * n_text):
        raise Error("whisper_encoder: ", size, " weights are not an encoder of width ", d, " and ", n_mels,
                    " mels with a positional embedding of at least ", s, " frames")

    # Uninitialised: each row is written before it is read, except the convolutions' zero
    # padding, set below (zero-filling all 10 S d floats was one thread's memset per call).
    var buf = List[Float32](unsafe_uninit_length=10 * m * d + (2 * s + 2) * (n_mels + d) + max(4 * d * d, 2 * m * d if bf16 else 0))
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
    var pk = c1.unsafe_offset((2 * s + 2) * d)         # a matrix's packed panels, or x's bfloat16 pairs
    for c in range(n_mels):
        tmel[unsafe_offset=c] = 0.0
        tmel[unsafe_offset=(2 * s + 1) * n_mels + c] = 0.0
    for c in range(d):
        c1[unsafe_offset=c] = 0.0
        c1[unsafe_offset=(2 * s + 1) * d + c] = 0.0

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

    var fo = 3 * n_mels * d + d + 3 * d * d + d + n_pos * d     # the float32 weights read so far
    var bo = 0                                                   # the bfloat16 pairs read so far
    var sp = (s + NT - 1) // NT * NT
    for _ in range(n_layer):
        var ln1 = wp.unsafe_offset(fo)
        fo += 2 * d
        var wq = _matrix[bf16](fo, bo, d * d)
        var bq = wp.unsafe_offset(fo)
        fo += d
        var wk = _matrix[bf16](fo, bo, d * d)
        var wv = _matrix[bf16](fo, bo, d * d)
        var bv = wp.unsafe_offset(fo)
        fo += d
        var wo = _matrix[bf16](fo, bo, d * d)
        var bo_ = wp.unsafe_offset(fo)
        var ln2 = bo_.unsafe_offset(d)
        fo += 3 * d
        var w1 = _matrix[bf16](fo, bo, 4 * d * d)
        var b1 = wp.unsafe_offset(fo)
        fo += 4 * d
        var w2 = _matrix[bf16](fo, bo, 4 * d * d)
        var b2 = wp.unsafe_offset(fo)
        fo += d
        _norm_rows(h, x, ln1, m, d)
        _linear[False, False, True, bf16](q, d, h, d, wp, bp, wq, d, bq, q, d, m, d, pk)
        _linear[False, False, False, bf16](k, d, h, d, wp, bp, wk, d, bq, k, d, m, d, pk)
        _linear[False, False, True, bf16](v, d, h, d, wp, bp, wv, d, bv, v, d, m, d, pk)
        if bf16 and s % 2 == 0 and s >= 16:          # the bfloat16 op's attention needs an even S
            _attention_bf16(att, q, k, v, batch, heads, s, d, s, d, d)
        else:
            _key_panels(kt, k, batch, heads, s, sp)
            _attend_all(att, q, kt, v, batch, heads, s, sp)
        _linear[False, True, True, bf16](x, d, att, d, wp, bp, wo, d, bo_, x, d, m, d, pk)
        _norm_rows(h, x, ln2, m, d)
        _linear[True, False, True, bf16](f, 4 * d, h, d, wp, bp, w1, 4 * d, b1, f, 4 * d, m, d, pk)
        _linear[False, True, True, bf16](x, d, f, 4 * d, wp, bp, w2, d, b2, x, d, m, 4 * d, pk)

    _norm_rows(feats, x, wp.unsafe_offset(fo), m, d)
    fo += 2 * d
    var plane = batch * heads * D * s
    for i in range(n_text):
        var wk = _matrix[bf16](fo, bo, d * d)
        var wv = _matrix[bf16](fo, bo, d * d)
        var bv = wp.unsafe_offset(fo)
        fo += d
        _linear[False, False, False, bf16](k, d, feats, d, wp, bp, wk, d, bv, k, d, m, d, pk)
        _linear[False, False, True, bf16](v, d, feats, d, wp, bp, wv, d, bv, v, d, m, d, pk)
        _heads_t[kv](cp.unsafe_offset(2 * i * plane), k, batch, heads, s, True)
        _heads_t[kv](cp.unsafe_offset((2 * i + 1) * plane), v, batch, heads, s, False)
    _ = buf^                                         # the scratch the workers used lives to here


def _check_shapes(name: StaticString, batch: Int, n_mels_frames: Int, s: Int, d: Int, features_batch: Int,
                  cross_batch: Int, cross_heads: Int, cross_cols: Int) raises:
    if n_mels_frames != 2 * s or features_batch != batch or cross_batch != batch \
            or cross_heads != d // D or cross_cols != D * s or d % NT != 0:
        raise Error(name, ": mel [B, n_mels, 2S], features [B, S, d] and cross [2L, B, d / 64, 64 S] disagree")


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
        _check_shapes("whisper_encoder", mel.shape()[0], mel.shape()[2], features.shape()[1], features.shape()[2],
                      features.shape()[0], cross.shape()[1], cross.shape()[2], cross.shape()[3])
        _encode[cross.dtype, False](features.unsafe_ptr(), cross.unsafe_ptr(), mel.unsafe_ptr(), weights.unsafe_ptr(),
                                    weights.shape()[0], weights.unsafe_ptr().unsafe_bitcast[UInt32](), 0, mel.shape()[0],
                                    mel.shape()[1], features.shape()[1], features.shape()[2], cross.shape()[0] // 2)


@extensibility.register("whisper_encoder_bf16")
struct WhisperEncoderBF16:
    """`WhisperEncoder` with bfloat16 products and float32 sums in its linear layers and
    self-attention (`_attention_bf16`): two products per lane per instruction where the CPU has
    AVX512-BF16 (vdpbf16ps). The activations are rounded to bfloat16 at each product's input;
    norms, softmax, biases, GELU, the convolutions and the residual stream stay float32.

    Inputs as `WhisperEncoder`'s, but ``weights`` holds every parameter except the linear
    layers' matrices, which come in ``matrices``: bfloat16, in ``weight_spec`` order, each
    [in, out] matrix as 64-column panels of [in / 2, 64, 2] (two rows' values side by side).
    """

    @staticmethod
    def execute[target: StaticString](
        features: OutputTensor[dtype=DType.float32, rank=3, ...],
        cross: OutputTensor[rank=4, ...],
        mel: InputTensor[dtype=DType.float32, rank=3, ...],
        weights: InputTensor[dtype=DType.float32, rank=1, ...],
        matrices: InputTensor[dtype=DType.bfloat16, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target == "gpu":
            raise Error("whisper_encoder_bf16 is a CPU op; on a GPU the encoder graph is MAX ops")
        _check_shapes("whisper_encoder_bf16", mel.shape()[0], mel.shape()[2], features.shape()[1], features.shape()[2],
                      features.shape()[0], cross.shape()[1], cross.shape()[2], cross.shape()[3])
        _encode[cross.dtype, True](features.unsafe_ptr(), cross.unsafe_ptr(), mel.unsafe_ptr(), weights.unsafe_ptr(),
                                   weights.shape()[0], matrices.unsafe_ptr().unsafe_bitcast[UInt32](), matrices.shape()[0] // 2,
                                   mel.shape()[0], mel.shape()[1], features.shape()[1], features.shape()[2],
                                   cross.shape()[0] // 2)
