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
        encoder = [p for p in mw.weight_spec(self.tiny.dims) if p.graph == "encoder"]
        self.assertIsNotNone(mw._adjacent(mw.graph_weights(self.tiny, encoder)))   # transposed ones too
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


class WeightImageTest(unittest.TestCase):
    """The float32 image of a checkpoint that a warm start maps instead of reading the file."""

    def setUp(self):
        import support
        self.dir = Path(tempfile.mkdtemp(prefix="maxwhisper-image-"))
        self.addCleanup(shutil.rmtree, self.dir)
        self.folder = self.dir / "graphs"
        self.checkpoint = support.save_pt(support.random_whisper(support._dims(64, 1, 1, 1)), self.dir / "m.pt")

    def load(self, checkpoint=None):
        return mw._WeightImage(self.folder).load(checkpoint or self.checkpoint)

    def assert_same(self, got, want):
        self.assertEqual((got.dims, got.source, got.alignment_heads), (want.dims, want.source, want.alignment_heads))
        self.assertEqual(sorted(got.state), sorted(want.state))
        for name, array in want.state.items():
            np.testing.assert_array_equal(got.state[name], array, err_msg=name)

    def image(self) -> Path:
        (image,) = self.folder.glob("weights-*.bin")
        return image

    def test_mapped_weights_equal_the_checkpoints_and_reach_the_graphs_uncopied(self):
        want = mw.load_weights(self.checkpoint)
        self.assert_same(self.load(), want)                      # read, and the image kept
        with mock.patch.object(mw, "load_weights", side_effect=AssertionError("read the checkpoint")):
            mapped = self.load()
        self.assert_same(mapped, want)
        spec = mw.weight_spec(mapped.dims)
        encoder = mw.graph_weights(mapped, [p for p in spec if p.graph == "encoder"])
        self.assertIsNotNone(mw._adjacent(encoder))              # one view of the image: no copy
        self.assertTrue(mapped.state["decoder.token_embedding.weight"].flags.writeable)

    def test_a_changed_checkpoint_or_a_torn_image_is_read_and_kept_again(self):
        import support
        self.load()
        image = self.image()
        whole = image.read_bytes()
        image.write_bytes(whole[:len(whole) // 2])
        want = mw.load_weights(self.checkpoint)
        with mock.patch.object(mw, "load_weights", wraps=mw.load_weights) as read:
            self.assert_same(self.load(), want)
        read.assert_called_once()
        self.assertEqual(image.read_bytes(), whole)
        support.save_pt(support.random_whisper(support._dims(64, 1, 1, 1), seed=1), self.checkpoint)
        self.assert_same(self.load(), mw.load_weights(self.checkpoint))
        self.assertNotEqual(image.read_bytes(), whole)

    def test_images_of_large_or_deleted_checkpoints_are_not_kept(self):
        with mock.patch.object(mw._WeightImage, "limit", 1 << 20):
            self.assert_same(self.load(), mw.load_weights(self.checkpoint))
        self.assertEqual(list(self.folder.glob("*")), [])
        other = Path(shutil.copy(self.checkpoint, self.dir / "other.pt"))
        self.load(other)
        other.unlink()
        self.load()                                             # written: the other's image goes
        self.assertEqual(len(list(self.folder.glob("weights-*.bin"))), 1)

    def test_concurrent_first_loads_write_one_whole_image(self):
        import threading
        got = []
        threads = [threading.Thread(target=lambda: got.append(self.load())) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        want = mw.load_weights(self.checkpoint)
        self.assertEqual(len(got), 4)
        for weights in got:
            self.assert_same(weights, want)
        self.assertEqual([f.name for f in self.folder.iterdir()], [self.image().name])   # no temporary left
        with mock.patch.object(mw, "load_weights", side_effect=AssertionError("read the checkpoint")):
            self.assert_same(self.load(), want)


if __name__ == "__main__":
    unittest.main()
