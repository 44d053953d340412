"""Every checkpoint: each format people keep Whisper in loads to the same weights, and every
released shape decodes as openai-whisper does (seeded random weights: the comparison is exact
whatever the values, so no download is needed).

``MW_TEST_FULL_SHAPES=1`` adds the whole-depth large-v3 and large-v3-turbo (about 20 GB of
memory and 20 minutes here); docs/PERFORMANCE.md has its last result.
"""

import importlib.util
import mmap
import os
import shutil
import struct
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import numpy as np

import support
from support import MODEL_DIMS, mw, random_whisper

STEPS = 64                                        # greedy steps compared per shape
# One seed per shape, each checked to have no near-tie in the reference's greedy run (smallest
# top-1/top-2 margin 0.003 or more, far above the logits' float32 differences; docs/PERFORMANCE.md).
SEEDS = {"tiny.en": 3, "base": 4, "small": 5, "medium": 6, "large-v3": 8, "large-v3-turbo": 14,
         "distil-large-v3": 15}


def _state(model) -> dict:
    return {k: v.numpy() for k, v in model.state_dict().items()}


class FormatsTest(unittest.TestCase):
    """One large-v3-turbo-shaped model (128 mels, 51866 tokens, 20 heads, a decoder shallower
    than its encoder), two encoder layers and one decoder layer, written in every format."""

    @classmethod
    def setUpClass(cls):
        import torch
        cls.dims = dict(MODEL_DIMS["large-v3-turbo"], n_audio_layer=2, n_text_layer=1)
        cls.model = random_whisper(cls.dims)
        cls.state = _state(cls.model)
        cls.hf = support.hf_model(cls.model)
        mel = torch.randn(1, cls.dims["n_mels"], mw.N_FRAMES)
        tokens = torch.tensor([[50258, 50259, 50360, 50364, 400, 500]])
        with torch.no_grad():               # the Hugging Face copy is the same model
            theirs = cls.hf(input_features=mel, decoder_input_ids=tokens).logits
            np.testing.assert_allclose(theirs.numpy(), cls.model(mel, tokens).numpy(), rtol=1e-4, atol=1e-3)
        cls.dir = Path(tempfile.mkdtemp(prefix="maxwhisper-formats-"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir)

    def folder(self, name: str) -> Path:
        path = self.dir / name
        path.mkdir()
        return path

    def assertSameWeights(self, weights, half=False):
        self.assertEqual(weights.dims, self.dims)
        self.assertEqual(set(weights.state), set(self.state))
        for k, v in self.state.items():
            got = weights.state[k]
            self.assertEqual(got.dtype, np.float32)
            if half and not np.array_equal(got, v):          # a tensor the format kept in float16
                v = v.astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(got, v, err_msg=k)

    def test_openai_pt(self):
        path = support.save_pt(self.model, self.dir / "model.pt")
        self.assertSameWeights(mw.load_weights(path))
        self.assertMapped(mw._mapped_pt(path)["model_state_dict"]["decoder.token_embedding.weight"])

    def test_openai_pt_in_torchs_legacy_format(self):
        """A file this module's reader does not take is torch.load's: the same weights."""
        import dataclasses as dc
        import torch
        path = self.dir / "legacy.pt"
        torch.save({"dims": dc.asdict(self.model.dims), "model_state_dict": self.model.state_dict()}, path,
                   _use_new_zipfile_serialization=False)
        self.assertIsNone(mw._mapped_pt(path))
        self.assertSameWeights(mw.load_weights(path))

    def test_openai_pt_half(self):
        import copy
        half = copy.deepcopy(self.model).half()
        w = mw.load_weights(support.save_pt(half, self.dir / "half.pt"))
        for k, v in half.state_dict().items():
            np.testing.assert_array_equal(w.state[k], v.float().numpy())

    def test_hugging_face_safetensors(self):
        heads = [(0, 3), (0, 17)]
        folder = support.save_hf(self.hf, self.folder("hf"), alignment_heads=heads)
        w = mw.load_weights(folder)
        self.assertSameWeights(w)
        self.assertEqual([tuple(h) for h in w.alignment_heads], heads)     # generation_config.json's
        state = {}
        mw._read_safetensors(folder / "model.safetensors", state)
        self.assertMapped(state["decoder.token_embedding.weight"])

    def test_hugging_face_sharded(self):
        folder = support.save_hf(self.hf, self.folder("sharded"), shard="100MB")
        self.assertGreater(len(list(folder.glob("model-*.safetensors"))), 1)
        self.assertSameWeights(mw.load_weights(folder))
        next(folder.glob("model-00002-*.safetensors")).unlink()
        with self.assertRaises(mw.ModelError) as ctx:
            mw.load_weights(folder)
        self.assertIn("model-00002", str(ctx.exception))

    def test_hugging_face_pytorch_bin(self):
        folder = support.save_hf(self.hf, self.folder("bin"), safe=False)
        self.assertSameWeights(mw.load_weights(folder))
        self.assertSameWeights(mw.load_weights(folder / "pytorch_model.bin"))

    def test_hugging_face_half(self):
        import copy
        folder = support.save_hf(copy.deepcopy(self.hf).half(), self.folder("hf16"))
        w = mw.load_weights(folder)
        for k, v in self.state.items():
            np.testing.assert_array_equal(w.state[k], v.astype(np.float16).astype(np.float32), err_msg=k)

    def test_ggml(self):
        self.assertSameWeights(mw.load_weights(support.save_ggml(self.model, self.dir / "ggml-f32.bin", f16=False)))
        self.assertSameWeights(mw.load_weights(support.save_ggml(self.model, self.dir / "ggml-f16.bin")), half=True)

    def assertGgmlWeights(self, weights, state: dict, matrix) -> None:
        """Each matrix (not the positional embeddings) is ``matrix(its float weights)``, the
        rest float32 or float16 as stored."""
        self.assertEqual(weights.dims, self.dims)
        for k, v in state.items():
            with self.subTest(name=k):
                if v.ndim == 2 and "positional_embedding" not in k:
                    np.testing.assert_array_equal(weights.state[k], matrix(v))
                elif not np.array_equal(weights.state[k], v):
                    np.testing.assert_array_equal(weights.state[k], v.astype(np.float16).astype(np.float32))

    def test_ggml_quantized(self):
        """whisper.cpp's quantized files: each matrix is its blocks' values as llama.cpp's own
        ``gguf`` package decodes them, and within a quantization step of the float weights."""
        try:
            from gguf import GGMLQuantizationType, quants
        except ImportError:
            self.skipTest("gguf is not installed (pip install gguf)")
        for kind, step in (("q4_0", 1 / 7), ("q4_1", 1 / 15), ("q5_0", 1 / 15), ("q5_1", 1 / 31), ("q8_0", 1 / 127)):
            qtype = GGMLQuantizationType[kind.upper()]
            w = mw.load_weights(support.save_ggml(self.model, self.dir / f"ggml-{kind}.bin", quantize=kind))
            with self.subTest(kind):
                self.assertGgmlWeights(w, self.state, lambda v: quants.dequantize(quants.quantize(v, qtype), qtype))
            for k, v in self.state.items():
                if v.ndim == 2 and "positional_embedding" not in k:
                    blocks = np.abs(v).reshape(len(v), -1, 32).max(2).repeat(32, 1).reshape(v.shape)
                    slack = blocks / 1024                         # the float16 scale and offset
                    self.assertTrue(np.all(np.abs(w.state[k] - v) <= step * blocks + slack), (kind, k))

    def test_ggml_k_quants(self):
        """whisper.cpp's k-quant files (q2_k to q6_k, 256-value blocks): each matrix is its
        blocks' values as gguf decodes them. gguf cannot encode these types, so the blocks are
        random and a copy of the model takes their values (``support.save_ggml``)."""
        import copy
        if not importlib.util.find_spec("gguf"):
            self.skipTest("gguf is not installed (pip install gguf)")
        model = copy.deepcopy(self.model)
        for kind in support.K_QUANT_SCALES:
            w = mw.load_weights(support.save_ggml(model, self.dir / f"ggml-{kind}.bin", quantize=kind))
            state = _state(model)
            with self.subTest(kind):
                self.assertFalse(np.array_equal(state["decoder.token_embedding.weight"],
                                                self.state["decoder.token_embedding.weight"]))
                self.assertGgmlWeights(w, state, lambda v: v)

    def test_ggml_types_not_read_are_named(self):
        path = support.save_ggml(self.model, self.dir / "ggml-q8.bin", quantize="q8_0")
        data = bytearray(path.read_bytes())
        first = data.index(b"decoder.token_embedding.weight") - 12 - 4 * 2    # that tensor's header
        data[first + 8:first + 12] = struct.pack("<i", 16)                    # ggml type iq2_xxs
        path.with_name("ggml-iq2.bin").write_bytes(bytes(data))
        with self.assertRaises(mw.ModelError) as ctx:
            mw.load_weights(path.with_name("ggml-iq2.bin"))
        self.assertIn("type 16", str(ctx.exception))
        self.assertIn("q4_k", str(ctx.exception))
        data = bytearray(path.read_bytes())
        data[4 * 11:4 * 12] = struct.pack("<i", 1000 + 8)                     # quantization version 1
        path.write_bytes(bytes(data))
        with self.assertRaises(mw.ModelError) as ctx:
            mw.load_weights(path)
        self.assertIn("quantization version 1", str(ctx.exception))

    def test_ctranslate2(self):
        self.assertSameWeights(mw.load_weights(support.save_ct2(self.hf, self.dir / "ct2")))
        folder = support.save_ct2(self.hf, self.dir / "ct2-f16", "float16")
        self.assertSameWeights(mw.load_weights(folder), half=True)
        self.assertMapped(mw._read_ct2_model_bin(folder / "model.bin")["decoder/embeddings/weight"])

    def test_ctranslate2_quantized(self):
        """A model converted with ``--quantization int8`` (a scale per row) or ``int16`` (one
        per matrix) loads as integer / scale, within half a quantization step of its float
        weights; an integer weight without a scale is refused."""
        import copy
        for quantization, levels in (("int8", 127), ("int8_float16", 127), ("int16", 1024)):
            hf = copy.deepcopy(self.hf)          # the converter quantizes the model it is given in place
            folder = support.save_ct2(hf, self.dir / f"ct2-{quantization}", quantization)
            w = mw.load_weights(folder)
            self.assertEqual(set(w.state), set(self.state))
            for k, v in self.state.items():
                with self.subTest(quantization, name=k):
                    if v.ndim > 1 and "positional_embedding" not in k:
                        rows = v.reshape(len(v), -1)
                        amax = np.abs(rows).max(1) if levels == 127 else np.abs(rows).max()
                        step = (amax / levels).reshape(-1, *[1] * (v.ndim - 1))
                        self.assertTrue(np.all(np.abs(w.state[k] - v) <= 0.501 * step))
                    elif not np.array_equal(w.state[k], v):  # float16 where the rest is float16
                        np.testing.assert_array_equal(w.state[k], v.astype(np.float16).astype(np.float32))
        variables = mw._read_ct2_model_bin(folder / "model.bin")
        unscaled = {k: x for k, x in variables.items() if not k.endswith("weight_scale")}
        with self.assertRaises(mw.ModelError) as ctx:
            mw._ct2_to_openai(unscaled, folder / "model.bin")
        self.assertIn("--quantization", str(ctx.exception))

    def assertMapped(self, array):
        """``array`` is a view of a file's pages, not a copy in fresh memory."""
        while isinstance(array, np.ndarray):
            array = array.base
        self.assertIsInstance(getattr(array, "obj", array), mmap.mmap)

    def test_truncated_files_name_themselves(self):
        for path in (support.save_pt(self.model, self.dir / "cut.pt"),
                     support.save_ggml(self.model, self.dir / "ggml-cut.bin"),
                     support.save_hf(self.hf, self.folder("cut")) / "model.safetensors"):
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
            with self.subTest(path.name), self.assertRaises(mw.ModelError) as ctx:
                mw.load_weights(path)
            self.assertIn(path.name, str(ctx.exception))


class CorruptFilesTest(unittest.TestCase):
    """Any byte of a file's headers flipped: the load succeeds or raises ``ModelError``, and
    never allocates more than the file holds."""

    def test_flipped_header_bytes(self):
        import random
        tmp = Path(tempfile.mkdtemp(prefix="maxwhisper-corrupt-"))
        self.addCleanup(shutil.rmtree, tmp)
        model = random_whisper(dict(MODEL_DIMS["tiny"], n_audio_layer=1, n_text_layer=1))
        hf = support.hf_model(model)
        files = [support.save_pt(model, tmp / "m.pt"), support.save_ggml(model, tmp / "ggml-m.bin"),
                 support.save_hf(hf, tmp / "hf") / "model.safetensors",
                 support.save_ct2(hf, tmp / "ct2") / "model.bin",
                 support.save_ct2(support.hf_model(model), tmp / "ct2-int8", "int8") / "model.bin"]
        if importlib.util.find_spec("gguf"):
            files.append(support.save_ggml(model, tmp / "ggml-q5_0.bin", quantize="q5_0"))
        rng = random.Random(0)
        for path in files:
            head = path.read_bytes()[:4096]
            for _ in range(40):
                at = rng.randrange(len(head))
                with open(path, "r+b") as f:                  # one byte changed in place, then put back
                    f.seek(at)
                    f.write(bytes([head[at] ^ 1 << rng.randrange(8)]))
                with self.subTest(file=path.name, byte=at):
                    try:
                        mw.load_weights(path.parent if path.name == "model.bin" else path)
                    except mw.ModelError:
                        pass
                with open(path, "r+b") as f:
                    f.seek(at)
                    f.write(head[at:at + 1])


class NamesTest(unittest.TestCase):
    """Names resolve offline: openai-whisper's download folder, then the Hugging Face hub cache."""

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="maxwhisper-names-"))
        self.addCleanup(shutil.rmtree, self.dir)
        env = {"XDG_CACHE_HOME": str(self.dir), "HF_HUB_CACHE": str(self.dir / "hub")}
        patcher = mock.patch.dict(os.environ, env)
        patcher.start()
        self.addCleanup(patcher.stop)

    def hub_folder(self, repo: str) -> Path:
        root = self.dir / "hub" / ("models--" + repo.replace("/", "--"))
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text("0123abcd")
        (root / "snapshots" / "0123abcd").mkdir(parents=True)
        return root / "snapshots" / "0123abcd"

    def test_hub_cache_by_short_and_repository_name(self):
        # turbo's decoder (4 layers of 20 heads) under its name: openai-whisper's alignment heads
        dims = dict(MODEL_DIMS["large-v3-turbo"], n_audio_layer=1)
        model = random_whisper(dims)
        support.save_hf(support.hf_model(model), self.hub_folder("openai/whisper-large-v3-turbo"))
        import base64
        import gzip
        import whisper
        table = gzip.decompress(base64.b85decode(whisper._ALIGNMENT_HEADS["large-v3-turbo"]))
        expected = [tuple(int(x) for x in ij) for ij in np.argwhere(np.frombuffer(table, bool).reshape(4, 20))]
        for name in ("large-v3-turbo", "turbo", "openai/whisper-large-v3-turbo"):
            with self.subTest(name):
                w = mw.load_weights(name)
                self.assertEqual(w.dims, dims)
                self.assertEqual(w.num_languages, 100)
                self.assertEqual(w.alignment_heads, expected)           # openai-whisper's table

    def test_distil_and_openai_cache(self):
        dims = dict(MODEL_DIMS["distil-large-v3"], n_audio_layer=1)
        support.save_hf(support.hf_model(random_whisper(dims)), self.hub_folder("distil-whisper/distil-large-v3"))
        self.assertEqual(mw.load_weights("distil-large-v3").dims, dims)
        (self.dir / "whisper").mkdir()
        small = dict(MODEL_DIMS["small"], n_audio_layer=1, n_text_layer=1)
        support.save_pt(random_whisper(small), self.dir / "whisper" / "small.pt")
        self.assertEqual(mw.load_weights("small").dims, small)

    def test_faster_whisper_conversion_in_the_hub_cache(self):
        dims = dict(MODEL_DIMS["medium.en"], n_audio_layer=1, n_text_layer=1)
        support.save_ct2(support.hf_model(random_whisper(dims)), self.hub_folder("Systran/faster-whisper-medium.en"))
        w = mw.load_weights("medium.en")
        self.assertEqual(w.dims, dims)
        self.assertFalse(w.is_multilingual)

    def test_a_missing_name_says_where_it_looked(self):
        with self.assertRaises(mw.ModelError) as ctx:
            mw.load_weights("large-v3")
        msg = str(ctx.exception)
        for part in (str(self.dir / "whisper" / "large-v3.pt"), "models--openai--whisper-large-v3",
                     "huggingface-cli download openai/whisper-large-v3", "whisper.load_model"):
            self.assertIn(part, msg)


class ShapesTest(unittest.TestCase):
    """Every released shape's dimensions come from the checkpoint alone."""

    def test_every_shape_round_trips(self):
        tmp = Path(tempfile.mkdtemp(prefix="maxwhisper-shapes-"))
        self.addCleanup(shutil.rmtree, tmp)
        for name, full in MODEL_DIMS.items():
            dims = dict(full, n_audio_layer=2 if full["n_text_layer"] < full["n_audio_layer"] else 1, n_text_layer=1)
            with self.subTest(name):
                w = mw.load_weights(support.save_pt(random_whisper(dims), tmp / "model.pt"))
                self.assertEqual(w.dims, dims)
                self.assertEqual(w.is_multilingual, not name.endswith(".en"))
                self.assertEqual(w.num_languages, {51864: 99, 51865: 99, 51866: 100}[dims["n_vocab"]])


class LoadingMemoryTest(unittest.TestCase):
    """A model on a CPU keeps one float32 copy of its weights: the state's arrays are views of
    the device buffers, with the checkpoint's values, and the buffers they are views of hold
    little more than the weights (a copy of the parameters the graphs take transposed would
    sit beside the checkpoint's buffer, which the other parameters' views keep alive)."""

    def test_state_is_the_device_copy(self):
        fresh = mw.load_weights("tiny.en")
        for cache in ("auto", "off"):                # the weight image mapped; the checkpoint read
            with self.subTest(graph_cache=cache):
                m = mw.load("tiny.en", device="cpu", warmup=False, kernels="on",
                            config=mw.Config.resolve(graph_cache=cache))
                buffers = [b.to_numpy() for b in m.device_weights.encoder + m.device_weights.step]
                for name, array in m.weights.state.items():
                    np.testing.assert_array_equal(array, fresh.state[name], err_msg=name)
                    self.assertTrue(any(np.shares_memory(array, b) for b in buffers), name)
                roots = {id(r): r for r in (a.base if a.base is not None else a for a in m.weights.state.values())}
                weights = sum(a.nbytes for a in fresh.state.values())
                self.assertLess(sum(r.nbytes for r in roots.values()), 1.01 * weights)

    @unittest.skipUnless(support.DEVICE == "gpu", "a GPU model's host memory (MW_TEST_DEVICE=gpu)")
    def test_a_gpu_model_keeps_no_weights_on_the_host(self):
        """The device holds its own copy of every weight, so load()'s model hands the host's back."""
        fresh = mw.load_weights("tiny.en")
        m = mw.load("tiny.en", device="gpu", warmup=False)
        self.assertFalse({p.name for p in mw.weight_spec(m.dims)} & set(m.weights.state))
        self.assertGreater(m.device_weights.released, 0.99 * sum(a.nbytes for a in fresh.state.values()))


class ReleaseTest(unittest.TestCase):
    """_release hands back the pages wholly inside the arrays it is given, in a mapping only."""

    def test_pages_inside_the_arrays_go_back(self):
        page = mmap.PAGESIZE // 4                         # floats a page
        buffer = mw._mapped_floats(10 * page)
        buffer[...] = 1
        kept, gone, neighbour = buffer[:page + 5], buffer[page + 5:6 * page + 7], buffer[6 * page + 7:]
        self.assertEqual(mw._release([gone.reshape(-1, 1).T]), 4 * mmap.PAGESIZE)  # pages 2-5
        self.assertEqual(buffer[2 * page:6 * page].max(), 0)     # read back as zeros: not held
        self.assertTrue((kept == 1).all() and (neighbour == 1).all())
        self.assertEqual((gone == 1).sum(), page - 5 + 7)          # the pages it shares
        self.assertEqual(mw._release([gone, neighbour]), 8 * mmap.PAGESIZE)     # with its neighbour: to the end
        self.assertTrue((kept == 1).all())
        self.assertEqual(mw._release([np.ones(10 * page, np.float32)]), 0)    # not a mapping


class RandomWeightParityTest(unittest.TestCase):
    """Each released shape (fewer layers, ``support.REDUCED_LAYERS``) with random weights:
    log-mel, encoder output and decoder logits within float32 tolerance of openai-whisper's,
    and the same greedy tokens for ``STEPS`` steps."""

    margins: dict = {}

    @classmethod
    def setUpClass(cls):
        import torch
        import whisper
        cls.dir = Path(tempfile.mkdtemp(prefix="maxwhisper-parity-"))
        wav, _ = support.samples("en")[0]
        cls.audio = mw.load_audio(wav)
        cls.padded = whisper.pad_or_trim(torch.from_numpy(cls.audio))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir)
        if cls.margins:
            print("\nsmallest top-1/top-2 logit margin over the greedy steps (largest logit difference "
                  "from openai-whisper's): " + ", ".join(f"{k} {v:.4f} ({e:.1e})" for k, (v, e) in cls.margins.items()),
                  file=sys.stderr)

    def check(self, name: str, dims: dict):
        import torch
        import whisper
        ref = random_whisper(dims, seed=SEEDS[name.split()[0]])
        m = mw.load(support.save_pt(ref, self.dir / f"{name}-random.pt"), device=support.DEVICE, warmup=False)
        # just the two graphs a token-at-a-time check runs, compiled side by side (a child
        # process compiles the second): with an empty graph cache this class's 6 min are 37 s
        # shorter (2 cores)
        m.runner.compile_all(["encoder", "step" if m.kernels else "decoder"])
        mel = whisper.log_mel_spectrogram(self.padded, dims["n_mels"])
        ours_mel = m.log_mel(self.audio, padding=mw.N_SAMPLES)[:, :mw.N_FRAMES]
        np.testing.assert_allclose(ours_mel, mel.numpy(), atol=2e-4)

        with torch.no_grad():
            features = ref.encoder(mel[None])
        ours, cross = m.encode(mel[None].numpy())
        scale = float(features.abs().max())
        np.testing.assert_allclose(ours, features.numpy(), atol=2e-4 * scale)

        tokenizer = m.tokenizer(language="en" if m.is_multilingual else None)
        prompt = list(tokenizer.sot_sequence_including_notimestamps)
        cache = m.new_cache(cross)
        theirs, mine, margin, error = list(prompt), list(prompt), np.inf, 0.0
        for t in prompt[:-1]:                                    # one token at a time: the step graph
            m.decode(cache, np.array([[t]]))
        last = prompt[-1]
        # openai-whisper decodes with its own key/value cache too: the prompt, then a token a step
        # (and its cross K/V made once, not at every step over the whole sequence)
        ref_cache, hooks = ref.install_kv_cache_hooks()
        try:
            fed = torch.tensor([theirs])
            for step in range(STEPS):
                with torch.no_grad():
                    expected = ref.decoder(fed, features, kv_cache=ref_cache)[0, -1].numpy()
                got = m.decode(cache, np.array([[last]]))[0, -1]
                if step == 0:
                    np.testing.assert_allclose(got, expected, atol=2e-4 * float(np.abs(expected).max()))
                top2 = np.sort(expected)[-2:]
                margin = min(margin, float(top2[1] - top2[0]))
                error = max(error, float(np.abs(got - expected).max()))
                theirs.append(int(expected.argmax()))
                fed = torch.tensor([[theirs[-1]]])
                last = int(got.argmax())
                mine.append(last)
                self.assertEqual(mine, theirs, f"{name}: step {step}")
        finally:
            for h in hooks:
                h.remove()
        self.assertGreater(len(set(theirs[len(prompt):])), STEPS // 4)   # not a repeated token
        self.margins[name] = margin, error
        return m, ref

    def test_tiny_en(self):
        self.check("tiny.en", support.reduced_dims("tiny.en"))

    def test_base(self):
        self.check("base", support.reduced_dims("base"))

    def test_small(self):
        self.check("small", support.reduced_dims("small"))

    def test_medium(self):
        self.check("medium", support.reduced_dims("medium"))

    def test_large_v3(self):
        self.check("large-v3", support.reduced_dims("large-v3"))

    def test_large_v3_turbo_and_its_transcript(self):
        """Also the whole transcribe() path: 128 mels, 100 languages, language detection."""
        import whisper
        m, ref = self.check("large-v3-turbo", support.reduced_dims("large-v3-turbo"))
        ours = m.transcribe(self.audio, temperature=0.0)
        theirs = whisper.transcribe(ref, self.audio, fp16=False, temperature=0.0)
        self.assertEqual(ours["language"], theirs["language"])
        self.assertEqual(support.tokens(ours), support.tokens(theirs))

    def test_distil_large_v3(self):
        self.check("distil-large-v3", support.reduced_dims("distil-large-v3"))

    @unittest.skipUnless(os.environ.get("MW_TEST_FULL_SHAPES"), "MW_TEST_FULL_SHAPES=1 runs the whole-depth shapes")
    def test_full_large_v3_and_turbo(self):
        for name in ("large-v3-turbo", "large-v3"):
            with self.subTest(name):
                self.check(name + " (full)", MODEL_DIMS[name])


if __name__ == "__main__":
    unittest.main()
