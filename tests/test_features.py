"""Decoding features: beam search, word timestamps, transcribe_batch, voice activity, guards."""

import math
import re
import tempfile
import unittest
from pathlib import Path

import numpy as np

import support
from support import mw
from test_parity import tokens, transcribe_both, word_diff


def words(result):
    return [(w["word"], w["start"], w["end"]) for s in result["segments"] for w in s["words"]]


class TimestampRuleTest(unittest.TestCase):
    def test_same_masks_as_openai_whisper(self):
        """ApplyTimestampRules compares the timestamps' total with the best text token in logits
        (openai-whisper's log-softmax order near ties): the same masks as openai-whisper's rule
        on random logits where either side wins, by a wide margin or by 1e-4 .. 1e-2."""
        import torch
        from whisper.decoding import ApplyTimestampRules as Reference
        from whisper.tokenizer import get_tokenizer
        tok = get_tokenizer(False)
        begin, ts = len(tok.sot_sequence), tok.timestamp_begin
        rng = np.random.default_rng(0)
        for case in range(400):
            logits = (rng.standard_normal((2, 51864)) * 2 - 10).astype(np.float32)
            logits[:, ts:] = rng.standard_normal((2, 51864 - ts)) * 4
            mass = np.logaddexp.reduce(logits[:, ts:].astype(np.float64), axis=-1)
            gap = rng.choice([-3.0, 3.0]) if case % 2 else rng.choice([-1, 1]) * 10 ** rng.uniform(-4, -2)
            logits[:, rng.integers(0, tok.eot)] = (mass + gap).astype(np.float32)   # text best by `gap`
            tokens = np.array([list(tok.sot_sequence) + [262, 290]] * 2)
            ours = logits.copy()
            mw.ApplyTimestampRules(tok, begin, None).apply(ours, tokens)
            want = torch.from_numpy(logits.copy())
            Reference(tok, begin, None).apply(want, torch.from_numpy(tokens))
            with self.subTest(case=case, gap=gap):
                np.testing.assert_array_equal(np.isinf(ours), np.isinf(want.numpy()))


class BeamSearchParityTest(unittest.TestCase):
    def test_beam_5_matches_openai(self):
        clips = [wav for wav, _ in support.samples("en")] + [support.long_clip()]
        same, report = 0, []
        for clip in clips:
            ours, theirs = transcribe_both("tiny.en", mw.load_audio(clip), beam_size=5)
            same += tokens(ours) == tokens(theirs)
            report.append((clip.name, ours["text"], theirs["text"]))
            self.assertLessEqual(word_diff(ours["text"], theirs["text"]), 1, report[-1])
        self.assertGreaterEqual(same, math.ceil(0.95 * len(clips)), report)

    def test_reorder_moves_cache_rows_on_device(self):
        m = support.model("tiny.en")
        cross = support.model("tiny.en").encode(np.zeros((1, 80, mw.N_FRAMES), np.float32))[1]
        prompt = np.array([[50257, 50362, 440], [50257, 50362, 383], [50257, 50362, 314]])
        moved = m.new_cache(cross, batch=3)
        m.decode(moved, prompt)
        m.reorder(moved, [2, 2, 0])
        fresh = m.new_cache(cross, batch=3)
        m.decode(fresh, prompt[[2, 2, 0]])
        step = np.array([[50363]] * 3)
        np.testing.assert_allclose(m.decode(moved, step), m.decode(fresh, step), atol=1e-4)

    def test_beam_and_best_of_options_are_checked(self):
        for bad in ({"beam_size": 2, "best_of": 2, "temperature": 0.0}, {"patience": 1.5},
                    {"best_of": 3, "temperature": 0.0}, {"beam_size": 0, "temperature": 0.0}):
            with self.subTest(**bad), self.assertRaises(mw.ConfigError):
                mw.DecodingOptions(**bad).check()


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


class TranscribeBatchTest(unittest.TestCase):
    def test_batch_equals_one_at_a_time(self):
        m = support.model("tiny.en")
        audios = [mw.load_audio(w) for w, _ in support.samples("en")] + [mw.load_audio(support.long_clip())]
        for options in ({"temperature": 0.0}, {"temperature": 0.0, "condition_on_previous_text": False}):
            with self.subTest(**options):
                together = mw.transcribe_batch(m, audios, batch_size=4, **options)
                alone = [m.transcribe(a, **options) for a in audios]
                self.assertEqual([tokens(r) for r in together], [tokens(r) for r in alone])
                self.assertEqual([[(s["start"], s["end"]) for s in r["segments"]] for r in together],
                                 [[(s["start"], s["end"]) for s in r["segments"]] for r in alone])

    def test_bad_audio_raises_before_decoding(self):
        with self.assertRaises(mw.AudioError) as ctx:
            mw.transcribe_batch(support.model("tiny.en"), [support.samples("en")[0][0], "/no/such.wav"])
        self.assertIn("/no/such.wav", str(ctx.exception))


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
