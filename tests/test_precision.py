"""bfloat16 decoder weights: checked against the float32 transcripts."""

import functools
import unittest

import support
from support import mw
from test_parity import tokens


@functools.lru_cache(maxsize=None)
def bf16(name):
    return mw.load(name, device="cpu", dtype="bfloat16")


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

    def test_unknown_dtype_is_a_config_error(self):
        with self.assertRaises(mw.ConfigError) as ctx:
            mw.load("tiny.en", device="cpu", dtype="float16", warmup=False)
        self.assertIn("dtype", str(ctx.exception))


if __name__ == "__main__":
    unittest.main()
