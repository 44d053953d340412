"""Live transcription: the stream resampler, prefix continuation, LocalAgreement commits, the
CLI's ``stream``, the server's ``stream=true`` events and Realtime WebSocket, and the
captions page in a real browser."""

import base64
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path

import numpy as np

import support
from support import mw

from test_server import request, transcribe


def chunks(x: np.ndarray, sizes) -> list:
    out, i, k = [], 0, 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        out.append(x[i:i + n])
        i, k = i + n, k + 1
    return out


class ResamplerTest(unittest.TestCase):
    def test_chunked_equals_whole(self):
        rng = np.random.default_rng(0)
        x = rng.standard_normal(50_000).astype(np.float32) * 0.1
        for rate in (8000, 22050, 24000, 44100, 48000):
            r = mw._StreamResampler(rate)
            parts = [r(c) for c in chunks(x, [1, 997, 4800, 333, 12000])] + [r(np.zeros(0, np.float32), final=True)]
            np.testing.assert_allclose(np.concatenate(parts), mw.resample(x, rate), atol=2e-6, err_msg=str(rate))

    def test_bad_rate_and_chunks_are_typed_errors(self):
        with self.assertRaises(mw.ConfigError):
            mw._StreamResampler(1000)
        with self.assertRaises(mw.AudioError):
            mw._pcm_float(np.zeros((2, 10), np.float32))
        with self.assertRaises(mw.AudioError):
            mw._pcm_float(np.zeros(10, np.int32))
        np.testing.assert_array_equal(mw._pcm_float(np.array([-32768, 16384], np.int16)), [-1.0, 0.5])


class TurnDetectorTest(unittest.TestCase):
    def test_speech_between_silences_is_one_turn(self):
        rng = np.random.default_rng(0)
        quiet, loud = np.zeros(16000, np.float32), (0.1 * rng.standard_normal(16000)).astype(np.float32)
        vad = mw._TurnDetector(0.5, prefix_padding_ms=300, silence_duration_ms=500)
        x = np.concatenate([quiet, loud, quiet])
        events = [e for piece in chunks(x, [999, 4800, 1]) for e in vad(piece)]
        kinds = [e[0] for e in events]
        self.assertEqual((kinds[0], kinds[-1], kinds.count("start"), kinds.count("stop")), ("start", "stop", 1, 1))
        self.assertEqual(events[0][1], 700)                   # 1000 ms, less 300 ms of padding
        self.assertEqual(events[-1][1], 2500)                 # 2000 ms + 500 ms of quiet
        audio = np.concatenate([e[1] for e in events if e[0] == "audio"])
        self.assertEqual(len(audio), 16000 * 18 // 10)        # padding + speech + the quiet until the stop
        self.assertEqual(mw._TurnDetector(0.5, 0, 500)(quiet), [])


class StreamingTest(unittest.TestCase):
    _offline: dict = {}                           # (samples, hash): the offline transcript

    @classmethod
    def setUpClass(cls):
        cls.model = support.model("tiny.en")
        cls.samples = {w.stem: (w, text) for w, text in support.samples("en")}

    def test_continue_prefix_continues_the_decoding(self):
        """Forcing the first tokens of a greedy decoding (timestamps too) as a continued
        prefix gives back the rest of that decoding, token for token."""
        m = self.model
        mel = m.log_mel(mw.load_audio(str(self.samples["counting"][0])), padding=mw.N_SAMPLES)
        mel = np.pad(mel[:, :mw.N_FRAMES], ((0, 0), (0, max(0, mw.N_FRAMES - mel.shape[1]))))[None, :, :mw.N_FRAMES]
        cross = m.encode(mel)[1]
        full = mw.decode_batch(m, m.new_cache(cross), [mw.DecodingOptions(language="en")])[0].tokens
        ts = m.tokenizer().timestamp_begin
        self.assertGreater(len(full), 8)
        for k in (1, 4, len(full) // 2, len(full) - 1):
            options = mw.DecodingOptions(language="en", prefix=full[:k], continue_prefix=True)
            rest = mw.decode_batch(m, m.new_cache(cross), [options])[0].tokens
            self.assertEqual(full[:k] + rest, full, f"prefix of {k} tokens")
        self.assertGreaterEqual(full[0], ts)                   # k = 1: a timestamp alone

    def feed(self, audio, rate=mw.SAMPLE_RATE, chunk=0.1, int16=False, stream=None, **options):
        stream = stream or self.model.stream(**options)
        events, longest = [], 0
        x = (np.clip(audio, -1, 1) * 32767).astype(np.int16) if int16 else audio
        for piece in chunks(x, [int(chunk * rate)]):
            events += stream.feed(piece, sample_rate=rate)
            longest = max(longest, len(stream.audio))
        events += stream.close()
        return stream, events, longest

    def check_events(self, stream, events):
        committed = [e for e in events if e.type == "committed"]
        self.assertEqual("".join(e.text for e in committed), stream.text)
        ends = [e.end for e in committed]
        self.assertEqual(ends, sorted(ends))
        self.assertTrue(all(e.start <= e.end for e in committed))

    def long_head(self) -> np.ndarray:
        """The long clip up to the middle of its quietest 0.3 s (a pause between sentences) in
        30-40 s: room for a stall forced at 8-12 s of buffer, its cut, and speech after it to
        show that no words were lost; ending in a word would leave that word to chance."""
        audio, tenth = mw.load_audio(str(support.long_clip())), mw.SAMPLE_RATE // 10
        peaks = np.abs(audio[300 * tenth:400 * tenth]).reshape(-1, tenth).max(axis=1)
        quiet = np.maximum(np.maximum(peaks[:-2], peaks[1:-1]), peaks[2:])    # loudest of 3 tenths
        return audio[:(301 + int(quiet.argmin())) * tenth + tenth // 2]

    def close_with_every_word(self, stream, events, audio):
        """Close the stream: its events are consistent and it has (nearly) the offline words
        of ``audio``."""
        events += stream.close()
        self.check_events(stream, events)
        key = (len(audio), hash(audio.tobytes()))
        if key not in self._offline:                       # the same clip in several tests
            self._offline[key] = self.model.transcribe(audio)["text"]
        offline = self._offline[key]
        self.assertGreater(len(stream.text.split()), 0.9 * len(offline.split()), (stream.text, offline))

    def test_short_clips_commit_the_offline_text(self):
        for name in ("quick_brown_fox", "counting", "hello_world"):
            wav, text = self.samples[name]
            audio = mw.load_audio(str(wav))
            stream, events, _ = self.feed(audio)
            self.check_events(stream, events)
            offline = self.model.transcribe(str(wav))["text"].strip()
            if name == "counting":
                # tiny.en writes the numbers as digits and hyphens ("1-2-345-678910."), which the
                # normaliser reads as a few numbers or several: compare the digits
                self.assertEqual(re.sub(r"\D", "", stream.text), re.sub(r"\D", "", offline), (stream.text, offline))
                continue
            errors, _ = support.word_errors(text, stream.text, True)
            self.assertLessEqual(errors, support.word_errors(text, offline, True)[0] + 1, (name, stream.text, offline))

    def test_a_decoding_that_says_its_text_again_commits_it_once(self):
        """The last decoding of a stream going on to say all the text again (tiny.en did, after
        the last words of a festival clip) is decoded again on a 30 s window, and what
        commits is the words up to the repeat; a short repeat, as speech has, stays."""
        wav, _ = self.samples["quick_brown_fox"]
        audio = mw.load_audio(str(wav))
        plain = self.feed(audio)[0].text
        stream, frames = self.model.stream(), []

        def looping(window):
            frames.append(window.mel.shape[-1])
            r = mw._run_window(self.model, window)
            if not stream.closed:
                return r
            said = stream._texts(stream.committed + list(r.tokens))
            return dataclasses.replace(r, tokens=list(r.tokens) + said)
        stream.runner = looping
        self.assertGreaterEqual(len(stream._texts(self.model.tokenizer().encode(plain))), mw._STREAM_LOOP)
        self.assertEqual(self.feed(audio, stream=stream)[0].text, plain)
        self.assertEqual(frames[-2:], [1000, mw.N_FRAMES])
        tok = self.model.tokenizer()
        stream.committed = tok.encode(" I said no.")
        said = tok.encode(" I said no. I said no.")
        self.assertLess(len(said) // 2, mw._STREAM_LOOP)
        self.assertEqual(stream._loop_start(said), len(said))

    def test_beam_search_stream_and_the_graphs_a_stream_runs(self):
        """beam_size decodes each update with beams; a stream compiles (or loads) its beam
        search and alignment graphs when it is made, not at a decoding."""
        wav, text = self.samples["quick_brown_fox"]
        beams = self.feed(mw.load_audio(str(wav)), beam_size=5)[0]
        offline = self.model.transcribe(str(wav))["text"]
        self.assertLessEqual(support.word_errors(text, beams.text, True)[0],
                             support.word_errors(text, offline, True)[0] + 1, (beams.text, offline))
        self.assertEqual(beams.o.beam_size, 5)
        self.assertIsNone(self.model.stream().o.beam_size)
        self.assertLessEqual({"reorder", "gather", "alignment"}, set(self.model.runner.graphs))
        with self.assertRaises(mw.ConfigError):
            self.model.stream(beam_size=0)

    def test_rates_and_int16_give_the_same_text(self):
        wav, _ = self.samples["quick_brown_fox"]
        audio = mw.load_audio(str(wav))
        base = self.feed(audio)[0].text
        at48k = mw.resample(audio, mw.SAMPLE_RATE, 48000)
        self.assertEqual(self.feed(at48k, rate=48000, int16=True, chunk=0.02)[0].text, base)

    def test_long_stream_commits_as_it_goes_and_stays_bounded(self):
        """... and encodes its buffer padded to the next 10 s (at least 1 s of padding), not to
        30 s: windows of 1000, 2000 and 3000 frames as the buffer grows."""
        wav = support.long_clip()
        audio = mw.load_audio(str(wav))
        seen = []                                     # (buffer samples, window frames)

        def runner(window):
            seen.append((len(stream.audio), window.mel.shape[-1]))
            return mw._run_window(self.model, window)
        stream = self.model.stream(runner=runner)
        stream, events, longest = self.feed(audio, stream=stream)
        self.assertEqual({f for _, f in seen}, {1000, 2000, 3000})
        for samples, frames in seen:
            self.assertEqual(frames, mw._stream_frames(samples))
            self.assertGreaterEqual(frames * mw.HOP_LENGTH - samples, mw.SAMPLE_RATE)
        self.assertEqual([mw._stream_frames(round(s * mw.SAMPLE_RATE)) for s in (0, 8.99, 9.01, 18.5, 25)],
                         [1000, 1000, 2000, 2000, 3000])
        self.check_events(stream, events)
        committed = [e for e in events if e.type == "committed"]
        self.assertGreater(len(committed), 20)                          # text leaves as it comes
        self.assertLessEqual(longest, mw._STREAM_FULL * mw.SAMPLE_RATE + 2 * mw.SAMPLE_RATE)
        self.assertLessEqual(len(stream.prompt), self.model.dims["n_text_ctx"])
        reference = wav.with_suffix(".txt").read_text()
        offline = self.model.transcribe(str(wav))["text"]
        errors_stream, n = support.word_errors(reference, stream.text, True)
        errors_offline, _ = support.word_errors(reference, offline, True)
        self.assertLessEqual(errors_stream, errors_offline + 0.10 * n, (stream.text, offline))

    def test_a_cut_by_word_alignment_keeps_the_buffers_last_seconds(self):
        """The buffer is cut at the start of a committed word ``_STREAM_CONTEXT`` s or more
        before its end; that word and the committed ones after it stay the next decoding's
        forced start: the audio after the cut begins inside a word whose text is known, not
        with a sliver of the next word, and the decodings after it hear the last seconds."""
        audio = mw.load_audio(str(support.long_clip()))
        stream = self.model.stream(trim=25)
        for piece in chunks(audio[:12 * mw.SAMPLE_RATE], [1600]):
            stream.feed(piece)
        tok = stream._tokenizer()
        said = stream._texts(stream.committed)
        self.assertGreater(len(tok.decode(said).split()), 8, tok.decode(said))
        at, done = stream._last_word_cut()
        kept = said[len(stream._texts(done)):]
        self.assertTrue(tok.decode(kept).startswith(" "), tok.decode(kept))          # whole words
        self.assertGreater(len(tok.decode(kept).split()), 1, tok.decode(kept))
        self.assertGreater(len(tok.decode(stream._texts(done)).split()), 1)
        self.assertTrue(0 < at <= len(stream.audio) - (mw._STREAM_CONTEXT - 0.1) * mw.SAMPLE_RATE)
        prompt, offset = list(stream.prompt), stream.offset
        stream._cut(at, done)
        self.assertEqual(stream.offset, offset + at)
        self.assertEqual(stream._texts(stream.committed), kept)
        self.assertGreaterEqual(stream.committed[0], stream._ts())            # opens on a timestamp
        self.assertEqual(stream.prompt, prompt + stream._texts(done))
        events = stream.feed(audio[12 * mw.SAMPLE_RATE:13 * mw.SAMPLE_RATE])   # decodes on from the words
        self.assertTrue(all(e.start >= at / mw.SAMPLE_RATE for e in events))

    def test_a_decoding_that_stops_short_of_its_speech_cuts_the_buffer_there(self):
        """A decoding that closes a segment and ends with ``_STREAM_STALL`` s or more of speech
        after it (whisper leaves out a last segment it has not heard the end of) commits its
        text up to there and the buffer is cut at that timestamp, so the next decoding starts
        on the speech left out: no words are lost."""
        audio = self.long_head()
        stream, stalls = self.model.stream(pause=10), []          # (no pause commits all of it)

        def stopping_short(window):
            # from a decoding that closes a segment, the decodings stop at that timestamp (with
            # the stream's text up to it) while the speech goes on, as tiny.en's did
            if stalls and stream.offset == stalls[0][0]:
                said = stalls[0][1]
                return dataclasses.replace(stalls[0][2], tokens=said[len(stream.committed):])
            r = mw._run_window(self.model, window)
            tokens = list(r.tokens)
            if (not stalls and 8 <= len(stream.audio) / mw.SAMPLE_RATE <= 12 and len(tokens) > 1
                    and tokens[-1] >= stream._ts() > tokens[-2]):
                stalls.append((stream.offset, stream.committed + tokens, r))
            return r
        stream.runner = stopping_short
        events, cut = [], False
        for piece in chunks(audio, [1600]):
            events += stream.feed(piece)
            if stalls and not cut and stream.offset != stalls[0][0]:
                said = stalls[0][1]
                at = round((said[-1] - stream._ts()) * mw.TIME_PRECISION * mw.SAMPLE_RATE)
                self.assertEqual(stream.offset, stalls[0][0] + at)          # cut at the closing timestamp
                self.assertEqual(stream.committed, [])                     # all of it in the prompt now
                self.assertEqual(stream.prompt[-len(stream._texts(said)):], stream._texts(said))
                cut = True
        self.assertTrue(cut)
        self.close_with_every_word(stream, events, audio)

    def test_decodings_that_stop_on_text_while_speech_goes_on_cut_the_buffer(self):
        """Decodings that end on text (no closing timestamp) and go no further while
        ``_STREAM_STALL`` s of speech follow it (tiny.en stopped at "... more than ethanol." for
        19 s of a news broadcast) commit that text and the buffer is cut in its last words, so
        the next decoding hears the speech left out."""
        audio = self.long_head()
        stream, frozen = self.model.stream(pause=10), []          # (no pause commits all of it)

        def stopping_on_text(window):
            # from one decoding on, the decodings end where it ended, on text, while the speech goes on
            r = mw._run_window(self.model, window)                 # (its cross K/V for the alignment)
            if frozen and stream.offset == frozen[0][0]:
                said = frozen[0][1]
                return dataclasses.replace(frozen[0][2], tokens=said[len(stream.committed):])
            tokens = list(r.tokens)
            while tokens and tokens[-1] >= stream._ts():
                tokens.pop()
            if not frozen and 8 <= len(stream.audio) / mw.SAMPLE_RATE <= 12 and len(stream._texts(tokens)) > 2:
                frozen.append((stream.offset, stream.committed + tokens, dataclasses.replace(r, tokens=tokens),
                               len(stream.audio)))
                return frozen[0][2]
            return r
        stream.runner = stopping_on_text
        events, cut = [], False
        for piece in chunks(audio, [1600]):
            events += stream.feed(piece)
            if frozen and not cut and stream.offset != frozen[0][0]:
                offset, said, _, at = frozen[0]
                moved = stream.offset - offset
                self.assertLessEqual(moved + len(stream.audio), at + 4 * mw.SAMPLE_RATE)   # within 4 s
                self.assertTrue(stream.text.endswith(stream._tokenizer().decode(stream._texts(said))[-20:]),
                                stream.text)                                            # all of it committed
                cut = True
        self.assertTrue(cut)
        self.close_with_every_word(stream, events, audio)

    def cut_after_empty_decodings(self, from_when, check):
        """Feed the long clip's head in 0.1 s pieces, the decodings saying nothing from the first
        update where ``from_when(stream)`` holds until the buffer is cut; then
        ``check(stream, offset, buffer samples, committed tokens)`` (the last three as they were
        at that update), and the rest of the clip is heard."""
        audio = self.long_head()
        stream, silent = self.model.stream(pause=10), []           # (no pause commits all of it)

        def saying_nothing(window):
            r = mw._run_window(self.model, window)                  # (its cross K/V for the alignment)
            if not silent and from_when(stream):
                silent.append((stream.offset, len(stream.audio), list(stream.committed)))
            return dataclasses.replace(r, tokens=[]) if silent and stream.offset == silent[0][0] else r
        stream.runner = saying_nothing
        events = []
        for piece in chunks(audio, [1600]):
            events += stream.feed(piece)
            if silent and stream.offset != silent[0][0]:
                break
        check(stream, *silent[0])
        for piece in chunks(audio[stream.offset + len(stream.audio):], [1600]):
            events += stream.feed(piece)
        self.close_with_every_word(stream, events, audio)

    def test_empty_decodings_after_committed_text_cut_the_buffer(self):
        """Decodings that say nothing after committed text ending on a word, while speech goes
        on (tiny.en, forced through "... for favoring big government." after a cut, for 11 s of
        a news report), stop where the committed text does: the buffer is cut in its last
        words within ``_STREAM_STALL`` s or so and the decodings after it hear the rest."""
        def check(stream, offset, heard, committed):
            self.assertLessEqual(stream.offset - offset + len(stream.audio), heard + 4 * mw.SAMPLE_RATE)
        self.cut_after_empty_decodings(
            lambda s: 8 <= len(s.audio) / mw.SAMPLE_RATE <= 12 and s.committed and s._texts(s.committed[-1:]), check)

    def test_empty_decodings_after_a_closed_segment_cut_the_buffer(self):
        """Decodings that say nothing after a committed segment's closing timestamp while
        speech goes on (tiny.en's, after "... running for president and yet..." in a news
        report fed in uneven steps, for 13 s) stop where that segment does: the buffer is cut
        at its timestamp within twice ``_STREAM_STALL`` s or so, and the decodings after the
        cut hear the rest."""
        def check(stream, offset, heard, committed):
            at = round((committed[-1] - stream._ts()) * mw.TIME_PRECISION * mw.SAMPLE_RATE)
            self.assertLessEqual(len(stream.audio), (2 * mw._STREAM_STALL + 1) * mw.SAMPLE_RATE)  # within 5 s
            self.assertEqual(stream.offset - offset, at)            # cut at the closing timestamp
        self.cut_after_empty_decodings(
            lambda s: len(s.audio) >= 5 * mw.SAMPLE_RATE and s.committed and s.committed[-1] >= s._ts(), check)

    def test_a_stall_on_one_committed_word_cuts_after_it(self):
        """Decodings that stop on the buffer's only committed word while speech goes on (tiny.en,
        forced through "ethanol." after a cut in a news report, said nothing for 13 s) leave no
        word to cut before: the buffer is cut where the word ends, within ``_STREAM_STALL`` s or
        so, not kept until it is full."""
        audio = self.long_head()
        stream = self.model.stream(pause=10)                         # (no pause commits all of it)
        tok = stream._tokenizer()

        def one_word(window):
            r = mw._run_window(self.model, window)                  # (its cross K/V for the alignment)
            if stream.offset:
                return r
            if stream._texts(stream.committed):
                return dataclasses.replace(r, tokens=[])            # nothing after the word
            texts = [i for i, t in enumerate(r.tokens) if t < tok.eot]
            spaced = [i for i in texts if tok.encoding.decode_single_token_bytes(r.tokens[i])[:1] == b" "]
            return dataclasses.replace(r, tokens=list(r.tokens[:spaced[1] if len(spaced) > 1 else len(r.tokens)]))
        stream.runner = one_word
        events, heard = [], 0
        for piece in chunks(audio, [1600]):
            events += stream.feed(piece)
            heard += len(piece)
            if stream.offset:
                break
        self.assertTrue(stream.offset)
        self.assertLessEqual(heard, 8 * mw.SAMPLE_RATE)
        for piece in chunks(audio[heard:], [1600]):
            events += stream.feed(piece)
        self.close_with_every_word(stream, events, audio)

    def test_an_empty_decoding_leaves_the_hypothesis_to_agree_with(self):
        """Decodings alternating between nothing and text (tiny.en's, after a sentence's end in
        a news report) still commit by agreement: a word waits at most two steps longer than in
        a stream without the empty ones (in audio time; its decodings are a step further apart),
        not until a pause or a cut."""
        audio = mw.load_audio(str(support.long_clip()))[:20 * mw.SAMPLE_RATE]

        def waits(every_other_empty: bool) -> float:
            calls = []

            def runner(window):
                r = mw._run_window(self.model, window)
                calls.append(1)
                return dataclasses.replace(r, tokens=[]) if every_other_empty and len(calls) % 2 else r
            stream, heard, delays = self.model.stream(runner=runner, pause=10), 0, []
            for piece in chunks(audio, [mw.SAMPLE_RATE // 2]):
                heard += len(piece)
                delays += [heard / mw.SAMPLE_RATE - e.end for e in stream.feed(piece) if e.type == "committed"]
            self.assertGreater(len(delays), 5)
            return float(np.median(delays))
        self.assertLessEqual(waits(True), waits(False) + 1.0)

    def test_a_segment_closed_past_the_buffers_end_closes_at_its_end(self):
        """A decoding that closes a segment after the end of its audio (in the window's
        padding: tiny.en closed a lecture's "... take no account of" at 27 s of a 20 s buffer)
        has those timestamps brought back to the buffer's end, so no committed token says
        the text reaches past the audio heard (committed, that told the later decodings to
        start at 27 s: they decoded nothing for 16 s)."""
        audio = self.long_head()
        stream, moved = self.model.stream(), []

        def closing_late(window):
            # while the buffer holds 8-12 s, a decoding that ends on a timestamp ends 7 s later
            r = mw._run_window(self.model, window)
            tokens, late = list(r.tokens), stream._ts() + round((len(stream.audio) / mw.SAMPLE_RATE + 7) / mw.TIME_PRECISION)
            if 8 <= len(stream.audio) / mw.SAMPLE_RATE <= 12 and tokens and tokens[-1] >= stream._ts():
                while tokens and tokens[-1] >= stream._ts():
                    tokens.pop()
                moved.append(len(stream.audio))
                r = dataclasses.replace(r, tokens=tokens + [late, late])
            return r
        stream.runner = closing_late
        events = []
        for piece in chunks(audio, [1600]):
            events += stream.feed(piece)
            end = stream._ts() + len(stream.audio) / mw.SAMPLE_RATE / mw.TIME_PRECISION
            self.assertTrue(all(t <= end for t in stream.committed + stream.hypothesis),
                            (len(stream.audio), stream.committed))
            self.assertLessEqual(max((e.end for e in events), default=0), stream._seconds(len(stream.audio)))
        self.assertTrue(moved)
        self.close_with_every_word(stream, events, audio)

    def test_silence_commits_nothing_and_is_not_decoded(self):
        decoded = []
        stream = self.model.stream(runner=lambda w: decoded.append(w) or mw._run_window(self.model, w))
        for _ in range(50):
            self.assertEqual(stream.feed(np.zeros(1600, np.float32)), [])
        self.assertEqual((stream.close(), decoded, stream.text), ([], [], ""))
        self.assertLessEqual(len(stream.audio), mw.SAMPLE_RATE)

    def test_a_last_chunk_given_to_close_is_decoded_once(self):
        """``close(chunk)`` (the server's worker when a turn ended while its audio waited)
        decodes the last audio once, where ``feed(chunk)`` then ``close()`` decode twice, and
        commits the same text."""
        wav, _ = self.samples["quick_brown_fox"]
        audio = mw.load_audio(str(wav))
        head, rest = audio[:16000], audio[16000:]
        texts = []
        for last in ("close", "feed"):
            decoded = []
            stream = self.model.stream(runner=lambda w: decoded.append(w) or mw._run_window(self.model, w))
            events = stream.feed(head)
            before = len(decoded)
            events += stream.close(rest) if last == "close" else stream.feed(rest) + stream.close()
            self.assertEqual(len(decoded) - before, 1 if last == "close" else 2, last)
            self.check_events(stream, events)
            texts.append(stream.text)
        self.assertEqual(texts[0], texts[1])
        self.assertIn("brown fox", texts[0])
        with self.assertRaises(mw.ConfigError):                # closed: no more audio
            stream.close(rest)

    def test_the_prompt_is_the_last_prompt_tokens_tokens(self):
        windows = []
        text = " ".join(f"word{i}" for i in range(200))
        # a prompt shorter than the limit (but over half of it) is taken whole
        stream = self.model.stream(initial_prompt=" ".join(f"word{i}" for i in range(24)),
                                   runner=lambda w: windows.append(w) or mw._run_window(self.model, w))
        stream.feed((0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32))
        self.assertTrue(mw.PROMPT_TOKENS / 2 < len(stream.prompt) < mw.PROMPT_TOKENS, len(stream.prompt))
        self.assertEqual(windows[-1].prompt, stream.prompt)
        self.assertEqual(windows[-1].decoding.repetition_limit, mw._STREAM_REPEATS)   # loops end early on a CPU
        for limit, expected in ((16, 16), (0, 0), (223, 223)):
            stream = self.model.stream(initial_prompt=text, prompt_tokens=limit,
                                       runner=lambda w: windows.append(w) or mw._run_window(self.model, w))
            stream.feed((0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32))
            whole = stream.prompt
            self.assertGreater(len(whole), 223)
            self.assertEqual(windows[-1].prompt, whole[len(whole) - expected:])

    def test_closed_stream_and_bad_options(self):
        stream = self.model.stream()
        stream.close()
        with self.assertRaises(mw.ConfigError):
            stream.feed(np.zeros(10, np.float32))
        with self.assertRaises(mw.ConfigError):
            self.model.stream(language="fr")                # tiny.en is English-only
        for bad in ({"initial_prompt": 5}, {"beam_size": 0}, {"step": 0}, {"pause": "x"}, {"trim": float("nan")},
                    {"silence_db": None}, {"prompt_tokens": 2.5}):
            with self.assertRaises(mw.ConfigError) as ctx:
                self.model.stream(**bad)
            self.assertIn(next(iter(bad)), str(ctx.exception))
        for bad in (-1, 224):                               # 0 .. half of tiny.en's 448 positions
            with self.assertRaises(mw.ConfigError):
                self.model.stream(prompt_tokens=bad)
        s = self.model.stream()
        s.feed(np.zeros(10, np.float32), sample_rate=16000)
        with self.assertRaises(mw.ConfigError):
            s.feed(np.zeros(10, np.float32), sample_rate=48000)


class MultilingualStreamTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not support.has_base():
            raise unittest.SkipTest("the base model's packages are not installed")
        cls.model = support.model("base")

    def test_the_language_is_detected_on_a_second_or_more(self):
        """A multilingual stream without a language detects it once its buffer holds 1 s of
        audio (a half second's guess took English for French) and decodes in it."""
        m = self.model
        for lang, name in (("en", "quick_brown_fox"), ("fr", "pangrama")):
            wav, text = dict((w.stem, (w, t)) for w, t in support.samples(lang))[name]
            decoded = []                               # (the window's language, the buffer's samples)
            stream = m.stream(runner=lambda w: decoded.append((w.decoding.language, len(stream.audio)))
                              or mw._run_window(m, w))
            for piece in chunks(mw.load_audio(str(wav)), [mw.SAMPLE_RATE // 2]):
                stream.feed(piece)
            stream.close()
            self.assertEqual(stream.language, lang)
            self.assertGreaterEqual(stream.language_probability, mw._DETECT_PROBABILITY)
            self.assertTrue(decoded)
            self.assertEqual({language for language, _ in decoded}, {lang})
            self.assertGreaterEqual(min(n for _, n in decoded), mw.SAMPLE_RATE, name)
            offline = m.transcribe(str(wav))["text"]
            self.assertLessEqual(support.word_errors(text, stream.text, lang == "en")[0],
                                 support.word_errors(text, offline, lang == "en")[0] + 2, (stream.text, offline))

    def test_an_unsure_language_waits_then_takes_the_most_probable_over_the_guesses(self):
        """Noise: base's best guess stays under p 0.7 (Norwegian Nynorsk, ~0.6), so the stream
        decodes nothing before 10 s, then takes the language of the largest summed guesses (and
        marks it unsure, so a Realtime session does not keep it for its later turns)."""
        m = self.model
        noise = (0.05 * np.random.default_rng(0).standard_normal(12 * mw.SAMPLE_RATE)).astype(np.float32)
        decoded, guesses = [], []
        stream = m.stream(runner=lambda w: decoded.append(len(stream.audio)) or mw._run_window(m, w))
        detect = m._language_probs
        m._language_probs = lambda cache: guesses.extend(detect(cache)) or guesses[-cache.batch:]   # recorded
        try:
            for piece in chunks(noise, [mw.SAMPLE_RATE // 2]):
                stream.feed(piece)
        finally:
            del m._language_probs
        self.assertEqual(len(guesses), 19)                           # at 1, 1.5, ... 10 s
        self.assertLess(max(max(g.values()) for g in guesses), mw._DETECT_PROBABILITY)
        self.assertGreaterEqual(min(decoded), 10 * mw.SAMPLE_RATE)
        sums = {code: sum(g[code] for g in guesses) for code in guesses[0]}
        self.assertEqual(stream.language, max(sums, key=sums.get))
        self.assertLess(stream.language_probability, mw._DETECT_PROBABILITY)   # a session won't keep it

    def test_a_realtime_session_keeps_only_a_sure_language(self):
        """A Realtime session without a language keeps what its first sure turn detected for
        the turns after it (as ``transcribe`` detects once per file): a later turn does not
        detect again. A session.update that sets ``language`` (here to null) resets it. An
        unsure turn (noise) is still decoded when it ends, and its language is not kept."""
        try:
            from websockets.sync.client import connect
        except ImportError:
            self.skipTest("websockets is not installed (pip install websockets)")
        english = mw.load_audio(str(dict((w.stem, w) for w, _ in support.samples("en"))["quick_brown_fox"]))
        noise = (0.05 * np.random.default_rng(0).standard_normal(3 * mw.SAMPLE_RATE)).astype(np.float32)
        server = mw.Server(mw.Config.resolve(model="base", seed=0), port=0, model=self.model)

        detections = []                                 # one per "detected language" log line
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: detections.append(record) if "detected language" in record.msg else None

        def turns(ws, *clips):
            """Commit each clip as a turn; the number of detections each turn logged."""
            counts = []
            for clip in clips:
                before = len(detections)
                for piece in chunks(clip, [8000]):
                    ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_b64(piece)}))
                ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                while json.loads(ws.recv(timeout=300))["type"] != "conversation.item.input_audio_transcription.completed":
                    pass
                counts.append(len(detections) - before)
            return counts

        def session(ws, **transcription):
            ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None,
                "transcription": transcription}}}}))
            while json.loads(ws.recv(timeout=30))["type"] != "session.updated":
                pass

        level = mw.log.level
        mw.log.addHandler(handler)
        mw.log.setLevel(logging.INFO)
        try:
            url = f"ws://{server.address[0]}:{server.address[1]}/v1/realtime?intent=transcription"
            with connect(url, open_timeout=30) as ws:
                session(ws)
                self.assertEqual(turns(ws, english, english), [1, 0])      # kept after a sure turn
                session(ws, language=None)
                self.assertEqual(turns(ws, english), [1])                  # reset: detects again
            with connect(url, open_timeout=30) as ws:
                session(ws)
                self.assertEqual(turns(ws, noise, english), [1, 1])        # an unsure turn is not kept
        finally:
            mw.log.removeHandler(handler)
            mw.log.setLevel(level)
            server.shutdown()
            server.drain(10)


class StreamCliTest(unittest.TestCase):
    def test_stdin_pcm_prints_committed_text(self):
        wav, _ = next((w, t) for w, t in support.samples("en") if w.stem == "quick_brown_fox")
        audio = mw.load_audio(str(wav))
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        r = subprocess.run([sys.executable, "-m", "maxwhisper", "stream", "-", "--model", "tiny.en"],
                           input=pcm, capture_output=True, timeout=900, cwd=support.ROOT,
                           env={**os.environ, "PYTHONPATH": str(support.ROOT)})
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertIn("quick brown fox", r.stdout.decode())
        r = support.run_cli("stream", "-", "--model", "tiny.en", "--step", "0")
        self.assertEqual(r.returncode, 2)
        self.assertIn("--step: bad value 0.0", r.stderr)                  # the flag, not stream()


def pcm16_b64(x: np.ndarray) -> str:
    return base64.b64encode((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()).decode()


class StreamServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = support.model("tiny.en")
        cls.samples = {w.stem: w for w, _ in support.samples("en")}
        # seeded: a window decoded again hotter samples the same tokens in every request
        cls.server = mw.Server(mw.Config.resolve(model="tiny.en", seed=0), port=0, model=cls.model,
                               api_key="sekret")
        cls.addr = cls.server.address
        cls.auth = {"Authorization": "Bearer sekret"}

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.drain(10)

    def events(self, body: bytes) -> list:
        return [json.loads(line[6:]) for line in body.decode().split("\n") if line.startswith("data: ")]

    def test_stream_true_deltas_add_up_to_the_response(self):
        long = support.long_clip().read_bytes()
        for audio in (self.samples["quick_brown_fox"].read_bytes(), long):
            status, _, plain = transcribe(self.addr, audio, self.auth)
            status2, headers, body = transcribe(self.addr, audio, self.auth, stream="true")
            self.assertEqual((status, status2), (200, 200), body[:300])
            self.assertEqual(headers["Content-Type"], "text/event-stream")
            events = self.events(body)
            deltas = [e["delta"] for e in events if e["type"] == "transcript.text.delta"]
            self.assertEqual(events[-1]["type"], "transcript.text.done")
            self.assertEqual("".join(deltas), json.loads(plain)["text"])
            self.assertEqual(events[-1]["text"], json.loads(plain)["text"])
        self.assertGreater(len(deltas), 1)                         # the long clip: a delta per window
        status, _, body = transcribe(self.addr, long, self.auth, stream="true", response_format="srt")
        self.assertEqual((status, json.loads(body)["error"]["param"]), (400, "response_format"))
        status, _, body = transcribe(self.addr, b"not audio", self.auth, stream="true")
        self.assertEqual(status, 400)                              # refused before any event

    def connect(self, subprotocols=("realtime", "openai-insecure-api-key.sekret"), **kw):
        from websockets.sync.client import connect
        return connect(f"ws://{self.addr[0]}:{self.addr[1]}/v1/realtime?intent=transcription",
                       subprotocols=list(subprotocols), open_timeout=30, **kw)

    def receive_until(self, ws, kind, timeout=300):
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            seen.append(event)
            if event["type"] == kind:
                return seen
        self.fail(f"no {kind} in {[e['type'] for e in seen]}")

    def test_realtime_transcription_with_server_vad(self):
        try:
            import websockets  # noqa: F401
        except ImportError:
            self.skipTest("websockets is not installed (pip install websockets)")
        audio = mw.load_audio(str(self.samples["quick_brown_fox"]))
        x24 = mw.resample(np.concatenate([np.zeros(8000, np.float32), audio, np.zeros(24000, np.float32)]),
                          mw.SAMPLE_RATE, 24000)
        with self.connect() as ws:
            self.assertEqual(ws.subprotocol, "realtime")
            created = json.loads(ws.recv(timeout=30))
            self.assertEqual((created["type"], created["session"]["type"]), ("session.created", "transcription"))
            ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
                "transcription": {"language": "en"}, "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}}}))
            updated = self.receive_until(ws, "session.updated")[-1]
            self.assertEqual(updated["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"], 500)
            for piece in chunks(x24, [2400]):
                ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_b64(piece)}))
            seen = self.receive_until(ws, "conversation.item.input_audio_transcription.completed")
            kinds = [e["type"] for e in seen]
            for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed"):
                self.assertIn(kind, kinds)
            started = next(e for e in seen if e["type"] == "input_audio_buffer.speech_started")
            self.assertAlmostEqual(started["audio_start_ms"], 500, delta=350)
            completed = seen[-1]
            deltas = "".join(e["delta"] for e in seen if e["type"].endswith("transcription.delta"))
            self.assertEqual(deltas, completed["transcript"])
            self.assertIn("quick brown fox", completed["transcript"])
            self.assertEqual(completed["item_id"], started["item_id"])
            # a bad event is an error event; the session goes on
            ws.send("not json")
            self.assertEqual(self.receive_until(ws, "error")[-1]["error"]["code"], "invalid_event")
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "***"}))
            self.assertEqual(self.receive_until(ws, "error")[-1]["error"]["code"], "invalid_value")
            ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            self.assertEqual(self.receive_until(ws, "error")[-1]["error"]["code"], "input_audio_buffer_commit_empty")
            for bad in ({"audio": [1]}, {"audio": {"input": {"format": {"type": "audio/pcm", "rate": "fast"}}}},
                        {"audio": {"input": {"transcription": {"language": "klingon"}}}},
                        {"audio": {"input": {"transcription": {"prompt": 5}}}}, None,
                        {"audio": {"input": {"turn_detection": {"threshold": "loud"}}}},
                        {"audio": {"input": {"turn_detection": {"silence_duration_ms": float("inf")}}}},
                        {"audio": {"input": {"turn_detection": {"prefix_padding_ms": 10 ** 12}}}}):
                ws.send(json.dumps({"type": "session.update", "session": bad}))
                self.assertEqual(self.receive_until(ws, "error")[-1]["error"]["code"], "invalid_value", bad)
            ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription"}}))
            turn = self.receive_until(ws, "session.updated")[-1]["session"]["audio"]["input"]["turn_detection"]
            self.assertEqual(turn, {**mw._TURN_DETECTION, "silence_duration_ms": 500})   # the bad ones left it
            ws.send(json.dumps({"type": "response.create"}))
            self.assertEqual(self.receive_until(ws, "error")[-1]["error"]["code"], "invalid_event_type")

    def test_realtime_manual_commit_and_auth(self):
        try:
            from websockets.exceptions import ConnectionClosed, InvalidStatus
        except ImportError:
            self.skipTest("websockets is not installed (pip install websockets)")
        with self.assertRaises(InvalidStatus) as refused:
            self.connect(subprotocols=("realtime",))
        self.assertEqual(refused.exception.response.status_code, 401)
        audio = mw.load_audio(str(self.samples["counting"]))
        with self.connect(subprotocols=(), additional_headers=self.auth) as ws:
            ws.send(json.dumps({"type": "session.update", "session": {
                "input_audio_format": "pcm16", "turn_detection": None,
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}}))
            self.receive_until(ws, "session.updated")
            for piece in chunks(audio, [3200]):
                ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_b64(piece)}))
            ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            seen = self.receive_until(ws, "conversation.item.input_audio_transcription.completed")
            self.assertNotIn("input_audio_buffer.speech_started", [e["type"] for e in seen])
            self.assertRegex(seen[-1]["transcript"].lower(), r"seven|7")
            with self.assertRaises(ConnectionClosed):                # over the message limit: closed
                ws.send("x" * (mw._MAX_WS_MESSAGE + 1))
                while True:
                    ws.recv(timeout=30)
        status, headers, _ = request(self.addr, "GET", "/v1/realtime", headers=self.auth)
        self.assertEqual(status, 426)

    def test_captions_page(self):
        status, headers, body = request(self.addr, "GET", "/")
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/html"))
        self.assertIn(b"/v1/realtime?intent=transcription", body)


def _chromium() -> str | None:
    return next((p for p in (os.environ.get("MW_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)


class CaptionsBrowserTest(unittest.TestCase):
    """The captions page in Chromium (playwright drives it): its fake microphone plays a WAV,
    the page streams it over the WebSocket, and the words appear."""

    def test_microphone_to_captions(self):
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            self.skipTest("playwright is not installed (pip install playwright)")
        chromium = _chromium()
        if chromium is None:
            self.skipTest("no Chromium (apt-get install chromium)")
        model = support.model("tiny.en")
        fox = next(w for w, _ in support.samples("en") if w.stem == "quick_brown_fox")
        folder = Path(tempfile.mkdtemp(prefix="maxwhisper-browser-"))
        wav = folder / "mic.wav"            # Chromium loops the file: speech, then quiet
        subprocess.run(["sox", str(fox), "-r", "48000", "-c", "1", str(wav), "pad", "0.5", "3"], check=True) \
            if shutil.which("sox") else wav.write_bytes(support.wav_bytes(
                np.concatenate([mw.load_audio(str(fox)), np.zeros(48000, np.float32)]), 16000, 16))
        server = mw.Server(mw.Config.resolve(model="tiny.en"), port=0, model=model)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=[
                    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                    f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
                    "--no-sandbox"])
                page = browser.new_page()
                page.goto(f"http://{server.address[0]}:{server.address[1]}/")
                page.click("#mic")
                page.wait_for_function("document.querySelector('#captions').innerText.toLowerCase()"
                                       ".includes('brown fox')", timeout=120_000)
                text = page.inner_text("#captions")
                browser.close()
        finally:
            server.shutdown()
            server.drain(5)
        self.assertIn("quick brown fox", text.lower())


if __name__ == "__main__":
    unittest.main()
