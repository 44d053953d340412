"""The Mojo kernels (kernels/attention.mojo, step.mojo) against numpy, and kernels on vs off."""

import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import numpy as np

import support
from support import mw


def reference(q, k_t, v, lengths):
    """softmax(q k / 8) v over the first lengths[t] keys, for q [B,T,>=h*64] (heads side by side
    in the first h*64 columns), k_t [B,h,64,S], v [B,h,S,64]; [B,T,h*64] like the ops."""
    b, h = k_t.shape[:2]
    heads = q[:, :, :h * 64].reshape(b, -1, h, 64)
    out = np.zeros((b, len(lengths), h, 64))
    for t, n in enumerate(lengths):
        s = np.einsum("bhd,bhdj->bhj", heads[:, t].astype(np.float64), k_t[..., :n]) / 8.0
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, t] = np.einsum("bhj,bhjd->bhd", p / p.sum(-1, keepdims=True), v[:, :, :n])
    return out.reshape(b, len(lengths), h * 64)


def _session(device: str):
    """The MAX device named ``device``, its graph DeviceRef, an InferenceSession on it and a
    maker of float32 tensor types on it."""
    from max import engine
    from max.dtype import DType
    from max.graph import DeviceRef, TensorType
    dev = mw._pick_device(device)
    ref = DeviceRef.from_device(dev)
    return dev, ref, engine.InferenceSession(devices=[dev]), lambda shape: TensorType(DType.float32, shape, device=ref)


@unittest.skipUnless((mw.KERNELS_DIR / "attention.mojo").is_file(), "kernels/ is not present")
class AttentionOpTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from max.dtype import DType
        from max.graph import BufferType, Graph, TensorType, ops
        cls.device, dev, session, f32 = _session(support.DEVICE)
        cls.graphs = {}
        for kv in (DType.float32, DType.bfloat16):
            with Graph(f"attention_op_{kv}",
                       input_types=[f32(["b", "t", "c"]), TensorType(kv, ["b", "h", 64, "s"], device=dev),
                                    TensorType(kv, ["b", "h", "s", 64], device=dev),
                                    TensorType(DType.int64, ["t"], device=dev)],
                       custom_extensions=[mw.KERNELS_DIR]) as g:
                q, k_t, v, n = (x.tensor for x in g.inputs)
                out = f32([q.shape[0], q.shape[1], k_t.shape[1] * 64])
                g.output(ops.custom(name="whisper_attention", device=dev, values=[q, k_t, v, n],
                                    out_types=[out])[0].tensor)
            cls.graphs[str(kv).split(".")[-1]] = session.load(g)
        with Graph("self_attention_op",
                   input_types=[f32(["b", 1, "c"]), BufferType(DType.float32, ["b", "h", 64, "s"], device=dev),
                                BufferType(DType.float32, ["b", "h", "s", 64], device=dev),
                                TensorType(DType.int64, [1], device=dev), TensorType(DType.int64, ["b"], device=dev)],
                   custom_extensions=[mw.KERNELS_DIR]) as g:
            qkv, k_cache, v_cache, n, starts = g.inputs
            out = f32([qkv.tensor.shape[0], 1, k_cache.shape[1] * 64])
            g.output(ops.inplace_custom("whisper_self_attention", dev, [qkv, k_cache, v_cache, n, starts],
                                        out_types=[out])[0].tensor)
        cls.graphs["self"] = session.load(g)

    def run_op(self, batch, heads, keys, lengths, kv="float32", columns=None):
        """The op's output and numpy's for random inputs (q rows of ``columns`` floats, heads *
        64 by default); bfloat16 K/V are compared with numpy on the same rounded values (the
        op widens them to float32 exactly)."""
        import torch
        from max.driver import Buffer
        rng = np.random.default_rng(batch * 1000 + heads + keys + lengths[0])
        q = rng.standard_normal((batch, len(lengths), columns or heads * 64), dtype=np.float32)
        k_t = rng.standard_normal((batch, heads, 64, keys), dtype=np.float32) * 3   # peaky softmax
        v = rng.standard_normal((batch, heads, keys, 64), dtype=np.float32)
        n = np.array(lengths, np.int64)
        dev_kv = [torch.from_numpy(a).to(getattr(torch, kv)) for a in (k_t, v)]
        k_t, v = (t.float().numpy() for t in dev_kv)
        inputs = [Buffer.from_numpy(q), *map(Buffer.from_dlpack, dev_kv), Buffer.from_numpy(n)]
        out = self.graphs[kv].execute(*(x.to(self.device) for x in inputs))[0]
        return out.to_numpy(), reference(q, k_t, v, n)

    def test_self_attention_cache_lengths(self):
        for kv in ("float32", "bfloat16"):
            for batch in (1, 4):
                for heads in (6, 20):
                    for length in (1, 2, 63, 64, 65, 447, 448):
                        with self.subTest(kv=kv, batch=batch, heads=heads, length=length):
                            ours, ref = self.run_op(batch, heads, 448, [length], kv)
                            np.testing.assert_allclose(ours, ref, atol=2e-5)

    def test_prefill_rows_are_causal(self):
        for kv in ("float32", "bfloat16"):
            for first, tokens in ((1, 65), (0, 4), (10, 3), (440, 8)):      # whole and partial blocks
                with self.subTest(kv=kv, first=first, tokens=tokens):
                    ours, ref = self.run_op(4, 6, 448, list(range(first + 1, first + tokens + 1)), kv)
                    np.testing.assert_allclose(ours, ref, atol=2e-5)

    def test_cross_attention_all_frames(self):
        """Every frame, given as their count or as a bound above any count (the step graph's)."""
        for kv in ("float32", "bfloat16"):
            for batch, heads, tokens in ((1, 6, 1), (4, 20, 1), (1, 6, 9), (2, 8, 6), (1, 20, 7)):
                for frames in (1500, 1 << 30):
                    with self.subTest(kv=kv, batch=batch, heads=heads, tokens=tokens, frames=frames):
                        ours, ref = self.run_op(batch, heads, 1500, [frames] * tokens, kv)
                        np.testing.assert_allclose(ours, ref, atol=2e-5)

    def test_queries_in_wider_rows(self):
        """q rows wider than the heads (a fused q|k|v projection): only the first h*64 count."""
        for tokens in (1, 6):
            with self.subTest(tokens=tokens):
                ours, ref = self.run_op(2, 6, 448, list(range(40, 40 + tokens)), columns=3 * 6 * 64)
                np.testing.assert_allclose(ours, ref, atol=2e-5)

    def test_self_attention_appends_then_attends(self):
        """whisper_self_attention writes the token's key and value into the cache at position
        length - 1 (nothing else changes) and attends over the first length rows; a row with a
        start (a left-padded prompt) over its rows from there, the same values as the row alone."""
        from max.driver import Buffer
        for batch in (1, 4):
            for heads in (6, 20):
                for length in (1, 2, 63, 64, 65, 447, 448):
                    starts = np.zeros(batch, np.int64) if batch == 1 else np.array([0, length - 1, length // 2, 1])
                    starts = np.minimum(starts, length - 1)
                    with self.subTest(batch=batch, heads=heads, length=length, starts=starts):
                        rng = np.random.default_rng(batch * 1000 + heads + length)
                        d = heads * 64
                        qkv = rng.standard_normal((batch, 1, 3 * d), dtype=np.float32)
                        k_cache = rng.standard_normal((batch, heads, 64, 448), dtype=np.float32) * 3
                        v_cache = rng.standard_normal((batch, heads, 448, 64), dtype=np.float32)
                        k_want, v_want = k_cache.copy(), v_cache.copy()
                        k_want[..., length - 1] = qkv[:, 0, d:2 * d].reshape(batch, heads, 64)
                        v_want[:, :, length - 1] = qkv[:, 0, 2 * d:].reshape(batch, heads, 64)
                        bufs = [Buffer.from_numpy(a).to(self.device) for a in (qkv, k_cache, v_cache)]
                        out = self.graphs["self"].execute(*bufs, *(Buffer.from_numpy(a).to(self.device)
                                                                   for a in (np.array([length]), starts)))[0]
                        want = [reference(qkv[r:r + 1], k_want[r:r + 1, ..., s:], v_want[r:r + 1, :, s:], [length - s])
                                for r, s in enumerate(starts)]
                        np.testing.assert_allclose(out.to_numpy(), np.concatenate(want), atol=2e-5)
                        np.testing.assert_array_equal(bufs[1].to_numpy(), k_want)
                        np.testing.assert_array_equal(bufs[2].to_numpy(), v_want)


def _bf16(a):
    """a rounded to bfloat16 (to nearest even), as float64."""
    import torch
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).double().numpy()


@unittest.skipUnless((mw.KERNELS_DIR / "attention.mojo").is_file(), "kernels/ is not present")
@unittest.skipUnless(support.DEVICE == "cpu", "the bfloat16 attention op is the CPU encoder's")
class AttentionBF16OpTest(unittest.TestCase):
    """whisper_attention_bf16 (the quantized encoders' self-attention) against numpy doing the
    op's roundings: q / 8, k, v and the unnormalized probabilities to bfloat16, sums exact."""

    @classmethod
    def setUpClass(cls):
        cls.device, cls.dev, cls.session, f32 = _session("cpu")
        cls.f32, cls.graphs = staticmethod(f32), {}

    def graph(self, heads):
        from max.graph import Graph, ops
        if heads not in self.graphs:
            f32 = self.f32
            with Graph(f"attention_bf16_{heads}", input_types=[f32(["b", "t", "cq"]), f32(["b", "s", "ck"]), f32(["b", "s", "cv"])],
                       custom_extensions=[mw.KERNELS_DIR]) as g:
                q, k, v = (x.tensor for x in g.inputs)
                g.output(ops.custom("whisper_attention_bf16", self.dev, [q, k, v],
                                    out_types=[f32([q.shape[0], q.shape[1], heads * 64])])[0].tensor)
            self.graphs[heads] = self.session.load(g)
        return self.graphs[heads]

    def check(self, batch, heads, tokens, keys, extra=0):
        from max.driver import Buffer
        rng = np.random.default_rng(batch * 1000 + heads * 10 + tokens + keys)
        d = heads * 64
        q, k, v = (rng.standard_normal((batch, n, d + extra), dtype=np.float32) for n in (tokens, keys, keys))
        k *= 3                                                         # peaky softmax
        out = self.graph(heads).execute(*(Buffer.from_numpy(a) for a in (q, k, v)))[0].to_numpy()
        split = lambda a: a[..., :d].reshape(batch, -1, heads, 64).transpose(0, 2, 1, 3)   # noqa: E731
        qh, kh, vh = _bf16(split(q) / 8), _bf16(split(k)), _bf16(split(v))
        s = qh @ kh.transpose(0, 1, 3, 2)
        e = np.exp(s - s.max(-1, keepdims=True))
        want = (_bf16(e) @ vh) / e.sum(-1, keepdims=True)
        np.testing.assert_allclose(out, want.transpose(0, 2, 1, 3).reshape(batch, tokens, d), atol=5e-3)

    def test_against_numpy(self):
        for batch, heads, tokens, keys in ((1, 6, 1500, 1500), (2, 6, 9, 1500), (1, 20, 7, 1500),
                                           (2, 8, 8, 62), (1, 6, 1, 16), (1, 6, 17, 30)):
            with self.subTest(batch=batch, heads=heads, tokens=tokens, keys=keys):
                self.check(batch, heads, tokens, keys)

    def test_rows_wider_than_the_heads(self):
        self.check(1, 6, 12, 64, extra=128)

    def test_odd_or_short_key_counts_are_refused(self):
        for keys in (15, 63):
            with self.subTest(keys=keys), self.assertRaises(Exception) as caught:
                self.check(1, 6, 4, keys)
            self.assertIn("even S", str(caught.exception))


def _layer_norm(x):
    x = x.astype(np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


def _gelu(y):
    from math import erf
    return 0.5 * y * (1 + np.vectorize(erf)(y / np.sqrt(2)))


def _bfloat16(x):
    """x rounded to bfloat16 as the model stores it, back in float32."""
    return (mw._bfloat16_bits(x).astype(np.uint32) << 16).view(np.float32)


@unittest.skipUnless((mw.KERNELS_DIR / "step.mojo").is_file(), "kernels/ is not present")
@unittest.skipUnless(support.DEVICE == "cpu", "the one-op step is the CPU step graph's")
class DecoderStepOpTest(unittest.TestCase):
    """whisper_decoder_step, the cached decoder in one op, through ``build_step_graph`` against
    a numpy decoder run a token at a time, with random weights packed in ``decoder_param_names``
    order: two blocks, float32 and bfloat16 matrices and cross K/V, batch 1, 4 and 5, 6 and 8
    heads, 1500 and 64 audio frames, cache positions at both ends, one new token (a step) or
    several (a prefill, causal), sequences left-padded to one length (``starts``), the logits
    of the tokens asked for; the tokens' keys and values land in the cache, nothing else moves."""

    CASES = {"float32": (6, 1500), "bfloat16": (8, 64)}        # heads, audio frames

    @classmethod
    def setUpClass(cls):
        from max.dtype import DType
        cls.device, dev, session, _ = _session("cpu")
        cls.graphs, cls.dims = {}, {}
        for wt, (heads, frames) in cls.CASES.items():
            d = 64 * heads
            cls.dims[wt] = dict(n_mels=80, n_audio_ctx=frames, n_audio_state=d, n_audio_head=heads,
                                n_audio_layer=0, n_vocab=101, n_text_ctx=448, n_text_state=d,
                                n_text_head=heads, n_text_layer=2)
            dtype = DType.bfloat16 if wt == "bfloat16" else None
            cls.graphs[wt] = session.load(mw.build_step_graph(cls.dims[wt], dev, mw.KERNELS_DIR, dtype, dtype))

    def weights(self, wt, rng) -> dict:
        """Random decoder parameters by name, matrices rounded to ``wt``."""
        p = {}
        for q in mw.weight_spec(self.dims[wt]):
            if q.graph == "decoder":
                x = rng.standard_normal(q.shape, dtype=np.float32)
                if q.low_precision:
                    x = x / np.float32(np.sqrt(q.shape[-1]))
                    p[q.name] = _bfloat16(x) if wt == "bfloat16" else x
                else:
                    p[q.name] = 1 + 0.1 * x if q.name.endswith("ln.weight") else 0.1 * x
        return p

    def execute(self, wt, p, tokens, pos, starts, idx, cross, planes) -> np.ndarray:
        """The op's logits [batch, len(idx), n_vocab]; ``planes`` (the cache) written in place."""
        from max.driver import Buffer
        spec = [q for q in mw.weight_spec(self.dims[wt]) if q.graph == "decoder"]

        def buf(x, low):
            return mw._bfloat16(x) if low and wt == "bfloat16" else Buffer.from_numpy(x)

        vectors = np.concatenate([p[q.name].ravel() for q in spec if not q.low_precision])
        matrices = np.concatenate([p[q.name].ravel() for q in spec if q.low_precision])
        return self.graphs[wt].execute(Buffer.from_numpy(tokens), Buffer.from_numpy(np.array([pos])),
                                       Buffer.from_numpy(starts), Buffer.from_numpy(idx), buf(vectors, False),
                                       buf(matrices, True), *(buf(c, True) for c in cross),
                                       Buffer.from_numpy(planes))[0].to_numpy()

    def run_step(self, batch, pos, wt, token=None, n_new=1, out_idx=(-1,), starts=None):
        """The op's logits and cache against numpy's steps for random weights (matrices and
        cross K/V rounded to ``wt``), cache and ``n_new`` new tokens; ``starts``: each row's
        first slot (the numpy decoder gives slot j position j - start and attends from the
        start). What the op computes at a row's pad slots is only checked to be finite: no
        query of the row reads it."""
        dims = self.dims[wt]
        L, d, h, frames = dims["n_text_layer"], dims["n_text_state"], dims["n_text_head"], dims["n_audio_ctx"]
        rng = np.random.default_rng(batch * 100 + h + pos)
        p = self.weights(wt, rng)
        cross = [rng.standard_normal(shape, dtype=np.float32) * 2 for _ in range(L)
                 for shape in ((batch, h, 64, frames), (batch, h, frames, 64))]
        cross = [_bfloat16(c) if wt == "bfloat16" else c for c in cross]
        planes = rng.standard_normal((2 * L, batch, h, 64 * 448), dtype=np.float32)
        before = planes.copy()
        tokens = rng.integers(0, dims["n_vocab"], (batch, n_new)) if token is None else np.full((batch, n_new), token)
        idx = np.array([i % n_new for i in out_idx], np.int64)
        starts = np.zeros(batch, np.int64) if starts is None else np.array(starts, np.int64)
        out = self.execute(wt, p, tokens, pos, starts, idx, cross, planes)

        def norm_linear(x, norm, layer):
            return (_layer_norm(x) * p[f"{norm}.weight"] + p[f"{norm}.bias"]) @ p[f"{layer}.weight"].T \
                + p[f"{layer}.bias"]

        want, logits = before.copy(), []
        for t in range(n_new):                                             # a token at a time: causal
            x = p["decoder.token_embedding.weight"][tokens[:, t:t + 1]] \
                + p["decoder.positional_embedding"][np.maximum(pos + t - starts, 0)][:, None]
            for i in range(L):
                b = f"decoder.blocks.{i}"
                qkv = norm_linear(x, f"{b}.attn_ln", f"{b}.attn.qkv")
                k_cache = want[2 * i].reshape(batch, h, 64, 448)
                v_cache = want[2 * i + 1].reshape(batch, h, 448, 64)
                k_cache[..., pos + t] = qkv[:, 0, d:2 * d].reshape(batch, h, 64)
                v_cache[:, :, pos + t] = qkv[:, 0, 2 * d:].reshape(batch, h, 64)
                att = np.concatenate([reference(qkv[r:r + 1], k_cache[r:r + 1, ..., s:], v_cache[r:r + 1, :, s:],
                                                [max(pos + t + 1 - s, 1)]) for r, s in enumerate(starts)])
                x = x + att @ p[f"{b}.attn.out.weight"].T + p[f"{b}.attn.out.bias"]
                q = norm_linear(x, f"{b}.cross_attn_ln", f"{b}.cross_attn.query")
                x = x + reference(q, cross[2 * i], cross[2 * i + 1], [frames]) @ p[f"{b}.cross_attn.out.weight"].T \
                    + p[f"{b}.cross_attn.out.bias"]
                x = x + _gelu(norm_linear(x, f"{b}.mlp_ln", f"{b}.mlp.0")) @ p[f"{b}.mlp.2.weight"].T \
                    + p[f"{b}.mlp.2.bias"]
            logits.append((_layer_norm(x) * p["decoder.ln.weight"] + p["decoder.ln.bias"])
                          @ p["decoder.token_embedding.weight"].T)
        self.assertEqual(out.shape, (batch, len(idx), dims["n_vocab"]))
        self.assertTrue(np.isfinite(out).all() and np.isfinite(planes).all())
        pad = pos + idx[None, :] < starts[:, None]                        # [batch, n_out]
        want_out = np.concatenate([logits[i] for i in idx], axis=1)
        np.testing.assert_allclose(np.where(pad[..., None], 0, out), np.where(pad[..., None], 0, want_out),
                                   atol=2e-4, rtol=1e-4)
        for r, first in enumerate(starts):                                # the pad slots: not compared
            for kv in (planes, want, before):
                for i in range(L):
                    kv[2 * i, r].reshape(h, 64, 448)[..., :first] = 0
                    kv[2 * i + 1, r].reshape(h, 448, 64)[:, :first] = 0
        np.testing.assert_allclose(planes, want, atol=1e-5)          # the tokens' K/V from pos
        for i in range(L):
            for kv in (planes, before):
                kv[2 * i].reshape(batch, h, 64, 448)[..., pos:pos + n_new] = 0
                kv[2 * i + 1].reshape(batch, h, 448, 64)[:, :, pos:pos + n_new] = 0
        np.testing.assert_array_equal(planes, before)                  # no other slot moved

    def test_step_against_numpy(self):
        for wt in self.CASES:
            for batch, pos in ((1, 0), (1, 447), (4, 63), (5, 100)):
                with self.subTest(wt=wt, batch=batch, pos=pos):
                    self.run_step(batch, pos, wt)

    def test_prefill_against_numpy(self):
        for wt in self.CASES:
            for batch, pos, n, out_idx in ((1, 0, 3, (0, -1)), (2, 5, 11, (-1,)), (4, 430, 18, (3, 17, 0))):
                with self.subTest(wt=wt, batch=batch, pos=pos, n=n):
                    self.run_step(batch, pos, wt, n_new=n, out_idx=out_idx)

    def test_padded_rows(self):
        """Rows of one batch from different first slots: a prefill over their pad slots, then
        steps."""
        for wt in self.CASES:
            for batch, pos, n, starts in ((3, 0, 9, (0, 2, 8)), (2, 0, 20, (19, 3)), (4, 12, 1, (0, 5, 11, 2))):
                with self.subTest(wt=wt, batch=batch, pos=pos, n=n, starts=starts):
                    self.run_step(batch, pos, wt, n_new=n, out_idx=(-1, 0), starts=starts)

    def test_a_row_is_the_same_in_any_batch(self):
        """A sequence's logits and cache rows are the same bits alone and beside others, at any
        row of a batch of any size, prefill and step: a window decodes (and samples) in a batch
        as it does alone. The vocabulary of 101 leaves a last group of under four weight rows."""
        rng = np.random.default_rng(7)
        for wt in self.CASES:
            dims, p = self.dims[wt], self.weights(wt, rng)
            L, h, frames = dims["n_text_layer"], dims["n_text_head"], dims["n_audio_ctx"]
            cross = [rng.standard_normal(shape, dtype=np.float32) for _ in range(L)
                     for shape in ((1, h, 64, frames), (1, h, frames, 64))]
            cross = [_bfloat16(c) if wt == "bfloat16" else c for c in cross]
            tokens = rng.integers(0, dims["n_vocab"], (1, 8))
            alone = None
            for batch in (1, 2, 3, 5, 6):
                others = rng.integers(0, dims["n_vocab"], (batch, 8))
                others[batch // 2] = tokens[0]                        # the sequence at a middle row
                rows = [np.concatenate([c] * batch) for c in cross]
                planes = np.zeros((2 * L, batch, h, 64 * 448), np.float32)
                zeros = np.zeros(batch, np.int64)
                got = [self.execute(wt, p, others[:, :7], 0, zeros, np.arange(7), rows, planes)[batch // 2],
                       self.execute(wt, p, others[:, 7:], 7, zeros, np.array([0]), rows, planes)[batch // 2],
                       planes[:, batch // 2].copy()]
                alone = alone or got
                with self.subTest(wt=wt, batch=batch):
                    for a, b in zip(got, alone):
                        np.testing.assert_array_equal(a, b)

    def test_position_outside_the_cache_is_refused(self):
        with self.assertRaises(Exception) as caught:
            self.run_step(1, 448, "bfloat16")
        self.assertIn("outside the cache", str(caught.exception))
        with self.assertRaises(Exception) as caught:
            self.run_step(1, 440, "bfloat16", n_new=9)                    # its last token past the end
        self.assertIn("outside the cache", str(caught.exception))

    def test_token_outside_the_vocabulary_is_refused(self):
        with self.assertRaises(Exception) as caught:
            self.run_step(1, 5, "bfloat16", token=101)
        self.assertIn("outside the vocabulary", str(caught.exception))


@unittest.skipUnless((mw.KERNELS_DIR / "attention.mojo").is_file(), "kernels/ is not present")
class GpuPathBuildTest(unittest.TestCase):
    def test_gpu_path_compiles_for_hopper(self):
        """The op's GPU path and its standalone check compile for an H100/H200 (sm_90) here,
        without a GPU: the Mojo compiler emits the device code at build time."""
        mojo = Path(sys.executable).parent / "mojo"
        if not mojo.is_file():
            self.skipTest(f"no mojo compiler beside {sys.executable}")
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run([str(mojo), "build", "--target-accelerator", "sm_90", "-I", str(support.ROOT),
                                  str(support.ROOT / "tests" / "attention_gpu_check.mojo"), "-o", f"{tmp}/check"],
                                 capture_output=True, text=True, timeout=600)
            self.assertEqual(run.returncode, 0, run.stderr[-3000:])
            self.assertTrue(Path(tmp, "check").is_file())


@unittest.skipUnless((mw.KERNELS_DIR / "attention.mojo").is_file(), "kernels/ is not present")
class KernelsOnOffTest(unittest.TestCase):
    def test_transcripts_identical(self):
        on = support.model("tiny.en")
        self.assertEqual(on.kernels, mw.KERNELS_DIR)
        off = mw.Model(support.weights("tiny.en"), device=support.DEVICE, kernels="off")
        self.assertIsNone(off.kernels)
        clips = [wav for wav, _ in support.samples("en")] + [support.long_clip()]
        for clip in clips:
            with self.subTest(clip=clip.name):
                a, b = on.transcribe(clip, temperature=0.0), off.transcribe(clip, temperature=0.0)
                self.assertEqual([s["tokens"] for s in a["segments"]], [s["tokens"] for s in b["segments"]])

    def test_decoder_graph_runs_are_exact_in_fresh_processes(self):
        """The MAX-ops decoder graph returns the new tokens' keys and values instead of storing
        them (``build_decoder_graph``): with the store in the graph, MAX 26.7 gave wrong logits
        or a wrong cache row in about one process in two on 2 cores. In fresh processes, a
        kernels-off model decodes a prompt and three steps four times over: the logits and the
        cache are the same every time, and the logits those of the kernels' one-op step."""
        support.model("tiny.en")                                          # skips without it
        script = "\n".join([
            "import sys, numpy as np, maxwhisper as mw",
            f"m = mw.Model(mw.load_weights('tiny.en'), device={support.DEVICE!r}, kernels=sys.argv[1])",
            "cross = m.encode(np.zeros((1, 80, 3000), np.float32), features=False)[1]",
            "def run():",
            "    c = m.new_cache(cross)",
            "    out = [m.decode(c, np.array([[50257, 50362, 440]]), out_idx=range(3))]",
            "    out += [m.decode(c, np.array([[t]])) for t in (2068, 7586, 21831)]",
            "    return np.concatenate(out, axis=1), np.concatenate([b.to_numpy().ravel() for b in c.self_buffers()])",
            "runs = [run() for _ in range(4)]",
            "assert all(np.array_equal(c, runs[0][1]) for _, c in runs), 'the cache differs between runs'",
            "print(max(float(np.abs(x - runs[0][0]).max()) for x, _ in runs))",
            "np.save(sys.argv[2], runs[0][0])"])
        with tempfile.TemporaryDirectory() as tmp:
            for i, kernels in enumerate(["auto"] + ["off"] * 6):
                out = subprocess.run([sys.executable, "-c", script, kernels, f"{tmp}/{i}.npy"], capture_output=True,
                                     text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(support.ROOT)})
                self.assertEqual(out.returncode, 0, out.stderr[-2000:])
                self.assertEqual(float(out.stdout.split()[-1]), 0.0)
                logits = np.load(f"{tmp}/{i}.npy")
                np.testing.assert_allclose(logits, np.load(f"{tmp}/0.npy"), atol=1e-3)
                np.testing.assert_array_equal(logits.argmax(-1), np.load(f"{tmp}/0.npy").argmax(-1))

    def test_missing_kernels_fall_back_with_one_log_line(self):
        with mock.patch.object(mw, "KERNELS_DIR", mw.KERNELS_DIR.parent / "no-kernels-here"):
            with self.assertLogs("maxwhisper", "INFO") as logs:
                self.assertIsNone(mw._kernels_dir("auto"))
            self.assertEqual(len(logs.output), 1)
            self.assertIn("MAX ops", logs.output[0])
            with self.assertRaises(mw.ConfigError):
                mw._kernels_dir("on")


if __name__ == "__main__":
    unittest.main()
