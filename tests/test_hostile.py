"""What a hostile or odd client can do to the server: bursts on a fresh process, memory bombs,
framing a proxy reads another way, slow and idle connections, abandoned requests, malformed
requests, and the metrics they must not break."""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path
from unittest import mock

import numpy as np

import support
from support import multipart, mw, wav_bytes

PROM_LINE = re.compile(r'^(# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+|'
                       r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*",?)*\})? '
                       r'-?[0-9.]+(e[+-]?[0-9]+)?)$')


def raw(address, data: bytes, timeout: float = 60) -> bytes:
    """Send raw bytes on a new connection; everything the server answers until it closes."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def post(address, body: bytes, content_type: str, headers: dict | None = None):
    conn = http.client.HTTPConnection(*address, timeout=120)
    try:
        conn.request("POST", "/v1/audio/transcriptions", body, {"Content-Type": content_type, **(headers or {})})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def wav_header(rate: int, data_bytes: int = 2) -> bytes:
    """A 16-bit mono WAV of ``data_bytes`` of zeros whose header says ``rate`` Hz."""
    fmt = (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + rate.to_bytes(4, "little") \
        + (0).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    body = b"WAVEfmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" + data_bytes.to_bytes(4, "little") \
        + bytes(data_bytes)
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def client_frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """One masked WebSocket frame as a client sends it."""
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else b"\xfe" + n.to_bytes(2, "big") if n < 65536 \
        else b"\xff" + n.to_bytes(8, "big")
    mask = b"\x01\x02\x03\x04"
    return bytes([(0x80 if fin else 0) | opcode]) + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class WebSocketFramesTest(unittest.TestCase):
    """The Realtime socket's framing as RFC 6455 has it, and bounded: fragments are joined
    around control frames, a message over the limit closes with 1009, and a flood of empty
    fragments is neither kept nor rescanned."""

    def socket(self, data: bytes, max_bytes: int = 1000):
        import io
        sent = []
        sock = mock.Mock(sendall=sent.append)
        return mw._WebSocket(io.BytesIO(data), sock, max_bytes), sent

    def test_fragments_are_joined_around_pings(self):
        data = client_frame(0x1, b"hel", fin=False) + client_frame(0x9, b"hi") \
            + client_frame(0x0, b"", fin=False) * 50_000 + client_frame(0x0, b"lo")
        ws, sent = self.socket(data)
        self.assertEqual(ws.receive(), "hello")
        self.assertEqual(sent, [b"\x8a\x02hi"])                    # the ping's pong, between the fragments

    def test_limits_close_the_socket(self):
        for data, code in ((client_frame(0x2, bytes(600), fin=False) + client_frame(0x0, bytes(600)), 1009),
                           (client_frame(0x1, b"\xff\xfe"), 1007),
                           (client_frame(0x0, b"x"), 1002),
                           (bytes([0x81, 0x02]) + b"hi", 1002)):           # unmasked
            ws, sent = self.socket(data)
            self.assertIsNone(ws.receive())
            self.assertEqual(sent[-1][2:4], code.to_bytes(2, "big"))


class HostileClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = support.model("tiny.en")
        cls.fox = support.samples("en")[-1][0].read_bytes()          # "The quick brown fox ..."

    def serve(self, **settings) -> mw.Server:
        server = mw.Server(mw.Config.resolve(env={}, model="tiny.en"), port=0, model=self.model, **settings)
        self.addCleanup(lambda: (server.shutdown(), server.drain(10)))
        return server

    def test_a_memory_bomb_header_is_refused_before_any_allocation(self):
        addr = self.serve().address
        for rate in (4294967295, 10_000_000):
            with self.subTest(rate=rate):
                body, ctype = multipart({}, wav_header(rate))
                status, _, answer = post(addr, body, ctype)
                self.assertEqual(status, 400, answer)
                self.assertIn(f"{rate} Hz", json.loads(answer)["error"]["message"])

    def test_the_resampler_and_the_duration_check_are_bounded(self):
        """An awkward rate (383999 Hz: 16000 filter phases) in little memory, and an hour of
        8 kHz audio refused from its header, before its samples are decoded."""
        import tracemalloc
        folder = Path(tempfile.mkdtemp(prefix="maxwhisper-bomb-"))
        awkward = folder / "awkward.wav"
        awkward.write_bytes(wav_bytes(np.zeros((40_000, 1)), 383_999, 16))
        hour = folder / "hour.wav"
        hour.write_bytes(wav_header(8000, 3600 * 8000 * 2))
        tracemalloc.start()
        try:
            self.assertEqual(len(mw.load_audio(awkward)), -(-40_000 * 16000 // 383_999))
            self.assertLess(tracemalloc.get_traced_memory()[1], 40 << 20)
            tracemalloc.reset_peak()
            with self.assertRaises(mw.CapacityError) as ctx:
                mw.load_audio(hour, max_seconds=600)
            self.assertIn("3600.0 s", str(ctx.exception))
            self.assertLess(tracemalloc.get_traced_memory()[1], 2 * hour.stat().st_size)   # the file's bytes
        finally:
            tracemalloc.stop()

    def test_the_server_bounds_audio_length_by_default(self):
        server = self.serve()
        self.assertEqual(server.config["max_audio_seconds"], 3600.0)
        self.assertEqual(server.config.sources["max_audio_seconds"], "serve default")
        body, ctype = multipart({}, wav_header(1000, 3601 * 1000 * 2))          # 7.2 MB: under the upload limit
        status, _, answer = post(server.address, body, ctype)
        self.assertEqual(status, 400, answer)
        self.assertIn("max_audio_seconds=3600", json.loads(answer)["error"]["message"])

    def test_metrics_label_known_routes_only(self):
        server = self.serve()
        for path in ('/probe"}x{', "/a", "/b", "/v1/../metrics"):
            raw(server.address, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        conn = http.client.HTTPConnection(*server.address, timeout=60)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        for line in text.strip().splitlines():
            self.assertRegex(line, PROM_LINE)
        self.assertIn('maxwhisper_http_requests_total{route="other",status="404"} 4', text)
        self.assertNotIn("probe", text)

    def test_client_input_is_a_400_with_no_internal_path(self):
        addr = self.serve().address
        nested = b"".join(b"--b%d\r\nContent-Type: multipart/form-data; boundary=b%d\r\n\r\n" % (i, i + 1)
                          for i in range(3000))
        cases = {
            "non-numeric length": b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n"
                                  b"Content-Type: multipart/form-data; boundary=b\r\n\r\n",
            "nested 3000 deep": b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                                b"Content-Type: multipart/form-data; boundary=b0\r\n\r\n--b0\r\n%s"
                                % (len(nested) + 6, nested),
        }
        for name, data in cases.items():
            with self.subTest(name):
                status, error = status_and_json(raw(addr, data))
                self.assertEqual(status, 400, error)
                self.assertNotIn("/tmp", error["error"]["message"])
        part = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n%s\r\n' % self.fox
        status, _, answer = post(addr, part + part + b"--B--\r\n", "multipart/form-data; boundary=B")
        self.assertEqual(status, 400, answer)
        self.assertIn("two 'file' parts", json.loads(answer)["error"]["message"])
        for filename in ("a\x00b.wav", "x" * 300 + ".wav", "../../etc/passwd"):
            with self.subTest(filename=filename[:20]):
                body, ctype = multipart({"response_format": "text"}, self.fox, filename=filename)
                status, _, answer = post(addr, body, ctype)
                self.assertEqual((status, answer.decode().strip()), (200, "The quick brown fox jumps over the lazy dog."))
        body, ctype = multipart({}, b"RIFF" + bytes(40), filename="../../secret.wav")
        status, _, answer = post(addr, body, ctype)
        self.assertEqual(status, 400)
        self.assertNotIn("/tmp", json.loads(answer)["error"]["message"])

    def test_a_parts_headers_are_bounded(self):
        """Content-Disposition parameters parse in time quadratic in their length (400 KB: 0.8 s),
        so a part's headers are refused past 16 KiB, before they are parsed."""
        def form(disposition: bytes) -> bytes:
            return b"--B\r\nContent-Disposition: form-data; name=\"file\"; %s\r\n\r\nRIFF\r\n--B--\r\n" % disposition
        with self.assertRaises(mw._ApiError) as ctx:
            mw._parse_multipart("multipart/form-data; boundary=B", form(b"a=b; " * 400_000))
        self.assertEqual(ctx.exception.status, 400)
        self.assertIn("headers", str(ctx.exception))
        _, audio, filename = mw._parse_multipart("multipart/form-data; boundary=B",
                                                 form(b'filename="%s"' % (b"x" * 300)))
        self.assertEqual((audio, filename), (b"RIFF", "x" * 300))

    def test_form_fields_are_the_clients_text(self):
        options = mw._form_options({"prompt": "None", "language": "en", "temperature": "0.4"}, "transcribe")
        self.assertEqual(options, {"task": "transcribe", "initial_prompt": "None", "language": "en",
                                   "temperature": (0.4,)})
        with self.assertRaises(mw._ApiError) as ctx:
            mw._form_options({"temperature": "0.2,0.4"}, "transcribe")
        self.assertEqual((ctx.exception.status, ctx.exception.param), (400, "temperature"))

    def test_framing_that_a_proxy_could_read_another_way_is_refused(self):
        addr = self.serve().address
        body, ctype = multipart({}, self.fox)
        head = f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n".encode()
        cases = {"chunked and a length": b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(body),
                 "two lengths": b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(body), len(body) - 1)}
        for name, headers in cases.items():
            with self.subTest(name):
                status, error = status_and_json(raw(addr, head + headers + b"\r\n" + body))
                self.assertEqual(status, 400, error)

    def test_connections_are_capped_and_slow_clients_dropped(self):
        addr = self.serve(max_connections=2, client_timeout=1.0).address
        idle = [socket.create_connection(addr, timeout=60) for _ in range(2)]
        time.sleep(0.3)                                          # both accepted
        status, error = status_and_json(raw(addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))
        self.assertEqual(status, 503, error)
        for s in idle:                                           # the idle ones are closed by the server
            self.assertEqual(s.recv(1), b"")
            s.close()
        drip = socket.create_connection(addr, timeout=60)
        drip.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\n")
        closed = False
        for _ in range(100):                                     # one header byte every 0.2 s
            try:
                drip.sendall(b"X")
                time.sleep(0.2)
                closed = drip.recv(1, socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                continue
            except OSError:
                closed = True
            if closed:
                break
        drip.close()
        self.assertTrue(closed, "a client dripping its headers kept its connection")
        self.assertEqual(raw(addr, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[:12],
                         b"HTTP/1.1 200")

    def test_malformed_requests_get_json_and_wrong_methods_405(self):
        addr = self.serve().address
        cases = {b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n": 414,
                 b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(120)) + b"\r\n": 431,
                 b"\x16\x03\x01 not http\r\n\r\n": 400,
                 b"PUT /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n": 405,
                 b"GET /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n\r\n": 405}
        for data, expected in cases.items():
            with self.subTest(expected=expected, start=data[:20]):
                response = raw(addr, data)
                status, error = status_and_json(response)
                self.assertEqual(status, expected, error)
                self.assertEqual(error["error"]["code"], expected)
                self.assertNotIn(b"Python", response.partition(b"\r\n\r\n")[0])
                if expected == 405:
                    self.assertIn(b"\r\nAllow: POST\r\n", response)

    def test_a_new_connection_during_drain_is_refused_at_once(self):
        server = self.serve()
        server.shutdown()
        with self.assertRaises(OSError):
            socket.create_connection(server.address, timeout=5).recv(1)

    def test_an_abandoned_request_is_cancelled(self):
        server = self.serve()
        before = self.model.metrics()["requests"]
        body, ctype = multipart({}, support.long_clip().read_bytes())
        s = socket.create_connection(server.address, timeout=60)
        s.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (ctype.encode(), len(body), body))
        deadline = time.time() + 300
        while server.scheduler.depth() == 0:                     # decoding its first window
            self.assertLess(time.time(), deadline)
            time.sleep(0.05)
        s.close()
        while server.scheduler.depth():                          # dropped at its next window
            self.assertLess(time.time(), deadline)
            time.sleep(0.05)
        self.assertEqual(server.cancelled, 1)
        self.assertEqual(self.model.metrics()["requests"], before)   # never finished
        self.assertIn("maxwhisper_requests_cancelled_total 1", server.metrics_text())

    def test_digital_silence_gives_no_text(self):
        result = self.model.transcribe(np.zeros(600 * mw.SAMPLE_RATE, np.float32))
        self.assertEqual((result["text"], result["segments"]), ("", []))
        self.assertEqual(result["metrics"]["silence_skips"], 20)

    def test_a_compile_does_not_hold_up_other_graphs(self):
        m = mw.Model(support.weights("tiny.en"), device="cpu", warmup=False)
        mel = m.log_mel(mw.load_audio(support.samples("en")[0][0]), padding=mw.N_SAMPLES)[None, :, :mw.N_FRAMES]
        m.encode(mel)                                            # the encoder graph is ready
        compiling, release = threading.Event(), threading.Event()
        real = m.runner.store.load

        def slow(session, name, build):
            if name.startswith("reorder"):
                compiling.set()
                release.wait(120)
            return real(session, name, build)

        m.runner.store = mock.Mock(load=slow)
        compile_thread = threading.Thread(target=m.runner.compiled, args=("reorder",))
        compile_thread.start()
        self.addCleanup(compile_thread.join)
        self.addCleanup(release.set)
        self.assertTrue(compiling.wait(120))
        encode_thread = threading.Thread(target=m.encode, args=(mel,))
        encode_thread.start()
        encode_thread.join(60)
        self.assertFalse(encode_thread.is_alive(), "the encoder graph waited for another graph's compile")


class FreshServerBurstTest(unittest.TestCase):
    def test_24_requests_right_after_ready(self):
        """A new process, so every lazy global (openai-whisper's modules, the tokenizer, the
        graphs) is first used by the burst itself."""
        support.model("tiny.en")                                 # the graph store is filled
        proc = subprocess.Popen([sys.executable, "-m", "maxwhisper", "serve", "--port", "0", "--model", "tiny.en"],
                                cwd=support.ROOT, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(support.ROOT)})
        self.addCleanup(proc.stderr.close)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        addr = ("127.0.0.1", int(re.search(r"http://[\d.]+:(\d+)", proc.stderr.readline()).group(1)))
        threading.Thread(target=proc.stderr.read, daemon=True).start()        # keep the pipe drained
        deadline = time.time() + 600
        while raw(addr, b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[:12] != b"HTTP/1.1 200":
            self.assertLess(time.time(), deadline)
            time.sleep(0.2)
        clips = [(w.read_bytes(), text) for w, text in support.samples("en")]
        start, results = threading.Barrier(24), [None] * 24

        def client(i):
            audio, _ = clips[i % len(clips)]
            body, ctype = multipart({"response_format": "text"}, audio)
            start.wait()
            results[i] = post(addr, body, ctype)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        expected = [support.model("tiny.en").transcribe(str(w))["text"].strip() for w, _ in support.samples("en")]
        for i, (status, _, body) in enumerate(results):
            self.assertEqual(status, 200, body)
            self.assertEqual(body.decode().strip(), expected[i % len(clips)])


if __name__ == "__main__":
    unittest.main()
