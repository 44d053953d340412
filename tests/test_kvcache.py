"""KVCache: step-by-step decoding equals full recompute, and the context limit is enforced."""

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

    def test_batch_rows_are_independent(self):
        cache = self.model.new_cache(self.cross, batch=2)
        two = np.stack([self.tokens[:20], self.tokens[20:40]])
        logits = self.model.decode(cache, two)
        for row in range(2):
            one = self.model.decode(self.model.new_cache(self.cross), two[row:row + 1])
            np.testing.assert_allclose(logits[row], one[0], atol=1e-3)


if __name__ == "__main__":
    unittest.main()
