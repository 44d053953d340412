"""Voice activity and the hallucination guards."""

import math
import re
import unittest

import numpy as np

import support
from support import mw, words, tokens, transcribe_both

class VoiceActivityTest(unittest.TestCase):
    def test_speech_regions_of_tone_bursts(self):
        t = np.arange(mw.SAMPLE_RATE) / mw.SAMPLE_RATE
        burst = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        gap = np.zeros(5 * mw.SAMPLE_RATE, np.float32)
        audio = np.concatenate([gap, burst, gap, burst, np.zeros(mw.SAMPLE_RATE // 2, np.float32), burst])
        regions = mw.speech_regions(audio, speech_pad_seconds=0.25)
        sr = mw.SAMPLE_RATE
        self.assertEqual(len(regions), 2)                 # the 0.5 s gap is not long silence
        self.assertAlmostEqual(regions[0][0] / sr, 4.75, delta=0.03)
        self.assertAlmostEqual(regions[0][1] / sr, 6.25, delta=0.03)
        self.assertAlmostEqual(regions[1][0] / sr, 10.75, delta=0.03)
        self.assertEqual(mw.speech_regions(np.zeros(sr, np.float32)), [])

    def test_speech_regions_checks_its_arguments(self):
        """A string was read as a sequence of characters, and NaN or negative settings gave []."""
        audio = np.zeros(mw.SAMPLE_RATE, np.float32)
        for bad in ({"threshold_db": math.nan}, {"min_silence_seconds": -1}, {"speech_pad_seconds": None}):
            with self.subTest(**bad), self.assertRaises(mw.ConfigError) as ctx:
                mw.speech_regions(audio, **bad)
            self.assertIn(next(iter(bad)), str(ctx.exception))
        for bad in ("missing.wav", np.zeros((2, 800), np.float32), np.zeros(800, np.int16)):
            with self.subTest(type(bad).__name__), self.assertRaises(mw.AudioError):
                mw.speech_regions(bad)

    def test_silence_is_skipped_and_timestamps_map_back(self):
        m = support.model("tiny.en")
        clips = {w.stem: mw.load_audio(w) for w, _ in support.samples("en")}
        parts = [clips["quick_brown_fox"], np.zeros(20 * mw.SAMPLE_RATE, np.float32), clips["hello_world"],
                 np.zeros(20 * mw.SAMPLE_RATE, np.float32), clips["counting"]]
        starts = np.cumsum([0] + [len(p) for p in parts]) / mw.SAMPLE_RATE
        audio = np.concatenate(parts)
        plain = m.transcribe(audio, temperature=0.0)
        vad = m.transcribe(audio, temperature=0.0, vad_filter=True, word_timestamps=True)
        self.assertLess(vad["metrics"]["windows"], plain["metrics"]["windows"])
        for part, first, last in ((0, ("the",), ("dog",)), (2, ("hello",), ("world",)), (4, ("one", "1"), ("ten", "10"))):
            spoken = [w for w in words(vad) if starts[part] - 0.5 <= w[1] and w[2] <= starts[part + 1] + 0.5]
            said = [re.sub(r"\W", "", w[0]).lower() for w in spoken]
            with self.subTest(part=part, said=said):
                self.assertTrue(said and said[0].startswith(first) and said[-1].endswith(last))
        self.assertIn("fox", vad["text"].lower())


class HallucinationGuardTest(unittest.TestCase):
    def test_quiet_no_speech_window_is_skipped(self):
        noise = (np.random.default_rng(0).standard_normal(30 * mw.SAMPLE_RATE) * 1e-3).astype(np.float32)
        m = support.model("tiny.en")
        kept = m.transcribe(noise, temperature=0.0)                       # -60 dBFS hiss
        self.assertTrue(kept["text"].strip(), "openai's rules keep a confident hallucination here")
        guarded = m.transcribe(noise, temperature=0.0, silence_threshold_db=-45)
        self.assertEqual(guarded["text"].strip(), "")
        self.assertEqual(guarded["metrics"]["silence_skips"], 1)
        speech = mw.load_audio(support.samples("en")[0][0])
        self.assertEqual(tokens(m.transcribe(speech, temperature=0.0, silence_threshold_db=-45)),
                         tokens(m.transcribe(speech, temperature=0.0)))

    def test_repetition_loop_is_cut_and_retried(self):
        m = support.model("tiny.en")
        wav = support.samples("en")[0][0]
        loop = {"initial_prompt": "la la la la la la la la la la la la", "compression_ratio_threshold": None,
                "logprob_threshold": None, "seed": 0}
        run = lambda text: max((len(r) // 3 for r in re.findall(r"(?:la ?)+", text.lower())), default=0)  # noqa: E731
        looping = m.transcribe(wav, **loop)
        self.assertGreater(run(looping["text"]), 20)
        guarded = m.transcribe(wav, repetition_limit=4, **loop)
        self.assertGreaterEqual(guarded["metrics"]["fallbacks"], 1)
        self.assertLessEqual(run(guarded["text"]), 4)

    def test_hallucination_silence_threshold_matches_openai(self):
        clips = {w.stem: mw.load_audio(w) for w, _ in support.samples("en")}
        hiss = (np.random.default_rng(0).standard_normal(20 * mw.SAMPLE_RATE) * 1e-3).astype(np.float32)
        audio = np.concatenate([clips["quick_brown_fox"], hiss, clips["counting"], hiss])
        results = {}
        for threshold in (None, 2.0):
            ours, theirs = transcribe_both("tiny.en", audio, word_timestamps=True,
                                           hallucination_silence_threshold=threshold)
            self.assertEqual(tokens(ours), tokens(theirs), threshold)
            results[threshold] = tokens(ours)
        self.assertNotEqual(results[None], results[2.0], "the threshold changed where windows start")
        with self.assertRaises(mw.ConfigError):
            support.model("tiny.en").transcribe(audio, hallucination_silence_threshold=2.0)

    def test_loop_detector(self):
        tok = support.model("tiny.en").tokenizer()
        guard = mw.RepetitionGuard(tok, 0, limit=3)
        self.assertTrue(guard.loops([1, 2, 3, 4, 5, 4, 5, 4, 5]))
        self.assertTrue(guard.loops([9, 7, 7, 7]))
        self.assertFalse(guard.loops([4, 5, 4, 5, 6]))
        self.assertFalse(guard.loops([7, 7, tok.timestamp_begin]))


if __name__ == "__main__":
    unittest.main()
