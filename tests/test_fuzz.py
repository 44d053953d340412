"""Seeded fuzzing of the two parsers that take bytes from strangers: the WAV reader (with the
resampler behind it) and the multipart form parser. Each mutated input must give a result or a
typed error; a hang trips an alarm, and the run's peak memory (its own process, so nothing
else counts; Linux's VmHWM) must stay under a bound."""

import json
import random
import signal
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np

from support import ROOT, multipart, mw, wav_bytes

HANG_SECONDS = 30          # not a speed limit: only an input that never returns trips it


def _mutate(rng: random.Random, data: bytes, tokens: list[bytes]) -> bytes:
    """One to four random edits: byte flips, a 4-byte field set to an extreme value, a cut, a
    duplicated or deleted span, or a structural token inserted."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind, at = rng.randrange(6), rng.randrange(len(b) + 1)
        if kind == 0 and b:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == 1 and len(b) >= 4:
            at = rng.randrange(len(b) - 3)
            value = rng.choice([0, 1, 2, 67, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 383999, 10_000_000,
                                rng.randrange(1 << 32)])
            b[at:at + 4] = value.to_bytes(4, "little")
        elif kind == 2:
            del b[at:]
        elif kind == 3:
            b[at:at] = b[at:at + rng.randint(1, 512)] * rng.randint(1, 4)
        elif kind == 4:
            del b[at:at + rng.randint(1, 64)]
        else:
            b[at:at] = rng.choice(tokens) * rng.randint(1, 50)
    return bytes(b)


def _hung(*_):
    raise AssertionError(f"a parser ran past {HANG_SECONDS} s on one input")


def _each(inputs, check) -> dict:
    """Run ``check`` on every (input, context); count the outcomes by name."""
    signal.signal(signal.SIGALRM, _hung)
    outcomes: dict = {}
    for data, context in inputs:
        signal.alarm(HANG_SECONDS)
        try:
            outcome = check(data, context)
        except Exception as e:  # the failure the fuzzing looks for: keep the input
            path = Path(tempfile.mkdtemp(prefix="maxwhisper-fuzz-")) / "input.bin"
            path.write_bytes(data)
            raise AssertionError(f"{type(e).__name__}: {e} ({context!r}; input kept in {path})") from e
        finally:
            signal.alarm(0)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def fuzz_wav(n: int) -> dict:
    """``load_audio`` on ``n`` mutated WAV files (60 s of audio at most: 3.8 MB of samples)."""
    rng, gen = random.Random(1234), np.random.default_rng(0)
    tone = np.sin(np.arange(4000) * 0.05)[:, None] * 0.5
    seeds = [wav_bytes(tone, 8000, bits) for bits in (8, 16, 24, 32)]
    seeds += [wav_bytes(tone, 22050, 32, fmt_tag=3), wav_bytes(np.hstack([tone, tone]), 44100, 16),
              wav_bytes(gen.uniform(-1, 1, (3000, 1)), 11025, 16)]
    tokens = [b"RIFF", b"WAVE", b"fmt ", b"data", b"LIST", b"\xfe\xff", b"\x00" * 8]
    path = Path(tempfile.mkdtemp(prefix="maxwhisper-fuzz-wav-")) / "x.wav"

    def check(data: bytes, _) -> str:
        path.write_bytes(data)
        try:
            x = mw.load_audio(path, max_seconds=60)
        except (mw.AudioError, mw.CapacityError) as e:
            return type(e).__name__
        assert x.dtype == np.float32 and x.ndim == 1 and len(x) <= 61 * mw.SAMPLE_RATE, (x.dtype, x.shape)
        return "samples"

    return _each(((_mutate(rng, rng.choice(seeds), tokens) if i else seeds[0], None) for i in range(n)), check)


def fuzz_multipart(n: int) -> dict:
    """``_parse_multipart`` on ``n`` mutated form bodies and content types."""
    rng = random.Random(99)
    seeds = [multipart(fields, b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(200))
             for fields in ({}, {"model": "whisper-1", "language": "en"},
                            {"timestamp_granularities[]": ["word", "segment"], "response_format": "srt"})]
    boundary = seeds[0][1].split("boundary=")[1].encode()
    tokens = [b"\r\n--" + boundary, b"\r\n--" + boundary + b"--", b"\r\n\r\n", b"\r\n",
              b"Content-Disposition: form-data; name=\"file\"; filename=\"a\x00b.wav\"\r\n",
              b"Content-Type: multipart/mixed; boundary=" + boundary + b"\r\n"]
    nested = b"".join(b"--b%d\r\nContent-Type: multipart/form-data; boundary=b%d\r\n\r\n" % (i, i + 1)
                      for i in range(3000))
    seeds.append((b"--b0\r\n" + nested, "multipart/form-data; boundary=b0"))
    headers = ["multipart/form-data; boundary=", 'multipart/form-data; boundary="x;y"', "text/plain",
               "multipart/form-data; boundary=" + "b" * 71, "multipart/form-data; boundary*=utf-8''%FF"]

    def check(data: bytes, ctype: str) -> str:
        try:
            fields, audio, _ = mw._parse_multipart(ctype, data)
        except mw._ApiError as e:
            assert e.status == 400, e.message
            return "400"
        assert isinstance(fields, dict) and (audio is None or isinstance(audio, bytes))
        return "form"

    def inputs():
        for i in range(n):
            body, ctype = rng.choice(seeds)
            if i and rng.random() < 0.1:
                ctype = rng.choice(headers)
            yield (_mutate(rng, body, tokens) if i else body), ctype

    return _each(inputs(), check)


class FuzzTest(unittest.TestCase):
    def fuzz(self, which: str, n: int) -> dict:
        proc = subprocess.run([sys.executable, __file__, which, str(n)], capture_output=True, text=True,
                              timeout=1800, cwd=ROOT)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        report = json.loads(proc.stdout)
        self.assertEqual(sum(report["outcomes"].values()), n)
        return report

    def test_wav_reader(self):
        report = self.fuzz("wav", 3000)
        self.assertGreater(report["outcomes"].get("samples", 0), 100, report)     # not all refused
        self.assertLess(report["max_rss_mb"], 400, report)

    def test_multipart_parser(self):
        report = self.fuzz("multipart", 3000)
        self.assertGreater(report["outcomes"].get("form", 0), 100, report)
        self.assertLess(report["max_rss_mb"], 300, report)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("wav", "multipart"):
        counts = (fuzz_wav if sys.argv[1] == "wav" else fuzz_multipart)(int(sys.argv[2]))
        # VmHWM, not getrusage's ru_maxrss: that one keeps the parent's peak across fork and exec
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        rss_mb = int(hwm.split()[1]) / 1024
        print(json.dumps({"outcomes": counts, "max_rss_mb": round(rss_mb, 1)}))
    else:
        unittest.main()
