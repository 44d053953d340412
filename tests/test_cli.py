"""The command line: python -m maxwhisper audio.wav ..."""

import json
import shutil
import tempfile
import unittest
from pathlib import Path

import support
from support import run_cli


class CliTest(unittest.TestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="maxwhisper-cli-"))
        self.addCleanup(shutil.rmtree, self.dir)
        support.model("tiny.en")                      # compile once, so the CLI starts warm

    def test_transcribes_and_writes_every_format(self):
        wav, text = support.samples("en")[-1]
        proc = run_cli(wav, "--output_dir", self.dir / "out", "--output_format", "all", cwd=self.dir)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(text.rstrip("."), proc.stdout)
        self.assertRegex(proc.stdout, r"\[00:00\.000 --> 00:0\d\.\d{3}\]")
        self.assertNotIn("compiling", proc.stderr)                     # the stored graphs load
        for ext in ("txt", "srt", "vtt", "tsv", "json"):
            self.assertTrue((self.dir / "out" / f"{wav.stem}.{ext}").exists(), ext)
        data = json.loads((self.dir / "out" / f"{wav.stem}.json").read_text())
        self.assertEqual(data["language"], "en")

    def test_bad_file_is_one_line_and_others_continue(self):
        wav, text = support.samples("en")[-1]
        bad = self.dir / "broken.wav"
        bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
        proc = run_cli(bad, wav, "-f", "txt", "-o", self.dir, "--verbose", "False", cwd=self.dir)
        self.assertEqual(proc.returncode, 2)
        errors = [l for l in proc.stderr.splitlines() if l.startswith("maxwhisper: error:")]
        self.assertEqual(len(errors), 1, proc.stderr)
        self.assertIn("broken.wav", errors[0])
        self.assertNotIn("Traceback", proc.stderr)
        self.assertIn(text.rstrip("."), (self.dir / f"{wav.stem}.txt").read_text())

    def test_unknown_model_exits_2(self):
        proc = run_cli("x.wav", "--model", "no-such-model", cwd=self.dir)
        self.assertEqual(proc.returncode, 2)
        self.assertIn("no-such-model", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)

    def test_an_output_dir_that_cannot_be_made_exits_2_before_loading(self):
        wav, _ = support.samples("en")[-1]
        taken = self.dir / "taken"
        taken.write_text("")
        for args in ((wav, "-o", taken), ("batch", wav, "--output_dir", taken), (wav, "-o", taken / "below")):
            with self.subTest(args=args[:-2]):
                proc = run_cli(*args, "--model", "no-such-model", cwd=self.dir)   # the folder is checked first
                self.assertEqual(proc.returncode, 2, proc.stderr)
                self.assertIn(f"output_dir {args[-1]}", proc.stderr)
                self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
    unittest.main()
