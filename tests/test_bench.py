"""bench.py smoke tests: each command runs end to end on a short clip (no timing assertions)."""

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np

import support
from support import mw

ROOT = Path(__file__).resolve().parent.parent
PROBE_KERNELS = ROOT / "bench_kernels"                       # bench.py's read-rate probe op


def bench(*args):
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise AssertionError(f"bench.py {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


class BenchSmokeTest(unittest.TestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="maxwhisper-bench-test-"))
        self.addCleanup(shutil.rmtree, self.dir)
        support.model("tiny.en")                                 # compile before the workers start

    def test_compare_one_clip(self):
        wav, text = support.samples("en")[-1]
        out = self.dir / "compare.json"
        proc = bench("compare", "--audio", wav, "--engines",
                     "maxwhisper,openai,faster-whisper-int8,maxwhisper-chunked,faster-whisper-batched",
                     "--repeats", "1", "--threads", "2", "--chunk-batch", "2", "--json", out)
        result = json.loads(out.read_text())
        engines = result["engines"]
        self.assertIn("maxwhisper", engines)
        self.assertIn("openai", engines)
        self.assertIn("maxwhisper-chunked", engines)
        if importlib.util.find_spec("faster_whisper") is None:
            for name in ("faster-whisper-int8", "faster-whisper-batched"):
                self.assertIn(name, result["skipped"])
                self.assertIn(f"skipping {name}", proc.stderr)
        for name, e in engines.items():
            with self.subTest(engine=name):
                self.assertGreater(e["wall_s"], 0)
                self.assertEqual(e["wer"], 0.0, e["texts"])
                self.assertGreater(e["tokens_per_s"], 0)
                self.assertGreater(e["peak_rss_mb"], 0)
        self.assertEqual(engines["maxwhisper"]["wall_ratio_to_first"], 1.0)
        self.assertIn("| maxwhisper |", proc.stdout)

    def test_stream_replays_through_the_api_and_the_websocket(self):
        try:
            import websockets  # noqa: F401
        except ImportError:
            self.skipTest("websockets is not installed (pip install websockets)")
        copies = {}
        for wav, text in support.samples("en"):
            copies[wav.stem] = self.dir / wav.name                # a .txt beside it is its reference
            shutil.copy(wav, copies[wav.stem])
            copies[wav.stem].with_suffix(".txt").write_text(text)
        copy = copies["quick_brown_fox"]
        out = self.dir / "stream.json"
        bench("stream", "--audio", copy, copies["counting"], "--concurrency", "1", "--ws-minutes", "0.1",
              "--memory-minutes", "0.1", "--memory-step", "1", "--json", out)
        result = json.loads(out.read_text())
        row = result["clips"][0]
        self.assertGreater(row["words_matched"], 5)
        self.assertIn("brown fox", row["text"].lower())
        self.assertEqual(result["clips"][1]["clip"], "counting.wav")
        # all: every clip's errors over every clip's words, so between the two clips' WERs
        wers = sorted(r["wer_stream"] for r in result["clips"])
        self.assertTrue(wers[0] <= result["all"]["wer_stream"] <= wers[1], (wers, result["all"]))
        self.assertEqual([r["streams"] for r in result["websocket"]], [1])
        ws = result["websocket"][0]
        self.assertGreater(ws["median_latency"], 0)
        # up to 6 s of the clips one after another: both
        self.assertAlmostEqual(ws["audio_seconds"], row["seconds"] + result["clips"][1]["seconds"])
        self.assertTrue(math.isfinite(ws["latency_drift"]))
        # five beams, fed random steps of 0.5-1 s without waiting: commits are timed in audio
        # fed; a clip without a reference text is scored against --reference-model's transcript
        bare = self.dir / "bare" / copy.name
        bare.parent.mkdir()
        shutil.copy(copy, bare)
        bench("stream", "--audio", copy, bare, "--unpaced", "--step-max", "1", "--seed", "2", "--beam-size", "5",
              "--reference-model", "tiny.en", "--concurrency", "", "--json", out)
        result = json.loads(out.read_text())
        row = result["clips"][0]
        self.assertEqual((result["paced"], result["beam_size"], result["step_max"], result["seed"]), (False, 5, 1.0, 2))
        self.assertIn("brown fox", row["text"])
        self.assertLessEqual(row["p95_latency"], row["seconds"])
        self.assertEqual([r["wer_against"] for r in result["clips"]], ["reference", "tiny.en offline"])

    def test_coldstart_with_empty_caches(self):
        """The Quick start's command with a fresh compile cache and graph store: it compiles the
        two one-op graphs, says so, and prints the sample's words; then warm, and a cold server."""
        text = dict((w.stem, t) for w, t in support.samples("en"))["quick_brown_fox"]
        out = self.dir / "coldstart.json"
        proc = bench("coldstart", "--model", "tiny.en", "--repeats", "1", "--json", out)
        result = json.loads(out.read_text())["models"]["tiny.en"]
        self.assertEqual(len(result["transcripts"]), 1)
        self.assertEqual(support.word_errors(text, result["transcripts"][0], english=True)[0], 0)
        if (mw.KERNELS_DIR / "encoder.mojo").is_file():
            self.assertEqual(set(result["graph_compile_s"]), {"encoder", "step"})
        self.assertGreater(result["server_ready_cold_s"], 0)
        self.assertEqual(len(result["warm_s"]), 1)
        self.assertIn("| tiny.en |", proc.stdout)

    def test_scaling_and_stress(self):
        out = self.dir / "scaling.json"
        bench("scaling", "--positions", "10,50", "--steps", "3", "--kernels", "off", "--json", out)
        result = json.loads(out.read_text())
        self.assertEqual(set(result["step_ms"]), {"10", "50"})
        self.assertIs(result["kernels"], False)
        self.assertEqual(set(result["fraction_of_bandwidth_limit"]), {"10", "50"})
        self.assertEqual(len(result["bandwidth_probes_gbs"]), 3)          # before, then after each position
        readers = {"max_all_cores", "mojo_all_cores"} if (PROBE_KERNELS / "probe.mojo").is_file() else {"max_all_cores"}
        self.assertEqual(set(result["bandwidth_probes_gbs"][0]), readers)
        probed = [max(r.values()) for r in result["bandwidth_probes_gbs"]]
        for p, rate in result["bandwidth_gbs"].items():
            self.assertIn(rate, probed, p)
        out = self.dir / "stress.json"
        bench("stress", "--repeats", "2", "--json", out)
        result = json.loads(out.read_text())
        self.assertEqual({k: v["length"] for k, v in result["decodes"].items()},
                         {"50": 50, "100": 100, "200": 200, "440": 440})
        self.assertTrue(result["capacity_error_past_448"])

    def test_archive_runs_every_way_on_the_same_files(self):
        out = self.dir / "archive.json"
        wavs = [w for w, _ in support.samples("en")]
        proc = bench("archive", "--audio", *wavs, "--files", "5", "--batch", "2", "--repeats", "1", "--json", out)
        ways = json.loads(out.read_text())["ways"]
        self.assertEqual(set(ways), {"chunks", "each, prompt lengths apart", "transcribe_each"})
        for name, way in ways.items():
            with self.subTest(way=name):
                self.assertTrue(way["same_tokens"])
                self.assertEqual(way["windows_per_batch"] * way["encoder_batches"], 5)   # a window each
                self.assertEqual(way["windows_per_decoder_batch"] * way["decoder_batches"], 5)
        self.assertEqual(ways["transcribe_each"]["encoder_batches"], 3)
        self.assertIn("| transcribe_each |", proc.stdout)

    def test_sizes_runs_each_engine_on_the_same_random_checkpoint(self):
        out = self.dir / "sizes.json"
        bench("sizes", "--model", "tiny.en", "--repeats", "1", "--steps", "4", "--json", out,
              "--engines", "maxwhisper,maxwhisper-nice0,maxwhisper-q4_0,openai,faster-whisper-fp32,faster-whisper-int8")
        runs = json.loads(out.read_text())["runs"]
        self.assertEqual([(r["engine"], r["precision"]) for r in runs],
                         [("maxwhisper", "float32"), ("maxwhisper-nice0", "float32"), ("maxwhisper-q4_0", "q4_0"),
                          ("openai", "float32"), ("faster-whisper-fp32", "float32"), ("faster-whisper-int8", "int8")])
        self.assertTrue(all(0 < r["rss_mb"] <= r["peak_rss_mb"] for r in runs))
        self.assertTrue(all(r["encode_ms"] > 0 and r["step_ms"] > 0 for r in runs))
        self.assertGreater(runs[0]["load_peak_over_weights"], 0)
        self.assertGreater(runs[0]["threads_lowered"], 0)      # MAX's polling thread, at nice 19
        self.assertEqual(runs[1]["threads_lowered"], 0)        # left as MAX starts it

    def test_throughput_runs_each_engine_on_the_same_windows(self):
        out = self.dir / "throughput.json"
        proc = bench("throughput", "--model", "tiny.en", "--device", "cpu", "--dtype", "float32", "--batch", "1,2",
                     "--windows", "2", "--tokens", "6", "--repeats", "1", "--json", out)
        result = json.loads(out.read_text())
        self.assertEqual(result["failed"], {})              # a worker fails when a window gets other than 6 tokens
        self.assertEqual([(r["engine"], r["batch"]) for r in result["runs"]],
                         [(e, b) for e in ("maxwhisper", "transformers", "openai") for b in (1, 2)])
        for r in result["runs"]:
            self.assertEqual(r["windows"], 2)
            self.assertAlmostEqual(r["x_real_time"], 2 * 30 / r["seconds"])
            self.assertGreater(r["peak_memory_mb"], 0)
        best = max(r["x_real_time"] for r in result["runs"] if r["engine"] != "maxwhisper")
        self.assertAlmostEqual(result["runs"][0]["x_best_peer"], result["runs"][0]["x_real_time"] / best)
        self.assertIn("| tiny.en | transformers | 2 |", proc.stdout)

    def test_random_weights_have_the_checkpoints_names_and_shapes(self):
        import bench as b
        for name in ("tiny.en", "base"):
            try:
                real = mw.load_weights(name)
            except mw.ModelError:
                continue                       # base ships in an optional package
            with self.subTest(model=name):
                fake = b.random_weights(name)
                self.assertEqual(fake.dims, real.dims)
                self.assertEqual({k: v.shape for k, v in fake.state.items()},
                                 {k: v.shape for k, v in real.state.items()})
        with self.assertRaises(mw.ConfigError):
            b.random_weights("tiny.fr")

    def test_scaling_with_random_weights(self):
        out = self.dir / "scaling_random.json"
        bench("scaling", "--weights", "random", "--positions", "10,400", "--steps", "2", "--kernels", "on",
              "--batch", "2", "--json", out)
        result = json.loads(out.read_text())
        self.assertEqual((result["weights"], result["batch"], result["kernels"]), ("random", 2, True))
        self.assertIsNone(result["device_graphs"])                       # a CPU has none
        self.assertEqual(set(result["step_ms"]), {"10", "400"})
        self.assertTrue(all(v > 0 for v in result["step_ms"].values()))
        self.assertEqual(set(result["first_step_ms"]), {"10", "400"})

    def test_step_bytes_count_every_weight(self):
        """The bandwidth bound's bytes: the decoder's matrices and embedding as the packed step
        op takes them, plus float32 cross K/V and the filled self K/V."""
        import bench as b
        from max.graph import DeviceRef
        dims = mw.load_weights("tiny.en").dims
        vectors, matrices = mw._step_weight_types(dims, DeviceRef.CPU())
        d, L = dims["n_text_state"], dims["n_text_layer"]
        frames = 2 * dims["n_audio_ctx"] * d * L
        self.assertEqual(b.step_bytes(dims, 3, 9), 4 * (int(matrices.shape[0]) + 3 * frames + 3 * 2 * 10 * d * L))

    def test_a_clips_reference_is_its_txt_or_its_nist_stm(self):
        import bench as b
        clip = self.dir / "call.wav"
        self.assertIsNone(b.reference_text(clip))
        (self.dir / "call.stm").write_text(";; a comment\ncall 1 A 6.68 7.16 Hello?\n"
                                           "call 1 B 7.63 8.15 Oh, hello there.\n\n")
        self.assertEqual(b.reference_text(clip), "Hello? Oh, hello there.")
        (self.dir / "call.txt").write_text("Hi.")
        self.assertEqual(b.reference_text(clip), "Hi.")

    def test_word_error_rate(self):
        self.assertEqual(support.word_errors("The quick brown fox.", "the quick, brown fox", english=True), (0, 4))
        self.assertEqual(support.word_errors("the quick brown fox", "the slow brown dog cat", english=False), (3, 4))


@unittest.skipUnless((PROBE_KERNELS / "probe.mojo").is_file(), "bench_kernels/ is not present")
class StreamSumOpTest(unittest.TestCase):
    """whisper_stream_sum, bench.py's memory read probe: the sum of every element, the runs
    split over the cores with their tails, down to tensors smaller than one vector."""

    def test_sum(self):
        from max.driver import Buffer
        from max.graph import Graph, ops
        from max import engine
        from max.driver import CPU
        from max.dtype import DType
        from max.graph import DeviceRef, TensorType
        session, dev = engine.InferenceSession(devices=[CPU()]), DeviceRef.CPU()
        f32 = lambda shape: TensorType(DType.float32, shape, device=dev)          # noqa: E731
        with Graph("stream_sum", input_types=[f32(["r", "c"])], custom_extensions=[PROBE_KERNELS]) as g:
            g.output(ops.custom("whisper_stream_sum", dev, [g.inputs[0].tensor], out_types=[f32([1])])[0].tensor)
        model = session.load(g)
        rng = np.random.default_rng(3)
        for shape in ((1, 1), (3, 5), (7, 64), (1000, 1003), (128, 8192)):
            with self.subTest(shape=shape):
                x = rng.random(shape, dtype=np.float32) - 0.25
                got = model.execute(Buffer.from_numpy(x))[0].to_numpy()[0]
                self.assertAlmostEqual(float(got), float(x.sum(dtype=np.float64)), delta=1e-5 * x.size)


if __name__ == "__main__":
    unittest.main()
