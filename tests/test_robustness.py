"""Robustness: a bad-input corpus, recovery from graph failures, threads, lazy modules."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest
from pathlib import Path
from unittest import mock

import numpy as np

import support
from support import ROOT, mw, wav_bytes

class BadInputTest(unittest.TestCase):
    """Each bad input has one documented outcome: a result, or a typed error naming the file."""

    @classmethod
    def setUpClass(cls):
        cls.model = support.model("tiny.en")
        cls.wav, cls.text = support.samples("en")[-1]           # "The quick brown fox ..."
        cls.speech = mw.load_audio(cls.wav)
        cls.dir = Path(tempfile.mkdtemp(prefix="maxwhisper-bad-"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir)

    def write(self, name, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def resampled(self, rate: int) -> np.ndarray:
        """The speech sample at another rate (numpy interpolation, independent of ours)."""
        t = np.arange(int(len(self.speech) * rate / mw.SAMPLE_RATE)) / rate
        return np.interp(t, np.arange(len(self.speech)) / mw.SAMPLE_RATE, self.speech)

    def assert_text(self, result, words=("quick", "brown", "fox")):
        text = result["text"].lower()
        self.assertNotIn("nan", text)
        for w in words:
            self.assertIn(w, text)

    def test_readable_variants_transcribe(self):
        stereo = np.stack([self.resampled(44100), self.resampled(44100)], axis=1) * 0.9
        cases = {
            "stereo 44.1 kHz 16-bit": wav_bytes(stereo, 44100, 16),
            "8-bit 8 kHz": wav_bytes(self.resampled(8000)[:, None], 8000, 8),
            "24-bit PCM 16 kHz": wav_bytes(self.speech[:, None], 16000, 24),
        }
        for what, data in cases.items():
            with self.subTest(what):
                self.assert_text(self.model.transcribe(self.write(f"{what}.wav", data)))

    def test_truncated_wav_transcribes_what_is_there_with_a_warning(self):
        data = wav_bytes(self.speech[:, None], 16000, 16)
        path = self.write("truncated.wav", data[:44 + 2 * int(1.6 * mw.SAMPLE_RATE)])
        with self.assertLogs("maxwhisper", "WARNING") as logs:
            result = self.model.transcribe(path)
        self.assertIn("truncated.wav", logs.output[0])
        self.assert_text(result, words=("quick",))

    def test_absurd_data_size_is_read_as_truncated(self):
        data = bytearray(wav_bytes(self.speech[:, None], 16000, 16))
        data[40:44] = (0xFFFFFFF0).to_bytes(4, "little")               # "4 GB" of data
        with self.assertLogs("maxwhisper", "WARNING"):
            self.assert_text(self.model.transcribe(self.write("huge.wav", bytes(data))))

    def test_empty_outcomes(self):
        zero = self.write("zero_frames.wav", wav_bytes(np.zeros((0, 1)), 16000, 16))
        ten_ms = self.write("ten_ms.wav", wav_bytes(self.speech[:160, None], 16000, 16))
        for path in (zero, ten_ms):
            with self.subTest(path.name):
                result = self.model.transcribe(path)
                self.assertEqual(result["text"].strip(), "")
                self.assertTrue(all(np.isfinite(s["avg_logprob"]) for s in result["segments"]))

    def test_unreadable_inputs_raise_audio_errors_naming_the_file(self):
        rng = np.random.default_rng(0)
        bad = wav_bytes(np.array([[0.1], [np.nan], [np.inf]]), 16000, 32, 3)
        zero_hz = bytearray(wav_bytes(self.speech[:1000, None], 16000, 16))
        zero_hz[24:28] = (0).to_bytes(4, "little")
        cases = {
            "empty file": self.write("empty.wav", b""),
            "random bytes": self.write("random.bin", rng.bytes(4096)),
            "text named .mp3": self.write("notes.mp3", b"meeting notes, not audio\n" * 20),
            "NaN/inf float WAV": self.write("nan.wav", bad),
            "0 Hz header": self.write("zero_hz.wav", bytes(zero_hz)),
            "directory": self.dir,
            "missing path": self.dir / "missing.wav",
        }
        for what, path in cases.items():
            with self.subTest(what), self.assertRaises(mw.AudioError) as ctx:
                self.model.transcribe(path)
            self.assertIn(str(path), str(ctx.exception))

    def test_wrong_arrays(self):
        for bad in (np.zeros((2, 16000), np.float32), np.zeros(16000, np.int16), np.zeros((), np.float32)):
            with self.subTest(shape=bad.shape, dtype=str(bad.dtype)), self.assertRaises(mw.AudioError):
                self.model.transcribe(bad)

    def test_too_long_audio_is_a_capacity_error(self):
        with self.assertRaises(mw.CapacityError) as ctx:
            self.model.transcribe(self.speech, max_audio_seconds=1.0)
        self.assertIn("max_audio_seconds", str(ctx.exception))

    def test_library_prints_nothing_by_default(self):
        data = wav_bytes(self.speech[:, None], 16000, 16)
        path = self.write("quiet.wav", data[:-1000])
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import maxwhisper as mw; "
                f"mw.load_audio({str(path)!r})")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        self.assertEqual((proc.returncode, proc.stderr, proc.stdout), (0, "", ""))


class RecoveryAndThreadsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = support.model("tiny.en")
        cls.clips = [wav for wav, _ in support.samples("en")]
        cls.expected = {c: cls.model.transcribe(c)["text"] for c in cls.clips}

    def test_failed_compile_then_recovery(self):
        m = mw.Model(support.weights("tiny.en"), device="cpu", warmup=False)
        real_load, calls = m.runner.store.load, []

        def flaky_load(session, name, build):
            calls.append(name)
            if len(calls) == 1:
                raise RuntimeError("simulated compiler crash")
            return real_load(session, name, build)

        m.runner.store = mock.Mock(load=flaky_load)
        with self.assertRaises(mw.DeviceError) as ctx:
            m.transcribe(self.clips[0])
        self.assertIn("encoder graph", str(ctx.exception))
        self.assertEqual(m.transcribe(self.clips[0])["text"], self.expected[self.clips[0]])

    def test_device_error_then_recovery(self):
        real = {name: self.model.runner.graphs[name] for name in ("decoder", "step") if name in self.model.runner.graphs}
        for name, graph in real.items():
            broken = mock.Mock(wraps=graph)
            fault = RuntimeError("simulated device fault")
            broken.execute.side_effect = broken._execute_device_tensors.side_effect = fault
            self.model.runner.graphs[name] = broken
        try:
            with self.assertRaises(mw.DeviceError):
                self.model.transcribe(self.clips[0])
        finally:
            self.model.runner.graphs.update(real)
        self.assertEqual(self.model.transcribe(self.clips[0])["text"], self.expected[self.clips[0]])

    def test_eight_threads_five_files_each(self):
        results, errors = {}, []

        def work(k):
            try:
                for j in range(5):
                    clip = self.clips[(k + j) % len(self.clips)]
                    results[(k, j)] = (clip, self.model.transcribe(clip)["text"])
            except Exception as e:  # collected and reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(results), 40)
        for clip, text in results.values():
            self.assertEqual(text, self.expected[clip])


class OpenAIModulesTest(unittest.TestCase):
    """openai-whisper's tokenizer is loaded without its torch-importing package __init__."""

    def fresh_process(self, code: str, cache: str):
        """What ``code``, run in a new interpreter with ``cache`` as its user cache folder,
        prints as JSON."""
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "XDG_CACHE_HOME": cache})
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        return json.loads(out.stdout)

    def test_tokenizer_without_torch(self):
        code = ("import sys, maxwhisper as mw; t = mw._openai('tokenizer').get_tokenizer(False); "
                "print(t.encode(' hello'), 'torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        self.assertEqual(out.stdout.split(), ["[23748]", "False"], out.stderr[-2000:])

    def test_non_speech_tokens_are_kept_and_safe_under_concurrent_first_use(self):
        """A fresh process, 8 threads asking at once: each gets openai-whisper's list and the
        cache file holds it; the next process reads the file (a planted list comes back), and
        a corrupt file is computed and written again."""
        code = ("import json, os, sys, threading, maxwhisper as mw\n"
                "tok = mw._openai('tokenizer').get_tokenizer(False, num_languages=99)\n"
                "got = []\n"
                "threads = [threading.Thread(target=lambda: got.append(mw._non_speech_tokens(tok))) for _ in range(8)]\n"
                "[t.start() for t in threads]; [t.join() for t in threads]\n"
                "print(json.dumps({'got': got, 'want': sorted(tok.non_speech_tokens)}))\n")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "maxwhisper" / "non_speech_tokens.json"
            first = self.fresh_process(code, tmp)
            self.assertTrue(first["want"])
            self.assertEqual(first["got"], [first["want"]] * 8)
            (key, stored), = json.loads(path.read_text()).items()
            self.assertEqual(stored, first["want"])
            path.write_text(json.dumps({key: [1, 2, 3]}))
            self.assertEqual(self.fresh_process(code, tmp)["got"], [[1, 2, 3]] * 8)
            path.write_text("{not json")
            self.assertEqual(self.fresh_process(code, tmp)["got"], [first["want"]] * 8)
            self.assertEqual(json.loads(path.read_text()), {key: first["want"]})

    def test_the_vocabulary_copy_builds_openai_whispers_encoding_once_under_concurrent_first_use(self):
        """A fresh process, 8 threads building a multilingual tokenizer at once: openai-whisper's
        get_encoding runs once, every thread gets one encoding equal to openai-whisper's, and
        the vocabulary is kept; the next process gets the same encoding from the copy without
        openai-whisper's parse, decoding without tiktoken's BPE and building it once when 8
        threads first encode; a torn copy is parsed and kept again."""
        code = ("import json, random, threading, maxwhisper as mw\n"
                "tok = mw._openai('tokenizer')\n"
                "vocabulary, calls, got = tok.get_encoding.__self__, [], []\n"
                "original = vocabulary.original\n"
                "vocabulary.original = lambda **kw: calls.append(kw) or original(**kw)\n"
                "def run(target):\n"
                "    threads = [threading.Thread(target=target) for _ in range(8)]\n"
                "    [t.start() for t in threads]; [t.join() for t in threads]\n"
                "run(lambda: got.append(tok.get_tokenizer(True, num_languages=100, language='de').encoding))\n"
                "want, e = original(name='multilingual', num_languages=100), got[0]\n"
                "random.seed(0); ids = [[random.randrange(want.n_vocab) for _ in range(20)] for _ in range(200)]\n"
                "decoded = all(e.decode(i) == want.decode(i) and e.decode_bytes(i) == want.decode_bytes(i) for i in ids)\n"
                "special = [(e.encode_single_token(t), t in e.special_tokens_set) for t in want.special_tokens_set]\n"
                "decoded &= special == [(want.encode_single_token(t), True) for t in want.special_tokens_set]\n"
                "lazy = getattr(e, '_built', 'not kept') is None and e.encode(' ') == want.encode(' ') == [220]\n"
                "lazy &= getattr(e, '_built', 'not kept') is None\n"
                "encoded = []; run(lambda: encoded.append((e.encode(' Grüße, world!'), id(e._tiktoken()) if lazy else 0)))\n"
                "print(json.dumps({'calls': len(calls), 'objects': len({id(e) for e in got}), 'threads': len(got),\n"
                "    'same': e.__getstate__() == want.__getstate__() and e.n_vocab == want.n_vocab and e.eot_token == want.eot_token,\n"
                "    'decoded': decoded, 'lazy': lazy, 'built': len({b for _, b in encoded}),\n"
                "    'tokens': [t for t, _ in encoded] == [want.encode(' Grüße, world!')] * 8}))\n")
        with tempfile.TemporaryDirectory() as tmp:
            first = self.fresh_process(code, tmp)
            self.assertEqual(first, {"calls": 1, "objects": 1, "threads": 8, "same": True, "decoded": True,
                                     "lazy": False, "built": 1, "tokens": True})
            (copy,) = Path(tmp, "maxwhisper", "tokenizer").iterdir()
            kept = {**first, "calls": 0, "lazy": True}
            self.assertEqual(self.fresh_process(code, tmp), kept)
            copy.write_bytes(copy.read_bytes()[:1000])
            self.assertEqual(self.fresh_process(code, tmp), first)
            self.assertEqual(self.fresh_process(code, tmp), kept)

    def test_a_module_importing_its_package_falls_back_to_the_import(self):
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "tokenizer.py").write_text("from .utils import format_timestamp\n")
            saved = sys.modules.pop("_maxwhisper_openai_tokenizer", None)
            try:
                with mock.patch.object(mw, "_openai_dir", lambda: Path(tmp)), \
                        mock.patch.dict(mw._OPENAI_MODULES, clear=True):
                    module = mw._openai("tokenizer")
                self.assertEqual(module.__name__, "whisper.tokenizer")
                self.assertTrue(callable(module.get_tokenizer))
            finally:
                sys.modules.pop("_maxwhisper_openai_tokenizer", None)
                if saved is not None:
                    sys.modules["_maxwhisper_openai_tokenizer"] = saved


if __name__ == "__main__":
    unittest.main()
