"""Lower-precision decoder weights (bfloat16, Q4_0 blocks): checked against float32."""

import functools
import unittest

import numpy as np

import support
from support import mw
from test_parity import tokens


@functools.lru_cache(maxsize=None)
def bf16(name):
    return mw.load(name, device="cpu", dtype="bfloat16")


@functools.lru_cache(maxsize=None)
def q4(name):
    return mw.load(name, device="cpu", dtype="q4_0")


def dequantize(blocks, cols):
    """Q4_0 blocks back to floats, by llama.cpp's definition ((q - 8) * d); also each weight's d."""
    b = blocks.reshape(len(blocks), cols // 32, 18)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = np.concatenate([b[..., 2:] & 15, b[..., 2:] >> 4], -1).astype(np.float32)
    return ((q - 8) * d[..., None]).reshape(len(blocks), cols), np.repeat(d, 32, 1)


class BFloat16Test(unittest.TestCase):
    def test_english_samples_match_float32(self):
        for wav, _ in support.samples("en"):
            with self.subTest(clip=wav.name):
                audio = mw.load_audio(wav)
                self.assertEqual(tokens(bf16("tiny.en").transcribe(audio, temperature=0.0)),
                                 tokens(support.model("tiny.en").transcribe(audio, temperature=0.0)))

    def test_long_form_accuracy_holds(self):
        from bench import LONG_TEXT, word_errors
        audio = mw.load_audio(support.long_clip())
        errors = {}
        for label, m in (("float32", support.model("tiny.en")), ("bfloat16", bf16("tiny.en"))):
            wrong, total = word_errors(LONG_TEXT, m.transcribe(audio, temperature=0.0)["text"], True)
            errors[label] = wrong / total
        self.assertLessEqual(errors["bfloat16"], errors["float32"] + 0.05, errors)

    def test_weights_are_stored_in_bfloat16(self):
        from max.dtype import DType
        m = bf16("tiny.en")
        names = mw.decoder_param_names(m.dims)
        kinds = {n: b.dtype for n, b in zip(names, m._dec_w)}
        self.assertEqual(kinds["decoder.token_embedding.weight"], DType.bfloat16)
        self.assertEqual(kinds["decoder.blocks.0.mlp.0.weight"], DType.bfloat16)
        self.assertEqual(kinds["decoder.blocks.0.mlp_ln.weight"], DType.float32)

    def test_q4_0_blocks(self):
        """quantize_q4_0 is llama.cpp's Q4_0: each weight within one step d of its block."""
        w = np.random.default_rng(0).standard_normal((70, 96)).astype(np.float32)
        blocks = mw.quantize_q4_0(w)
        self.assertEqual(blocks.shape, (96, 3 * 18))                   # rows padded to 96
        back, d = dequantize(blocks, 96)
        self.assertTrue(np.all(np.abs(back[:70] - w) <= np.abs(d[:70]) * 1.001))
        self.assertFalse(back[70:].any())

    def test_q4_0_matmul_matches_dequantized_weights(self):
        from max.driver import Buffer
        from max.dtype import DType
        from max.graph import DeviceRef, Graph, TensorType
        m = q4("tiny.en")
        rng = np.random.default_rng(1)
        w = rng.standard_normal((1152, 384)).astype(np.float32) * 0.05
        x = rng.standard_normal((3, 384)).astype(np.float32)
        packed = m._run("repack", m._put(mw.quantize_q4_0(w)))[0]
        cpu = DeviceRef.CPU()
        with Graph("q4_gemv_test", input_types=[TensorType(DType.float32, [3, 384], device=cpu),
                                               TensorType(DType.uint8, [1152, 216], device=cpu)]) as g:
            g.output(mw._gemv(g.inputs[1].tensor, g.inputs[0].tensor))
        out = m._session.load(g).execute(Buffer.from_numpy(x), packed)[0].to_numpy()
        ref = x @ dequantize(mw.quantize_q4_0(w), 384)[0].T
        self.assertLess(np.abs(out - ref).max() / np.abs(ref).max(), 2e-2)

    def test_q4_0_transcripts(self):
        """Q4_0 is not exact: on the English samples and the long clip its WER is held to
        float32's (plus 5 points on the long clip), and its weights are uint8 blocks."""
        from bench import LONG_TEXT, word_errors
        from max.dtype import DType
        clips = [(mw.load_audio(wav), text) for wav, text in support.samples("en")]
        clips.append((mw.load_audio(support.long_clip()), LONG_TEXT))
        for (audio, text), slack in zip(clips, [0.0] * (len(clips) - 1) + [0.05]):
            errors = [word_errors(text, m.transcribe(audio, temperature=0.0)["text"], True)
                      for m in (support.model("tiny.en"), q4("tiny.en"))]
            with self.subTest(text=text[:20]):
                self.assertLessEqual(errors[1][0] / errors[1][1], errors[0][0] / errors[0][1] + slack, errors)
        m = q4("tiny.en")
        kinds = {n: b.dtype for n, b in zip(mw.decoder_param_names(m.dims, quantized=True), m._dec_w)}
        self.assertEqual(kinds["decoder.logits.weight"], DType.uint8)
        self.assertEqual(kinds["decoder.blocks.0.attn.qkv.weight"], DType.uint8)
        self.assertEqual(kinds["decoder.token_embedding.weight"], DType.bfloat16)

    def test_unknown_dtype_is_a_config_error(self):
        with self.assertRaises(mw.ConfigError) as ctx:
            mw.load("tiny.en", device="cpu", dtype="float16", warmup=False)
        self.assertIn("dtype", str(ctx.exception))


if __name__ == "__main__":
    unittest.main()
