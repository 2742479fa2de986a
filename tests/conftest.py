"""Test set-up: 8 fake CPU devices, float32 matmuls at full precision, and the
micro attack that the report, metrics and extract tests read.

XLA_FLAGS must be set before jax is imported anywhere, which is why it is set at
the top of this file.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # pylint: disable=g-import-not-at-top,g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")  # public prompt lists (tests/data/README.md)
TESTBED = os.path.join(REPO, "memjax", "assets", "testbed")
# The micro attack: a sample of every kind of the testbed's evaluation captions.
MICRO_KINDS = {"MV": 6, "TV": 4, "RV": 3, "unique": 5, "heldout": 10}
MICRO_TOP_K = 12


def parse_command(cmd, argv):
  """A command module's config from argv (its own define/build, fresh flags)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  cmd.define(fv)
  fv(["prog"] + list(argv))
  return cmd.build(fv)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
  """A tiny random SD1-style folder (eps, conv projections, quick_gelu)."""
  from memjax.testing import tiny  # pylint: disable=g-import-not-at-top
  return tiny.build_tiny_model(str(tmp_path_factory.mktemp("models") / "sd1"), "sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
  """A tiny random SD2-style folder (v-prediction, linear projections, gelu)."""
  from memjax.testing import tiny  # pylint: disable=g-import-not-at-top
  return tiny.build_tiny_model(str(tmp_path_factory.mktemp("models") / "sd2"), "sd2", seed=1)


def micro_config(folder: str, workdir: str, **changes):
  """The micro attack's ExtractConfig: the bundled testbed model, `folder`'s
  sample of its evaluation captions, every stage at toy size."""
  from memjax.stages import extract  # pylint: disable=g-import-not-at-top
  options = {
      "scan": {"seeds": [0, 1], "batch_size": 32, "top_k": MICRO_TOP_K, "log_interval_s": 60},
      # As configs/demo.flags: the blackbox and the regeneration without guidance.
      "blackbox": {"seeds": [0, 1], "top_k": MICRO_TOP_K, "batch_size": 8,
                   "guidance_scale": 1.0},
      "generate": {"seeds": [0, 1], "top_k": MICRO_TOP_K, "sampler": "heun", "steps": 8,
                   "batch_size": 8, "guidance_scale": 1.0},
      "index": {"embedder": "random"}, "verify": {"k": 4, "template_rule": "group"},
      "metrics": {"k_list": [2, 4, 8]}, "report": {"k_list": [2, 4, 8]}}
  for stage, values in changes.pop("options", {}).items():
    options[stage] = dict(options.get(stage, {}), **values)
  return extract.ExtractConfig(
      model=os.path.join(TESTBED, "model"), prompts=os.path.join(folder, "eval.parquet"),
      workdir=workdir, training_set=os.path.join(TESTBED, "train.parquet"), options=options,
      **changes)


@pytest.fixture(scope="session")
def micro_extract(tmp_path_factory):
  """The whole attack run once on the bundled testbed model (about 20 s): 28 of its
  evaluation captions (every kind), the top 12 attacked, regenerated and labelled.

  Returns {"workdir", "prompts", "out" (extract.run's summary)}.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  from memjax.stages import extract  # pylint: disable=g-import-not-at-top
  folder = str(tmp_path_factory.mktemp("micro"))
  ev = pq.read_table(os.path.join(TESTBED, "eval_prompts.parquet"))
  kinds = np.array(ev["kind"].to_pylist())
  rows = np.concatenate([np.flatnonzero(kinds == k)[:n] for k, n in MICRO_KINDS.items()])
  sub = ev.take(pa.array(rows))
  paths = [None if p is None else os.path.join(TESTBED, p) for p in sub["image_path"].to_pylist()]
  sub = sub.set_column(sub.column_names.index("image_path"), "image_path", pa.array(paths))
  captions = sub["caption"].to_pylist()
  first_tv = sub["kind"].to_pylist().index("TV")  # markup the report must escape
  captions[first_tv] = captions[first_tv] + " <b>&amp;</b>"
  sub = sub.set_column(sub.column_names.index("caption"), "caption", pa.array(captions))
  pq.write_table(sub, os.path.join(folder, "eval.parquet"))
  workdir = os.path.join(folder, "w")
  out = extract.run(micro_config(folder, workdir))
  return {"workdir": workdir, "folder": folder, "prompts": os.path.join(folder, "eval.parquet"),
          "out": out}


@pytest.fixture(scope="module")
def one_faiss_thread():
  """FAISS on one OpenMP thread for a module's tests: OpenMP spinning on a loaded
  2-core machine makes k-means 10x slower."""
  import faiss  # pylint: disable=g-import-not-at-top
  before = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(1)
  yield
  faiss.omp_set_num_threads(before)
