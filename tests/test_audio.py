"""Audio input: the WAV reader, the resampler, the ffmpeg path and typed errors."""

import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

import numpy as np

from support import mw, wav_bytes

RATE = 16000


class AudioTest(unittest.TestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="maxwhisper-audio-"))
        self.addCleanup(shutil.rmtree, self.dir)

    def write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def tone(self, rate: int, seconds: float = 0.5, freq: float = 440.0) -> np.ndarray:
        t = np.arange(int(rate * seconds)) / rate
        return (0.5 * np.sin(2 * np.pi * freq * t))[:, None]

    def test_every_pcm_width_and_float(self):
        x = self.tone(RATE)
        for bits, tag, tol in ((8, 1, 1e-2), (16, 1, 1e-4), (24, 1, 1e-6), (32, 1, 1e-7), (32, 3, 1e-7)):
            with self.subTest(bits=bits, tag=tag):
                y = mw.load_audio(self.write(f"t{bits}_{tag}.wav", wav_bytes(x, RATE, bits, tag)))
                self.assertEqual(y.dtype, np.float32)
                self.assertEqual(y.shape, (len(x),))
                self.assertLess(np.abs(y - x[:, 0]).max(), tol)

    def test_stereo_is_mixed_to_mono(self):
        left, right = self.tone(RATE, freq=300), self.tone(RATE, freq=500)
        y = mw.load_audio(self.write("stereo.wav", wav_bytes(np.hstack([left, right]), RATE, 16)))
        np.testing.assert_allclose(y, (left[:, 0] + right[:, 0]) / 2, atol=1e-4)

    def test_resampler_keeps_a_tone_and_removes_alias(self):
        for rate in (8000, 11025, 22050, 44100, 44101, 48000):     # 44101: 16000 phases
            with self.subTest(rate=rate):
                x = self.tone(rate, seconds=1.0, freq=1000.0)
                y = mw.load_audio(self.write(f"r{rate}.wav", wav_bytes(x, rate, 32, 3)))
                self.assertAlmostEqual(len(y), RATE, delta=1)
                t = np.arange(len(y)) / RATE
                ref = 0.5 * np.sin(2 * np.pi * 1000.0 * t)
                mid = slice(800, len(y) - 800)               # away from the zero-padded edges
                self.assertLess(np.abs(y[mid] - ref[mid]).max(), 5e-3)
        # a 10 kHz tone is above the 8 kHz Nyquist limit of 16 kHz audio: it must vanish
        x = self.tone(48000, seconds=1.0, freq=10000.0)
        y = mw.load_audio(self.write("alias.wav", wav_bytes(x, 48000, 32, 3)))
        self.assertLess(np.sqrt(np.mean(y[800:-800] ** 2)), 5e-3)

    def test_truncated_data_chunk_decodes_what_is_there(self):
        data = wav_bytes(self.tone(RATE), RATE, 16)
        with self.assertLogs("maxwhisper", "WARNING"):
            y = mw.load_audio(self.write("cut.wav", data[:-1001]))
        self.assertEqual(len(y), (len(data) - 44 - 1001) // 2)

    def test_zero_frames_is_empty(self):
        y = mw.load_audio(self.write("empty.wav", wav_bytes(np.zeros((0, 1)), RATE, 16)))
        self.assertEqual(len(y), 0)

    def test_errors_name_the_file(self):
        cases = {
            "missing": self.dir / "nope.wav",
            "directory": self.dir,
            "nan": self.write("nan.wav", wav_bytes(np.array([[0.0], [np.nan]]), RATE, 32, 3)),
            "overflowing": self.write("loud.wav", wav_bytes(np.array([[0.0], [1e30]]), RATE, 32, 3)),
            "bad format": self.write("alaw.wav", wav_bytes(self.tone(RATE), RATE, 8, 6)),
            "no data": self.write("nodata.wav", b"RIFF\x04\x00\x00\x00WAVE"),
        }
        for what, path in cases.items():
            with self.subTest(what), self.assertRaises(mw.AudioError) as ctx:
                mw.load_audio(path)
            self.assertIn(str(path), str(ctx.exception))

    def test_arrays(self):
        x = np.zeros(100, np.float64)
        self.assertEqual(mw.load_audio(x).dtype, np.float32)
        np.testing.assert_array_equal(mw.load_audio(np.full(4, 32768.0)), 32768.0)   # int16's scale, as whisper takes
        for bad in (np.zeros((2, 100), np.float32), np.zeros(100, np.int16), np.full(100, 1e30, np.float32)):
            with self.subTest(shape=bad.shape, dtype=bad.dtype), self.assertRaises(mw.AudioError):
                mw.load_audio(bad)
        import torch                                  # openai-whisper takes tensors too
        x = torch.linspace(-1, 1, 100)
        np.testing.assert_array_equal(mw.load_audio(x), x.numpy())
        for bad in ([0.0] * 100, b"RIFF", 16000):
            with self.subTest(type=type(bad).__name__), self.assertRaises(mw.AudioError) as ctx:
                mw.load_audio(bad)
            self.assertIn(type(bad).__name__, str(ctx.exception))

    @unittest.skipUnless(shutil.which("ffmpeg"), "ffmpeg is not installed")
    def test_other_formats_go_through_ffmpeg(self):
        wav = self.write("tone.wav", wav_bytes(self.tone(RATE, seconds=1.0), RATE, 16))
        flac = self.dir / "tone.flac"
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(wav), str(flac)], check=True)
        y = mw.load_audio(flac)
        self.assertLess(np.abs(y - mw.load_audio(wav)).max(), 1e-3)
        fake = self.write("notes.mp3", b"this is text, not audio\n")
        with self.assertRaises(mw.AudioError) as ctx:
            mw.load_audio(fake)
        self.assertIn("notes.mp3", str(ctx.exception))


if __name__ == "__main__":
    unittest.main()
