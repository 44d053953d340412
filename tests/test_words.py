"""Word timestamps against openai-whisper, and the subtitles the CLI writes with them."""

import tempfile
import unittest
from pathlib import Path

import numpy as np

import support
from support import mw, words, transcribe_both

class WordTimestampsTest(unittest.TestCase):
    def test_words_match_openai_within_a_tenth_of_a_second(self):
        for wav, _ in support.samples("en"):
            with self.subTest(clip=wav.name):
                ours, theirs = transcribe_both("tiny.en", mw.load_audio(wav), word_timestamps=True)
                self.assertEqual([w[0] for w in words(ours)], [w[0] for w in words(theirs)])
                self.assertTrue(words(ours))
                for a, b in zip(words(ours), words(theirs)):
                    self.assertLessEqual(abs(a[1] - b[1]), 0.1, (a, b))
                    self.assertLessEqual(abs(a[2] - b[2]), 0.1, (a, b))
                for w in (w for s in ours["segments"] for w in s["words"]):
                    self.assertLessEqual(w["start"], w["end"])
                    self.assertTrue(0.0 <= w["probability"] <= 1.0)

    def test_cli_subtitles_highlight_words(self):
        wav = support.samples("en")[-1][0]
        with tempfile.TemporaryDirectory() as out:
            done = support.run_cli(wav, "--word_timestamps", "True", "--highlight_words", "True",
                                   "-f", "all", "-o", out)
            self.assertEqual(done.returncode, 0, done.stderr)
            for ext in ("srt", "vtt"):
                text = (Path(out) / f"{wav.stem}.{ext}").read_text()
                self.assertGreaterEqual(text.count("<u>"), 5, ext)
            refused = support.run_cli(wav, "--max_line_width", "20", "-o", out)
            self.assertEqual(refused.returncode, 2)
            self.assertIn("--word_timestamps", refused.stderr)


class AlignmentPartsTest(unittest.TestCase):
    """The module's DTW and punctuation merge against openai-whisper's own, step for step."""

    def test_dtw_takes_openai_whispers_path(self):
        from whisper.timing import dtw_cpu
        rng = np.random.default_rng(0)
        for shape in [(1, 1), (1, 7), (6, 1), (3, 3), (40, 900), (120, 1500)]:
            for kind in ("normal", "ties", "flat", "nan"):
                x = rng.standard_normal(shape)
                if kind == "ties":
                    x = np.round(x)
                elif kind == "flat":
                    x[:] = 1.0
                elif kind == "nan":                     # a frame of zero spread is NaN after the norm
                    x[:, rng.integers(shape[1])] = np.nan
                with self.subTest(shape=shape, kind=kind):
                    np.testing.assert_array_equal(mw._dtw(x), dtw_cpu(x.copy()))

    def test_punctuation_joins_its_word_as_openai_whisper_does(self):
        from whisper.timing import WordTiming, merge_punctuations
        texts = [[" \"", " Hello", ",", " world", ".", "\""], [" (", " ¿", " Qué", "?", " )"],
                 ["'", " it", "'s", " -", " ok", "!"], [" ", "."], ["."], []]
        prepended, appended = "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、"
        for words in texts:
            theirs = [WordTiming(w, [i], i, i + 1, 0.5) for i, w in enumerate(words)]
            ours = [mw._WordTiming(w, [i], i, i + 1, 0.5) for i, w in enumerate(words)]
            merge_punctuations(theirs, prepended, appended)
            mw._merge_punctuations(ours, prepended, appended)
            self.assertEqual([(w.word, w.tokens) for w in ours], [(w.word, w.tokens) for w in theirs], words)


if __name__ == "__main__":
    unittest.main()
