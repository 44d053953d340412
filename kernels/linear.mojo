from std.math import erf, sqrt
from std.utils import StaticTuple
from std.sys import simd_width_of
from std.sys.intrinsics import PrefetchOptions, prefetch

comptime LW = 16         # SIMD width over the input features (float32: one AVX-512 register)
comptime ROWS = 4        # weight rows per output store (one bias / residual / output vector)
comptime TV = simd_width_of[DType.float32]()  # the prefill tile's width: one register (16 or 8 lanes)
comptime TX = 4 if TV >= 16 else 2            # input rows per prefill tile: 4 x 4 sums in 16 of
                                              # AVX-512's 32 registers, 2 x 4 in 8 of AVX2's 16
comptime PF = 4096       # software prefetch distance of a weight stream, in elements (16 KB of
                         # float32); a prefetch past the end of W is a hint, and never faults


@always_inline
def _prefetch_ahead[dt: DType](p: Pointer[Scalar[dt], _]):
    """Prefetches the cache line PF elements past p: a weight stream's (and the read probe's)
    software prefetch, into every cache level."""
    prefetch[PrefetchOptions().for_read().high_locality()](p.unsafe_offset(PF))


def _finish[gelu: Bool, residual: Bool, biased: Bool](
    o: Pointer[Float32, MutAnyOrigin],
    bias: Pointer[Float32, MutAnyOrigin],
    res: Pointer[Float32, MutAnyOrigin],
    sums: SIMD[DType.float32, ROWS],
    at: Int,
    r: Int,
    nr: Int,
):
    """Writes nr outputs from o[at]: the dot products of weight rows r .. r + nr - 1 plus their
    bias (where ``biased``), through the GELU and plus the residual where asked."""
    var y = sums
    if nr == ROWS:
        comptime if biased:
            y += bias.unsafe_offset(r).unsafe_load[width=ROWS]()
        comptime if gelu:
            y = 0.5 * y * (1.0 + erf(y * 0.7071067811865476))
        comptime if residual:
            y += res.unsafe_offset(at).unsafe_load[width=ROWS]()
        o.unsafe_offset(at).unsafe_store(y)
        return
    for i in range(nr):
        var e = y[i]
        comptime if biased:
            e += bias[unsafe_offset=r + i]
        comptime if gelu:
            e = 0.5 * e * (1.0 + erf(e * 0.7071067811865476))
        comptime if residual:
            e += res[unsafe_offset=at + i]
        o[unsafe_offset=at + i] = e


def _gemv_rows[wt: DType, gelu: Bool, residual: Bool, biased: Bool = True](
    o: Pointer[Float32, MutAnyOrigin],
    x: Pointer[Float32, _],
    w: Pointer[Scalar[wt], MutAnyOrigin],
    bias: Pointer[Float32, MutAnyOrigin],
    res: Pointer[Float32, MutAnyOrigin],
    m_rows: Int,
    k: Int,
    n: Int,
    r0: Int,
    r1: Int,
):
    """Output o[m, r] = act(x[m] . w[r] + bias[r]) (+ res[m, r]) for weight rows r0 .. r1 - 1
    and every input row m, the bias added where ``biased``. Each weight row streams from
    memory once (a step is bandwidth-bound), read in order; TX input rows at a time take four
    weight rows in a TX x 4 tile of sums held in registers (each load serves several products:
    a prompt's prefill is compute-bound). The input rows left over (a one-token step's at
    batch 1-3) take one weight row at a time, each sum in the tile's order (one register of
    sums, then across it), so an output does not depend on the rows beside it: a window's
    logits are the same bits alone and in a batch of any size. One chain of sums keeps up with
    a weight row streaming from memory (measured: as fast as two partial sums)."""
    for r in range(r0, r1, ROWS):
        var nr = min(ROWS, r1 - r)
        var m = 0
        while m + TX <= m_rows and nr == ROWS:    # TX x 4 dot products: 4 + TX loads feed 4 TX FMAs
            var w0 = w.unsafe_offset(r * k)
            var acc = StaticTuple[SIMD[DType.float32, TV], TX * 4](SIMD[DType.float32, TV](0))
            for j in range(0, k, TV):
                var wv = StaticTuple[SIMD[DType.float32, TV], 4](SIMD[DType.float32, TV](0))
                comptime for b in range(4):
                    _prefetch_ahead(w0.unsafe_offset(b * k + j))
                    wv[b] = w0.unsafe_offset(b * k + j).unsafe_load[width=TV]().cast[DType.float32]()
                comptime for a in range(TX):
                    var xv = x.unsafe_offset((m + a) * k + j).unsafe_load[width=TV]()
                    comptime for b in range(4):
                        acc[a * 4 + b] += wv[b] * xv
            comptime for a in range(TX):
                var y = SIMD[DType.float32, ROWS](0)
                comptime for b in range(4):
                    y[b] = acc[a * 4 + b].reduce_add()
                _finish[gelu, residual, biased](o, bias, res, y, (m + a) * n + r, r, nr)
            m += TX
        while m < m_rows:
            var xr = x.unsafe_offset(m * k)
            var y = SIMD[DType.float32, ROWS](0)
            for i in range(nr):
                var wr = w.unsafe_offset((r + i) * k)
                var acc = SIMD[DType.float32, TV](0)
                for j in range(0, k, TV):
                    _prefetch_ahead(wr.unsafe_offset(j))
                    acc += wr.unsafe_offset(j).unsafe_load[width=TV]().cast[DType.float32]() * xr.unsafe_offset(j).unsafe_load[width=TV]()
                y[i] = acc.reduce_add()
            _finish[gelu, residual, biased](o, bias, res, y, m * n + r, r, nr)
            m += 1


def _layer_norm(
    dst: Pointer[mut=True, Float32, _],
    x: Pointer[Float32, _],
    gamma: Pointer[Float32, _],
    beta: Pointer[Float32, _],
    m_rows: Int,
    k: Int,
):
    """dst[m] = LayerNorm(x[m]) * gamma + beta for m_rows rows of k floats (k a multiple of LW;
    epsilon 1e-5, as Whisper's norms)."""
    for m in range(m_rows):
        var row = x.unsafe_offset(m * k)
        var s = SIMD[DType.float32, LW](0)
        for j in range(0, k, LW):
            s += row.unsafe_offset(j).unsafe_load[width=LW]()
        var mean = s.reduce_add() / Float32(k)
        var v = SIMD[DType.float32, LW](0)
        for j in range(0, k, LW):
            var c = row.unsafe_offset(j).unsafe_load[width=LW]() - mean
            v += c * c
        var inv = 1.0 / sqrt(v.reduce_add() / Float32(k) + 1e-5)
        for j in range(0, k, LW):
            var c = (row.unsafe_offset(j).unsafe_load[width=LW]() - mean) * inv
            var g = gamma.unsafe_offset(j).unsafe_load[width=LW]()
            dst.unsafe_offset(m * k + j).unsafe_store(c * g + beta.unsafe_offset(j).unsafe_load[width=LW]())
