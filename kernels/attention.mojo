import extensibility
from max.gpu.host import DeviceContext
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from std.math import exp

comptime W = 16          # SIMD width over key positions (float32: one AVX-512 register)
comptime D = 64          # head dimension of every released Whisper size


@extensibility.register("whisper_attention")
struct WhisperAttention:
    @staticmethod
    def execute[target: StaticString](
        output: OutputTensor[dtype=DType.float32, rank=4, ...],
        q: InputTensor[dtype=DType.float32, rank=4, ...],
        k_t: InputTensor[dtype=DType.float32, rank=4, ...],
        v: InputTensor[dtype=DType.float32, rank=4, ...],
        lengths: InputTensor[dtype=DType.int64, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var qs = q.shape()
        var n_tok = qs[2]
        var keys = k_t.shape()[3]
        var n_items = qs[0] * qs[1] * n_tok
        var qp = q.unsafe_ptr()
        var kp = k_t.unsafe_ptr()
        var vp = v.unsafe_ptr()
        var op = output.unsafe_ptr()
        var lp = lengths.unsafe_ptr()

        def work(i: Int) raises {var qp, var kp, var vp, var op, var lp, var n_tok, var keys}:
            var t = i % n_tok
            var bh = i // n_tok
            var length = Int(lp[unsafe_offset=t])
            var n_vec = length // W * W
            var scores = List[Float32](length=keys, fill=0.0)
            var sp = scores.unsafe_ptr()
            var qrow = qp.unsafe_offset(i * D)
            var kbase = kp.unsafe_offset(bh * D * keys)
            for d in range(D):
                var qd = qrow[unsafe_offset=d] * 0.125
                var krow = kbase.unsafe_offset(d * keys)
                for j in range(0, n_vec, W):
                    var acc = sp.unsafe_offset(j).unsafe_load[width=W]()
                    sp.unsafe_offset(j).unsafe_store(acc + krow.unsafe_offset(j).unsafe_load[width=W]() * qd)
                for j in range(n_vec, length):
                    sp[unsafe_offset=j] = sp[unsafe_offset=j] + qd * krow[unsafe_offset=j]
            var m = sp[unsafe_offset=0]
            for j in range(1, length):
                m = max(m, sp[unsafe_offset=j])
            var total: Float32 = 0.0
            for j in range(length):
                var e = exp(sp[unsafe_offset=j] - m)
                sp[unsafe_offset=j] = e
                total += e
            var vbase = vp.unsafe_offset(bh * keys * D)
            var acc = SIMD[DType.float32, D](0)
            for j in range(length):
                acc += vbase.unsafe_offset(j * D).unsafe_load[width=D]() * sp[unsafe_offset=j]
            op.unsafe_offset(i * D).unsafe_store(acc / total)

        sync_parallelize(work, n_items)
