"""Nearest training images: FAISS indexes and embedding folders.

docs/method.md section 5: generated images are embedded with CLIP, L2-normalised
and searched by inner product (= cosine similarity) among the training images'
embeddings; the k nearest are then loaded and compared in pixels.

Embedding folders use the layout of LAION-style knn tooling (clip-retrieval,
the released LAION-5B embeddings): `DIR/img_emb/img_emb_<n>.npy` ([rows, D],
float16 or float32) next to `DIR/metadata/metadata_<n>.parquet` with the same
rows in the same order (`url` and/or `image_path`, `caption`, any other column).
`memjax.index` writes its own embeddings that way, so one reader serves both.
A vector's FAISS id is its row number over all chunks of all sources, in
order.
"""
import dataclasses
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError

EMB_DIR, META_DIR = workdir_lib.EMB_DIR, workdir_lib.META_DIR
_NUMBER = re.compile(r"(\d+)(?=\.[a-z]+$)")

# ---- FAISS -------------------------------------------------------------------


def set_nprobe(index: faiss.Index, nprobe: Optional[int]) -> bool:
  """Sets nprobe on an index with an IVF part (wrapped or not); False if none."""
  if nprobe is None or faiss.try_extract_index_ivf(index) is None:
    return False
  if nprobe < 1:
    raise InputError(f"--nprobe must be >= 1, got {nprobe}")
  faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
  return True


def new_index(factory: str, dim: int) -> faiss.Index:
  """An empty index from any index-factory string, inner-product metric."""
  try:
    return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
  except RuntimeError as e:
    raise InputError(f"--index_factory={factory}: FAISS cannot build it for dimension {dim}: "
                     f"{str(e).strip().splitlines()[-1]}") from None


def build_index(factory: str, chunks: Sequence, dim: int, nprobe: Optional[int] = None,
                max_train: int = 1 << 20, seed: int = 0) -> faiss.Index:
  """Builds an index of unit vectors, training it first when it needs it.

  Args:
    factory: FAISS index-factory string ("Flat", "IVF4096,Flat",
      "IVF65536,PQ64", "OPQ64,IVF65536,PQ64", "HNSW32", ...).
    chunks: [n_i, D] arrays and/or `Chunk`s (files, loaded one at a time, so a
      large set streams: once to train, once to add). Rows are normalised
      again here, so float16 LAION vectors are fine.
    dim: D.
    nprobe: IVF lists visited per query (ignored without IVF).
    max_train: training uses at most this many vectors, drawn uniformly from
      all of them (the index is trained once; the rest are only added).
    seed: of that draw.
  """
  from memjax.data.embed import l2_normalize  # pylint: disable=g-import-not-at-top
  as_array = lambda c: load_chunk(c) if isinstance(c, Chunk) else np.asarray(c, np.float32)
  index = new_index(factory, dim)
  if not index.is_trained:
    sizes = [c.rows if isinstance(c, Chunk) else len(c) for c in chunks]
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(total, min(total, max_train), replace=False))
    train, offset = [np.zeros((0, dim), np.float32)], 0
    for chunk, n in zip(chunks, sizes):
      local = pick[(pick >= offset) & (pick < offset + n)] - offset
      if len(local):
        train.append(l2_normalize(as_array(chunk)[local]))
      offset += n
    try:
      index.train(np.ascontiguousarray(np.concatenate(train)))
    except RuntimeError as e:
      raise InputError(f"--index_factory={factory}: training on {total} vectors failed (too "
                       f"few for this factory?): {str(e).strip().splitlines()[-1]}") from None
  for chunk in chunks:
    vectors = as_array(chunk)
    if len(vectors):
      index.add(np.ascontiguousarray(l2_normalize(vectors)))
  set_nprobe(index, nprobe)
  return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
  """queries [Q, D] (normalised here) -> (similarity [Q, k], ids [Q, k]).

  Best first; id -1 (similarity -inf) where the index holds fewer than k.
  """
  from memjax.data.embed import l2_normalize  # pylint: disable=g-import-not-at-top
  if k < 1:
    raise InputError(f"--k must be >= 1, got {k}")
  if len(queries) == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  sims, ids = index.search(np.ascontiguousarray(l2_normalize(queries)), int(k))
  sims = np.where(ids < 0, -np.inf, sims).astype(np.float32)
  return sims, ids.astype(np.int64)


def save_index(index: faiss.Index, path: str) -> None:
  """Writes the index atomically."""
  data = faiss.serialize_index(index)
  workdir_lib.write_atomic(path, lambda f: f.write(data.tobytes()))


def load_index(path: str, nprobe: Optional[int] = None) -> faiss.Index:
  if not os.path.isfile(path):
    raise InputError(f"{path} does not exist: build it with python -m memjax.index")
  try:
    index = faiss.read_index(path)
  except RuntimeError as e:
    raise InputError(f"{path}: not a FAISS index: {e}") from None
  set_nprobe(index, nprobe)
  return index


# ---- embedding folders -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One embeddings file and its metadata file (same rows, same order)."""
  emb_path: str
  meta_path: str
  rows: int


def _numbered(folder: str, ext: str) -> Dict[int, str]:
  out = {}
  for name in os.listdir(folder) if os.path.isdir(folder) else []:
    m = _NUMBER.search(name)
    if name.endswith(ext) and not name.startswith(".") and m:
      out[int(m.group(1))] = os.path.join(folder, name)
  return out


def list_chunks(folder: str) -> List[Chunk]:
  """The chunks of a LAION-style embeddings folder, in number order.

  Raises:
    InputError: no `img_emb/*.npy`, an embeddings file without its metadata
      file (or the other way round), or row counts that differ.
  """
  embs = _numbered(os.path.join(folder, EMB_DIR), ".npy")
  metas = _numbered(os.path.join(folder, META_DIR), ".parquet")
  if not embs:
    raise InputError(f"{folder}: no {EMB_DIR}/img_emb_<n>.npy files (the layout of LAION-style "
                     f"embeddings: {EMB_DIR}/img_emb_0.npy + {META_DIR}/metadata_0.parquet)")
  if sorted(embs) != sorted(metas):
    raise InputError(f"{folder}: embeddings {sorted(embs)} and metadata {sorted(metas)} files "
                     "do not pair up by number")
  chunks = []
  for n in sorted(embs):
    try:
      shape = np.load(embs[n], mmap_mode="r").shape
      rows = pq.ParquetFile(metas[n]).metadata.num_rows
    except (OSError, ValueError, pa.ArrowException) as e:
      raise InputError(f"{embs[n]} / {metas[n]}: cannot read: {e}") from None
    if len(shape) != 2 or shape[0] != rows:
      raise InputError(f"{embs[n]} holds an array of shape {shape} but {metas[n]} has "
                       f"{rows} rows; they must match row for row")
    chunks.append(Chunk(embs[n], metas[n], rows))
  return chunks


def chunk_dim(chunks: Sequence[Chunk]) -> int:
  dims = {np.load(c.emb_path, mmap_mode="r").shape[1] for c in chunks}
  if len(dims) != 1:
    raise InputError(f"embedding files have different widths {sorted(dims)}: "
                     f"{', '.join(c.emb_path for c in chunks)}")
  return dims.pop()


def load_chunk(chunk: Chunk) -> np.ndarray:
  return np.asarray(np.load(chunk.emb_path, mmap_mode="r"), np.float32)


class TrainingSet:
  """Metadata of every indexed vector, by FAISS id (row over all chunks).

  Metadata files are read on first use and kept (one row per vector: fine for
  millions; a billion-row pool wants a key-value store instead).
  """

  def __init__(self, chunks: Sequence[Chunk]):
    self.chunks = list(chunks)
    self.offsets = np.cumsum([0] + [c.rows for c in self.chunks])
    self._tables: Dict[int, pa.Table] = {}

  @property
  def size(self) -> int:
    return int(self.offsets[-1])

  def _table(self, i: int) -> pa.Table:
    if i not in self._tables:
      self._tables[i] = pq.read_table(self.chunks[i].meta_path)
    return self._tables[i]

  def rows(self, ids: Sequence[int]) -> List[Optional[dict]]:
    """Metadata dicts (plus `id`) of FAISS ids; None for -1 or out of range."""
    out = []
    for i in ids:
      i = int(i)
      if not 0 <= i < self.size:
        out.append(None)
        continue
      c = int(np.searchsorted(self.offsets, i, side="right") - 1)
      row = self._table(c).slice(i - int(self.offsets[c]), 1).to_pylist()[0]
      row["id"] = i
      out.append(row)
    return out

  def table(self) -> pa.Table:
    """All metadata as one table (with `id`)."""
    tables = [self._table(i) for i in range(len(self.chunks))]
    if not tables:
      return pa.table({"id": pa.array([], pa.int64())})
    t = pa.concat_tables(tables, promote_options="permissive")
    return t.append_column("id", pa.array(np.arange(t.num_rows, dtype=np.int64)))


class IndexStore:
  """A `memjax.index` stage folder: the FAISS index, its metadata and manifest."""

  def __init__(self, location: str, nprobe: Optional[int] = None):
    self.directory = workdir_lib.resolve(location, "index")
    path = os.path.join(self.directory, workdir_lib.MANIFEST)
    if not os.path.isfile(path):
      raise InputError(f"--index={location}: no finished index there ({path} is missing); "
                       "build it with python -m memjax.index --workdir=" + location)
    self.manifest = workdir_lib.Manifest.from_dict(workdir_lib.read_json(path))
    self.info = self.manifest.details
    chunks = []
    for source in self.info["sources"]:
      chunks.extend(list_chunks(source))
    self.training = TrainingSet(chunks)
    self.index = load_index(os.path.join(self.directory, workdir_lib.FAISS_INDEX),
                            nprobe if nprobe is not None else self.info.get("nprobe"))
    if self.index.ntotal != self.training.size:
      raise InputError(f"{self.directory}: the FAISS index holds {self.index.ntotal} vectors "
                       f"but the embedding folders {self.info['sources']} hold "
                       f"{self.training.size}; rebuild it with --overwrite")

  def search(self, queries: np.ndarray, k: int):
    return search(self.index, queries, k)

  def statuses(self) -> Optional[pa.Table]:
    """Every input image of `--images` with its status (ok, missing, ...)."""
    if not shards.list_shards(self.directory):
      return None
    return shards.open_shards(self.directory).to_table()
