"""deploy/: the alerting rules (promtool), the dashboard's and rules' metric names against what
the server exports, the Kubernetes manifests against the server's routes and flags, the
Dockerfiles against the README, the settings template against OPTIONS, the GPU check script's
steps and what it returns."""

import json
import os
import re
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

import support
from support import mw

from test_server import request

DEPLOY = support.ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"


def promtool(*args):
    if shutil.which("promtool") is None:
        raise unittest.SkipTest("promtool is not installed (apt-get install prometheus)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=PROMETHEUS, timeout=300)


class AlertRulesTest(unittest.TestCase):
    def test_rules_check_and_their_unit_tests_pass(self):
        r = promtool("check", "rules", "maxwhisper-alerts.yml")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        r = promtool("test", "rules", "maxwhisper-alerts-test.yml")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


def used_metrics(text: str) -> set:
    return set(re.findall(r"\b(maxwhisper_[a-z_]+)", text))


class MetricNamesTest(unittest.TestCase):
    def test_rules_and_dashboard_use_only_exported_metrics(self):
        server = mw.Server(mw.Config.resolve(model="tiny.en"), port=0, model=support.model("tiny.en"))
        try:
            text = request(server.address, "GET", "/metrics")[2].decode()
        finally:
            server.shutdown()
            server.drain(5)
        exported = set()
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
            exported |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
        rules = (PROMETHEUS / "maxwhisper-alerts.yml").read_text()
        dashboard = json.loads((DEPLOY / "grafana" / "maxwhisper-dashboard.json").read_text())
        exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
        hpa = (DEPLOY / "kubernetes" / "maxwhisper.yaml").read_text()
        for source, names in (("rules", used_metrics(rules)), ("dashboard", used_metrics(exprs)),
                              ("autoscaler", used_metrics(hpa))):
            self.assertTrue(names, source)
            self.assertLessEqual(names, exported, f"{source} uses metrics the server does not export")


class ManifestsTest(unittest.TestCase):
    def test_kubernetes_probes_flags_and_grace(self):
        import yaml
        docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "maxwhisper.yaml").read_text())}
        self.assertEqual(set(docs), {"Deployment", "Service", "HorizontalPodAutoscaler"})
        pod = docs["Deployment"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        args = mw._arg_parser("serve", "", mw._SERVE_SCOPES).parse_args(container["args"][1:])
        self.assertEqual(container["args"][0], "serve")
        grace = mw._config_from_args(args, mw._SERVE_SCOPES)["grace"]
        self.assertGreater(pod["terminationGracePeriodSeconds"], grace)
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            self.assertIn(container[probe]["httpGet"]["path"], mw._ROUTES)
        self.assertEqual(container["readinessProbe"]["httpGet"]["path"], "/ready")
        for env in container["env"]:
            self.assertIn(env["name"][len("MAXWHISPER_"):].lower(), mw.SETTINGS)
        self.assertEqual(docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"],
                         docs["Deployment"]["metadata"]["name"])

    def test_dockerfiles_run_the_readme_install_then_warm_up(self):
        readme = (support.ROOT / "README.md").read_text()
        install = "python3 -m venv .venv && . .venv/bin/activate && pip install -e ."
        self.assertIn(install, readme)
        cpu = (DEPLOY / "Dockerfile").read_text()
        self.assertIn(install, cpu)
        self.assertRegex(cpu, r"python -m maxwhisper --warmup")
        for dockerfile in (cpu, (DEPLOY / "Dockerfile.gpu").read_text()):
            self.assertIn('ENTRYPOINT ["python", "-m", "maxwhisper"]', dockerfile)
            for name in re.findall(r"MAXWHISPER_([A-Z_]+)=", dockerfile):
                self.assertIn(name.lower(), mw.SETTINGS)


class SettingsTemplateTest(unittest.TestCase):
    def test_every_setting_is_in_the_template_with_its_default(self):
        template = (DEPLOY / "maxwhisper.cfg").read_text()
        settings = dict(re.findall(r"^# (\w+) =[ ]?(.*)$", template, re.M))
        self.assertEqual(set(settings), {o.name for o in mw.OPTIONS})
        self.assertEqual(mw.Config.resolve(path=DEPLOY / "maxwhisper.cfg", env={}).describe(),
                         mw.Config.resolve(env={}).describe())
        uncommented = re.sub(r"^# (\w+ =.*)$", r"\1", template, flags=re.M)
        path = Path(tempfile.mkdtemp(prefix="maxwhisper-cfg-")) / "all.cfg"
        path.write_text(uncommented)
        every = mw.Config.resolve(path=path, env={})
        for o in mw.OPTIONS:
            self.assertEqual(every[o.name], o.default, o.name)


class GpuScriptsTest(unittest.TestCase):
    def test_a_spent_budget_skips_every_check_but_still_returns_the_graph_store(self):
        """deploy/gpu/run.sh with no time left (its CPU rehearsal, MW_GPU_DRY): every check
        step is skipped in the results table, the graph store goes out as pieces that unpack
        to it, and what $OUT holds fits the device tool's limits (8 files, plain names)."""
        for script in ("pack.sh", "run.sh"):
            self.assertEqual(subprocess.run(["bash", "-n", str(DEPLOY / "gpu" / script)]).returncode, 0, script)
        if shutil.which("xz") is None:
            self.skipTest("xz is not installed")
        with tempfile.TemporaryDirectory() as tmp:
            work, out = Path(tmp, "work"), Path(tmp, "out")
            (work / "payload" / "site").mkdir(parents=True)
            (work / "graphs").mkdir()
            (work / "graphs" / "encoder_x.mef").write_bytes(os.urandom(100_000))
            (work / "graphs" / "weights-x.bin").write_bytes(os.urandom(100_000))      # stays behind
            env = {**os.environ, "MW_GPU_WORK": str(work), "OUT": str(out), "MW_GPU_SECONDS": "0", "MW_GPU_DRY": "1"}
            for steps, skipped in ((None, 8), ("1 9 10", 3)):           # the checks; a throughput session
                run_env = env if steps is None else {**env, "MW_GPU_STEPS": steps}
                r = subprocess.run(["bash", str(DEPLOY / "gpu" / "run.sh"), "check"], env=run_env,
                                   capture_output=True, text=True, timeout=300)
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
                table = (out / "results.md").read_text()
                self.assertEqual(table.count("skipped: the call's time is spent"), skipped, table)
                self.assertEqual("| 10. throughput" in table, steps is not None, table)
                self.assertIn("| 11. the graph store out | ok: 1 graphs |", table)
            files = sorted(p.name for p in out.iterdir())
            self.assertLessEqual(len(files), 8, files)
            self.assertTrue(all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files)
            listing = subprocess.run(f"cat {out}/graphs.tar.xz.* | xz -dc | tar -t", shell=True,
                                     capture_output=True, text=True, check=True).stdout
            self.assertEqual(listing.split(), ["encoder_x.mef"])

    def test_every_test_the_script_names_exists(self):
        """Each ``-p FILE -k NAME`` in run.sh selects at least one test: a renamed test would
        otherwise cost a GPU session its step ("NO TESTS RAN")."""
        script = (DEPLOY / "gpu" / "run.sh").read_text()
        named = re.findall(r"-p (test_\w+\.py)((?:\s+-k \w+)+)", script)
        self.assertGreaterEqual(len(named), 5, "run.sh's unittest lines were not found")
        for module, keys in named:
            for key in keys.split()[1::2]:
                with self.subTest(module=module, key=key):
                    loader = unittest.TestLoader()
                    loader.testNamePatterns = [f"*{key}*"]
                    self.assertGreater(loader.discover(str(support.ROOT / "tests"), pattern=module).countTestCases(), 0)


if __name__ == "__main__":
    unittest.main()
