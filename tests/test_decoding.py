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

    def test_every_row_its_own_history(self):
        """Rows of one batch after different histories (none, text, open and closed pairs,
        timestamps going back, as a forced prefix may hold), 0 to 6 sampled tokens: each row's
        mask is openai-whisper's for that row."""
        import torch
        from whisper.decoding import ApplyTimestampRules as Reference
        from whisper.tokenizer import get_tokenizer
        tok = get_tokenizer(False)
        begin, ts = len(tok.sot_sequence), tok.timestamp_begin
        rng = np.random.default_rng(1)
        for case in range(60):
            n = case % 7
            sampled = np.where(rng.random((8, n)) < 0.5, rng.integers(ts, ts + 1501, (8, n)), rng.integers(0, tok.eot, (8, n)))
            tokens = np.concatenate([np.tile(tok.sot_sequence, (8, 1)), sampled], axis=1)
            logits = rng.standard_normal((8, 51864)).astype(np.float32)
            ours = logits.copy()
            mw.ApplyTimestampRules(tok, begin, 50).apply(ours, tokens)
            want = torch.from_numpy(logits.copy())
            Reference(tok, begin, 50).apply(want, torch.from_numpy(tokens))
            with self.subTest(case=case):
                np.testing.assert_array_equal(np.isinf(ours), np.isinf(want.numpy()))


class ChoiceOnDeviceTest(unittest.TestCase):
    """Greedy and beam-search choices made on the device (a GPU's default; forced here on this
    run's device) are the host's: the same tokens and log-probabilities from the same logits,
    and the same transcripts."""

    def test_choices_match_the_host_rules(self):
        """Random logits where timestamps or text win by a clear margin, after every kind of
        token history (text, an open pair, a closed pair, earlier timestamps): the device's
        token and log-probability are the host filters' argmax and log-softmax, and its beam
        candidates the host's likeliest tokens in order."""
        m = support.model("tiny.en")
        tok = m.tokenizer()
        options = mw.DecodingOptions()
        begin, ts = len(tok.sot_sequence), tok.timestamp_begin
        filters = mw._logit_filters(options, tok, begin)[1:]           # SuppressBlank: first step only
        chooser = mw._ChoiceOnDevice(m, filters, begin)
        rng = np.random.default_rng(0)
        histories = [[262, 290], [ts + 10], [ts + 10, 262], [ts + 4, 262, ts + 9], [ts + 4, 262, ts + 9, ts + 9],
                     [ts + 3, 290, ts + 7, ts + 7, 262, 11], [ts + 1500], [ts + 2, 50]]
        for case in range(20):
            for h in histories:
                tokens = np.array([list(tok.sot_sequence) + h] * 3)
                logits = (rng.standard_normal((3, m.dims["n_vocab"])) * 2 - 10).astype(np.float32)
                logits[:, ts:] = rng.standard_normal((3, m.dims["n_vocab"] - ts)) * 4
                mass = np.logaddexp.reduce(logits[:, ts:].astype(np.float64), axis=-1)
                logits[np.arange(3), rng.integers(0, tok.eot, 3)] = (mass + rng.choice([-3.0, 3.0], 3)).astype(np.float32)
                want = logits.copy()
                for f in filters:
                    f.apply(want, tokens)
                got = m.runner.run("greedy", m.put(logits[:, None]), *chooser.rules(tokens))[0].to_numpy()
                with self.subTest(case=case, history=h):
                    np.testing.assert_array_equal(got[:, 0], want.argmax(-1))
                    np.testing.assert_allclose(got[:, 1], mw._log_softmax(want).max(-1), atol=1e-5)
                k = mw._BEAM_CANDIDATES
                got = m.runner.run("beam", m.put(logits[:, None]), *chooser.rules(tokens))[0].to_numpy()
                logprobs = mw._log_softmax(want)
                likeliest = np.argsort(-logprobs, axis=-1, kind="stable")[:, :k]
                with self.subTest(case=case, history=h, beams=True):
                    np.testing.assert_array_equal(got[:, :k], likeliest)
                    np.testing.assert_allclose(got[:, k:], np.take_along_axis(logprobs, likeliest, -1), atol=1e-5)

    def test_transcripts_match_the_host(self):
        m = mw.load("tiny.en", device=support.DEVICE)
        m.choose_on_device = True
        calls = []
        greedy, candidates = m.greedy, m.candidates
        m.greedy = lambda *args: calls.append("greedy") or greedy(*args)
        m.candidates = lambda *args: calls.append("beam") or candidates(*args)
        reference = support.model("tiny.en")
        clips = [(w.name, mw.load_audio(w)) for w, _ in support.samples("en")]
        for name, audio in clips + [("long", mw.load_audio(support.long_clip()))]:
            for options in ({}, {"without_timestamps": True}, {"beam_size": 5}):
                with self.subTest(clip=name, **options):
                    want = reference.transcribe(audio, temperature=0.0, **options)
                    got = m.transcribe(audio, temperature=0.0, **options)
                    self.assertEqual(tokens(got), tokens(want))
                    for a, b in zip(got["segments"], want["segments"]):
                        self.assertAlmostEqual(a["avg_logprob"], b["avg_logprob"], places=4)
        self.assertGreater(calls.count("greedy"), 300)
        self.assertGreater(calls.count("beam"), 100)
        guarded = mw.DecodingOptions(repetition_limit=4)                 # a rule the device lacks
        self.assertFalse(mw._ChoiceOnDevice.usable(m, guarded, mw._logit_filters(guarded, m.tokenizer(), 3)))


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


class DecodingOptionsTest(unittest.TestCase):
    def test_beam_and_best_of_options_are_checked(self):
        for bad in ({"beam_size": 2, "best_of": 2, "temperature": 0.0}, {"patience": 1.5},
                    {"best_of": 3, "temperature": 0.0}, {"beam_size": 0, "temperature": 0.0}):
            with self.subTest(**bad), self.assertRaises(mw.ConfigError):
                mw.DecodingOptions(**bad).check()

    def test_each_field_is_checked_as_its_option(self):
        """Values the option table refuses are ConfigErrors naming the field, here too (they
        were a ValueError from numpy or int(), or a NaN transcript)."""
        for bad in ({"temperature": -1.0}, {"temperature": math.nan}, {"temperature": (0.0, 0.2)},
                    {"suppress_tokens": "x"}, {"suppress_tokens": [-5]}, {"task": "foo"}, {"seed": -1},
                    {"max_initial_timestamp": -1.0}, {"repetition_limit": 0}, {"prompt": [1.5]}):
            with self.subTest(**bad), self.assertRaises(mw.ConfigError) as ctx:
                mw.DecodingOptions(**bad).check()
            self.assertIn(next(iter(bad)), str(ctx.exception))
        mw.DecodingOptions(prompt=[50257, 1], prefix="a", suppress_tokens=[-1, 5], seed=np.int64(3)).check()

    def test_token_ids_past_the_vocabulary_and_unknown_languages_are_refused(self):
        """A prompt or prefix id past the embedding table failed in the decoder's kernel."""
        m = support.model("tiny.en")
        cross = m.encode(np.zeros((1, 80, mw.N_FRAMES), np.float32), features=False)[1]
        for bad in ({"prompt": [10 ** 6]}, {"prefix": [51864]}, {"suppress_tokens": "1,99999"}, {"language": "xx"}):
            with self.subTest(**bad), self.assertRaises(mw.ConfigError) as ctx:
                mw.decode_batch(m, m.new_cache(cross), [mw.DecodingOptions(**bad)])
            self.assertIn(next(iter(bad)), str(ctx.exception))


if __name__ == "__main__":
    unittest.main()
