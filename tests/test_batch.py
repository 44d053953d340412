"""Batch jobs: inputs (files, folders, manifests), outputs written whole, failures recorded,
resuming after a killed run, and the same job on a local Ray cluster with an actor killed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

import support
from support import mw


def batch_cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "maxwhisper", "batch", *map(str, args)], cwd=support.ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(support.ROOT)})


class BatchTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = support.model("tiny.en")
        cls.samples = [w for w, _ in support.samples("en")]
        cls.expected = {w.stem: cls.model.transcribe(str(w))["text"].strip() for w in cls.samples}

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="maxwhisper-batch-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.audio = self.dir / "audio"
        (self.audio / "nested").mkdir(parents=True)
        for w in self.samples[:2]:
            shutil.copy(w, self.audio / w.name)
        for w in self.samples[2:]:
            shutil.copy(w, self.audio / "nested" / w.name)
        (self.audio / "nested" / "broken.wav").write_bytes(b"RIFF....WAVEnot audio")
        (self.audio / "notes.md").write_text("not an audio extension: ignored")

    def texts(self, out: Path) -> dict:
        return {str(p.relative_to(out).with_suffix("")): p.read_text().strip() for p in out.rglob("*.txt")}

    def expected_texts(self) -> dict:
        return {(f"nested/{w.stem}" if i >= 2 else w.stem): self.expected[w.stem] for i, w in enumerate(self.samples)}

    def test_inputs_folders_files_and_manifests(self):
        names = dict((n, p) for p, n in mw.batch_inputs([self.audio]))
        self.assertEqual(set(names), {"counting", "hello_world", "nested/quick_brown_fox", "nested/broken"})
        manifest = self.dir / "list.csv"
        manifest.write_text("id,path\n1,audio/counting.wav\n2,%s\n" % (self.audio / "hello_world.wav"))
        jsonl = self.dir / "list.jsonl"
        jsonl.write_text(json.dumps({"audio": "audio/nested/quick_brown_fox.wav"}) + "\n")
        lines = self.dir / "list.txt"
        lines.write_text("# a comment\naudio/counting.wav\n\n")
        got = mw.batch_inputs([manifest, jsonl, lines])
        self.assertEqual([n for _, n in got], ["counting", "hello_world", "quick_brown_fox"])
        self.assertTrue(all(Path(p).exists() for p, _ in got))
        with self.assertRaises(mw.ConfigError):                 # two audios, one output name
            mw.batch_inputs([self.audio / "counting.wav", self.dir / "x" / "counting.wav"])
        (self.dir / "x").mkdir()
        shutil.copy(self.samples[0], self.dir / "x" / "counting.wav")
        with self.assertRaises(mw.ConfigError):
            mw.batch_inputs([self.audio / "counting.wav", self.dir / "x" / "counting.wav"])
        with self.assertRaises(mw.ConfigError):
            mw.batch_inputs([self.dir / "missing.wav"])
        with self.assertRaises(mw.ConfigError):                 # one folder, not a list of its letters
            mw.batch_inputs(str(self.audio))
        bad = self.dir / "bad.csv"
        bad.write_text("id,url\n1,x\n")
        with self.assertRaises(mw.ConfigError):
            mw.batch_inputs([bad])
        for name, data, where in (("rows.jsonl", b'{"path": "a.wav"}\nnot json\n', "line 2"),
                                  ("rows2.jsonl", b'{"path": "a.wav"}\n{"file": "b.wav"}\n', "line 2"),
                                  ("rows.csv", b"id,path\n1,a.wav\n2,\n", "line 3"),
                                  ("latin1.txt", b"caf\xe9.wav\n", "UTF-8")):
            with self.subTest(name), self.assertRaises(mw.ConfigError) as ctx:
                (self.dir / name).write_bytes(data)
                mw.batch_inputs([self.dir / name])
            self.assertIn(f"{name}", str(ctx.exception))
            self.assertIn(where, str(ctx.exception))

    def test_batch_writes_every_output_records_failures_and_resumes(self):
        out = self.dir / "out"
        r = batch_cli(self.audio, "--output_dir", out, "--output_format", "all", "--batch_size", "2")
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertIn("3 ok, 1 failed", r.stdout)
        self.assertEqual(self.texts(out), self.expected_texts())
        for ext in ("vtt", "srt", "tsv", "json"):
            self.assertTrue((out / "nested" / f"quick_brown_fox.{ext}").stat().st_size > 0)
        failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
        self.assertEqual([(f["name"], f["error"]) for f in failures], [("nested/broken", "AudioError")])
        self.assertFalse(list(out.rglob(".maxwhisper-*")), "no temporary files left")
        # a second run: only what is missing
        (out / "counting.srt").unlink()
        before = (out / "hello_world.txt").stat().st_mtime_ns
        r = batch_cli(self.audio, "--output_dir", out, "--output_format", "all")
        self.assertIn("2 done before, 2 to do", r.stderr)
        self.assertIn("1 ok, 1 failed, 2 done before", r.stdout)
        self.assertTrue((out / "counting.srt").exists())
        self.assertEqual((out / "hello_world.txt").stat().st_mtime_ns, before)

    def test_a_killed_run_resumes_with_the_missing_files_only(self):
        long = support.long_clip()
        last = self.audio / "zz"
        last.mkdir()
        shutil.copy(long, last / "long.wav")                   # sorts last, takes seconds
        out = self.dir / "out"
        proc = subprocess.Popen([sys.executable, "-m", "maxwhisper", "batch", str(self.audio), "--output_dir",
                                 str(out), "--batch_size", "1"], cwd=support.ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(support.ROOT)})
        deadline = time.monotonic() + 600
        while not (out / "nested" / "quick_brown_fox.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.assertFalse((out / "zz" / "long.txt").exists(), "killed before the long clip was written")
        done = {p: p.stat().st_mtime_ns for p in out.rglob("*.txt")}
        r = batch_cli(self.audio, "--output_dir", out, "--batch_size", "1")
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertIn(f"{len(done)} done before, {5 - len(done)} to do", r.stderr)
        self.assertEqual({p: p.stat().st_mtime_ns for p in done}, done)     # not written again
        self.assertTrue((out / "zz" / "long.txt").read_text().strip())


def ray_available() -> bool:
    """Whether Ray Data is installed, found without importing it: Ray and its libraries do not
    belong in the test process (the jobs run Ray in their own)."""
    import importlib.util
    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("pyarrow") is not None


@unittest.skipUnless(ray_available(), "ray is not installed (pip install -e '.[ray]')")
class RayBatchTest(BatchTest):
    """The same job on a local Ray cluster: Ray Data maps BatchTranscriber over the inputs."""

    def test_ray_job_gives_the_same_texts(self):
        out = self.dir / "out"
        r = batch_cli(self.audio, "--output_dir", out, "--ray", "--workers", "2", "--batch_size", "1")
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])
        self.assertIn("3 ok, 1 failed", r.stdout)
        self.assertEqual(self.texts(out), self.expected_texts())

    def test_a_killed_actor_is_replaced_and_every_input_has_one_output(self):
        for k in range(3):                                      # enough work to kill an actor during it
            shutil.copy(support.long_clip(), self.audio / f"long{k}.wav")
        out = self.dir / "out"
        proc = subprocess.Popen([sys.executable, "-m", "maxwhisper", "batch", str(self.audio), "--output_dir",
                                 str(out), "--ray", "--workers", "2", "--batch_size", "1"], cwd=support.ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(support.ROOT)})
        deadline, killed = time.monotonic() + 600, None
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            if any(out.rglob("*.txt")):                        # actors are working: kill one
                pids = subprocess.run(["pgrep", "-f", "MapWorker"], capture_output=True, text=True).stdout.split()
                if pids:
                    killed = int(pids[0])
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.1)
        stdout, stderr = proc.communicate(timeout=900)
        self.assertIsNotNone(killed, "no actor to kill")
        self.assertEqual(proc.returncode, 0, stderr[-3000:])
        self.assertIn("6 ok, 1 failed", stdout)
        texts = self.texts(out)
        self.assertEqual(set(texts), set(self.expected_texts()) | {f"long{k}" for k in range(3)})
        self.assertTrue(all(texts[f"long{k}"] for k in range(3)))
        self.assertFalse(list(out.rglob(".maxwhisper-*")), "no temporary files left")

    test_a_killed_run_resumes_with_the_missing_files_only = None
    test_batch_writes_every_output_records_failures_and_resumes = None
    test_inputs_folders_files_and_manifests = None


if __name__ == "__main__":
    unittest.main()
