import extensibility
from max.gpu.host import DeviceContext
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from std.runtime import parallelism_level
from std.sys.intrinsics import PrefetchOptions, prefetch

# The linear layers' streaming loop (kernels/linear.mojo), reduced to a sum: the same SIMD
# width and software prefetch distance, so the probe reads at the rate those layers can.
comptime LW = 16
comptime PF = 4096


@always_inline
def _prefetch_ahead[dt: DType](p: Pointer[Scalar[dt], _]):
    prefetch[PrefetchOptions().for_read().high_locality()](p.unsafe_offset(PF))


@extensibility.register("whisper_stream_sum")
struct WhisperStreamSum:
    """The sum of a float32 tensor x [R, C] into out [1] (CPU): the memory read probe that
    ``bench.py scaling`` times next to MAX's own reduction, taking the faster as the machine's
    read rate. One contiguous run per core, four 16-lane partial sums, and the same software
    prefetch (PF elements ahead) as the linear layers' weight streams. A benchmark tool, kept
    out of the kernel package the model ships.
    """

    @staticmethod
    def execute[target: StaticString](
        output: OutputTensor[dtype=DType.float32, rank=1, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target == "gpu":
            raise Error("whisper_stream_sum is a CPU op; on a GPU bench.py probes with MAX's sum")
        var n = x.shape()[0] * x.shape()[1]
        var parts = parallelism_level()
        var partial = List[Float32](length=parts, fill=0.0)
        var pp = partial.unsafe_ptr().unsafe_origin_cast[MutAnyOrigin]()
        var xp = x.unsafe_ptr()

        def work(i: Int) raises {var pp, var xp, var n, var parts}:
            var lo = i * n // parts // (4 * LW) * (4 * LW)
            var hi = n if i == parts - 1 else (i + 1) * n // parts // (4 * LW) * (4 * LW)
            var s0 = SIMD[DType.float32, LW](0)
            var s1 = SIMD[DType.float32, LW](0)
            var s2 = SIMD[DType.float32, LW](0)
            var s3 = SIMD[DType.float32, LW](0)
            var j = lo
            while j + 4 * LW <= hi:
                comptime for c in range(4):
                    _prefetch_ahead(xp.unsafe_offset(j + c * LW))
                s0 += xp.unsafe_offset(j).unsafe_load[width=LW]()
                s1 += xp.unsafe_offset(j + LW).unsafe_load[width=LW]()
                s2 += xp.unsafe_offset(j + 2 * LW).unsafe_load[width=LW]()
                s3 += xp.unsafe_offset(j + 3 * LW).unsafe_load[width=LW]()
                j += 4 * LW
            var s = (s0 + s1 + s2 + s3).reduce_add()
            while j < hi:
                s += xp[unsafe_offset=j]
                j += 1
            pp[unsafe_offset=i] = s

        sync_parallelize(work, parts)
        var total = Float32(0)
        for i in range(parts):
            total += partial[i]
        output.unsafe_ptr()[unsafe_offset=0] = total
