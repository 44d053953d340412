"""KVCache: step-by-step decoding equals full recompute, the context limit is enforced, and
the steps replayed as device graphs equal the steps launched op by op."""

import gc
import unittest

import numpy as np

import support
from support import mw


class KVCacheTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = support.model("tiny.en")
        wav, _ = support.samples("en")[0]
        mel = cls.model.log_mel(mw.load_audio(wav), padding=mw.N_SAMPLES)[None, :, :mw.N_FRAMES]
        cls.mel = mel
        cls.features, cls.cross = cls.model.encode(mel)
        tok = cls.model.tokenizer(language="en")
        text = tok.encode(" " + support.LONG_TEXT)
        cls.tokens = np.array(list(tok.sot_sequence) + (text * 3)[:448 - len(tok.sot_sequence)], np.int64)

    def test_steps_equal_full_recompute(self):
        cache = self.model.new_cache(self.cross)
        steps = {}
        self.model.decode(cache, self.tokens[None, :1])
        for pos in range(1, 441):
            logits = self.model.decode(cache, self.tokens[None, pos:pos + 1])
            if pos in (1, 50, 200, 440):
                steps[pos] = logits[0, 0]
        self.assertEqual(cache.length, 441)
        for pos, step in steps.items():
            with self.subTest(position=pos):
                full = self.model.decode(self.model.new_cache(self.cross), self.tokens[None, :pos + 1])
                np.testing.assert_allclose(step, full[0, 0], atol=1e-3)

    def test_prefill_matches_openai_decoder(self):
        import torch
        ref = support.reference("tiny.en")
        n = 64
        ours = self.model.decode(self.model.new_cache(self.cross), self.tokens[None, :n], out_idx=range(n))
        with torch.no_grad():
            theirs = ref.decoder(torch.from_numpy(self.tokens[None, :n]), torch.from_numpy(self.features)).numpy()
        np.testing.assert_allclose(ours, theirs, atol=5e-3)
        np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))

    def test_one_token_prompt_matches_openai_decoder(self):
        """A one-token call (the step graph with the kernels) returns that token's logits for
        every index asked, as openai-whisper's decoder gives them."""
        import torch
        ref = support.reference("tiny.en")
        ours = self.model.decode(self.model.new_cache(self.cross), self.tokens[None, :1], out_idx=(0, -1))
        self.assertEqual(ours.shape, (1, 2, 51864))
        with torch.no_grad():
            theirs = ref.decoder(torch.from_numpy(self.tokens[None, :1]), torch.from_numpy(self.features)).numpy()
        for i in range(2):
            np.testing.assert_allclose(ours[:, i], theirs[:, 0], atol=5e-3)
        self.assertEqual(self.model.decode(self.model.new_cache(self.cross), self.tokens[None, :1], out_idx=()).shape,
                         (1, 0, 51864))

    def test_encode_without_features(self):
        """Decoding's encode leaves the audio features on the device: the same K/V, no features."""
        features, cross = self.model.encode(self.mel, features=False)
        self.assertIsNone(features)
        for (k, v), (k0, v0) in zip(cross, self.cross):       # a GPU's sums may round apart
            np.testing.assert_allclose(k.to_numpy(), k0.to_numpy(), rtol=0, atol=1e-5)
            np.testing.assert_allclose(v.to_numpy(), v0.to_numpy(), rtol=0, atol=1e-5)

    def test_capacity_is_enforced(self):
        cache = self.model.new_cache(self.cross)
        self.model.decode(cache, self.tokens[None, :440])
        for _ in range(8):
            self.model.decode(cache, self.tokens[None, :1])
        self.assertEqual(cache.length, cache.capacity)
        with self.assertRaises(mw.CapacityError) as ctx:
            self.model.decode(cache, self.tokens[None, :1])
        self.assertIn("448", str(ctx.exception))
        self.assertEqual(cache.length, 448)
        cache.reset()
        self.assertEqual(self.model.decode(cache, self.tokens[None, :3]).shape, (1, 1, 51864))

    def test_bad_arguments_are_typed_errors_before_any_graph_runs(self):
        """Ids past a table were a DeviceError from a kernel, or (reorder) no error at all."""
        m, cache = self.model, self.model.new_cache(self.cross, batch=2)
        vocab = m.dims["n_vocab"]
        for label, call in [("tokens", lambda: m.decode(cache, [[1], [vocab]])),
                            ("tokens", lambda: m.decode(cache, [[1], [-1]])),
                            ("tokens", lambda: m.decode(cache, [[1.0], [2.0]])),
                            ("tokens", lambda: m.decode(cache, np.zeros((2, 0), np.int64))),
                            ("batch", lambda: m.new_cache(self.cross, batch=0)),
                            ("reorder", lambda: m.reorder(cache, [0, 2])),
                            ("cross_rows", lambda: m.cross_rows(self.cross, [1])),
                            ("tokens", lambda: m.alignment(self.cross, [1, vocab])),
                            ("windows", lambda: m.alignment(m.cross_rows(self.cross, [0, 0]), [1])),
                            ("encode", lambda: m.encode([[0.0]]))]:
            with self.subTest(label), self.assertRaises(mw.ConfigError) as ctx:
                call()
            self.assertIn(label, str(ctx.exception))
        self.assertEqual(cache.length, 0)
        with self.assertRaises(mw.AudioError):
            m.log_mel(np.zeros((2, 1600), np.float32))

    def test_batch_rows_are_independent(self):
        cache = self.model.new_cache(self.cross, batch=2)
        two = np.stack([self.tokens[:20], self.tokens[20:40]])
        logits = self.model.decode(cache, two)
        for row in range(2):
            one = self.model.decode(self.model.new_cache(self.cross), two[row:row + 1])
            np.testing.assert_allclose(logits[row], one[0], atol=1e-3)


class NewCacheTest(unittest.TestCase):
    @unittest.skipUnless(support.DEVICE == "cpu" and (mw.KERNELS_DIR / "step.mojo").is_file(), "the CPU kernel step")
    def test_a_step_right_after_a_new_cache_keeps_what_it_writes(self):
        """A Q4_0 model steps through the kernel step graph over a cache of device buffers.
        Its first token's keys and values are written in every layer, in each of 20 new
        caches: on a CPU, MAX 26.7 went on zeroing a new buffer after ``Buffer.zeros``
        returned, and the zeroing overwrote that token's layer-0 values in up to 17 of 20."""
        m = mw.load("tiny.en", device="cpu", dtype="q4_0")
        self.assertFalse(m.precision.packed)
        cross = m.encode(np.zeros((4, 80, 1000), np.float32), features=False)[1]
        sot = m.tokenizer().sot
        for k in range(20):
            cache = m.new_cache(cross, batch=4)
            m.decode(cache, np.full((4, 1), sot))
            for i, buf in enumerate(cache.self_buffers()):
                first = buf.to_numpy()[:, :, :, 0] if i % 2 == 0 else buf.to_numpy()[:, :, 0, :]
                with self.subTest(cache=k, buffer=i):
                    self.assertTrue(np.all(first != 0), f"{np.sum(first == 0)} of the first token's entries are 0")


class DeviceGraphTest(unittest.TestCase):
    """A decoding's per-token graphs, replayed as device graphs captured once per KVCache (the
    ``device_graphs`` setting, on by default on a GPU), give what launching them op by op gives."""

    @classmethod
    def setUpClass(cls):
        cls.audio = mw.load_audio(support.samples("en")[0][0])

    @unittest.skipUnless(support.DEVICE == "cpu", "a CPU cannot capture device graphs; a GPU can")
    def test_a_graph_that_cannot_be_captured_runs_op_by_op(self):
        """MAX captures device graphs on GPUs only: a CPU model made to capture its greedy
        choice (as a GPU model does) warns once that it cannot and then launches it as before,
        with the same transcript."""
        m = mw.load("tiny.en", device="cpu")
        m.device_graphs = m.choose_on_device = True
        with self.assertLogs("maxwhisper", "WARNING") as logs:
            got = m.transcribe(self.audio, temperature=0.0)
            again = m.transcribe(self.audio, temperature=0.0)
        self.assertEqual(sum("does not replay as a device graph" in line for line in logs.output), 1, logs.output)
        self.assertEqual((m.runner.captures, len(m.runner._dropped)), (0, 0))
        want = support.model("tiny.en").transcribe(self.audio, temperature=0.0)
        self.assertEqual(support.tokens(got), support.tokens(want))
        self.assertEqual(support.tokens(again), support.tokens(want))

    @unittest.skipUnless(support.DEVICE == "gpu", "device graphs are captured on a GPU (MW_TEST_DEVICE=gpu)")
    def test_replayed_steps_equal_launched_ones(self):
        """Step by step, the same logits from a replayed step as from the same model's graph
        launched op by op; one capture per cache, and another when the cache's buffers are
        replaced; the same greedy transcripts (the step and the choice replayed); a dropped
        cache's capture released at the next call. (Beam search and word timestamps replay too:
        test_parity compares them with openai-whisper on the GPU; here they would compile three
        more graphs.)"""
        m = support.model("tiny.en")
        launched = mw.load("tiny.en", device=support.DEVICE)
        launched.device_graphs = False
        self.assertTrue(m.device_graphs)
        mel = m.log_mel(self.audio, padding=mw.N_SAMPLES)[None, :, :mw.N_FRAMES]
        cross = m.encode(mel)[1]
        tok = m.tokenizer(language="en")
        tokens = np.array(list(tok.sot_sequence) + tok.encode(" " + support.LONG_TEXT)[:60], np.int64)[None]
        replayed, eager = m.new_cache(cross), launched.new_cache(cross)
        captures = m.runner.captures
        m.decode(replayed, tokens[:, :3])
        launched.decode(eager, tokens[:, :3])
        for pos in range(3, tokens.shape[1]):
            if pos == 40:                     # buffers replaced: the step is captured anew
                replayed.self_k = [b.copy() for b in replayed.self_k]
            np.testing.assert_allclose(m.decode(replayed, tokens[:, pos:pos + 1]),
                                       launched.decode(eager, tokens[:, pos:pos + 1]), atol=1e-5, err_msg=f"at {pos}")
        self.assertEqual(m.runner.captures - captures, 2)
        self.assertEqual(set(replayed.device_graphs), {"step"})
        self.assertEqual(eager.device_graphs, {})
        for options in ({}, {"without_timestamps": True}):
            with self.subTest(**options):
                self.assertEqual(support.tokens(m.transcribe(self.audio, temperature=0.0, **options)),
                                 support.tokens(launched.transcribe(self.audio, temperature=0.0, **options)))
        key = replayed.device_graphs["step"].key
        del replayed
        gc.collect()
        self.assertIn(key, [k for _, k in m.runner._dropped])
        m.decode(m.new_cache(cross), tokens[:, :1])
        self.assertFalse(m.runner._dropped)


if __name__ == "__main__":
    unittest.main()
