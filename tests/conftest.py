"""Test set-up: 8 fake CPU devices, float32 matmuls at full precision.

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

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


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


@pytest.fixture(scope="module")
def one_faiss_thread():
  """FAISS on one OpenMP thread for a module's tests: OpenMP spinning on a loaded
  2-core machine makes k-means 10x slower."""
  import faiss  # pylint: disable=g-import-not-at-top
  before = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(1)
  yield
  faiss.omp_set_num_threads(before)
