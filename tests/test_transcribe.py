"""transcribe(), transcribe_batch() and transcribe_each(): options, fallback, language handling, typed errors."""

import unittest

import numpy as np

import support
from support import mw, tokens


class TranscribeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = support.model("tiny.en")
        cls.wav, cls.text = support.samples("en")[-1]

    def test_path_and_array_agree(self):
        a = self.model.transcribe(str(self.wav))
        b = mw.transcribe(self.model, mw.load_audio(self.wav))
        a.pop("metrics"), b.pop("metrics")
        self.assertEqual(a, b)
        self.assertEqual(a["language"], "en")
        self.assertEqual(a["text"].strip().lower().rstrip("."), self.text.lower().rstrip("."))

    def test_silence_and_empty_give_no_text(self):
        result = self.model.transcribe(np.zeros(mw.SAMPLE_RATE * 5, np.float32))
        self.assertEqual(result["text"].strip(), "")
        empty = self.model.transcribe(np.zeros(0, np.float32))
        self.assertEqual((empty["text"], empty["segments"], empty["metrics"]["windows"]), ("", [], 0))

    def test_temperature_fallback_samples_best_of(self):
        # an impossible compression threshold forces every temperature to be tried
        result = self.model.transcribe(str(self.wav), temperature=(0.0, 0.5, 1.0),
                                       compression_ratio_threshold=0.0, best_of=3, seed=7)
        self.assertEqual({s["temperature"] for s in result["segments"]}, {1.0})
        self.assertTrue(all(np.isfinite(s["avg_logprob"]) for s in result["segments"]))

    def test_without_timestamps_and_clips(self):
        plain = self.model.transcribe(str(self.wav), without_timestamps=True)
        self.assertFalse(any(t >= 50363 for s in plain["segments"] for t in s["tokens"]))
        self.assertIn("fox", plain["text"].lower())
        clipped = self.model.transcribe(str(self.wav), clip_timestamps="0,1.2")
        self.assertLessEqual(max(s["end"] for s in clipped["segments"]), 1.2 + 1e-6)
        # clips at or past the end are cut at the end (openai-whisper seeks back and forth forever)
        seconds = len(mw.load_audio(self.wav)) / mw.SAMPLE_RATE
        past = self.model.transcribe(str(self.wav), clip_timestamps=[0, seconds + 0.004, seconds + 5, seconds + 9])
        whole = self.model.transcribe(str(self.wav))
        self.assertEqual([s["tokens"] for s in past["segments"]], [s["tokens"] for s in whole["segments"]])

    def test_bad_options_raise_config_errors(self):
        for options in ({"patience": 2.0}, {"task": "summarise"}, {"language": "fr"},
                        {"no_such_option": 1}, {"length_penalty": 3.0}):
            with self.subTest(**options), self.assertRaises(mw.ConfigError) as ctx:
                self.model.transcribe(str(self.wav), **options)
            self.assertIn(next(iter(options)), str(ctx.exception))

    def test_option_values_are_checked_as_flags_are(self):
        """A keyword argument goes through its option's parse, as a flag or config line does: a
        value of the wrong kind or out of range is a ConfigError naming it, before any audio."""
        bad = {"beam_size": 0, "best_of": 2.5, "temperature": -1, "seed": "x", "patience": -1,
               "clip_timestamps": "abc", "max_initial_timestamp": -1, "repetition_limit": 1,
               "initial_prompt": 5, "language": 5, "word_timestamps": "maybe", "sample_len": True,
               "suppress_tokens": "a,b", "prefix": 5.0, "vad_parameters": {"threshold_db": "loud"},
               "no_speech_threshold": float("nan")}
        for name, value in bad.items():
            with self.subTest(name=name), self.assertRaises(mw.ConfigError) as ctx:
                self.model.transcribe("no-such-file.wav", **{name: value})
            self.assertIn(repr(name), str(ctx.exception))
        for vad in ({"speech_pad_seconds": float("inf")}, {"min_silence_seconds": -1}):   # margins, in seconds
            with self.subTest(vad=vad), self.assertRaises(mw.ConfigError) as ctx:
                self.model.transcribe("no-such-file.wav", vad_filter=True, vad_parameters=vad)
            self.assertIn(next(iter(vad)), str(ctx.exception))
        with self.assertRaises(mw.ConfigError) as ctx:         # the ids are the vocabulary's
            self.model.transcribe(str(self.wav), suppress_tokens=[-1, 10 ** 8])
        self.assertIn("suppress_tokens", str(ctx.exception))
        # text, as a flag holds it, and Python values of the option's kind both work
        a = self.model.transcribe(str(self.wav), temperature=0, clip_timestamps=[0, 1.2], beam_size="2",
                                  suppress_tokens=[-1], word_timestamps=1)
        b = self.model.transcribe(str(self.wav), temperature="0", clip_timestamps="0,1.2", beam_size=2,
                                  suppress_tokens="-1", word_timestamps=True)
        self.assertEqual(a["text"], b["text"])
        self.assertIn("quick brown fox", a["text"].lower())

    def test_an_english_only_model_takes_english_by_name(self):
        """'English', 'EN': openai-whisper's tokenizer reads them as 'en' on any model."""
        for language in ("English", "EN", "en"):
            self.assertEqual(self.model.transcribe(np.zeros(1600, np.float32), language=language)["language"], "en")

    def test_english_only_model_cannot_detect_language(self):
        with self.assertRaises(mw.ConfigError):
            self.model.detect_language(np.zeros((80, mw.N_FRAMES), np.float32))


class PaddedPromptsTest(unittest.TestCase):
    """Windows whose prompts differ in length decode in one batch, the shorter prompts
    left-padded, each as it decodes alone."""

    @classmethod
    def setUpClass(cls):
        cls.model = support.model("tiny.en")
        text = cls.model.tokenizer().encode(" " + support.LONG_TEXT) * 4
        cls.prompts = [text[:n] for n in (0, 3, 41, 220)]
        wavs = [w for w, _ in support.samples("en")] * len(cls.prompts)
        cls.mels = np.stack([cls.model.log_mel(mw.load_audio(w), padding=mw.N_SAMPLES)[:, :mw.N_FRAMES]
                             for w in wavs[:len(cls.prompts)]])

    def decode(self, rows, prompts=None, **options):
        """decode_batch over the windows ``rows`` with their prompts, in one batch."""
        opts = [mw.DecodingOptions(prompt=(prompts or self.prompts)[k], **options) for k in rows]
        rngs = [np.random.default_rng(k) for k in rows]
        cross = self.model.encode(self.mels[rows], features=False)[1]
        cache = self.model.new_cache(cross, batch=len(rows) * opts[0].group_size())
        return mw.decode_batch(self.model, cache, opts, rngs)

    def test_greedy_beams_and_samples(self):
        if not self.model.precision.packed:
            self.skipTest(f"a {self.model.device_name} model's matmuls round a row by its batch: "
                          "test_a_max_ops_model_pads_too compares its rows")
        self.assertEqual(len({mw._batch_key(self.model, mw.DecodingOptions(prompt=p)) for p in self.prompts}), 1)
        rows = list(range(len(self.prompts)))
        for options in ({}, {"beam_size": 3}, {"temperature": 0.8, "best_of": 2}):
            together = self.decode(rows, **options)
            for k in rows:
                alone = self.decode([k], **options)[0]
                with self.subTest(prompt=len(self.prompts[k]), **options):
                    self.assertEqual(together[k].tokens, alone.tokens)
                    self.assertEqual(together[k].avg_logprob, alone.avg_logprob)      # the same bits
                    self.assertEqual(together[k].no_speech_prob, alone.no_speech_prob)

    def test_a_max_ops_model_pads_too(self):
        """Without the one-op step prompts are padded as well: kernels off (the MAX-ops decoder
        graph for prompts and steps), Q4_0 (that prefill, then the step graph a GPU runs: MAX's
        matmuls around the attention ops) and a GPU's model. MAX's matmuls may round a row
        differently in a batch of another size, so each window's greedy tokens are those it
        decodes alone and its log-probabilities theirs to float32 rounding; Q4_0's within 2e-3:
        its matmul rounds activations to 8 bits, where a float32 difference can flip a rounding
        (the unprompted window, decoded alone by the step graph and here by the decoder graph's
        prefill: 3e-4 in avg_logprob, 7e-4 in no_speech_prob)."""
        models = {"kernels off": mw.Model(support.weights("tiny.en"), device=support.DEVICE, kernels="off", warmup=False)}
        if support.DEVICE == "cpu":
            models["q4_0"] = mw.load("tiny.en", device="cpu", dtype="q4_0")
        if not self.model.precision.packed:
            models[self.model.device_name] = self.model
        opts, crosses = [mw.DecodingOptions(prompt=p) for p in self.prompts], {}
        for name, m in models.items():
            self.assertEqual(len({mw._batch_key(m, o) for o in opts}), 1)
            cross = crosses[name] = m.encode(self.mels, features=False)[1]
            together = mw.decode_batch(m, m.new_cache(cross, batch=len(opts)), opts)
            for k, o in enumerate(opts):
                alone = mw.decode_batch(m, m.new_cache(m.cross_rows(cross, [k])), [o])[0]
                with self.subTest(name, prompt=len(o.prompt)):
                    self.assertEqual(together[k].tokens, alone.tokens)
                    close = {"delta": 2e-3} if name == "q4_0" else {"places": 4}
                    self.assertAlmostEqual(together[k].avg_logprob, alone.avg_logprob, **close)
                    self.assertAlmostEqual(together[k].no_speech_prob, alone.no_speech_prob, **close)
        off = models["kernels off"]
        off.pads_prompts = False                                  # each prompt length apart
        self.assertNotEqual(mw._batch_key(off, opts[0]), mw._batch_key(off, opts[1]))
        with self.assertRaises(mw.ConfigError) as caught:
            mw.decode_batch(off, off.new_cache(crosses["kernels off"], batch=len(opts)), opts)
        self.assertIn("pads_prompts", str(caught.exception))

    def test_a_prompt_at_the_cap_shares_the_batch(self):
        """openai-whisper keeps up to 223 tokens of earlier text, which leaves a shorter prompt
        padded to it less room than the 224 tokens it may sample: where the context runs out
        before a shorter window ends (never, with end-of-text suppressed), that window is
        decoded again without the capped one."""
        if not self.model.precision.packed:
            self.skipTest(f"a {self.model.device_name} model's matmuls round a row by its batch")
        prompts = [self.prompts[-1] * 2] + self.prompts[:3]                         # 223 kept, 0, 3, 41
        self.assertEqual(len({mw._batch_key(self.model, mw.DecodingOptions(prompt=p)) for p in prompts}), 1)
        # without timestamps the start of transcript is two tokens: past the capped prompt
        # 448 - 226 = 222 are left, and the shorter ones may sample all 224
        endless = {"suppress_tokens": [-1, self.model.tokenizer().eot], "without_timestamps": True}
        rows = list(range(len(prompts)))
        for options in ({}, endless, {**endless, "beam_size": 2}, {**endless, "temperature": 0.8, "best_of": 2}):
            together = self.decode(rows, prompts, **options)
            for k in rows:
                alone = self.decode([k], prompts, **options)[0]
                with self.subTest(prompt=len(prompts[k]), **options):
                    self.assertEqual(together[k].tokens, alone.tokens)
                    self.assertEqual(together[k].avg_logprob, alone.avg_logprob)
            if options:                                      # the shorter ones ran past the capped one
                self.assertGreater(min(len(r.tokens) for r in together[1:]), len(together[0].tokens))


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

    def test_a_finished_audio_gives_its_place_to_the_next(self):
        """A long audio batched with short ones: each short one that finishes is replaced by the
        next at the next round, so every round but the last decodes batch_size windows."""
        m = support.model("tiny.en")
        audios = [mw.load_audio(support.long_clip())] + [mw.load_audio(w) for w, _ in support.samples("en")] * 2
        sizes, decode = [], mw._decode_round
        mw._decode_round = lambda model, work: sizes.append(len(work)) or decode(model, work)
        try:
            together = mw.transcribe_batch(m, audios, batch_size=2, temperature=0.0)
        finally:
            mw._decode_round = decode
        self.assertGreater(together[0]["metrics"]["windows"], 1)
        self.assertEqual(sum(sizes), sum(r["metrics"]["windows"] for r in together))
        self.assertEqual(sizes[:-1], [2] * (len(sizes) - 1))
        self.assertEqual([tokens(r) for r in together], [tokens(m.transcribe(a, temperature=0.0)) for a in audios])

    def test_each_reads_as_it_goes_and_reports_failures_apart(self):
        """transcribe_each: every audio's result is transcribe's, an audio that cannot be read
        comes back as its error while the others go on, and the audios are read as the
        iteration goes: at most twice batch_size held at a time."""
        m = support.model("tiny.en")
        short = [str(w) for w, _ in support.samples("en")]
        paths = [str(support.long_clip())] + short + ["/no/such.wav"] + short
        pulled, got = [], []

        def audios():
            for p in paths:
                pulled.append(p)
                yield p
        with self.assertRaises(mw.ConfigError):
            mw.transcribe_each(m, audios(), batch_size=0)
        for k, result in mw.transcribe_each(m, audios(), batch_size=2, temperature=0.0):
            got.append((k, result))
            held = [i for i in range(len(pulled)) if i not in dict(got) and paths[i] != "/no/such.wav"]
            self.assertLessEqual(len(held), 4)
        self.assertEqual(sorted(k for k, _ in got), list(range(len(paths))))
        self.assertLess([k for k, _ in got].index(1), [k for k, _ in got].index(0), "a short one first")
        alone = {p: tokens(m.transcribe(p, temperature=0.0)) for p in set(paths) - {"/no/such.wav"}}
        for k, result in got:
            with self.subTest(path=paths[k]):
                if paths[k] == "/no/such.wav":
                    self.assertIsInstance(result, mw.AudioError)
                    self.assertIn("/no/such.wav", str(result))
                else:
                    self.assertEqual(tokens(result), alone[paths[k]])

    def test_bad_audio_raises_before_decoding(self):
        with self.assertRaises(mw.AudioError) as ctx:
            mw.transcribe_batch(support.model("tiny.en"), [support.samples("en")[0][0], "/no/such.wav"])
        self.assertIn("/no/such.wav", str(ctx.exception))
        one = str(support.samples("en")[0][0])              # one path, not a list of its characters
        for batch in (mw.transcribe_batch, lambda *a: list(mw.transcribe_each(*a))):
            for audios in (one, None, 5):
                with self.subTest(audios=audios), self.assertRaises(mw.ConfigError) as ctx:
                    batch(support.model("tiny.en"), audios)
                self.assertIn("list of audios", str(ctx.exception))


class ChunkedTest(unittest.TestCase):
    """transcribe(..., chunk_batch=N): one audio as chunks cut at pauses, decoded side by side."""

    def test_cuts_fall_in_pauses_and_cover_the_audio(self):
        rate = mw.SAMPLE_RATE
        noise = np.random.default_rng(0).standard_normal(100 * rate).astype(np.float32) * 0.1
        for pause in (12.0, 24.0, 41.0, 55.0, 80.0):              # half-second pauses
            noise[int(pause * rate):int((pause + 0.5) * rate)] = 0.0
        cuts = mw._chunk_cuts(noise)
        self.assertEqual(cuts[0][0], 0)
        self.assertEqual(cuts[-1][1], len(noise))
        self.assertEqual([b for _, b in cuts[:-1]], [a for a, _ in cuts[1:]])
        lengths = [(b - a) / rate for a, b in cuts]
        self.assertTrue(all(15.0 <= n <= 30.0 for n in lengths[:-1]), lengths)
        self.assertLessEqual(lengths[-1], 30.0)
        # the second 15 s of the first chunk holds the pause at 24 s, of the second the one at 41 s:
        # cut in them (the pause at 12 s is too early, the one at 55 s past the next 30 s)
        self.assertTrue(24.0 <= cuts[0][1] / rate <= 24.5, cuts)
        self.assertTrue(41.0 <= cuts[1][1] / rate <= 41.5, cuts)
        self.assertEqual(mw._chunk_cuts(noise[:30 * rate]), [(0, 30 * rate)])
        self.assertEqual(mw._chunk_cuts(np.zeros(0, np.float32)), [(0, 0)])

    def test_the_chunks_are_each_transcribed_alone_and_joined(self):
        m = support.model("tiny.en")
        audio = mw.load_audio(support.long_clip())
        options = {"temperature": 0.0, "word_timestamps": True}
        requests = m.metrics()["requests"]
        together = m.transcribe(audio, chunk_batch=4, **options)
        self.assertEqual(m.metrics()["requests"], requests + 1)
        cuts = mw._chunk_cuts(audio)
        self.assertGreaterEqual(len(cuts), 3)
        alone = [m.transcribe(audio[a:b], **options) for a, b in cuts]
        self.assertEqual(tokens(together), [t for r in alone for t in tokens(r)])
        self.assertEqual(together["text"], "".join(r["text"] for r in alone))
        expected = [(round(min(s["start"], (b - a) / mw.SAMPLE_RATE) + a / mw.SAMPLE_RATE, 3),
                     round(min(s["end"], (b - a) / mw.SAMPLE_RATE) + a / mw.SAMPLE_RATE, 3))
                    for (a, b), r in zip(cuts, alone) for s in r["segments"]]
        self.assertEqual([(s["start"], s["end"]) for s in together["segments"]], expected)
        self.assertEqual([s["id"] for s in together["segments"]], list(range(len(together["segments"]))))
        for s in together["segments"]:
            for w in s["words"]:
                self.assertTrue(s["start"] - 1e-6 <= w["start"] <= w["end"] <= s["end"] + 1e-6, (s, w))
        self.assertEqual(together["metrics"]["chunks"], len(cuts))
        self.assertEqual(together["metrics"]["windows"], sum(r["metrics"]["windows"] for r in alone))
        self.assertAlmostEqual(together["metrics"]["audio_seconds"], len(audio) / mw.SAMPLE_RATE)
        one = m.transcribe(audio, chunk_batch=1, **options)
        self.assertEqual(tokens(one), tokens(together))

    def test_voice_activity_times_are_the_audio_s(self):
        m = support.model("tiny.en")
        speech = mw.load_audio(support.long_clip())
        audio = np.concatenate([np.zeros(10 * mw.SAMPLE_RATE, np.float32), speech])
        r = m.transcribe(audio, chunk_batch=4, vad_filter=True, temperature=0.0)
        self.assertGreaterEqual(r["metrics"]["chunks"], 3)
        self.assertGreaterEqual(r["segments"][0]["start"], 9.5)
        self.assertLessEqual(r["segments"][-1]["end"], len(audio) / mw.SAMPLE_RATE + 1e-6)
        self.assertEqual([s["start"] for s in r["segments"]], sorted(s["start"] for s in r["segments"]))

    @unittest.skipUnless(support.has_base(), "needs the base model (pip install -e '.[test]')")
    def test_a_multilingual_model_detects_the_language_once(self):
        m = support.model("base")
        clips = [mw.load_audio(w) for w, _ in support.samples("es")]
        gap = np.zeros(mw.SAMPLE_RATE // 2, np.float32)
        audio = np.concatenate([x for _ in range(40) for clip in clips for x in (clip, gap)])[:70 * mw.SAMPLE_RATE]
        detections, detect = [], mw._detect_windows
        mw._detect_windows = lambda model, mels: detections.append(len(mels)) or detect(model, mels)
        try:
            r = m.transcribe(audio, chunk_batch=4, temperature=0.0)
        finally:
            mw._detect_windows = detect
        self.assertEqual(detections, [1])
        self.assertEqual(r["language"], "es")
        self.assertGreaterEqual(r["metrics"]["chunks"], 3)

    def test_bad_chunk_batch_raises_config_errors(self):
        m = support.model("tiny.en")
        wav = str(support.samples("en")[-1][0])
        for options in ({"chunk_batch": 0}, {"chunk_batch": 2, "clip_timestamps": "0,1"}):
            with self.subTest(**options), self.assertRaises(mw.ConfigError) as ctx:
                m.transcribe(wav, **options)
            self.assertIn("chunk_batch", str(ctx.exception))
        proc = support.run_cli(wav, "--chunk_batch", "0")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("--chunk_batch=0", proc.stderr)


if __name__ == "__main__":
    unittest.main()
