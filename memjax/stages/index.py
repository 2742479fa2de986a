"""Training-image index: CLIP embeddings of a training set and a FAISS index.

`images` is a table (parquet, jsonl, csv, tsv) with `url` and/or `image_path` (a
path relative to the table's folder, absolute, file:// or http(s)://),
`caption` and optionally `index` (the image's id in its training set; default:
row number). Each image is embedded with the CLIP image encoder of `embedder`
(`memjax.data.embed`), L2-normalised. A missing or unreadable image is recorded
with its status and error and is not embedded (never as black).

`WORKDIR/index/`, in the layout of LAION-style embeddings (`memjax.data.retrieval`):
`img_emb/img_emb_<n>.npy` [rows, D] float32 and `metadata/metadata_<n>.parquet`
(the images that were embedded: `index`, `url`, `image_path`, `caption`, `row`),
`part-*.parquet` (every input row of chunk n with `status`, `error`: written
last, so a chunk is done exactly when its shard exists and a rerun resumes),
`faiss.index`, `run_config.json`, `manifest.json`. `embeddings` adds a folder of
precomputed vectors (e.g. the LAION-2B-en ViT-L/14 image embeddings) ahead of
the embedded images; their FAISS ids come first.
"""
import concurrent.futures
import dataclasses
import os
import time
from typing import Dict, List, Optional

from absl import logging
import numpy as np
import pyarrow as pa

from memjax.data import embed
from memjax.data import images as images_lib
from memjax.data import retrieval
from memjax.data import tables
from memjax.runtime import checks
from memjax.runtime import distributed
from memjax.runtime import fingerprint
from memjax.runtime import engine
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError

STAGE = "index"
_LOAD_THREADS = 8  # image decoding and downloads overlap; the encoder is one stream


@dataclasses.dataclass
class IndexConfig:
  """The index stage's settings (each one a flag of `python -m memjax.index`)."""
  workdir: str
  images: Optional[str] = None
  embeddings: Optional[str] = None
  embedder: str = "ViT-L-14@openai"
  embedder_checkpoint: Optional[str] = None
  index_factory: str = "Flat"
  nprobe: Optional[int] = None
  batch_size: int = 32
  csv_delimiter: Optional[str] = None
  max_images: Optional[int] = None
  chunk_rows: int = 4096
  max_train: int = 1 << 20
  overwrite: bool = False
  log_interval_s: float = 30.0

  def __post_init__(self):
    checks.at_least(self, 1, "nprobe", "batch_size", "max_images", "chunk_rows", "max_train")
    checks.at_least(self, 0, "log_interval_s")


def _column(table: pa.Table, name: str) -> list:
  return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows


def _load_chunk(table: tables.PromptTable, base_dir: str, start: int, stop: int, pool):
  """Rows [start, stop) and their images (read in threads)."""
  rows = table.read_rows(start, stop)
  urls, paths = _column(rows, "url"), _column(rows, "image_path")
  refs = [p if isinstance(p, str) and p.strip() else u for p, u in zip(paths, urls)]
  # No download cache here: only verify reloads (its k nearest) images.
  return rows, list(pool.map(lambda ref: images_lib.read_image(ref, base_dir), refs))


def _embed_chunk(cfg: IndexConfig, folder: str, base_dir: str, embedder, start: int,
                 stop: int, loaded) -> pa.Table:
  """Embeds one chunk, writes its vectors and metadata; returns its status rows."""
  table, reads = loaded
  rows = np.arange(start, stop, dtype=np.int64)
  if "index" in table.column_names:
    index, index_type = table["index"].to_pylist(), table.schema.field("index").type
  else:
    index, index_type = [int(r) for r in rows], pa.int64()
  ok = [i for i, r in enumerate(reads) if r.usable]
  vectors = embedder.embed([reads[i].pil() for i in ok])

  def resolved(p):  # an absolute local path, so verify can run from anywhere
    local = isinstance(p, str) and p and "://" not in p and not os.path.isabs(p)
    return os.path.join(base_dir, p) if local else p

  urls, paths = _column(table, "url"), _column(table, "image_path")
  columns = {"index": (index, index_type), "url": (urls, pa.string()),
             "image_path": ([resolved(p) for p in paths], pa.string()),
             "caption": (_column(table, "caption"), pa.string())}
  meta = pa.table({k: pa.array([v[i] for i in ok], t) for k, (v, t) in columns.items()})
  meta = meta.append_column("row", pa.array(rows[ok], pa.int64()))
  n = start // cfg.chunk_rows
  emb_path = os.path.join(folder, workdir_lib.EMB_DIR, f"img_emb_{n}.npy")
  workdir_lib.write_atomic(emb_path, lambda f: np.save(f, vectors.astype(np.float32)))
  workdir_lib.write_parquet(os.path.join(folder, workdir_lib.META_DIR, f"metadata_{n}.parquet"),
                            meta)
  return pa.table({"row": pa.array(rows, pa.int64()),
                   **{k: pa.array(v, t) for k, (v, t) in columns.items()},
                   "status": pa.array([r.status for r in reads], pa.string()),
                   "error": pa.array([r.detail or None for r in reads], pa.string())})


def _check(cfg: IndexConfig) -> None:
  if not cfg.images and not cfg.embeddings:
    raise InputError("give --images=TABLE and/or --embeddings=DIR")
  if cfg.images and not os.path.exists(cfg.images):
    raise InputError(f"--images={cfg.images}: file does not exist")
  if cfg.embeddings and not os.path.isdir(cfg.embeddings):
    raise InputError(f"--embeddings={cfg.embeddings}: folder does not exist")


def run(cfg: IndexConfig) -> Optional[workdir_lib.Manifest]:
  """Embeds cfg.images (if any), builds the FAISS index; returns the manifest
  (None on processes other than 0)."""
  t0 = time.perf_counter()
  _check(cfg)
  embedder, table = None, None
  if cfg.images:
    table = tables.open_prompts(cfg.images, None, cfg.csv_delimiter)
    if "url" not in table.schema.names and "image_path" not in table.schema.names:
      raise InputError(f"{cfg.images}: needs a column 'url' or 'image_path'; its columns are: "
                       f"{', '.join(table.schema.names)}")
    embedder = embed.load_embedder(cfg.embedder, cfg.embedder_checkpoint, cfg.batch_size)
    dim = embedder.dim
  else:  # precomputed only: the encoder that made them is recorded, for verify
    embed.parse_embedder(cfg.embedder, cfg.embedder_checkpoint)
    dim = retrieval.chunk_dim(retrieval.list_chunks(cfg.embeddings))
  retrieval.new_index(cfg.index_factory, dim)  # a bad factory fails before hours of embedding
  identity = {"images": os.path.abspath(cfg.images) if cfg.images else None,
              "images_content": fingerprint.path_identity(cfg.images) if cfg.images else None,
              "embeddings": os.path.abspath(cfg.embeddings) if cfg.embeddings else None,
              "embeddings_content": (fingerprint.files_identity(cfg.embeddings, [
                  c for chunk in retrieval.list_chunks(cfg.embeddings)
                  for c in (chunk.emb_path, chunk.meta_path)]) if cfg.embeddings else None),
              "embedder": embedder.identity if embedder else None,
              "max_images": cfg.max_images, "chunk_rows": cfg.chunk_rows}
  # The FAISS index is built again by every run (cheap next to embedding), so its
  # settings are not part of the identity: another factory reuses the embeddings.
  stage = engine.StageRun(cfg.workdir, STAGE, identity, cfg.overwrite, started=t0)
  load_s = time.perf_counter() - t0
  stats = engine.LoopStats()
  if table is not None:
    n_rows = table.num_rows if cfg.max_images is None else min(table.num_rows, cfg.max_images)
    base_dir = os.path.dirname(os.path.abspath(cfg.images))
    todo = stage.todo(n_rows, cfg.chunk_rows)
    with concurrent.futures.ThreadPoolExecutor(_LOAD_THREADS) as pool:
      stats = stage.loop(
          todo, lambda a, b: _load_chunk(table, base_dir, a, b, pool),
          lambda a, b, loaded: _embed_chunk(cfg, stage.dir, base_dir, embedder, a, b, loaded),
          "images", cfg.log_interval_s)
  if not stage.complete():
    return None
  sources = ([os.path.abspath(cfg.embeddings)] if cfg.embeddings else []) + (
      [os.path.abspath(stage.dir)] if cfg.images else [])
  chunks: List[retrieval.Chunk] = []
  for source in sources:
    chunks.extend(retrieval.list_chunks(source))
  dim = retrieval.chunk_dim(chunks)
  if embedder and dim != embedder.dim:
    raise InputError(f"--embeddings={cfg.embeddings} holds {dim}-wide vectors but "
                     f"--embedder={cfg.embedder} makes {embedder.dim}-wide ones")
  t1 = time.perf_counter()
  index = retrieval.build_index(cfg.index_factory, chunks, dim, cfg.nprobe, cfg.max_train)
  build_s = time.perf_counter() - t1
  retrieval.save_index(index, os.path.join(stage.dir, workdir_lib.FAISS_INDEX))
  counts: Dict = {"vectors": int(index.ntotal)}
  if table is not None:
    counts.update(engine.status_counts(stage.dir))
  logging.info("index: %d vectors of width %d, %s", index.ntotal, dim, cfg.index_factory)
  return stage.write_manifest(
      cfg, counts=counts,
      timings={"load_s": load_s, "embed_s": stats.seconds, "images_this_run": stats.rows},
      rate=engine.rate(stats.rows, stats.seconds), rate_unit="images/s",
      outputs={"faiss_index": workdir_lib.FAISS_INDEX, "embeddings": workdir_lib.EMB_DIR,
               "metadata": workdir_lib.META_DIR, "status": "part-*.parquet"},
      runtime=distributed.runtime_info(),
      details={"sources": sources, "dim": dim, "ntotal": int(index.ntotal), "build_s": build_s,
               "index_factory": cfg.index_factory, "nprobe": cfg.nprobe,
               "embedder": cfg.embedder,
               "embedder_checkpoint": (os.path.abspath(cfg.embedder_checkpoint)
                                       if cfg.embedder_checkpoint else None),
               "embedder_identity": embedder.identity if embedder else None},
      # A run that embedded nothing keeps the timings and rate of the one that did;
      # the index it built (every run builds it) is described in `details`.
      did_work=stats.rows > 0 or table is None)
