"""The OpenAI-compatible HTTP server: formats, errors, limits, auth, batching, shutdown."""

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
import unittest

import numpy as np

import support
from support import multipart, mw


def request(address, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """(status, headers, body bytes) of one HTTP request."""
    conn = http.client.HTTPConnection(*address, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def transcribe(address, audio: bytes, headers: dict | None = None, path="/v1/audio/transcriptions", **fields):
    body, ctype = multipart(fields, audio)
    return request(address, "POST", path, body, {"Content-Type": ctype, **(headers or {})})


class ServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = support.model("tiny.en")
        cls.wavs = [w for w, _ in support.samples("en")]
        cls.audio = {w.stem: w.read_bytes() for w in cls.wavs}
        cls.server = mw.Server(mw.Config.resolve(model="tiny.en"), port=0, model=cls.model, max_batch=8)
        cls.addr = cls.server.address

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.drain(10)

    def test_every_response_format(self):
        fox = self.audio["quick_brown_fox"]
        status, headers, body = transcribe(self.addr, fox, model="whisper-1")
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body), {"text": "The quick brown fox jumps over the lazy dog."})
        status, headers, body = transcribe(self.addr, fox, response_format="text")
        self.assertEqual((status, body.decode().strip()), (200, "The quick brown fox jumps over the lazy dog."))
        self.assertTrue(headers["Content-Type"].startswith("text/plain"))
        _, _, srt = transcribe(self.addr, fox, response_format="srt")
        self.assertRegex(srt.decode(), r"^1\n00:00:00,000 --> 00:00:02,\d{3}\nThe quick brown fox")
        _, _, vtt = transcribe(self.addr, fox, response_format="vtt")
        self.assertTrue(vtt.decode().startswith("WEBVTT\n\n00:00.000 --> 00:02."))
        status, _, body = transcribe(self.addr, fox, response_format="verbose_json",
                                     **{"timestamp_granularities[]": ["segment", "word"]})
        verbose = json.loads(body)
        self.assertEqual((verbose["task"], verbose["language"]), ("transcribe", "english"))
        self.assertAlmostEqual(verbose["duration"], 2.889, places=2)
        self.assertEqual(set(verbose["segments"][0]), {"id", "seek", "start", "end", "text", "tokens", "temperature",
                                                       "avg_logprob", "compression_ratio", "no_speech_prob"})
        self.assertEqual([w["word"] for w in verbose["words"]][:3], ["The", "quick", "brown"])
        silence = support.wav_bytes(np.zeros((16000, 1)), 16000, 16)      # words asked for: a list, if empty
        _, _, body = transcribe(self.addr, silence, response_format="verbose_json",
                                **{"timestamp_granularities[]": ["word"]})
        self.assertEqual((json.loads(body)["segments"], json.loads(body)["words"]), ([], []))
        status, _, body = transcribe(self.addr, fox, path="/v1/audio/translations")
        self.assertEqual((status, json.loads(body)["text"][:9]), (200, "The quick"))

    def test_info_routes_and_metrics(self):
        self.assertEqual(request(self.addr, "GET", "/health")[0], 200)
        self.assertEqual(request(self.addr, "GET", "/ready")[0], 200)
        status, _, body = request(self.addr, "GET", "/v1/models")
        self.assertEqual({m["id"] for m in json.loads(body)["data"]}, {"tiny.en", "whisper-1"})
        status, _, body = request(self.addr, "GET", "/v1/models/whisper-1")
        self.assertEqual((status, json.loads(body)["id"]), (200, "whisper-1"))
        status, _, body = request(self.addr, "GET", "/v1/models/openai%2Fwhisper-large-v3")
        self.assertEqual((status, json.loads(body)["error"]["param"]), (404, "model"))
        self.assertIn("'openai/whisper-large-v3'", json.loads(body)["error"]["message"])
        transcribe(self.addr, self.audio["hello_world"])
        text = request(self.addr, "GET", "/metrics")[2].decode()
        self.assertRegex(text, r'maxwhisper_http_requests_total\{route="/v1/audio/transcriptions",status="200"\} \d+')
        for name in ("maxwhisper_queue_depth", "maxwhisper_request_seconds_bucket", "maxwhisper_batch_windows_count",
                     "maxwhisper_audio_seconds_total", "maxwhisper_tokens_total"):
            self.assertIn(name, text)

    def test_errors_in_openai_shape(self):
        fox = self.audio["quick_brown_fox"]
        cases = [
            ("malformed multipart", 400, request(self.addr, "POST", "/v1/audio/transcriptions", b"garbage",
                                                 {"Content-Type": "multipart/form-data; boundary=x"})),
            ("no file part", 400, transcribe(self.addr, None, model="whisper-1")),
            ("bad response_format", 400, transcribe(self.addr, fox, response_format="docx")),
            ("unreadable audio", 400, transcribe(self.addr, b"RIFF\x00\x00 not a wav")),
            ("unknown model", 400, transcribe(self.addr, fox, model="large-v9")),
            ("special token in prompt", 400, transcribe(self.addr, fox, prompt="<|endoftext|>")),
            ("unknown route", 404, request(self.addr, "GET", "/v2/nothing")),
        ]
        for what, expected, (status, headers, body) in cases:
            with self.subTest(what):
                self.assertEqual(status, expected, body)
                error = json.loads(body)["error"]
                self.assertEqual(set(error), {"message", "type", "param", "code"})
                self.assertTrue(error["message"])
        self.assertEqual(transcribe(self.addr, fox)[0], 200)            # still serving

    def test_batched_concurrent_requests_are_exact(self):
        expected = {name: json.loads(transcribe(self.addr, data)[2])["text"] for name, data in self.audio.items()}
        before = self.server.scheduler.batch_sizes.sum, self.server.scheduler.batch_sizes.count
        jobs = list(self.audio.items()) * 4
        out = [None] * len(jobs)

        def call(i, name, data):
            out[i] = (name, transcribe(self.addr, data))
        threads = [threading.Thread(target=call, args=(i, n, d)) for i, (n, d) in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name, (status, _, body) in out:
            self.assertEqual((status, json.loads(body)["text"]), (200, expected[name]))
        rounds = self.server.scheduler.batch_sizes.count - before[1]
        windows = self.server.scheduler.batch_sizes.sum - before[0]
        self.assertLess(rounds, windows, "some windows must have been decoded together")

    def test_a_failing_transcription_fails_alone(self):
        scheduler = self.server.scheduler
        s = mw._transcribe_options(self.model, {})
        good = mw._Job(mw._Transcription(self.model, self.wavs[0], s))
        bad = mw._Job(mw._Transcription(self.model, self.wavs[1], s))
        bad.transcription.mel = np.zeros((128, 6000), np.float32)      # not this model's features
        for job in (bad, good):
            scheduler.submit(job)
        self.assertTrue(good.done.wait(60) and bad.done.wait(60))
        self.assertIsNone(good.error)
        self.assertEqual(good.result["text"], self.model.transcribe(self.wavs[0])["text"])
        self.assertIsNotNone(bad.error)
        self.assertEqual(transcribe(self.addr, self.audio["hello_world"])[0], 200)


class ServerLimitsTest(unittest.TestCase):
    def setUp(self):
        self.model = support.model("tiny.en")
        self.fox = [w for w, _ in support.samples("en")][-1].read_bytes()

    def serve(self, **options):
        server = mw.Server(mw.Config.resolve(model="tiny.en"), port=0, model=self.model, **options)
        self.addCleanup(lambda: (server.shutdown(), server.drain(10)))
        return server.address

    def test_auth(self):
        addr = self.serve(api_key="s3cret")
        self.assertEqual(transcribe(addr, self.fox)[0], 401)
        self.assertEqual(transcribe(addr, self.fox, {"Authorization": "Bearer wrong"})[0], 401)
        self.assertEqual(transcribe(addr, self.fox, {"Authorization": "Bearer s3cret"})[0], 200)
        self.assertEqual(request(addr, "GET", "/v1/models")[0], 401)
        self.assertEqual(request(addr, "GET", "/health")[0], 200)

    def test_upload_limit_is_answered_not_reset(self):
        addr = self.serve(max_upload_mb=50_000 / 2**20)
        status, _, body = transcribe(addr, bytes(200_000))             # sent whole, no Expect header
        self.assertEqual(status, 413)
        self.assertIn("limit", json.loads(body)["error"]["message"])
        conn = http.client.HTTPConnection(*addr, timeout=30)
        conn.putrequest("POST", "/v1/audio/transcriptions")
        for k, v in {"Content-Length": "900000000", "Expect": "100-continue",
                     "Content-Type": "multipart/form-data; boundary=x"}.items():
            conn.putheader(k, v)
        conn.endheaders()                                              # no body: refused from the headers
        self.assertEqual(conn.getresponse().status, 413)
        conn.close()

    def test_queue_full_and_deadline(self):
        addr = self.serve(max_batch=1, queue_size=1, request_timeout=60)
        long_audio = support.long_clip().read_bytes()
        results = []
        threads = [threading.Thread(target=lambda: results.append(transcribe(addr, long_audio))) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        for t in threads:
            t.join()
        statuses = sorted(r[0] for r in results)
        self.assertIn(503, statuses)
        self.assertIn(200, statuses)
        busy = next(r for r in results if r[0] == 503)
        self.assertEqual(busy[1]["Retry-After"], "1")
        addr = self.serve(request_timeout=0.05)
        status, _, body = transcribe(addr, long_audio)
        self.assertEqual(status, 504, body)

    def test_drain_past_grace_answers_503_and_stops_decoding(self):
        server = mw.Server(mw.Config.resolve(model="tiny.en"), port=0, model=self.model)
        self.addCleanup(lambda: (server.shutdown(), server.drain(10)))
        result = []
        t = threading.Thread(target=lambda: result.append(transcribe(server.address,
                                                                     support.long_clip().read_bytes())))
        t.start()
        deadline = time.time() + 120
        while server.scheduler.depth() == 0:                   # decoding its first window
            self.assertLess(time.time(), deadline)
            time.sleep(0.05)
        server.shutdown()
        self.assertFalse(server.drain(0))
        t.join()
        self.assertFalse(server.scheduler._thread.is_alive())
        status, headers, body = result[0]
        self.assertEqual(status, 503, body)
        self.assertIn("shut down", json.loads(body)["error"]["message"])
        self.assertEqual(headers["Retry-After"], "5")
        job = mw._Job(mw._Transcription(self.model, support.samples("en")[0][0], mw._transcribe_options(self.model, {})))
        with self.assertRaises(mw._ApiError):                  # a late submit is refused, not left waiting
            server.scheduler.submit(job)

    def test_chunking_strategy_decodes_the_chunks_together(self):
        """OpenAI's ``chunking_strategy``: the audio's chunks (``chunk_batch``) go through the
        scheduler together, at most ``max_batch`` queued at a time, and the response is
        ``transcribe(..., chunk_batch=N)``'s; streamed, the deltas add up to its text."""
        long_audio = support.long_clip().read_bytes()
        expected = self.model.transcribe(str(support.long_clip()), chunk_batch=8, word_timestamps=True)
        self.assertGreaterEqual(expected["metrics"]["chunks"], 3)
        server = mw.Server(mw.Config.resolve(model="tiny.en"), port=0, model=self.model, max_batch=8)
        self.addCleanup(lambda: (server.shutdown(), server.drain(10)))
        status, _, body = transcribe(server.address, long_audio, chunking_strategy="auto", response_format="verbose_json",
                                     **{"timestamp_granularities[]": ["segment", "word"]})
        self.assertEqual(status, 200, body[:300])
        got = json.loads(body)
        self.assertEqual(got["text"], expected["text"].strip())
        self.assertEqual([(s["start"], s["end"]) for s in got["segments"]],
                         [(s["start"], s["end"]) for s in expected["segments"]])
        self.assertEqual(len(got["words"]), sum(len(s["words"]) for s in expected["segments"]))
        rounds, windows = server.scheduler.batch_sizes.count, server.scheduler.batch_sizes.sum
        self.assertLess(rounds, windows, "the chunks must have been decoded together")
        status, _, body = transcribe(server.address, long_audio, stream="true",
                                     chunking_strategy=json.dumps({"type": "server_vad", "silence_duration_ms": 500}))
        events = [json.loads(line[6:]) for line in body.decode().split("\n") if line.startswith("data: ")]
        text = self.model.transcribe(str(support.long_clip()), chunk_batch=8)["text"].strip()  # segment times only
        self.assertEqual(events[-1]["text"], text)
        self.assertGreater(len(events), 2)
        self.assertEqual("".join(e.get("delta", "") for e in events[:-1]), text)
        # three chunks through a queue of one, a window at a time: they wait their turn, no 503
        addr = self.serve(max_batch=1, queue_size=1)
        status, _, body = transcribe(addr, long_audio, chunking_strategy="auto")
        self.assertEqual((status, json.loads(body)["text"]), (200, text))
        for bad in ("sometimes", json.dumps({"type": "semantic_vad"}), "[1]", "[" * 60000):
            with self.subTest(chunking_strategy=bad[:20]):
                status, _, body = transcribe(server.address, self.fox, chunking_strategy=bad)
                self.assertEqual((status, json.loads(body)["error"]["param"]), (400, "chunking_strategy"))


class MultilingualServerTest(unittest.TestCase):
    def test_requests_languages_are_detected_together_in_the_scheduler(self):
        """Requests that name no language are detected by the scheduler, the ones it takes in
        together in one encoder run (not each alone in its handler thread, before the queue),
        and each is decoded in its own language with ``transcribe``'s text; a streamed response
        sends no delta before its language is known."""
        if not support.has_base():
            self.skipTest("the base model's packages are not installed")
        m = support.model("base")
        wavs = {lang: support.samples(lang)[0][0] for lang in ("en", "fr", "es")}
        server = mw.Server(mw.Config.resolve(model="base", seed=0), port=0, model=m, max_batch=4)
        self.addCleanup(lambda: (server.shutdown(), server.drain(10)))
        detections, probs = [], m._language_probs

        def gated(cache):          # the first detection waits for every request to be queued
            deadline = time.monotonic() + 60
            while not detections and server.scheduler.depth() < len(wavs) and time.monotonic() < deadline:
                time.sleep(0.01)
            detections.append((threading.current_thread().name, cache.batch))
            return probs(cache)

        out = {}

        def post(lang):
            fields = {"stream": "true"} if lang == "es" else {"response_format": "verbose_json"}
            out[lang] = transcribe(server.address, wavs[lang].read_bytes(), **fields)

        threads = [threading.Thread(target=post, args=(lang,)) for lang in wavs]
        m._language_probs = gated
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            del m._language_probs
        self.assertEqual({name for name, _ in detections}, {"maxwhisper-scheduler"})
        self.assertEqual(sum(n for _, n in detections), len(wavs))
        self.assertGreater(max(n for _, n in detections), 1)
        for lang, wav in wavs.items():
            status, _, body = out[lang]
            self.assertEqual(status, 200, body[:300])
            alone = m.transcribe(wav, seed=0)
            self.assertEqual(alone["language"], lang)
            if lang == "es":
                events = [json.loads(line[6:]) for line in body.decode().split("\n") if line.startswith("data: ")]
                self.assertEqual(events[-1], {"type": "transcript.text.done", "text": alone["text"].strip(),
                                              "usage": {"type": "duration", "seconds": events[-1]["usage"]["seconds"]}})
                self.assertEqual("".join(e.get("delta", "") for e in events[:-1]), alone["text"].strip())
            else:
                self.assertEqual((json.loads(body)["language"], json.loads(body)["text"]),
                                 (mw._openai("tokenizer").LANGUAGES[lang], alone["text"].strip()))


class ServeProcessTest(unittest.TestCase):
    def test_sigterm_finishes_the_request_in_flight(self):
        proc = subprocess.Popen([sys.executable, "-m", "maxwhisper", "serve", "--port", "0", "--model", "tiny.en"],
                                cwd=support.ROOT, stderr=subprocess.PIPE, text=True,
                                env={**__import__("os").environ, "PYTHONPATH": str(support.ROOT)})
        self.addCleanup(proc.stderr.close)
        self.addCleanup(proc.kill)
        line = proc.stderr.readline()
        addr = ("127.0.0.1", int(re.search(r"http://[\d.]+:(\d+)", line).group(1)))
        deadline = time.time() + 600
        while request(addr, "GET", "/ready")[0] != 200:
            self.assertLess(time.time(), deadline)
            time.sleep(0.5)
        result = []
        t = threading.Thread(target=lambda: result.append(transcribe(addr, support.long_clip().read_bytes(),
                                                                     response_format="text")))
        t.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        t.join()
        self.assertEqual(proc.wait(timeout=60), 0)
        status, _, body = result[0]
        self.assertEqual(status, 200)
        self.assertIn("printing press", body.decode())        # the second of its three windows

    def test_openai_client(self):
        try:
            from openai import OpenAI
        except ImportError:
            self.skipTest("the openai package is not installed (pip install -e '.[test]')")
        server = mw.Server(mw.Config.resolve(model="tiny.en"), port=0, model=support.model("tiny.en"),
                           api_key="k")
        self.addCleanup(lambda: (server.shutdown(), server.drain(10)))
        client = OpenAI(base_url="http://%s:%d/v1" % server.address, api_key="k")
        wav = [w for w, _ in support.samples("en")][-1]
        with open(wav, "rb") as f:
            text = client.audio.transcriptions.create(model="whisper-1", file=f).text
        self.assertEqual(text, "The quick brown fox jumps over the lazy dog.")
        with open(wav, "rb") as f:
            verbose = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                                         timestamp_granularities=["word"])
        self.assertEqual(verbose.words[1].word, "quick")
        self.assertEqual(client.models.retrieve("whisper-1").id, "whisper-1")
        self.assertEqual([m.id for m in client.models.list()], ["tiny.en", "whisper-1"])


if __name__ == "__main__":
    unittest.main()
