# Standalone GPU check of the attention ops (kernels/attention.mojo), no MAX graph: random
# inputs (a fixed LCG) copied to the GPU, each op's GPU path run, the output compared with a
# float64 softmax(q.K/8).V on the host (whisper_self_attention: also the key and value it
# appended to the cache), then the mean time of a call with the launches pipelined. Built on a
# machine without a GPU for the card that runs it, e.g. an H100/H200:
#   mojo build --target-accelerator sm_90 -I . tests/attention_gpu_check.mojo -o attention_gpu_check
# and run there with the MAX libraries on LD_LIBRARY_PATH. MW_TEST_DEVICE=gpu runs the unittest
# op tests (tests/test_kernels.py) through MAX graphs instead.
from kernels.attention import D, GPU_THREADS, WhisperAttention, WhisperSelfAttention
from extensibility import InputTensor, OutputTensor, _MutableInputTensor
from extensibility.managed_tensor_slice import StaticTensorSpec
from max.gpu import WARP_SIZE, barrier, block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.gpu.memory import AddressSpace
from max.gpu.primitives import warp
from std.memory import stack_allocation
from std.utils.index import IndexList
from std.utils.numerics import min_or_neg_inf
from std.math import exp
from std.time import perf_counter_ns

comptime SPLIT_KEYS = 128        # keys per block of the split candidate


def random_list(n: Int, scale: Float32, mut seed: UInt64) -> List[Float32]:
    """Returns n values in [-1000, 1000) / scale from a 64-bit LCG."""
    var out = List[Float32](length=n, fill=0.0)
    for i in range(n):
        seed = seed * 6364136223846793005 + 1442695040888963407
        out[i] = Float32(Int((seed >> 40) % 2000) - 1000) / scale
    return out^


def worst_error(q: List[Float32], q_stride: Int, k: List[Float32], v: List[Float32], o: List[Float32],
                b: Int, h: Int, t: Int, s: Int, lens: List[Int], starts: List[Int]) -> Float64:
    """Largest |o - softmax(q.K/8).V| in float64; q rows of q_stride floats (heads side by side
    first), K^T [b,h,64,s], V [b,h,s,64], o [b,t,h*64]; batch row r's keys from starts[r] on."""
    var worst: Float64 = 0.0
    for bh in range(b * h):
        for tt in range(t):
            var n = lens[tt]
            var first = starts[bh // h]
            var row = (bh // h) * t + tt
            var sc = List[Float64](length=n, fill=0.0)
            var mx: Float64 = -1e30
            for j in range(first, n):
                var acc: Float64 = 0.0
                for d in range(64):
                    acc += Float64(q[row * q_stride + (bh % h) * 64 + d]) * Float64(k[bh * 64 * s + d * s + j])
                sc[j] = acc / 8.0
                mx = max(mx, sc[j])
            var tot: Float64 = 0.0
            for j in range(first, n):
                sc[j] = exp(sc[j] - mx)
                tot += sc[j]
            for d in range(64):
                var r: Float64 = 0.0
                for j in range(first, n):
                    r += sc[j] * Float64(v[bh * s * 64 + j * 64 + d])
                worst = max(worst, abs(r / tot - Float64(o[(row * h + bh % h) * 64 + d])))
    return worst


def to_device[dt: DType](ctx: DeviceContext, values: List[Float32]) raises -> type_of(ctx.enqueue_create_buffer[dt](1)):
    """Returns the values (rounded to dt) in a new GPU buffer."""
    var host = ctx.enqueue_create_host_buffer[dt](len(values))
    ctx.synchronize()
    for i in range(len(values)):
        host[i] = Scalar[dt](values[i])
    var dev = ctx.enqueue_create_buffer[dt](len(values))
    ctx.enqueue_copy(dev, host)
    return dev^


def from_device[dt: DType](ctx: DeviceContext, dev: type_of(ctx.enqueue_create_buffer[dt](1)), n: Int) raises -> List[Float32]:
    """The first n values of a GPU buffer, as float32."""
    var host = ctx.enqueue_create_host_buffer[dt](n)
    ctx.enqueue_copy(host, dev)
    ctx.synchronize()
    var out = List[Float32](length=n, fill=0.0)
    for i in range(n):
        out[i] = host[i].cast[DType.float32]()
    return out^


def rounded[dt: DType](values: List[Float32]) -> List[Float32]:
    """Returns the values as the GPU holds them in dt."""
    var out = List[Float32](length=len(values), fill=0.0)
    for i in range(len(values)):
        out[i] = Scalar[dt](values[i]).cast[DType.float32]()
    return out^


def check[kv: DType](ctx: DeviceContext, b: Int, h: Int, t: Int, s: Int, lens: List[Int], reps: Int) raises:
    """Checks whisper_attention: batch b, h heads, t queries of lengths lens over s keys."""
    var seed: UInt64 = 12345
    var hq = random_list(b * t * h * 64, 500.0, seed)
    var hk = rounded[kv](random_list(b * h * 64 * s, 300.0, seed))
    var hv = rounded[kv](random_list(b * h * 64 * s, 1000.0, seed))
    var hl = ctx.enqueue_create_host_buffer[DType.int64](t)
    ctx.synchronize()
    for i in range(t):
        hl[i] = Int64(lens[i])
    var dq = to_device[DType.float32](ctx, hq)
    var dk = to_device[kv](ctx, hk)
    var dv = to_device[kv](ctx, hv)
    var dl = ctx.enqueue_create_buffer[DType.int64](t)
    ctx.enqueue_copy(dl, hl)
    var do = ctx.enqueue_create_buffer[DType.float32](b * t * h * 64)
    var o = OutputTensor[static_spec=StaticTensorSpec[DType.float32, 3, ...].get_unknown()](do.unsafe_ptr(), IndexList[3](b, t, h * 64))
    var q = InputTensor[static_spec=StaticTensorSpec[DType.float32, 3, ...].get_unknown()](dq.unsafe_ptr(), IndexList[3](b, t, h * 64))
    var k = InputTensor[static_spec=StaticTensorSpec[kv, 4, ...].get_unknown()](dk.unsafe_ptr(), IndexList[4](b, h, 64, s))
    var v = InputTensor[static_spec=StaticTensorSpec[kv, 4, ...].get_unknown()](dv.unsafe_ptr(), IndexList[4](b, h, s, 64))
    var l = InputTensor[static_spec=StaticTensorSpec[DType.int64, 1, ...].get_unknown()](dl.unsafe_ptr(), IndexList[1](t))
    WhisperAttention.execute["gpu"](o, q, k, v, l, ctx)
    var worst = worst_error(hq, h * 64, hk, hv, from_device[DType.float32](ctx, do, b * t * h * 64), b, h, t, s, lens,
                            List[Int](length=b, fill=0))
    var t0 = perf_counter_ns()
    for _ in range(reps):
        WhisperAttention.execute["gpu"](o, q, k, v, l, ctx)
    ctx.synchronize()
    var us = Float64(perf_counter_ns() - t0) / 1000.0 / Float64(reps)
    print("attention kv", kv, "b", b, "h", h, "t", t, "s", s, "max abs err", worst, "us/call", us)
    if t != 1 or lens[0] < s:                    # the split candidate: one query seeing every key
        return
    var splits = (s + SPLIT_KEYS - 1) // SPLIT_KEYS
    var dpart = ctx.enqueue_create_buffer[DType.float32](b * h * splits * (D + 2))

    def split() raises {var ctx, var dpart, var do, var dq, var dk, var dv, var b, var h, var s, var splits}:
        ctx.enqueue_function[_attend_split_gpu[kv]](dpart.unsafe_ptr(), dq.unsafe_ptr(), dk.unsafe_ptr(), dv.unsafe_ptr(),
                                                    Int32(h), Int32(s), Int32(splits), grid_dim=b * h * splits,
                                                    block_dim=GPU_THREADS)
        ctx.enqueue_function[_combine_split_gpu](do.unsafe_ptr(), dpart.unsafe_ptr(), Int32(splits),
                                                 grid_dim=b * h, block_dim=D)

    split()
    worst = worst_error(hq, h * 64, hk, hv, from_device[DType.float32](ctx, do, b * h * 64), b, h, 1, s, lens,
                        List[Int](length=b, fill=0))
    t0 = perf_counter_ns()
    for _ in range(reps):
        split()
    ctx.synchronize()
    us = Float64(perf_counter_ns() - t0) / 1000.0 / Float64(reps)
    print("  split candidate, keys in blocks of", SPLIT_KEYS, ": max abs err", worst, "us/call", us)


def check_self(ctx: DeviceContext, b: Int, h: Int, length: Int, starts: List[Int], reps: Int) raises:
    """Checks whisper_self_attention: batch b, h heads, appending at position length - 1 of 448,
    row r attending from its slot starts[r] on (a left-padded prompt)."""
    comptime S = 448
    var seed: UInt64 = 777
    var d = h * 64
    var hqkv = random_list(b * 3 * d, 500.0, seed)
    var hk = random_list(b * h * 64 * S, 300.0, seed)
    var hv = random_list(b * h * 64 * S, 1000.0, seed)
    var hl = ctx.enqueue_create_host_buffer[DType.int64](1)
    ctx.synchronize()
    hl[0] = Int64(length)
    var dqkv = to_device[DType.float32](ctx, hqkv)
    var dk = to_device[DType.float32](ctx, hk)
    var dv = to_device[DType.float32](ctx, hv)
    var dl = ctx.enqueue_create_buffer[DType.int64](1)
    ctx.enqueue_copy(dl, hl)
    var hs = ctx.enqueue_create_host_buffer[DType.int64](b)
    ctx.synchronize()
    for r in range(b):
        hs[r] = Int64(starts[r])
    var ds = ctx.enqueue_create_buffer[DType.int64](b)
    ctx.enqueue_copy(ds, hs)
    var do = ctx.enqueue_create_buffer[DType.float32](b * d)
    var o = OutputTensor[static_spec=StaticTensorSpec[DType.float32, 3, ...].get_unknown()](do.unsafe_ptr(), IndexList[3](b, 1, d))
    var qkv = InputTensor[static_spec=StaticTensorSpec[DType.float32, 3, ...].get_unknown()](dqkv.unsafe_ptr(), IndexList[3](b, 1, 3 * d))
    var k = _MutableInputTensor[static_spec=StaticTensorSpec[DType.float32, 4, ...].get_unknown()](dk.unsafe_ptr(), IndexList[4](b, h, 64, S))
    var v = _MutableInputTensor[static_spec=StaticTensorSpec[DType.float32, 4, ...].get_unknown()](dv.unsafe_ptr(), IndexList[4](b, h, S, 64))
    var l = InputTensor[static_spec=StaticTensorSpec[DType.int64, 1, ...].get_unknown()](dl.unsafe_ptr(), IndexList[1](1))
    var st = InputTensor[static_spec=StaticTensorSpec[DType.int64, 1, ...].get_unknown()](ds.unsafe_ptr(), IndexList[1](b))
    WhisperSelfAttention.execute["gpu"](o, qkv, k, v, l, st, ctx)
    var pos = length - 1
    for bh in range(b * h):                       # the cache as the op should have left it
        for c in range(64):
            var src = (bh // h) * 3 * d + (bh % h) * 64 + c
            hk[(bh * 64 + c) * S + pos] = hqkv[src + d]
            hv[(bh * S + pos) * 64 + c] = hqkv[src + 2 * d]
    var worst: Float64 = 0.0
    var got_k = from_device[DType.float32](ctx, dk, len(hk))
    var got_v = from_device[DType.float32](ctx, dv, len(hv))
    for i in range(len(hk)):
        worst = max(worst, Float64(abs(got_k[i] - hk[i])), Float64(abs(got_v[i] - hv[i])))
    var lens: List[Int] = [length]
    worst = max(worst, worst_error(hqkv, 3 * d, hk, hv, from_device[DType.float32](ctx, do, b * d), b, h, 1, S, lens, starts))
    var t0 = perf_counter_ns()
    for _ in range(reps):
        WhisperSelfAttention.execute["gpu"](o, qkv, k, v, l, st, ctx)
    ctx.synchronize()
    var us = Float64(perf_counter_ns() - t0) / 1000.0 / Float64(reps)
    print("self_attention b", b, "h", h, "length", length, "max abs err", worst, "us/call", us)


# A candidate for one query of few rows (a batch-1 step's cross-attention: 6 heads, one block
# each, leave most of the GPU idle): the keys split across blocks of SPLIT_KEYS, each writing its
# unnormalized output, maximum and sum, then one block per row combining them. `check` times it
# after the op on the same inputs, before the op takes it.
def _attend_split_gpu[kv: DType](
    part: Pointer[Float32, MutAnyOrigin],
    q: Pointer[Float32, MutAnyOrigin],
    k_t: Pointer[Scalar[kv], MutAnyOrigin],
    v: Pointer[Scalar[kv], MutAnyOrigin],
    heads32: Int32,
    keys32: Int32,
    splits32: Int32,
):
    """Block row * splits + s (row = batch * heads + head, one query per row, every key seen):
    keys s * SPLIT_KEYS .. of the row; writes part[(row * splits + s) * (D + 2) ..]: the 64
    sums of e^(score - max) * v, then the max and the sum of e^(score - max)."""
    comptime WARPS = GPU_THREADS // WARP_SIZE
    comptime PARTS = GPU_THREADS // D
    var heads = Int(heads32)
    var keys = Int(keys32)
    var splits = Int(splits32)
    var row = Int(block_idx.x) // splits
    var lo = (Int(block_idx.x) % splits) * SPLIT_KEYS
    var hi = min(lo + SPLIT_KEYS, keys)
    var tid = Int(thread_idx.x)
    var lane = tid % WARP_SIZE
    var w = tid // WARP_SIZE
    var qs = stack_allocation[D, Float32, address_space=AddressSpace.SHARED]()
    var scores = stack_allocation[SPLIT_KEYS, Float32, address_space=AddressSpace.SHARED]()
    var red = stack_allocation[WARPS, Float32, address_space=AddressSpace.SHARED]()
    var parts = stack_allocation[GPU_THREADS, Float32, address_space=AddressSpace.SHARED]()
    if tid < D:
        qs[unsafe_offset=tid] = q[unsafe_offset=(row // heads) * heads * D + (row % heads) * D + tid] * 0.125
    barrier()
    var kbase = k_t.unsafe_offset(row * D * keys)
    var m = min_or_neg_inf[DType.float32]()
    for j in range(lo + tid, hi, GPU_THREADS):
        var sc: Float32 = 0.0
        for d in range(D):
            sc += qs[unsafe_offset=d] * kbase[unsafe_offset=d * keys + j].cast[DType.float32]()
        scores[unsafe_offset=j - lo] = sc
        m = max(m, sc)
    m = warp.max(m)
    if lane == 0:
        red[unsafe_offset=w] = m
    barrier()
    m = red[unsafe_offset=0]
    for i in range(1, WARPS):
        m = max(m, red[unsafe_offset=i])
    barrier()
    var total: Float32 = 0.0
    for j in range(lo + tid, hi, GPU_THREADS):
        var e = exp(scores[unsafe_offset=j - lo] - m)
        scores[unsafe_offset=j - lo] = e
        total += e
    total = warp.sum(total)
    if lane == 0:
        red[unsafe_offset=w] = total
    barrier()
    total = 0.0
    for i in range(WARPS):
        total += red[unsafe_offset=i]
    var vbase = v.unsafe_offset(row * keys * D)
    var d = tid % D
    var acc: Float32 = 0.0
    for j in range(lo + tid // D, hi, PARTS):
        acc += scores[unsafe_offset=j - lo] * vbase[unsafe_offset=j * D + d].cast[DType.float32]()
    parts[unsafe_offset=tid] = acc
    barrier()
    var out = part.unsafe_offset(Int(block_idx.x) * (D + 2))
    if tid < D:
        var r: Float32 = 0.0
        for p in range(PARTS):
            r += parts[unsafe_offset=p * D + tid]
        out[unsafe_offset=tid] = r
    if tid == 0:
        out[unsafe_offset=D] = m
        out[unsafe_offset=D + 1] = total


def _combine_split_gpu(o: Pointer[Float32, MutAnyOrigin], part: Pointer[Float32, MutAnyOrigin], splits32: Int32):
    """Block row, thread d: output d of the row from its splits' parts (an empty split's max is
    -inf: its weight e^(-inf) is 0)."""
    var splits = Int(splits32)
    var tid = Int(thread_idx.x)
    var base = part.unsafe_offset(Int(block_idx.x) * splits * (D + 2))
    var top = min_or_neg_inf[DType.float32]()
    for s in range(splits):
        top = max(top, base[unsafe_offset=s * (D + 2) + D])
    var total: Float32 = 0.0
    var acc: Float32 = 0.0
    for s in range(splits):
        var wt = exp(base[unsafe_offset=s * (D + 2) + D] - top)
        total += wt * base[unsafe_offset=s * (D + 2) + D + 1]
        acc += wt * base[unsafe_offset=s * (D + 2) + tid]
    o[unsafe_offset=Int(block_idx.x) * D + tid] = acc / total


def main() raises:
    var ctx = DeviceContext()
    check[DType.float32](ctx, 2, 3, 3, 1500, [1500, 700, 1], 200)
    check[DType.bfloat16](ctx, 2, 3, 3, 1500, [1500, 65, 2], 200)
    check[DType.float32](ctx, 1, 6, 1, 448, [400], 500)
    check[DType.float32](ctx, 1, 6, 1, 1500, [1500], 500)          # tiny.en's step, batch 1
    check[DType.bfloat16](ctx, 1, 20, 1, 1500, [1500], 500)        # large-v3(-turbo)'s, batch 1
    check[DType.bfloat16](ctx, 8, 20, 1, 1500, [1500], 200)
    check[DType.float32](ctx, 2, 6, 1, 1000, [1000], 500)          # a last split of 104 keys
    check[DType.float32](ctx, 8, 20, 1, 448, [64], 500)
    check_self(ctx, 1, 6, 1, [0], 500)
    check_self(ctx, 4, 20, 448, [0, 0, 0, 0], 200)
    check_self(ctx, 3, 6, 40, [0, 39, 17], 500)
