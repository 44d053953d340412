"""The MAX graphs against openai-whisper's PyTorch modules: log-mel, encoder, cross K/V; the
store of compiled graphs that makes warm starts fast; how a cold start compiles."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path
from unittest import mock

import numpy as np

import support
from support import mw


class GraphTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = support.model("tiny.en")
        cls.ref = support.reference("tiny.en")
        wav, _ = support.samples("en")[0]
        cls.audio = mw.load_audio(wav)

    def test_log_mel_matches_whisper(self):
        import torch
        import whisper
        for what, audio in (("clip", self.audio), ("clip+30s", self.audio),
                            ("long", mw.load_audio(support.long_clip()))):
            pad = mw.N_SAMPLES if what != "clip" else 0
            with self.subTest(what):
                ours = self.model.log_mel(audio, padding=pad)
                theirs = whisper.log_mel_spectrogram(torch.from_numpy(audio), padding=pad).numpy()
                self.assertEqual(ours.shape, theirs.shape)
                self.assertLessEqual(np.abs(ours - theirs).max(), 1e-3)

    def test_encoder_and_cross_kv_match_whisper(self):
        import torch
        mel = self.model.log_mel(self.audio, padding=mw.N_SAMPLES)[None, :, :mw.N_FRAMES]
        features, cross = self.model.encode(mel)
        with torch.no_grad():
            ref = self.ref.encoder(torch.from_numpy(mel))
            ref_kv = [(b.cross_attn.key(ref), b.cross_attn.value(ref)) for b in self.ref.decoder.blocks]
        ref = ref.numpy()
        cos = float((features * ref).sum() / np.linalg.norm(features) / np.linalg.norm(ref))
        self.assertGreaterEqual(cos, 0.9999)
        h = self.model.dims["n_text_head"]
        for (k_t, v), (rk, rv) in zip(cross, ref_kv):
            rk = rk.numpy().reshape(1, -1, h, 64).transpose(0, 2, 3, 1)    # [B, h, 64, 1500]
            rv = rv.numpy().reshape(1, -1, h, 64).transpose(0, 2, 1, 3)    # [B, h, 1500, 64]
            np.testing.assert_allclose(k_t.to_numpy(), rk, atol=2e-3)
            np.testing.assert_allclose(v.to_numpy(), rv, atol=2e-3)

    def test_a_shorter_window_matches_whisper(self):
        """A stream encodes its buffer padded to 10 or 20 s, not 30 (``_stream_frames``): the
        encoder reads the positional embedding's first rows and the decoder attends over the
        frames there are, as openai-whisper's modules do given that mel. Both paths: the Mojo
        encoder and step ops, and MAX ops (kernels off)."""
        import torch
        import torch.nn.functional as F
        off = mw.Model(support.weights("tiny.en"), device=support.DEVICE, kernels="off")
        tok, enc = self.model.tokenizer(), self.ref.encoder
        tokens = list(tok.sot_sequence_including_notimestamps) + tok.encode(" And so my fellow Americans")
        for frames in (1000, 2000):
            mel = self.model.log_mel(self.audio, padding=mw.N_SAMPLES)[None, :, :frames]
            with torch.no_grad():
                x = F.gelu(enc.conv2(F.gelu(enc.conv1(torch.from_numpy(mel))))).permute(0, 2, 1)
                x = x + enc.positional_embedding[:frames // 2]
                for block in enc.blocks:
                    x = block(x)
                ref = enc.ln_post(x)
                ref_logits = self.ref.decoder(torch.tensor([tokens]), ref).numpy()
            for name, m in (("kernels", self.model), ("MAX ops", off)):
                with self.subTest(frames=frames, path=name):
                    features, cross = m.encode(mel)
                    self.assertEqual(features.shape, (1, frames // 2, m.dims["n_audio_state"]))
                    cos = float((features * ref.numpy()).sum() / np.linalg.norm(features) / np.linalg.norm(ref))
                    self.assertGreaterEqual(cos, 0.9999)
                    logits = m.decode(m.new_cache(cross), np.array([tokens]), out_idx=list(range(len(tokens))))
                    np.testing.assert_allclose(logits, ref_logits, atol=2e-2)
        for bad in (np.zeros((1, 80, 999), np.float32), np.zeros((1, 80, 3002), np.float32)):
            with self.assertRaisesRegex(mw.ConfigError, "even number of frames up to 3000"):
                self.model.encode(bad)

    def test_batched_encoder_equals_single(self):
        mel = self.model.log_mel(self.audio, padding=mw.N_SAMPLES)[None, :, :mw.N_FRAMES]
        single, _ = self.model.encode(mel)
        pair, _ = self.model.encode(np.concatenate([mel, mel[:, :, ::-1].copy()]))
        np.testing.assert_allclose(pair[0], single[0], atol=1e-4)

    def test_graph_builders_are_plain_functions_of_dims(self):
        from max.graph import DeviceRef
        dims = dict(self.model.dims, n_text_layer=2, n_audio_layer=1)
        enc = mw.build_encoder_graph(dims, DeviceRef.CPU())
        dec = mw.build_decoder_graph(dims, DeviceRef.CPU())
        self.assertEqual(len(enc.inputs), 1 + len(mw.encoder_param_names(dims)))
        self.assertEqual(len(dec.inputs), 5 + len(mw.decoder_param_names(dims)) + 4 * 2)
        if (mw.KERNELS_DIR / "attention.mojo").is_file():
            step = mw.build_step_graph(dims, DeviceRef.CPU(), mw.KERNELS_DIR)
            self.assertEqual(len(step.inputs), 4 + 2 + 2 * 2 + 1)     # packed weights, cross K/V, cache

    def test_every_graph_builds_for_a_gpu(self):
        """Graph construction checks devices (no GPU needed): every input is on the GPU but the
        slice bounds MAX takes from host tensors, and the GPU step is MAX ops around the two
        attention ops, not the CPU's one-op step."""
        from max.dtype import DType
        from max.graph import DeviceRef
        dims, gpu = dict(self.model.dims, n_text_layer=2, n_audio_layer=1), DeviceRef.GPU()
        n_dec, L = len(mw.decoder_param_names(dims)), dims["n_text_layer"]
        for dtype, kv in ((None, None), (DType.bfloat16, DType.bfloat16)):
            graphs = {  # name: (graph, its input count, the inputs on the host)
                "encoder": (mw.build_encoder_graph(dims, gpu, kv), 1 + len(mw.encoder_param_names(dims)), set()),
                "decoder": (mw.build_decoder_graph(dims, gpu, dtype, kv), 5 + n_dec + 4 * L, set()),
                "append": (mw.build_append_graph(dims, gpu), 1 + 4 * L, {0}),
                "reorder": (mw.build_reorder_graph(dims, gpu), 2 + 2 * L, {1}),
                "gather": (mw.build_gather_graph(dims, gpu, kv), 1 + 2 * L, set()),
                "alignment": (mw.build_alignment_graph(dims, gpu, dtype, kv), 4 + n_dec + 2 * L, set())}
            if (mw.KERNELS_DIR / "attention.mojo").is_file():
                graphs["step"] = (mw.build_step_graph(dims, gpu, mw.KERNELS_DIR, dtype, kv), 3 + n_dec + 4 * L, set())
            for name, (graph, count, host) in graphs.items():
                with self.subTest(graph=name, dtype=dtype):
                    self.assertEqual(len(graph.inputs), count)
                    devices = [str(v.type.device) for v in graph.inputs]
                    self.assertEqual({i for i, d in enumerate(devices) if d.startswith("cpu")}, host, devices)
            if "step" in graphs:
                text = str(graphs["step"][0])
                self.assertIn("whisper_self_attention", text)
                self.assertNotIn("whisper_decoder_step", text)
            if kv is not None:
                self.assertTrue(all(v.type.dtype == kv for v in graphs["gather"][0].inputs[1:]))


class GraphStoreTest(unittest.TestCase):
    """Compiled graphs kept as .mef files: written on the first load, loaded by the next."""

    def test_store_round_trip_and_a_corrupt_file(self):
        wav, _ = support.samples("en")[0]
        want = support.model("tiny.en").transcribe(wav)["text"]
        with tempfile.TemporaryDirectory() as tmp:
            old, recent = Path(tmp) / "decoder_other-0123456789abcdef.mef", Path(tmp) / "step_other-0123.mef"
            old.write_bytes(b"an old version's graph")
            recent.write_bytes(b"another install's graph, in use")
            os.utime(old, (time.time() - 40 * 86400,) * 2)
            cfg = mw.Config.resolve(model="tiny.en", device="cpu", graph_cache=tmp)
            first = mw.load(config=cfg)
            self.assertEqual(set(first.graph_sources.values()), {"compiled"})
            self.assertFalse(old.exists())                                # unused for 40 days
            self.assertTrue(recent.exists())
            recent.unlink()
            files = sorted(Path(tmp).glob("*.mef"))
            self.assertEqual(len(files), len(first.graph_sources), files)
            second = mw.load(config=cfg)
            self.assertEqual(set(second.graph_sources.values()), {"stored"})
            self.assertEqual(second.transcribe(wav)["text"], want)
            encoder = next(f for f in files if f.name.startswith("encoder_"))
            encoder.write_bytes(b"not a graph")
            with self.assertLogs("maxwhisper", "WARNING") as logs:
                third = mw.load(config=cfg)
            self.assertIn(str(encoder), "\n".join(logs.output))
            self.assertEqual(third.graph_sources["encoder"], "compiled")
            self.assertGreater(encoder.stat().st_size, 100_000)          # written again
            self.assertEqual(third.transcribe(wav)["text"], want)
            self.assertEqual(mw.load(config=mw.Config.resolve(model="tiny.en", device="cpu",
                                                               graph_cache="off")).graph_sources,
                             dict.fromkeys(first.graph_sources, "compiled"))

    def test_the_digest_describes_the_code_imported_not_the_file_there_now(self):
        """A graph builder edited on disk under a running process (a deploy replacing the
        module under a server) names the graphs of processes that import the new file, not of
        this one: it would store its old graphs under the new code's name for them to load."""
        import importlib.util
        from max.driver import CPU

        def imported(path: Path, name: str):
            spec = importlib.util.spec_from_file_location(name, path)
            module = sys.modules[name] = importlib.util.module_from_spec(spec)   # (its dataclasses look it up)
            self.addCleanup(sys.modules.pop, name)
            spec.loader.exec_module(module)
            return module

        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "maxwhisper.py"
            shutil.copy(mw.__file__, copy)
            running = imported(copy, "maxwhisper_running")
            before = running._GraphStore(tmp, CPU()).digest
            copy.write_text(copy.read_text().replace("# 7. graphs\n", "# 7. graphs\n# a builder changed\n"))
            self.assertEqual(running._GraphStore(tmp, CPU()).digest, before)
            self.assertNotEqual(imported(copy, "maxwhisper_deployed")._GraphStore(tmp, CPU()).digest, before)


class RuntimeHelperTest(unittest.TestCase):
    """The thread MAX starts at a process's first graph execution is lowered to nice 19
    (``_RuntimeHelper``), once, whichever models and threads run first, and nothing else is."""

    def test_the_first_executions_lower_maxs_helper_thread_alone(self):
        """A fresh process, two models, four threads encoding at once as the process's first
        executions: every result equals a later serial one; the threads lowered are new, not
        Python's and not MAX's workers, each at nice 19 and named once; every other thread
        keeps the process's nice; later runs lower nothing more."""
        code = ("import json, os, threading, numpy as np, maxwhisper as mw\n"
                "models = [mw.load('tiny.en', device='cpu', warmup=False) for _ in range(2)]\n"
                "for m in models: m.runner.compiled('encoder')\n"
                "mel = np.random.default_rng(0).standard_normal((1, 80, 3000), dtype=np.float32)\n"
                "out = {}\n"
                "def run(k): out[k] = models[k % 2].encode(mel)[0]\n"
                "threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]\n"
                "[t.start() for t in threads]; [t.join() for t in threads]\n"
                "lowered = list(mw._RuntimeHelper.lowered)\n"
                "serial = models[0].encode(mel)[0]\n"
                "def name(t): return open(f'/proc/self/task/{t}/comm').read().strip()\n"
                "tids = [int(t) for t in os.listdir('/proc/self/task')]\n"
                "print(json.dumps({'same': [bool(np.array_equal(out[k], serial)) for k in range(4)],\n"
                "    'lowered': lowered, 'later': mw._RuntimeHelper.lowered,\n"
                "    'python': [t.native_id for t in threading.enumerate()],\n"
                "    'base': os.getpriority(os.PRIO_PROCESS, 0),\n"
                "    'threads': {t: [name(t), os.getpriority(os.PRIO_PROCESS, t)] for t in tids}}))\n")
        out = subprocess.run([sys.executable, "-c", code], cwd=support.ROOT, capture_output=True, text=True,
                             timeout=900)
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        got = json.loads(out.stdout.splitlines()[-1])
        threads = {int(t): v for t, v in got["threads"].items()}
        self.assertEqual(got["same"], [True] * 4)
        self.assertTrue(got["lowered"], threads)                  # MAX 26.7 starts one
        self.assertEqual(len(set(got["lowered"])), len(got["lowered"]))
        self.assertEqual(got["later"], got["lowered"])
        workers = [t for t, (name, _) in threads.items() if "Thread" in name]
        self.assertTrue(workers, threads)
        for tid, (name, nice) in threads.items():
            lowered = tid in got["lowered"]
            self.assertEqual(nice, 19 if lowered else got["base"], (tid, name, threads))
            if lowered:
                self.assertNotIn(tid, workers + got["python"])


class ColdStartTest(unittest.TestCase):
    """What a first load compiles and what it reports while it does."""

    @classmethod
    def setUpClass(cls):
        cls.weights = support.weights("tiny.en")

    def test_a_cpu_model_compiles_two_graphs_of_one_op_each(self):
        """The encoder and the decoder (prefill and steps) are one Mojo op each on a CPU with
        the kernels: no MAX matmul to compile before the first transcript."""
        m = mw.Model(self.weights, device="cpu", warmup=False)
        if not m.precision.packed:
            self.skipTest("no kernels/ folder")
        self.assertEqual(m.graphs_for(temperature=0.0), ["encoder", "step"])
        for name, op in (("encoder", "whisper_encoder"), ("step", "whisper_decoder_step")):
            text = str(m.runner.builders[name][1]())
            self.assertIn(op, text)
            self.assertNotIn("matmul", text)

    def test_cold_graphs_are_reported_with_the_time_left(self):
        m = mw.Model(self.weights, device="cpu", warmup=False)
        seconds = {}
        m.runner.store = mock.Mock(load=lambda session, name, build: (object(), "compiled"),
                                   has=lambda name: name.startswith("gather"),        # stored
                                   compile_seconds=lambda: {f"reorder_{m.runner.builders['reorder'][0]}": 7.0},
                                   record_compile=lambda name, s: seconds.update({name: s}))
        with self.assertLogs("maxwhisper", "INFO") as logs:
            m.runner.compile_all(["reorder", "gather"])
        text = "\n".join(logs.output)
        self.assertIn("compiling the reorder graph (once per model size and device: ~7 s; 0% of this start done, ~7 s left)", text)
        self.assertIn("reorder graph ready in", text)
        self.assertNotIn("compiling the gather graph", text)                      # loaded, not compiled
        self.assertEqual(list(seconds), [f"reorder_{m.runner.builders['reorder'][0]}"])
        self.assertEqual(m.graph_sources, {"reorder": "compiled", "gather": "compiled"})

    def test_several_cold_graphs_compile_in_child_processes_at_once(self):
        """Two graphs to compile: a child process compiles the second into the store while this
        one compiles the first; both are the model's, reported as compiled, their times kept. A
        child that fails leaves its graph to this process, with a warning naming why."""
        names = ["reorder", "gather"]
        with tempfile.TemporaryDirectory() as tmp, mock.patch.object(mw, "_cores", lambda: 2):
            m = mw.Model(self.weights, device="cpu", warmup=False, config=mw.Config.resolve(graph_cache=tmp))
            with self.assertLogs("maxwhisper", "INFO") as logs:
                m.runner.compile_all(names)
            self.assertIn("compiling the gather graph in another process", "\n".join(logs.output))
            # the log names why a child failed (its last stderr line), should one ever fail here
            self.assertEqual(m.graph_sources, dict.fromkeys(names, "compiled"), "\n".join(logs.output))
            self.assertEqual(sorted(f.name.split("_")[0] for f in Path(tmp).glob("*.mef")), sorted(names))
            self.assertEqual(len(json.loads((Path(tmp) / "compile-seconds.json").read_text())), 2)
        with tempfile.TemporaryDirectory() as tmp, mock.patch.object(mw, "_cores", lambda: 2), \
                mock.patch.object(mw, "_COMPILE_CHILD", "import sys; sys.exit('no MAX here')"):
            m = mw.Model(self.weights, device="cpu", warmup=False, config=mw.Config.resolve(graph_cache=tmp))
            with self.assertLogs("maxwhisper", "INFO") as logs:
                m.runner.compile_all(names)
            text = "\n".join(logs.output)
            self.assertIn("compiling the gather graph in another process failed (no MAX here); compiling it here", text)
            self.assertIn("compiling the gather graph (once", text)
            self.assertEqual(m.graph_sources, dict.fromkeys(names, "compiled"))

    def test_child_processes_only_where_cores_and_memory_allow(self):
        """One child per core beside this process, but only as many as the spare memory holds
        at ~1.5 GB each; the first cold graph is always this process's."""
        m = mw.Model(self.weights, device="cpu", warmup=False)
        m.runner.store = mock.Mock(load=lambda session, name, build: (object(), "compiled"), has=lambda name: False,
                                   compile_seconds=dict, record_compile=lambda name, s: None)
        spawned = []
        for cores, spare, want in ((8, 64 * 2**30, ["gather", "alignment"]), (2, 64 * 2**30, ["gather"]),
                                   (8, 2 * 2**30, ["gather"]), (8, 2**30, []), (1, 64 * 2**30, [])):
            spawned.clear()
            m.runner.graphs.clear()
            with mock.patch.object(m.runner, "_spawn", lambda name, progress: spawned.append(name)), \
                    mock.patch.object(mw, "_cores", lambda: cores), mock.patch.object(mw, "_spare_memory", lambda: spare):
                m.runner.compile_all(["reorder", "gather", "alignment"])
            self.assertEqual(spawned, want, (cores, spare))

    def test_progress_share_and_time_left(self):
        p = mw._CompileProgress({"encoder": 100.0, "step": 20.0})
        self.assertEqual(p.status(0.0), (0.0, 120.0))
        p._started["encoder"] = 0.0
        self.assertEqual(p.status(40.0), (40 / 120, 60.0 + 20.0))
        p._finished["encoder"], p._started["step"] = 90.0, 90.0
        self.assertEqual(p.status(100.0), (110 / 120, 10.0))
        share, left = p.status(500.0)                                  # late: never past 100%
        self.assertLess(share, 1.0)
        self.assertEqual(left, 1.0)
        p = mw._CompileProgress({"encoder": 100.0, "step": 20.0, "reorder": 30.0}, workers=2)
        self.assertEqual(p.status(0.0), (0.0, 100.0))                 # 150 s on 2 workers, but the encoder is 100
        p._started.update(encoder=0.0, step=0.0)
        self.assertEqual(p.status(50.0)[1], 50.0)                      # the encoder's 50 s is the longest

    def test_compile_times_are_kept_for_the_next_estimate(self):
        with tempfile.TemporaryDirectory() as tmp:
            mw._GraphStore(tmp, "cpu").record_compile("encoder_x", 81.25)
            self.assertEqual(mw._GraphStore(tmp, "cpu").compile_seconds(), {"encoder_x": 81.2})
            for bad in ("not json", "[1, 2]", '{"encoder_x": null}'):
                (Path(tmp) / "compile-seconds.json").write_text(bad)
                self.assertEqual(mw._GraphStore(tmp, "cpu").compile_seconds(), {})

    def test_the_graphs_each_configuration_needs(self):
        m = mw.Model(self.weights, device="cpu", warmup=False)
        core = ["encoder", "step"] if m.precision.packed else ["encoder", "decoder"]
        self.assertEqual(m.graphs_for(temperature=0.0), core)
        self.assertEqual(m.graphs_for(temperature=0.0, beam_size=5), core + ["reorder", "gather"])
        self.assertEqual(m.graphs_for(), core)
        self.assertEqual(m.graphs_for(best_of=5), core + ["gather"])         # samples on a fallback
        self.assertEqual(m.graphs_for(temperature=0.0, word_timestamps=True), core + ["gather", "alignment"])
        m.choose_on_device = True                                  # a GPU's: choices on the device
        self.assertEqual(m.graphs_for(temperature=0.0, beam_size=5), core + ["greedy", "reorder", "beam", "gather"])
        with self.assertRaises(mw.ConfigError):
            m.graphs_for(beams=5)


if __name__ == "__main__":
    unittest.main()
