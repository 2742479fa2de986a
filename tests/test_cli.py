"""Every stage module imports beside every other in one process (absl refuses a
flag name defined twice), and the shared flags parse from a flagfile."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("scan", "blackbox", "generate", "index", "verify", "metrics", "report", "extract",
          "crosscheck", "train")


def test_all_stages_import_together():
  code = ("import importlib\n"
          f"for m in {STAGES!r}:\n"
          "  importlib.import_module('memjax.' + m)\n"
          "print('ok')\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
  assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_scoring_path_imports_no_torch():
  code = ("import sys, memjax.scan, memjax.blackbox, memjax.generate\n"
          "bad = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip') "
          "if m in sys.modules]\n"
          "print('imported:', bad)\n"
          "sys.exit(1 if bad else 0)\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
  assert r.returncode == 0, r.stdout + r.stderr[-3000:]


def test_help_of_each_stage_runs():
  for m in ("scan", "blackbox", "metrics"):
    r = subprocess.run([sys.executable, "-m", f"memjax.{m}", "--helpshort"], capture_output=True,
                       text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    # absl exits 1 after printing help; what matters is the help, not a traceback.
    assert f"memjax/{m}.py" in r.stdout and "Traceback" not in r.stderr, (m, r.stderr[-2000:])
