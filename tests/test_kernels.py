"""The Mojo attention kernel (kernels/attention.mojo) against numpy, and kernels on vs off."""

import unittest
from unittest import mock

import numpy as np

import support
from support import mw


def reference(q, k_t, v, lengths):
    """softmax(q k / 8) v over the first lengths[t] keys, for q [B,h,T,64], k_t [B,h,64,S]."""
    out = np.zeros_like(q)
    for t, n in enumerate(lengths):
        s = np.einsum("bhd,bhdj->bhj", q[:, :, t].astype(np.float64), k_t[..., :n]) / 8.0
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, :, t] = np.einsum("bhj,bhjd->bhd", p / p.sum(-1, keepdims=True), v[:, :, :n])
    return out


@unittest.skipUnless((mw.KERNELS_DIR / "attention.mojo").is_file(), "kernels/ is not present")
class AttentionOpTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from max import engine
        from max.driver import CPU
        from max.dtype import DType
        from max.graph import DeviceRef, Graph, TensorType, ops
        dev = DeviceRef.CPU()
        cls.graphs = {}
        session = engine.InferenceSession(devices=[CPU()])
        for heads in (6, 20):
            for keys in (448, 1500):
                f32 = lambda shape: TensorType(DType.float32, shape, device=dev)  # noqa: E731
                with Graph(f"attention_op_{heads}_{keys}",
                           input_types=[f32(["b", heads, "t", 64]), f32(["b", heads, 64, keys]),
                                        f32(["b", heads, keys, 64]),
                                        TensorType(DType.int64, ["t"], device=dev)],
                           custom_extensions=[mw.KERNELS_DIR]) as g:
                    q, k_t, v, n = (x.tensor for x in g.inputs)
                    g.output(ops.custom(name="whisper_attention", device=dev, values=[q, k_t, v, n],
                                        out_types=[f32(q.shape)])[0].tensor)
                cls.graphs[heads, keys] = session.load(g)

    def run_op(self, batch, heads, keys, lengths):
        from max.driver import Buffer
        rng = np.random.default_rng(batch * 1000 + heads + keys + lengths[0])
        q = rng.standard_normal((batch, heads, len(lengths), 64), dtype=np.float32)
        k_t = rng.standard_normal((batch, heads, 64, keys), dtype=np.float32) * 3   # peaky softmax
        v = rng.standard_normal((batch, heads, keys, 64), dtype=np.float32)
        n = np.array(lengths, np.int64)
        out = self.graphs[heads, keys].execute(*[Buffer.from_numpy(a) for a in (q, k_t, v, n)])[0]
        return out.to_numpy(), reference(q, k_t, v, n)

    def test_self_attention_cache_lengths(self):
        for batch in (1, 4):
            for heads in (6, 20):
                for length in (1, 2, 63, 64, 65, 447, 448):
                    with self.subTest(batch=batch, heads=heads, length=length):
                        ours, ref = self.run_op(batch, heads, 448, [length])
                        np.testing.assert_allclose(ours, ref, atol=2e-5)

    def test_prefill_rows_are_causal(self):
        ours, ref = self.run_op(4, 6, 448, list(range(1, 66)))
        np.testing.assert_allclose(ours, ref, atol=2e-5)

    def test_cross_attention_all_frames(self):
        for batch, heads, tokens in ((1, 6, 1), (4, 20, 1), (1, 6, 9)):
            with self.subTest(batch=batch, heads=heads, tokens=tokens):
                ours, ref = self.run_op(batch, heads, 1500, [1500] * tokens)
                np.testing.assert_allclose(ours, ref, atol=2e-5)


@unittest.skipUnless((mw.KERNELS_DIR / "attention.mojo").is_file(), "kernels/ is not present")
class KernelsOnOffTest(unittest.TestCase):
    def test_transcripts_identical(self):
        on = support.model("tiny.en")
        self.assertEqual(on.kernels, mw.KERNELS_DIR)
        off = mw.Model(on.weights, device="cpu", kernels="off")
        self.assertIsNone(off.kernels)
        clips = [wav for wav, _ in support.samples("en")] + [support.long_clip()]
        for clip in clips:
            with self.subTest(clip=clip.name):
                a, b = on.transcribe(clip, temperature=0.0), off.transcribe(clip, temperature=0.0)
                self.assertEqual([s["tokens"] for s in a["segments"]], [s["tokens"] for s in b["segments"]])

    def test_missing_kernels_fall_back_with_one_log_line(self):
        with mock.patch.object(mw, "KERNELS_DIR", mw.KERNELS_DIR.parent / "no-kernels-here"):
            with self.assertLogs("maxwhisper", "INFO") as logs:
                self.assertIsNone(mw._kernels_dir("auto", "cpu"))
            self.assertEqual(len(logs.output), 1)
            self.assertIn("MAX ops", logs.output[0])
            with self.assertRaises(mw.ConfigError):
                mw._kernels_dir("on", "cpu")
        with self.assertLogs("maxwhisper", "INFO"):
            self.assertIsNone(mw._kernels_dir("auto", "gpu"))


if __name__ == "__main__":
    unittest.main()
