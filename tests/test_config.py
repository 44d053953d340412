"""Settings: one options table, config file < environment < arguments; logs and metrics."""

import dataclasses
import json
import math
import re
import shutil
import tempfile
import unittest
from pathlib import Path

import support
from support import ROOT, mw, run_cli


class ConfigTest(unittest.TestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="maxwhisper-cfg-"))
        self.addCleanup(shutil.rmtree, self.dir)
        self.cfg = self.dir / "maxwhisper.cfg"
        self.cfg.write_text("[maxwhisper]\nbest_of = 2\nlanguage = en\nno_speech_threshold = 0.5\n"
                            "temperature = 0, 0.5\n")

    def test_precedence_default_file_env_argument(self):
        env = {"MAXWHISPER_BEST_OF": "3", "MAXWHISPER_LANGUAGE": "fr"}
        c = mw.Config.resolve(self.cfg, env=env, best_of=4)
        self.assertEqual((c["best_of"], c.sources["best_of"]), (4, "argument"))
        self.assertEqual((c["language"], c.sources["language"]), ("fr", "$MAXWHISPER_LANGUAGE"))
        self.assertEqual(c["no_speech_threshold"], 0.5)
        self.assertIn("maxwhisper.cfg", c.sources["no_speech_threshold"])
        self.assertEqual(c["temperature"], (0.0, 0.5))
        self.assertEqual((c["task"], c.sources["task"]), ("transcribe", "default"))
        via_env = mw.Config.resolve(env={"MAXWHISPER_CONFIG": str(self.cfg)})
        self.assertEqual(via_env["best_of"], 2)

    def test_unknown_keys_and_bad_values_name_the_key(self):
        cases = [({"MAXWHISPER_COLOUR": "red"}, "colour"), ({"MAXWHISPER_BEST_OF": "many"}, "best_of"),
                 ({"MAXWHISPER_DEVICE": "tpu"}, "device"), ({"MAXWHISPER_TEMPERATURE": "-1"}, "temperature"),
                 # empty text would mean the current folder, or every network interface
                 ({"MAXWHISPER_MODEL": ""}, "model"), ({"MAXWHISPER_GRAPH_CACHE": " "}, "graph_cache"),
                 ({"MAXWHISPER_HOST": ""}, "host"),
                 # infinite: an OverflowError mid-transcription
                 ({"MAXWHISPER_PATIENCE": "inf"}, "patience"), ({"MAXWHISPER_MAX_INITIAL_TIMESTAMP": "inf"},
                                                                 "max_initial_timestamp")]
        for env, key in cases:
            with self.subTest(key=key), self.assertRaises(mw.ConfigError) as ctx:
                mw.Config.resolve(env=env)
            self.assertIn(key, str(ctx.exception))
        self.cfg.write_text("[maxwhisper]\nbeam = 5\n")
        with self.assertRaises(mw.ConfigError) as ctx:
            mw.Config.resolve(self.cfg, env={})
        self.assertIn("beam", str(ctx.exception))
        self.cfg.write_bytes(b"[maxwhisper]\nlanguage = caf\xe9\n")          # Latin-1, not UTF-8
        for path, says in ((self.dir / "absent.cfg", "not found"), (self.dir, "cannot read"), (self.cfg, "UTF-8")):
            with self.subTest(says), self.assertRaises(mw.ConfigError) as ctx:
                mw.Config.resolve(path, env={})
            self.assertIn(f"{path}: ", str(ctx.exception))
            self.assertIn(says, str(ctx.exception))

    def test_resolved_values_resolve_to_themselves(self):
        env = {"MAXWHISPER_VAD_PARAMETERS": '{"threshold_db": -40}', "MAXWHISPER_CLIP_TIMESTAMPS": "1,2.5",
               "MAXWHISPER_PORT": "0", "MAXWHISPER_SUPPRESS_TOKENS": "-1,50257"}
        c = mw.Config.resolve(self.cfg, env=env)
        self.assertEqual(mw.Config.resolve(env={}, **c.values).values, c.values)     # a Ray actor's

    def test_model_takes_transcribe_defaults_from_config(self):
        cfg = mw.Config.resolve(env={"MAXWHISPER_MAX_AUDIO_SECONDS": "0.5"})
        m = mw.Model(support.weights("tiny.en"), device="cpu", config=cfg)
        wav, _ = support.samples("en")[0]
        with self.assertRaises(mw.CapacityError):
            m.transcribe(wav)
        self.assertTrue(m.transcribe(wav, max_audio_seconds=None)["text"])        # argument wins

    def test_print_config_shows_every_source(self):
        env = {"MAXWHISPER_CONFIG": str(self.cfg), "MAXWHISPER_LANGUAGE": "de"}
        proc = run_cli("--print-config", "--best_of", "7", env=env, cwd=self.dir)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = dict(l.split(" = ", 1) for l in proc.stdout.splitlines())
        self.assertEqual(lines["best_of"], "7  # command line")
        self.assertEqual(lines["language"], "'de'  # $MAXWHISPER_LANGUAGE")
        self.assertIn("maxwhisper.cfg [maxwhisper] no_speech_threshold", lines["no_speech_threshold"])
        self.assertEqual(lines["task"], "'transcribe'  # default")
        bad = run_cli("--print-config", "--device", "tpu", env=env, cwd=self.dir)
        self.assertEqual(bad.returncode, 2)
        self.assertEqual(len(bad.stderr.strip().splitlines()), 1)
        self.assertIn("device", bad.stderr)


class OptionsTableTest(unittest.TestCase):
    """Every option is one row of ``OPTIONS``; the other places read it."""

    def test_flags_settings_and_docs_come_from_the_table(self):
        names = [o.name for o in mw.OPTIONS]
        self.assertEqual(len(names), len(set(names)))
        self.assertEqual(list(mw.SETTINGS), names)
        cli = run_cli("--help").stdout
        serve = run_cli("serve", "--help").stdout
        deploy = (ROOT / "docs" / "DEPLOY.md").read_text()
        for o in mw.OPTIONS:
            with self.subTest(option=o.name):
                self.assertIn(f"`{o.name}`", deploy)
                self.assertEqual(o.name in cli, o.scope in ("load", "transcribe", "cli", "logging"))
                if o.scope in ("load", "transcribe", "serve", "logging"):
                    self.assertIn(f"--{o.name}", serve)
                if o.scope == "transcribe":
                    self.assertIn(o.name, {f.name for f in dataclasses.fields(mw.TranscribeOptions)})
                    self.assertEqual(getattr(mw.TranscribeOptions(), o.name), o.default)
        for field in dataclasses.fields(mw.DecodingOptions):
            if field.name in mw.SETTINGS and field.name != "temperature":     # a window's one temperature
                self.assertEqual(field.default, mw.SETTINGS[field.name].default, field.name)

    def test_a_parsed_value_parses_to_itself(self):
        """Settings travel as values (to a Ray actor, a server's requests, a model's transcribe
        defaults) and are parsed again there: every default is its own parse."""
        for o in mw.OPTIONS:
            for default in [o.default] + [d for d in (o.cli_default, o.serve_default) if d is not None]:
                with self.subTest(option=o.name, default=default):
                    self.assertEqual(o.parse(default), default)

    def test_load_applies_its_arguments_over_a_config(self):
        cfg = mw.Config.resolve(env={}, model="no-such-model")
        with self.assertRaises(mw.ModelError) as ctx:
            mw.load(config=cfg)
        self.assertIn("no-such-model", str(ctx.exception))
        with self.assertRaises(mw.ModelError) as ctx:
            mw.load("other-missing-model", config=cfg)
        self.assertIn("other-missing-model", str(ctx.exception))
        self.assertEqual(cfg.override(dtype="bfloat16").sources["dtype"], "argument")
        self.assertEqual(cfg["dtype"], "float32")                              # the original is unchanged
        for bad, says in ((dict(config=3), "config=3"),                     # not file descriptor 3
                          (dict(config=cfg.override(graph_cache=__file__)), "graph_cache"),
                          (dict(config=cfg, warmup="maybe"), "warmup")):
            with self.subTest(says), self.assertRaises(mw.ConfigError) as ctx:
                mw.load(**bad)
            self.assertIn(says, str(ctx.exception))

    def test_serve_settings_are_checked(self):
        with self.assertRaises(mw.ConfigError) as ctx:
            mw.Config.resolve(env={"MAXWHISPER_PORT": "eighty"})
        self.assertIn("port", str(ctx.exception))
        for bad in ({"max_batch": 0}, {"max_upload_mb": math.inf}, {"client_timeout": math.inf},
                    {"request_timeout": 0}, {"grace": -1}):
            with self.subTest(**bad), self.assertRaises(mw.ConfigError) as ctx:   # inf: OverflowError, or
                mw.Server(mw.Config.resolve(env={}), port=0, **bad)                 # every connection closed
            self.assertIn(next(iter(bad)), str(ctx.exception))
        for bad in ({"max_batch": 0}, {"queue_size": 0}):                 # queue_size 0: no bound at all
            with self.subTest(**bad), self.assertRaises(mw.ConfigError):
                mw.Scheduler(None, **bad)

    def test_graph_digest_covers_only_what_decides_a_graph(self):
        source = mw._graph_source()
        for decides in ("def weight_spec(", "def quantize_q4_0(", "def build_decoder_graph(", "def _gemv("):
            self.assertIn(decides, source)
        for does_not in ("def load_weights(", "class Server", "class _Transcription", "class KVCache"):
            self.assertNotIn(does_not, source)


class LogsAndMetricsTest(unittest.TestCase):
    PROM_LINE = re.compile(r'^(# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+|'
                           r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? '
                           r'-?[0-9.]+(e[+-]?[0-9]+)?)$')

    def test_per_call_and_cumulative_metrics(self):
        m = support.model("tiny.en")
        wav, _ = support.samples("en")[0]
        before = m.metrics()
        result = m.transcribe(wav)
        rec = result["metrics"]
        for key in ("audio_seconds", "windows", "tokens", "encoder_seconds", "decode_seconds",
                    "tokens_per_second", "real_time_factor", "compile_seconds", "fallbacks", "device"):
            self.assertIn(key, rec)
        self.assertEqual(rec["windows"], 1)
        self.assertEqual(rec["tokens"], sum(len(s["tokens"]) for s in result["segments"]))
        self.assertEqual(rec["device"], "cpu")
        after = m.metrics()
        self.assertEqual(after["requests"] - before["requests"], 1)
        self.assertAlmostEqual(after["audio_seconds"] - before["audio_seconds"], rec["audio_seconds"])
        text = m.metrics(format="prometheus")
        for line in text.strip().splitlines():
            self.assertRegex(line, self.PROM_LINE)
        self.assertIn("# TYPE maxwhisper_tokens_total counter", text)

    def test_cli_json_logs_parse_and_warmup(self):
        support.model("tiny.en")
        wav, _ = support.samples("en")[0]
        with tempfile.TemporaryDirectory() as out:
            proc = run_cli(wav, "--log-format", "json", "-f", "txt", "-o", out)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        entries = [json.loads(line) for line in proc.stderr.splitlines()]
        self.assertTrue(entries)
        self.assertTrue(all({"time", "level", "logger", "message"} <= set(e) for e in entries))
        warm = run_cli("--warmup")
        self.assertEqual(warm.returncode, 0, warm.stderr)
        self.assertIn("kept in the graph store", warm.stderr)


if __name__ == "__main__":
    unittest.main()
