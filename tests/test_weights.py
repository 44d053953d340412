"""Weights: CTranslate2 folders, openai-whisper checkpoints, model names, typed errors."""

import os
import shutil
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import numpy as np

from support import mw


class WeightsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tiny = mw.load_weights("tiny.en")

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="maxwhisper-weights-"))
        self.addCleanup(shutil.rmtree, self.dir)

    def test_ctranslate2_folder_loads_into_openai_whisper(self):
        from whisper.model import ModelDimensions, Whisper
        w = self.tiny
        self.assertEqual(w.dims, dict(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6,
                                      n_audio_layer=4, n_vocab=51864, n_text_ctx=448, n_text_state=384,
                                      n_text_head=6, n_text_layer=4))
        self.assertFalse(w.is_multilingual)
        self.assertEqual(len(w.alignment_heads), 8)
        ref = Whisper(ModelDimensions(**w.dims))
        missing, unexpected = ref.load_state_dict(w.torch_state_dict(), strict=True)
        self.assertEqual((missing, unexpected), ([], []))
        self.assertTrue(all(a.dtype == np.float32 for a in w.state.values()))

    def test_weights_are_laid_out_for_the_packed_decoder(self):
        # load_weights puts the decoder's matrices end to end in the step op's order, so
        # packing them for it takes a view (a warm start's copy of the model saved)
        spec = [p for p in mw.weight_spec(self.tiny.dims) if p.graph == "decoder" and p.low_precision]
        flat = mw._adjacent(mw.graph_weights(self.tiny, spec))
        self.assertEqual(flat.size, sum(np.prod(p.shape) for p in spec))
        self.assertTrue(np.shares_memory(flat, self.tiny.state["decoder.token_embedding.weight"]))
        a = np.arange(10, dtype=np.float32)
        np.testing.assert_array_equal(mw._adjacent([a[0:3], a[3:5].reshape(2, 1)]), a[:5])
        for apart in ([a[0:3], a[4:5]], [a[3:5], a[0:3]], [a[0:3], np.zeros(2, np.float32)], [a[::2]]):
            self.assertIsNone(mw._adjacent(apart))

    def test_openai_checkpoint_round_trip(self):
        import torch
        path = self.dir / "tiny.en.pt"
        torch.save({"dims": self.tiny.dims, "model_state_dict": self.tiny.torch_state_dict()}, path)
        w = mw.load_weights(path)
        self.assertEqual(w.dims, self.tiny.dims)
        for k, v in self.tiny.state.items():
            np.testing.assert_array_equal(w.state[k], v)

    def test_names_resolve_to_the_whisper_cache(self):
        import torch
        cache = self.dir / "whisper"
        cache.mkdir()
        torch.save({"dims": self.tiny.dims, "model_state_dict": self.tiny.torch_state_dict()}, cache / "mine.pt")
        with mock.patch.dict(os.environ, {"XDG_CACHE_HOME": str(self.dir)}):
            self.assertEqual(mw.load_weights("mine").dims, self.tiny.dims)
            with self.assertRaises(mw.ModelError) as ctx:
                mw.load_weights("large-v9")
        msg = str(ctx.exception)
        self.assertIn("large-v9", msg)
        self.assertIn("huggingface-cli download openai/whisper-large-v9", msg)   # not openai-whisper's name

    def test_bad_files_raise_model_errors(self):
        folder = self.dir / "ct2"
        folder.mkdir()
        with self.assertRaises(mw.ModelError):                    # no model.bin
            mw.load_weights(folder)
        (folder / "model.bin").write_bytes(b"\x06\x00\x00\x00garbage")
        with self.assertRaises(mw.ModelError) as ctx:
            mw.load_weights(folder)
        self.assertIn("model.bin", str(ctx.exception))
        whole = Path(mw._packaged_model("tiny.en")) / "model.bin"
        (folder / "model.bin").write_bytes(whole.read_bytes()[:5_000_000])      # cut mid-variable
        with self.assertRaises(mw.ModelError) as ctx:
            mw.load_weights(folder)
        self.assertIn("truncated", str(ctx.exception))
        pt = self.dir / "bad.pt"
        pt.write_bytes(b"not a checkpoint")
        with self.assertRaises(mw.ModelError) as ctx:
            mw.load_weights(pt)
        self.assertIn("bad.pt", str(ctx.exception))

    def test_wrong_dims_are_refused(self):
        import torch
        dims = dict(self.tiny.dims, n_text_layer=6)
        path = self.dir / "lying.pt"
        torch.save({"dims": dims, "model_state_dict": self.tiny.torch_state_dict()}, path)
        with self.assertRaises(mw.ModelError) as ctx:
            mw.load_weights(path)
        self.assertIn("n_text_layer", str(ctx.exception))


if __name__ == "__main__":
    unittest.main()
