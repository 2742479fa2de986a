"""The commands: thin, importable side by side (no flag is defined at import), their
help lists their own flags, the scoring path imports no torch, and the package's
layout stays what README.md describes."""
import glob
import os
import re
import subprocess
import sys

from conftest import REPO

COMMANDS = ("scan", "blackbox", "generate", "index", "verify", "metrics", "report", "extract",
            "crosscheck", "train")
LAYERS = ("cli", "data", "method", "models", "runtime", "stages", "testing")


def _python(code):
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))


def test_all_commands_import_together_and_define_no_flag():
  r = _python("import importlib\n"
              "from absl import flags\n"
              f"for m in {COMMANDS!r}:\n"
              "  importlib.import_module('memjax.' + m)\n"
              "print(sorted(n for n in flags.FLAGS if n in ('model', 'workdir', 'seeds')))\n")
  assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-3000:]


def test_scoring_path_imports_no_torch():
  r = _python("import sys, memjax.scan, memjax.blackbox, memjax.generate, memjax.extract\n"
              "bad = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip') "
              "if m in sys.modules]\n"
              "print('imported:', bad)\n"
              "sys.exit(1 if bad else 0)\n")
  assert r.returncode == 0, r.stdout + r.stderr[-3000:]


def test_help_lists_the_commands_own_flags():
  model_file = ("--variant", "--model_config", "--prediction_type", "--image_size")
  for m, own in (("scan", ("--model", "--prompts", "--workdir", "--batch_size", "--dtype",
                           "--seeds", "--noise", "--attention", "--distributed") + model_file),
                 ("generate", ("--model", "--steps") + model_file),
                 ("crosscheck", ("--model", "--n") + model_file),
                 ("blackbox", ("--images", "--save_images", "--shard_size", "--top_k")
                  + model_file),
                 ("metrics", ("--scores", "--labels", "--k_list")),
                 ("extract", ("--scan_seeds", "--blackbox_top_k", "--generate_steps",
                              "--index_embedder", "--verify_k", "--report_top_k", "--dtype")
                  + model_file)):
    r = subprocess.run([sys.executable, "-m", f"memjax.{m}", "--help"], capture_output=True,
                       text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    # absl exits 1 after printing help; what matters is the help, not a traceback.
    assert "Traceback" not in r.stderr, (m, r.stderr[-2000:])
    for flag in own:  # booleans show as --[no]name
      assert re.search(r"--(\[no\])?" + flag[2:] + r"\b", r.stdout), (m, flag, r.stdout[-2000:])


def test_bad_flag_values_are_one_line_errors(tmp_path):
  for args, expect in ((["--workdir=w", "--seeds=0,x"], "--seeds must be integers"),
                       (["--workdir=w", "--prompts=p"], "--model is required"),
                       (["--model=m", "--prompts=p", "--workdir=w", "stray"],
                        "unexpected arguments")):
    r = subprocess.run([sys.executable, "-m", "memjax.scan"] + args, capture_output=True,
                       text=True, cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and expect in r.stderr


def test_layout_commands_on_top_layers_below_small_modules():
  top = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "memjax", "*.py")))
  assert top == sorted(COMMANDS + ("__init__",)), top
  folders = sorted(d for d in os.listdir(os.path.join(REPO, "memjax"))
                   if os.path.isfile(os.path.join(REPO, "memjax", d, "__init__.py")))
  assert folders == sorted(LAYERS), folders
  for path in glob.glob(os.path.join(REPO, "memjax", "**", "*.py"), recursive=True):
    with open(path, encoding="utf-8") as f:
      text = f.read()
    assert text.count("\n") <= 420, path  # small modules
    library = os.sep + "cli" + os.sep not in path and os.path.dirname(path) != os.path.join(
        REPO, "memjax")
    if library:  # flags live in the commands (and the cli layer that makes them) only
      assert "flags.DEFINE" not in text and "absl import flags" not in text, path
    assert "shared/spec" not in text and "ALGORITHMS.md" not in text, path
