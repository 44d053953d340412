# Standalone GPU check of the whisper_attention op (kernels/attention.mojo), no MAX graph:
# random q, K^T, V (a fixed LCG) copied to the GPU, the op's GPU path run, the output compared
# with a float64 softmax(q.K/8).V on the host, then the mean time of a call with the launches
# pipelined. Built on a machine without a GPU for the card that runs it, e.g. an H100/H200:
#   mojo build --target-accelerator sm_90 -I . tests/attention_gpu_check.mojo -o attention_gpu_check
# and run there with the MAX libraries on LD_LIBRARY_PATH. MW_TEST_DEVICE=gpu runs the unittest
# op tests (tests/test_kernels.py) through MAX graphs instead.
from kernels.attention import WhisperAttention
from extensibility import InputTensor, OutputTensor
from extensibility.managed_tensor_slice import StaticTensorSpec
from max.gpu.host import DeviceContext
from std.utils.index import IndexList
from std.math import exp
from std.time import perf_counter_ns


def check[kv: DType](ctx: DeviceContext, b: Int, h: Int, t: Int, s: Int, lens: List[Int], reps: Int) raises:
    """One shape: batch b, h heads, t queries of lengths lens over s keys; prints the error and µs/call."""
    var nq = b * h * t * 64
    var nk = b * h * 64 * s
    var hq = ctx.enqueue_create_host_buffer[DType.float32](nq)
    var hk = ctx.enqueue_create_host_buffer[kv](nk)
    var hv = ctx.enqueue_create_host_buffer[kv](nk)
    var hl = ctx.enqueue_create_host_buffer[DType.int64](t)
    var ho = ctx.enqueue_create_host_buffer[DType.float32](nq)
    ctx.synchronize()
    var seed: UInt64 = 12345
    for i in range(nq):
        seed = seed * 6364136223846793005 + 1442695040888963407
        hq[i] = Float32(Int((seed >> 40) % 2000) - 1000) / 500.0
    for i in range(nk):
        seed = seed * 6364136223846793005 + 1442695040888963407
        hk[i] = Scalar[kv](Float32(Int((seed >> 40) % 2000) - 1000) / 300.0)
        seed = seed * 6364136223846793005 + 1442695040888963407
        hv[i] = Scalar[kv](Float32(Int((seed >> 40) % 2000) - 1000) / 1000.0)
    for i in range(t):
        hl[i] = Int64(lens[i])
    var dq = ctx.enqueue_create_buffer[DType.float32](nq)
    var dk = ctx.enqueue_create_buffer[kv](nk)
    var dv = ctx.enqueue_create_buffer[kv](nk)
    var dl = ctx.enqueue_create_buffer[DType.int64](t)
    var do = ctx.enqueue_create_buffer[DType.float32](nq)
    ctx.enqueue_copy(dq, hq)
    ctx.enqueue_copy(dk, hk)
    ctx.enqueue_copy(dv, hv)
    ctx.enqueue_copy(dl, hl)
    var o = OutputTensor[static_spec=StaticTensorSpec[DType.float32, 4, ...].get_unknown()](do.unsafe_ptr(), IndexList[4](b, h, t, 64))
    var q = InputTensor[static_spec=StaticTensorSpec[DType.float32, 4, ...].get_unknown()](dq.unsafe_ptr(), IndexList[4](b, h, t, 64))
    var k = InputTensor[static_spec=StaticTensorSpec[kv, 4, ...].get_unknown()](dk.unsafe_ptr(), IndexList[4](b, h, 64, s))
    var v = InputTensor[static_spec=StaticTensorSpec[kv, 4, ...].get_unknown()](dv.unsafe_ptr(), IndexList[4](b, h, s, 64))
    var l = InputTensor[static_spec=StaticTensorSpec[DType.int64, 1, ...].get_unknown()](dl.unsafe_ptr(), IndexList[1](t))
    WhisperAttention.execute["gpu"](o, q, k, v, l, ctx)
    ctx.enqueue_copy(ho, do)
    ctx.synchronize()
    var worst: Float64 = 0.0
    for bh in range(b * h):
        for tt in range(t):
            var n = lens[tt]
            var sc = List[Float64](length=n, fill=0.0)
            var mx: Float64 = -1e30
            for j in range(n):
                var acc: Float64 = 0.0
                for d in range(64):
                    acc += Float64(hq[(bh * t + tt) * 64 + d]) * Float64(hk[bh * 64 * s + d * s + j].cast[DType.float32]())
                sc[j] = acc / 8.0
                mx = max(mx, sc[j])
            var tot: Float64 = 0.0
            for j in range(n):
                sc[j] = exp(sc[j] - mx)
                tot += sc[j]
            for d in range(64):
                var r: Float64 = 0.0
                for j in range(n):
                    r += sc[j] * Float64(hv[bh * s * 64 + j * 64 + d].cast[DType.float32]())
                worst = max(worst, abs(r / tot - Float64(ho[(bh * t + tt) * 64 + d])))
    var t0 = perf_counter_ns()
    for _ in range(reps):
        WhisperAttention.execute["gpu"](o, q, k, v, l, ctx)
    ctx.synchronize()
    var us = Float64(perf_counter_ns() - t0) / 1000.0 / Float64(reps)
    print("kv", kv, "b", b, "h", h, "t", t, "s", s, "max abs err", worst, "us/call", us)


def main() raises:
    var ctx = DeviceContext()
    check[DType.float32](ctx, 2, 3, 3, 1500, [1500, 700, 1], 200)
    check[DType.bfloat16](ctx, 2, 3, 3, 1500, [1500, 65, 2], 200)
    check[DType.float32](ctx, 1, 6, 1, 448, [400], 500)
    check[DType.float32](ctx, 1, 6, 1, 1500, [1500], 500)
    check[DType.bfloat16](ctx, 8, 20, 1, 1500, [1500], 200)
    check[DType.float32](ctx, 8, 20, 1, 448, [64], 500)
