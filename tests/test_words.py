"""Word timestamps against openai-whisper, and the subtitles the CLI writes with them."""

import tempfile
import unittest
from pathlib import Path

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


if __name__ == "__main__":
    unittest.main()
