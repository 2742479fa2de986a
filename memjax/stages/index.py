"""Training-image index: CLIP embeddings of a training set and a FAISS index.

    python -m memjax.index --images=TABLE --workdir=DIR [--embedder=ViT-L-14@openai
        --embedder_checkpoint=FILE] [--index_factory=Flat] [--nprobe=N]
    python -m memjax.index --embeddings=LAION_EMB_DIR --workdir=DIR --index_factory=IVF65536,PQ64

TABLE (parquet, jsonl, csv, tsv) has `url` and/or `image_path` (a path relative
to the table's folder, absolute, file:// or http(s)://), `caption` and
optionally `index` (the image's id in its training set; default: row number).
Each image is embedded with the open_clip encoder of --embedder
(`memjax.embed`), L2-normalised. A missing or unreadable image is recorded in
`status/` with its status and error and is not embedded (never as black).

WORKDIR, in the layout of LAION-style embeddings (`memjax.retrieval`):
`img_emb/img_emb_<n>.npy` [rows, D] float32 and `metadata/metadata_<n>.parquet`
(the images that were embedded: `index`, `url`, `image_path`, `caption`, `row`),
`status/status_<n>.parquet` (every input row of chunk n with `status`,
`error`), `faiss.index`, `manifest.json`, `run_config_index.json`. Chunk n is done
when its status file exists (written last, by atomic rename), so a rerun resumes;
other settings are refused without --overwrite. --embeddings adds a folder of
precomputed vectors (e.g. the LAION-2B-en ViT-L/14 image embeddings) ahead of
the embedded images; their FAISS ids come first.
"""
import concurrent.futures
import dataclasses
import os
import shutil
import time
from typing import Dict, List, Optional

from absl import flags
from absl import logging
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memjax import cli
from memjax.data import embed
from memjax.runtime import progress as progress_lib
from memjax.data import prompts as prompts_lib
from memjax.runtime import results
from memjax.data import retrieval
from memjax.runtime.errors import InputError

STAGE = "index"
_LOAD_THREADS = 8  # image decoding and downloads overlap; the encoder is one stream


@dataclasses.dataclass
class IndexConfig:
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

  def identity(self, embedder_identity: Optional[Dict]) -> Dict:
    """What changes the embeddings: a resume must match it exactly."""
    return {"images": os.path.abspath(self.images) if self.images else None,
            "embeddings": os.path.abspath(self.embeddings) if self.embeddings else None,
            "embedder": embedder_identity, "max_images": self.max_images,
            "chunk_rows": self.chunk_rows}


def _chunk_paths(workdir: str, n: int) -> Dict[str, str]:
  return {"emb": os.path.join(workdir, retrieval.EMB_DIR, f"img_emb_{n}.npy"),
          "meta": os.path.join(workdir, retrieval.META_DIR, f"metadata_{n}.parquet"),
          "status": os.path.join(workdir, retrieval.STATUS_DIR, f"status_{n}.parquet")}


def _write_atomic(path: str, write) -> None:
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
  write(tmp)
  os.replace(tmp, path)


def _column(table: pa.Table, name: str) -> list:
  return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows


def _embed_chunk(cfg: IndexConfig, table: pa.Table, rows: np.ndarray, embedder, n: int,
                 pool: concurrent.futures.Executor) -> None:
  """Loads, embeds and writes the images of one chunk (status file last)."""
  base_dir = os.path.dirname(os.path.abspath(cfg.images))
  urls, paths = _column(table, "url"), _column(table, "image_path")
  refs = [p if isinstance(p, str) and p.strip() else u for p, u in zip(paths, urls)]
  if "index" in table.column_names:
    index, index_type = table["index"].to_pylist(), table.schema.field("index").type
  else:
    index, index_type = [int(r) for r in rows], pa.int64()
  # No download cache here: only verify reloads (its k nearest) images.
  loaded = list(pool.map(lambda ref: retrieval.open_image(ref, base_dir), refs))
  ok = [i for i, (_, status, _) in enumerate(loaded) if status == "ok"]
  vectors = embedder.embed([loaded[i][0] for i in ok])

  def resolved(p):  # an absolute local path, so verify can run from anywhere
    local = isinstance(p, str) and p and "://" not in p and not os.path.isabs(p)
    return os.path.join(base_dir, p) if local else p

  captions = _column(table, "caption")
  columns = {"index": (index, index_type), "url": (urls, pa.string()),
             "image_path": ([resolved(p) for p in paths], pa.string()),
             "caption": (captions, pa.string())}
  meta = pa.table({k: pa.array([v[i] for i in ok], t) for k, (v, t) in columns.items()})
  meta = meta.append_column("row", pa.array(rows[ok], pa.int64()))
  status = pa.table({"row": pa.array(rows, pa.int64()),
                     **{k: pa.array(v, t) for k, (v, t) in columns.items()},
                     "status": pa.array([s for _, s, _ in loaded], pa.string()),
                     "error": pa.array([e for _, _, e in loaded], pa.string())})

  def save_npy(tmp):
    with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
      np.save(f, vectors.astype(np.float32))

  p = _chunk_paths(cfg.workdir, n)
  _write_atomic(p["emb"], save_npy)
  _write_atomic(p["meta"], lambda t: pq.write_table(meta, t))
  _write_atomic(p["status"], lambda t: pq.write_table(status, t))  # last: the chunk is done


def _embed_images(cfg: IndexConfig, embedder) -> Dict:
  """Embeds the rows of --images chunk by chunk, skipping finished chunks."""
  table = prompts_lib.open_prompts(cfg.images, "caption", cfg.csv_delimiter)
  names = table.schema.names
  if "url" not in names and "image_path" not in names:
    raise InputError(f"{cfg.images}: needs a column 'url' or 'image_path'; its columns are: "
                     f"{', '.join(names)}")
  n_rows = table.num_rows if cfg.max_images is None else min(table.num_rows, cfg.max_images)
  for sub in (retrieval.EMB_DIR, retrieval.META_DIR, retrieval.STATUS_DIR):
    os.makedirs(os.path.join(cfg.workdir, sub), exist_ok=True)
  chunks = [(n, s, min(s + cfg.chunk_rows, n_rows))
            for n, s in enumerate(range(0, n_rows, cfg.chunk_rows))]
  todo = [c for c in chunks if not os.path.exists(_chunk_paths(cfg.workdir, c[0])["status"])]
  progress = progress_lib.Progress(n_rows, what="images", interval_s=cfg.log_interval_s,
                                   initial=n_rows - sum(b - a for _, a, b in todo))
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(_LOAD_THREADS) as pool:
    for n, start, stop in todo:
      rows = np.arange(start, stop, dtype=np.int64)
      _embed_chunk(cfg, table.read(start, stop), rows, embedder, n, pool)
      progress.update(stop - start)
  embed_s = time.perf_counter() - t0
  counts: Dict[str, int] = {}
  for n, _, _ in chunks:
    status = pq.read_table(_chunk_paths(cfg.workdir, n)["status"], columns=["status"])
    for s in status["status"].to_pylist():
      counts[s] = counts.get(s, 0) + 1
  done_now = sum(b - a for _, a, b in todo)
  return {"rows": n_rows, "chunks": len(chunks), "counts": counts,
          "embedded_this_run": done_now, "embed_s": embed_s,
          "images_per_s": done_now / embed_s if embed_s and done_now else None}


def run(cfg: IndexConfig) -> Dict:
  """Embeds cfg.images (if any), builds the FAISS index; returns the manifest."""
  t_start = time.perf_counter()
  if not cfg.images and not cfg.embeddings:
    raise InputError("give --images=TABLE and/or --embeddings=DIR")
  if cfg.images and not os.path.exists(cfg.images):
    raise InputError(f"--images={cfg.images}: file does not exist")
  if cfg.embeddings and not os.path.isdir(cfg.embeddings):
    raise InputError(f"--embeddings={cfg.embeddings}: folder does not exist")
  if cfg.chunk_rows < 1 or cfg.batch_size < 1:
    raise InputError("chunk_rows and --batch_size must be >= 1")
  embedder = None
  if cfg.images:
    embedder = embed.load_embedder(cfg.embedder, cfg.embedder_checkpoint, cfg.batch_size)
    dim = embedder.dim
  else:  # precomputed only: the encoder that made them is recorded, for verify
    embed.parse_embedder(cfg.embedder, cfg.embedder_checkpoint)
    dim = retrieval.chunk_dim(retrieval.list_chunks(cfg.embeddings))
  retrieval.new_index(cfg.index_factory, dim)  # a bad factory fails before hours of embedding
  identity = cfg.identity(embedder.identity if embedder else None)
  if cfg.overwrite:
    for sub in (retrieval.EMB_DIR, retrieval.META_DIR, retrieval.STATUS_DIR):
      shutil.rmtree(os.path.join(cfg.workdir, sub), ignore_errors=True)
    for name in (retrieval.INDEX_FILE, retrieval.MANIFEST):
      if os.path.exists(os.path.join(cfg.workdir, name)):
        os.remove(os.path.join(cfg.workdir, name))
  results.check_run_config(cfg.workdir, identity, cfg.overwrite, stage=STAGE)

  embed_info = _embed_images(cfg, embedder) if cfg.images else None
  sources = ([os.path.abspath(cfg.embeddings)] if cfg.embeddings else []) + (
      [os.path.abspath(cfg.workdir)] if cfg.images else [])
  chunks: List[retrieval.Chunk] = []
  for source in sources:
    chunks.extend(retrieval.list_chunks(source))
  dim = retrieval.chunk_dim(chunks)
  if embedder and dim != embedder.dim:
    raise InputError(f"--embeddings={cfg.embeddings} holds {dim}-wide vectors but "
                     f"--embedder={cfg.embedder} makes {embedder.dim}-wide ones")
  t0 = time.perf_counter()
  index = retrieval.build_index(cfg.index_factory, chunks, dim, cfg.nprobe, cfg.max_train)
  build_s = time.perf_counter() - t0
  retrieval.save_index(index, os.path.join(cfg.workdir, retrieval.INDEX_FILE))
  manifest = {
      "stage": STAGE, "sources": sources, "dim": dim, "ntotal": int(index.ntotal),
      "index_factory": cfg.index_factory, "nprobe": cfg.nprobe,
      "embedder": cfg.embedder,
      "embedder_checkpoint": (os.path.abspath(cfg.embedder_checkpoint)
                              if cfg.embedder_checkpoint else None),
      "embedder_identity": embedder.identity if embedder else None,
      "images": embed_info, "config": dataclasses.asdict(cfg),
      "timings": {"build_s": build_s, "total_s": time.perf_counter() - t_start}}
  results.write_json_atomic(os.path.join(cfg.workdir, retrieval.MANIFEST), manifest)
  logging.info("index: %d vectors of width %d, %s", index.ntotal, dim, cfg.index_factory)
  return manifest


# ---- command line -----------------------------------------------------------------

_IMAGES = cli.IMAGES  # shared with memjax.blackbox (one flag name per process)
_EMBEDDINGS = flags.DEFINE_string(
    "embeddings", None, "Folder of precomputed embeddings: img_emb/img_emb_<n>.npy + "
    "metadata/metadata_<n>.parquet (LAION layout).")
_FACTORY = flags.DEFINE_string(
    "index_factory", "Flat", "FAISS index-factory string (Flat, IVF4096,Flat, IVF65536,PQ64, ...); "
    "inner product on unit vectors.")


def _config_from_flags() -> IndexConfig:
  f = cli.common_flag_values(required=("workdir",))
  return IndexConfig(
      workdir=f["workdir"], images=_IMAGES.value, embeddings=_EMBEDDINGS.value,
      embedder=embed.EMBEDDER_FLAG.value, embedder_checkpoint=embed.CHECKPOINT_FLAG.value,
      index_factory=_FACTORY.value, nprobe=retrieval.NPROBE_FLAG.value,
      batch_size=f["batch_size"], csv_delimiter=f["csv_delimiter"],
      max_images=f["max_prompts"], overwrite=f["overwrite"],
      log_interval_s=f["log_interval_s"])


def main(argv):
  del argv
  cfg = _config_from_flags()
  m = run(cfg)
  counts = (m["images"] or {}).get("counts", {})
  print(f"index done: {m['ntotal']} vectors ({m['index_factory']}, width {m['dim']}); "
        f"images {counts or 'none'}; in {cfg.workdir}")


if __name__ == "__main__":
  cli.run_main(main)
