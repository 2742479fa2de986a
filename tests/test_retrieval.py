"""memjax.data.retrieval and the index stage: FAISS against brute force, embedding
folders, WORKDIR/index/. (Reading images: tests/test_images.py.)"""
import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memjax.data import embed
from memjax.data import images
from memjax.data import retrieval
from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import index as index_lib


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # conftest.py


def _unit(rng, n, d):
  x = rng.standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(queries, base, k):
  sims = queries @ base.T
  ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(sims, ids, 1), ids


def test_flat_equals_brute_force():
  rng = np.random.default_rng(0)
  base, queries = _unit(rng, 3000, 32), _unit(rng, 100, 32)
  index = retrieval.build_index("Flat", [base[:1000], base[1000:]], 32)
  sims, ids = retrieval.search(index, queries * 3.0, 10)  # queries are normalised too
  want_sims, want_ids = _brute(queries, base, 10)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(sims, want_sims, atol=1e-5)


def test_ivf_recall_at_configured_nprobe(tmp_path):
  rng = np.random.default_rng(1)
  base, queries = _unit(rng, 4000, 32), _unit(rng, 200, 32)
  index = retrieval.build_index("IVF16,Flat", [base], 32, nprobe=12)
  _, ids = retrieval.search(index, queries, 10)
  _, want = _brute(queries, base, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want)])
  print("IVF16,Flat nprobe=12 recall@10", recall)
  assert recall >= 0.95
  # Saved and loaded, with nprobe given again at load: the same answers.
  path = str(tmp_path / "i.faiss")
  retrieval.save_index(index, path)
  _, again = retrieval.search(retrieval.load_index(path, nprobe=12), queries, 10)
  np.testing.assert_array_equal(again, ids)


def test_ivf_pq_builds_saves_and_loads(tmp_path):
  rng = np.random.default_rng(2)
  base = _unit(rng, 800, 16)
  index = retrieval.build_index("IVF4,PQ4x4", [base], 16, nprobe=4)
  sims, ids = retrieval.search(index, base[:20], 5)
  assert ids.shape == (20, 5) and (ids >= 0).all()
  assert np.mean(ids[:, 0] == np.arange(20)) > 0.5  # mostly finds itself first
  retrieval.save_index(index, str(tmp_path / "pq"))
  _, again = retrieval.search(retrieval.load_index(str(tmp_path / "pq"), 4), base[:20], 5)
  np.testing.assert_array_equal(again, ids)


def test_bad_factories_and_short_results():
  rng = np.random.default_rng(3)
  with pytest.raises(InputError, match="could not parse"):
    retrieval.build_index("Bogus7", [_unit(rng, 10, 8)], 8)
  with pytest.raises(InputError, match="training on 10 vectors failed"):
    retrieval.build_index("IVF16,Flat", [_unit(rng, 10, 8)], 8)
  index = retrieval.build_index("Flat", [_unit(rng, 3, 8)], 8)
  sims, ids = retrieval.search(index, _unit(rng, 2, 8), 5)
  assert (ids[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all()


def _write_chunk(folder, n, vectors, meta):
  os.makedirs(os.path.join(folder, "img_emb"), exist_ok=True)
  os.makedirs(os.path.join(folder, "metadata"), exist_ok=True)
  np.save(os.path.join(folder, "img_emb", f"img_emb_{n}.npy"), vectors)
  pq.write_table(pa.table(meta), os.path.join(folder, "metadata", f"metadata_{n}.parquet"))


def test_laion_layout_folders(tmp_path):
  rng = np.random.default_rng(4)
  folder = str(tmp_path / "laion")
  vecs = [_unit(rng, 5, 8).astype(np.float16), _unit(rng, 3, 8).astype(np.float16)]
  for n, v in enumerate(vecs):  # numbered 0, 10: order by number, not by name
    _write_chunk(folder, n * 10, v, {"url": [f"http://x/{n}/{i}" for i in range(len(v))],
                                     "caption": [f"c{n}{i}" for i in range(len(v))]})
  chunks = retrieval.list_chunks(folder)
  assert [c.rows for c in chunks] == [5, 3] and retrieval.chunk_dim(chunks) == 8
  training = retrieval.TrainingSet(chunks)
  rows = training.rows([6, 0, -1, 8])
  assert rows[0]["url"] == "http://x/1/1" and rows[0]["id"] == 6
  assert rows[1]["caption"] == "c00" and rows[2] is None and rows[3] is None
  index = retrieval.build_index("Flat", chunks, 8)
  _, ids = retrieval.search(index, np.concatenate(vecs).astype(np.float32)[[6]], 1)
  assert ids[0, 0] == 6
  os.remove(os.path.join(folder, "metadata", "metadata_10.parquet"))
  with pytest.raises(InputError, match="do not pair up"):
    retrieval.list_chunks(folder)
  _write_chunk(folder, 10, vecs[1], {"url": ["a", "b"], "caption": ["a", "b"]})
  with pytest.raises(InputError, match="must match row for row"):
    retrieval.list_chunks(folder)
  with pytest.raises(InputError, match="no img_emb"):
    retrieval.list_chunks(str(tmp_path))


def _image_table(tmp_path, n_ok=5):
  rng = np.random.default_rng(6)
  folder = tmp_path / "imgs"
  folder.mkdir()
  paths = []
  for i in range(n_ok):
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    paths.append(f"imgs/{i}.png")
  paths += ["imgs/missing.png", "imgs/broken.png"]
  (folder / "broken.png").write_bytes(b"garbage")
  table = str(tmp_path / "train.parquet")
  pq.write_table(pa.table({"image_path": paths, "caption": [f"cap {i}" for i in range(len(paths))],
                           "index": [100 + i for i in range(len(paths))]}), table)
  return table


def test_index_run_records_missing_and_resumes(tmp_path):
  table = _image_table(tmp_path)
  cfg = index_lib.IndexConfig(workdir=str(tmp_path / "w"), images=table, embedder="random",
                              chunk_rows=3, batch_size=2)
  m = index_lib.run(cfg)
  assert isinstance(m, workdir_lib.Manifest) and m.stage == "index"
  assert m.details["ntotal"] == 5 and m.counts["vectors"] == 5
  assert m.counts["status"] == {"missing": 1, "ok": 5, "unreadable": 1}
  assert m.counts["rows"] == 7 and m.counts["scored"] == 5
  assert m.timings["images_this_run"] == 7 and m.rate > 0 and m.rate_unit == "images/s"
  assert m.details["embedder"] == "random" and m.details["embedder_identity"]
  assert not m.resumed_finished
  assert workdir_lib.read_manifest(cfg.workdir, "index") == m
  # WORKDIR/index/: LAION-style chunks, one status shard per chunk, the index.
  folder = os.path.join(cfg.workdir, "index")
  assert shards.list_shards(folder) == [(0, 3), (3, 6), (6, 7)]
  assert sorted(os.listdir(os.path.join(folder, "img_emb"))) == [
      f"img_emb_{n}.npy" for n in range(3)]
  assert os.path.isfile(os.path.join(folder, "faiss.index"))
  assert not os.path.exists(os.path.join(cfg.workdir, "status"))
  assert not os.path.exists(os.path.join(folder, "status"))
  assert [c.rows for c in retrieval.list_chunks(folder)] == [3, 2, 0]
  for location in (cfg.workdir, folder):  # the workdir or its index folder
    store = retrieval.IndexStore(location)
    assert store.directory == folder and store.info["ntotal"] == 5
  status = store.statuses().sort_by("row").to_pylist()
  assert [r["row"] for r in status] == list(range(7))
  assert [r["status"] for r in status[5:]] == ["missing", "unreadable"]
  assert status[5]["index"] == 105 and status[6]["error"] and status[0]["error"] is None
  meta = store.training.table()
  assert meta["index"].to_pylist() == [100, 101, 102, 103, 104]
  assert all(os.path.isabs(p) for p in meta["image_path"].to_pylist())
  # An image is its own nearest neighbour.
  e = embed.load_embedder("random")
  read = images.read_image(meta["image_path"][3].as_py())
  assert read.status == "ok"
  _, ids = store.search(e.embed([read.pil()]), 2)
  assert ids[0, 0] == 3
  # A rerun embeds nothing again and reports the run that did the work.
  again = index_lib.run(cfg)
  assert again.resumed_finished and again.counts == m.counts
  assert again.timings == m.timings and again.rate == m.rate
  with pytest.raises(InputError, match="other settings"):
    index_lib.run(dataclasses.replace(cfg, max_images=3))
  fewer = index_lib.run(dataclasses.replace(cfg, max_images=3, overwrite=True))
  assert fewer.details["ntotal"] == 3 and fewer.counts["rows"] == 3
  assert shards.list_shards(folder) == [(0, 3)]
  with pytest.raises(InputError, match="no finished index"):
    retrieval.IndexStore(str(tmp_path / "nothing"))


def test_another_index_factory_reuses_the_embeddings(tmp_path):
  """Only the FAISS index depends on the factory: a rerun with another one
  rebuilds the index from the embeddings already written."""
  table = _image_table(tmp_path)
  cfg = index_lib.IndexConfig(workdir=str(tmp_path / "w"), images=table, embedder="random",
                              chunk_rows=3, batch_size=2)
  first = index_lib.run(cfg)
  ivf = index_lib.run(dataclasses.replace(cfg, index_factory="IVF2,Flat", nprobe=2))
  assert ivf.details["ntotal"] == 5 and ivf.details["index_factory"] == "IVF2,Flat"
  assert ivf.counts["status"] == first.counts["status"]
  store = retrieval.IndexStore(cfg.workdir)
  assert faiss_ivf(store.index) and store.info["nprobe"] == 2


def faiss_ivf(index):
  import faiss  # pylint: disable=g-import-not-at-top
  return faiss.try_extract_index_ivf(index) is not None


def test_index_from_precomputed_embeddings(tmp_path):
  rng = np.random.default_rng(7)
  folder = str(tmp_path / "laion")
  _write_chunk(folder, 0, _unit(rng, 40, 32).astype(np.float16),
               {"url": [f"http://x/{i}" for i in range(40)], "caption": ["c"] * 40})
  cfg = index_lib.IndexConfig(workdir=str(tmp_path / "w"), embeddings=folder, embedder="random",
                              index_factory="IVF4,Flat", nprobe=4)
  m = index_lib.run(cfg)
  assert m.details["ntotal"] == 40 and m.details["sources"] == [os.path.abspath(folder)]
  assert m.counts == {"vectors": 40} and m.details["embedder_identity"] is None
  store = retrieval.IndexStore(cfg.workdir)
  assert store.training.rows([7])[0]["url"] == "http://x/7"
  assert store.statuses() is None  # no images were read
  assert faiss_ivf(store.index)
  manifest = workdir_lib.read_json(os.path.join(cfg.workdir, "index", "manifest.json"))
  assert manifest["stage"] == "index" and manifest["details"]["embedder"] == "random"
  # Both: the precomputed vectors first, then the embedded images.
  both = index_lib.run(index_lib.IndexConfig(workdir=str(tmp_path / "both"), embeddings=folder,
                                             images=_image_table(tmp_path), embedder="random"))
  assert both.details["ntotal"] == 45
  assert both.details["sources"] == [os.path.abspath(folder),
                                     os.path.abspath(str(tmp_path / "both" / "index"))]
  rows = retrieval.IndexStore(str(tmp_path / "both")).training.rows([39, 40])
  assert rows[0]["url"] == "http://x/39" and rows[1]["index"] == 100
  with pytest.raises(InputError, match="images=TABLE and/or --embeddings"):
    index_lib.run(index_lib.IndexConfig(workdir=str(tmp_path / "x")))
  with pytest.raises(InputError, match="max_images must be >= 1"):
    index_lib.run(index_lib.IndexConfig(workdir=str(tmp_path / "x"), embeddings=folder,
                                        max_images=0))


def test_an_index_that_does_not_match_its_embeddings_is_refused(tmp_path):
  rng = np.random.default_rng(8)
  folder = str(tmp_path / "laion")
  _write_chunk(folder, 0, _unit(rng, 10, 8), {"url": [f"u{i}" for i in range(10)]})
  cfg = index_lib.IndexConfig(workdir=str(tmp_path / "w"), embeddings=folder, embedder="random")
  index_lib.run(cfg)
  _write_chunk(folder, 1, _unit(rng, 3, 8), {"url": ["a", "b", "c"]})  # the folder grew
  with pytest.raises(InputError, match="holds 10 vectors.*13.*--overwrite"):
    retrieval.IndexStore(cfg.workdir)
