"""Decoding: the timestamp rules and beam search against openai-whisper."""

import math
import unittest

import numpy as np

import support
from support import mw, tokens, transcribe_both, word_diff

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


if __name__ == "__main__":
    unittest.main()
