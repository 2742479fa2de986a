"""memjax.retrieval and memjax.index: FAISS against brute force, folders, images."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memjax.stages import index as index_lib
from memjax.data import retrieval
from memjax.runtime.errors import InputError


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


def test_open_image_statuses_and_pixels(tmp_path):
  rng = np.random.default_rng(5)
  array = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
  Image.fromarray(array).save(tmp_path / "ok.png")
  (tmp_path / "bad.png").write_bytes(b"not an image")
  image, status, _ = retrieval.open_image("ok.png", base_dir=str(tmp_path))
  assert status == "ok"
  pixels = retrieval.to_pixels(image)
  want = np.asarray(Image.fromarray(array).resize((256, 256), Image.LANCZOS), np.float32) / 255
  assert pixels.shape == (256, 256, 3)
  np.testing.assert_array_equal(pixels, want)
  assert retrieval.open_image("file://" + str(tmp_path / "ok.png"))[1] == "ok"
  assert retrieval.open_image(str(tmp_path / "gone.png"))[1] == "missing"
  assert retrieval.open_image(None)[1] == "missing"
  assert retrieval.open_image(str(tmp_path / "bad.png"))[1] == "unreadable"


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
  assert m["ntotal"] == 5 and m["images"]["counts"] == {"missing": 1, "ok": 5, "unreadable": 1}
  store = retrieval.IndexStore(cfg.workdir)
  status = store.statuses().to_pylist()
  assert [r["status"] for r in status[5:]] == ["missing", "unreadable"]
  assert status[5]["index"] == 105 and status[6]["error"]
  meta = store.training.table()
  assert meta["index"].to_pylist() == [100, 101, 102, 103, 104]
  assert all(os.path.isabs(p) for p in meta["image_path"].to_pylist())
  # An image is its own nearest neighbour.
  from memjax.data import embed  # pylint: disable=g-import-not-at-top
  e = embed.load_embedder("random")
  image, _, _ = retrieval.open_image(meta["image_path"][3].as_py())
  _, ids = store.search(e.embed([image]), 2)
  assert ids[0, 0] == 3
  # A rerun embeds nothing again; another factory only rebuilds the index.
  again = index_lib.run(dataclasses_replace(cfg, index_factory="IVF2,Flat", nprobe=2))
  assert again["images"]["embedded_this_run"] == 0 and again["ntotal"] == 5
  with pytest.raises(InputError, match="other settings"):
    index_lib.run(dataclasses_replace(cfg, max_images=3))


def dataclasses_replace(cfg, **kw):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(cfg, **kw)


def test_index_from_precomputed_embeddings(tmp_path):
  rng = np.random.default_rng(7)
  folder = str(tmp_path / "laion")
  _write_chunk(folder, 0, _unit(rng, 40, 32).astype(np.float16),
               {"url": [f"http://x/{i}" for i in range(40)], "caption": ["c"] * 40})
  cfg = index_lib.IndexConfig(workdir=str(tmp_path / "w"), embeddings=folder, embedder="random",
                              index_factory="IVF4,Flat", nprobe=4)
  m = index_lib.run(cfg)
  assert m["ntotal"] == 40 and m["sources"] == [os.path.abspath(folder)]
  store = retrieval.IndexStore(cfg.workdir)
  assert store.training.rows([7])[0]["url"] == "http://x/7"
  with open(os.path.join(cfg.workdir, "manifest.json")) as f:
    assert json.load(f)["embedder"] == "random"
  # Both: the precomputed vectors first, then the embedded images.
  both = index_lib.run(index_lib.IndexConfig(workdir=str(tmp_path / "both"), embeddings=folder,
                                             images=_image_table(tmp_path), embedder="random"))
  assert both["ntotal"] == 45
  rows = retrieval.IndexStore(str(tmp_path / "both")).training.rows([39, 40])
  assert rows[0]["url"] == "http://x/39" and rows[1]["index"] == 100
  with pytest.raises(InputError, match="images=TABLE and/or --embeddings"):
    index_lib.run(index_lib.IndexConfig(workdir=str(tmp_path / "x")))


def test_http_images_are_cached_and_dead_links_remembered(tmp_path):
  import functools  # pylint: disable=g-import-not-at-top
  import http.server  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  served = tmp_path / "served"
  served.mkdir()
  Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(served / "a.png")
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  handler.log_message = lambda *a: None
  server = http.server.HTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  base = f"http://127.0.0.1:{server.server_address[1]}"
  cache = str(tmp_path / "cache")
  try:
    image, status, _ = retrieval.open_image(base + "/a.png", cache_dir=cache)
    assert status == "ok" and image.getpixel((0, 0)) == (200, 200, 200)
    image, status, error = retrieval.open_image(base + "/gone.png", cache_dir=cache)
    assert image is None and status == "missing" and "404" in error
  finally:
    server.shutdown()
  # Served from the cache now that the server is gone; the dead link stays dead.
  assert retrieval.open_image(base + "/a.png", cache_dir=cache)[1] == "ok"
  assert "404" in retrieval.open_image(base + "/gone.png", cache_dir=cache)[2]
