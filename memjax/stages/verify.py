"""Ground-truth labels of generated images: retrieval, template masks, TV/MV/RV/N.

docs/method.md sections 5 to 7. `generated` is a workdir (or its generate stage
folder) whose `generated.parquet` has one row per generated image: `prompt_id`,
`caption`, `seed`, `sampler`, `steps`, `image_path` (relative to the stage
folder or absolute) and the prompt table's columns, e.g. `index`, `url`,
`scores`, `edge_scores`. `index` is a workdir (or its index stage folder) built by
`memjax.index`. For each prompt:

1. its generated images are embedded with the index's encoder and the k nearest
   training images of each are retrieved (FAISS, inner product on unit
   vectors); the prompt's group is the union, most similar first;
2. the group's images and the prompt's own training image (found in the index
   by the prompt's `index`, else by its `url`) are loaded at 256 x 256
   (Lanczos, no crop); a missing one is recorded, never compared as black;
3. template masks come from the group (`method.masks`): its near-duplicate
   pairs (`template_rule="pair"`, the default) or the images that share a
   layout with several others (`"group"`);
4. the label is TV, MV, RV or N (`method.labels`), every threshold a setting.

`WORKDIR/verify/` gets `verify.parquet` (one row per prompt: the reference's
columns `caption, index, url, scores, edge_scores, overfit_type, gen_seeds,
retrieved_urls, mse_real_gen, template_indices`, then memjax's own: every
measured error, matched ids, statuses; see `_row`), `templates/` (each template
PNG with its mask PNG beside it, listed in `templates/templates.parquet`),
`image_cache/` (downloaded training images), `run_config.json` and
`manifest.json`. `mse_real_gen` is, like the reference's thresholds, a SUM of
squared differences (min over seeds, to the prompt's own image) despite its
name. A rerun recomputes everything (cheap next to generation) and refuses
other settings without `overwrite`.
"""
import collections
import dataclasses
import os
import time
from typing import Dict, List, Optional

from absl import logging
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memjax.data import embed
from memjax.data import images as images_lib
from memjax.data import retrieval
from memjax.data import templates as templates_lib
from memjax.method import labels as labels_lib
from memjax.method import masks as masks_lib
from memjax.runtime import checks
from memjax.runtime import distributed
from memjax.runtime import engine
from memjax.runtime import progress as progress_lib
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError

STAGE = "verify"
_PER_IMAGE = ("seed", "image_path", "status")  # generated.parquet columns not per prompt
_REFERENCE_COLUMNS = ("caption", "index", "url", "scores", "edge_scores", "overfit_type",
                      "gen_seeds", "retrieved_urls", "mse_real_gen", "template_indices")
_CACHE_IMAGES = 512  # ~400 MB of 256 x 256 x 3 float32 training images
_MEMO_PAIRS = 500_000  # agreement fractions the group rule keeps (about 100 MB)
_EMBED_CHUNK = 256  # generated images decoded at once for the encoder


# The template rules (`method.masks`) and the settings only each one reads.
_RULE_FIELDS = {"pair": ("template_sse_low", "template_sse_high"),
                "group": ("template_agree_low", "template_agree_high",
                          "template_min_partners")}


@dataclasses.dataclass
class VerifyConfig:
  """The verify stage's settings (each one a flag of `python -m memjax.verify`)."""
  generated: str
  index: str
  workdir: str
  k: int = 16
  nprobe: Optional[int] = None
  embedder: Optional[str] = None  # None: the encoder the index was built with
  embedder_checkpoint: Optional[str] = None
  batch_size: int = 32
  tv_threshold: float = labels_lib.Thresholds.tv
  mv_threshold: float = labels_lib.Thresholds.mv
  rv_threshold: float = labels_lib.Thresholds.rv
  template_sse_low: float = masks_lib.SSE_LOW
  template_sse_high: float = masks_lib.SSE_HIGH
  template_pixel_tol: float = masks_lib.PIXEL_TOL
  template_rule: str = "pair"  # or "group" (docs/method.md section 6)
  template_agree_low: float = masks_lib.AGREE_LOW
  template_agree_high: float = masks_lib.AGREE_HIGH
  template_min_partners: int = masks_lib.MIN_PARTNERS
  max_prompts: Optional[int] = None
  overwrite: bool = False
  log_interval_s: float = 30.0

  def __post_init__(self):
    checks.at_least(self, 1, "k", "nprobe", "batch_size", "max_prompts",
                    "template_min_partners")
    checks.at_least(self, 0, "tv_threshold", "mv_threshold", "rv_threshold", "template_sse_low",
                    "template_agree_low", "log_interval_s")
    checks.finite(self, "tv_threshold", "mv_threshold", "rv_threshold", "template_sse_low",
                  "template_sse_high", "template_pixel_tol", "template_agree_low",
                  "template_agree_high")
    checks.one_of(self, "template_rule", tuple(_RULE_FIELDS))
    if not self.template_agree_low < self.template_agree_high <= 1:
      raise InputError(f"--template_agree_low={self.template_agree_low} must be below "
                       f"--template_agree_high={self.template_agree_high}, at most 1")
    if not self.template_sse_low < self.template_sse_high:
      raise InputError(f"--template_sse_low={self.template_sse_low} must be below "
                       f"--template_sse_high={self.template_sse_high}")
    if not self.template_pixel_tol > 0:
      raise InputError(f"--template_pixel_tol must be > 0, got {self.template_pixel_tol}")

  @property
  def thresholds(self) -> labels_lib.Thresholds:
    return labels_lib.Thresholds(self.tv_threshold, self.mv_threshold, self.rv_threshold)

  def identity(self, generated_dir: str, store: retrieval.IndexStore) -> Dict:
    d = dataclasses.asdict(self)
    for key in ("workdir", "overwrite", "batch_size", "embedder_checkpoint", "log_interval_s"):
      d.pop(key)
    for rule, fields in _RULE_FIELDS.items():  # only the chosen rule's settings count
      if rule != self.template_rule:
        for key in fields:
          d.pop(key)
    if self.template_rule == "pair":
      d.pop("template_rule")  # as recorded before the group rule existed
    d["generated"], d["index"] = os.path.abspath(generated_dir), os.path.abspath(store.directory)
    d["index_ntotal"] = store.info.get("ntotal")
    return d


def _embedder(cfg: VerifyConfig, manifest: Dict) -> embed.ImageEmbedder:
  """The index's encoder (or the one asked for, if it is the same)."""
  name = cfg.embedder or manifest["embedder"]
  if name != manifest["embedder"]:
    raise InputError(f"--embedder={name} but {cfg.index} was built with "
                     f"{manifest['embedder']}; queries must use the same encoder")
  checkpoint = cfg.embedder_checkpoint or manifest.get("embedder_checkpoint")
  embedder = embed.load_embedder(name, checkpoint, cfg.batch_size)
  built = manifest.get("embedder_identity")
  if built and built.get("checkpoint") != embedder.identity.get("checkpoint"):
    raise InputError(f"--embedder_checkpoint={checkpoint} is not the file {cfg.index} was "
                     f"built with ({built.get('checkpoint')})")
  if embedder.dim != manifest["dim"]:
    raise InputError(f"{name} makes {embedder.dim}-wide vectors; {cfg.index} holds "
                     f"{manifest['dim']}-wide ones")
  return embedder


def _read_generated(folder: str, location: str) -> pa.Table:
  path = os.path.join(folder, workdir_lib.GENERATED_TABLE)
  if not os.path.isfile(path):
    raise InputError(f"--generated={location}: no {path} (run memjax.generate)")
  try:
    table = pq.read_table(path)
  except (OSError, pa.ArrowException) as e:
    raise InputError(f"{path}: cannot read: {e}") from None
  need = [c for c in ("prompt_id", "seed", "image_path") if c not in table.column_names]
  if need:
    raise InputError(f"{path}: missing column(s) {need}; its columns are "
                     f"{', '.join(table.column_names)}")
  return table


class _ImageCache:
  """Training images as [256, 256, 3] arrays, by FAISS id, least recently used out."""

  def __init__(self, cache_dir: str):
    self.cache_dir = cache_dir
    self.items: "collections.OrderedDict" = collections.OrderedDict()

  def get(self, key, ref: Optional[str]):
    if key in self.items:
      self.items.move_to_end(key)
      return self.items[key]
    read = images_lib.read_image(ref, cache_dir=self.cache_dir)
    item = ((images_lib.to_unit(read.pixels, labels_lib.IMAGE_SIZE) if read.usable else None),
            read.status, read.detail)
    self.items[key] = item
    if len(self.items) > _CACHE_IMAGES:
      self.items.popitem(last=False)
    return item


class _OwnImages:
  """Finds a prompt's own training image in the index, by `index` then `url`."""

  def __init__(self, store: retrieval.IndexStore):
    self.by_index: Dict = {}
    self.by_url: Dict = {}
    tables = [store.training.table()]
    statuses = store.statuses()
    if statuses is not None:  # images that were not embedded (missing) are known too
      tables.append(statuses.filter(pc.not_equal(statuses["status"], "ok")))
    for table in tables:
      for row in table.to_pylist():
        if row.get("index") is not None:
          self.by_index.setdefault(str(row["index"]), row)
        if row.get("url"):
          self.by_url.setdefault(row["url"], row)

  def find(self, index, url) -> Optional[dict]:
    if index is not None and str(index) in self.by_index:
      return self.by_index[str(index)]
    return self.by_url.get(url) if url else None


def _key(row: dict):
  """A training image's id in the output: its `index`, else its FAISS id."""
  return row["index"] if row.get("index") is not None else row.get("id")


def _row(first: dict, prompt_id, result: Optional[labels_lib.LabelResult], extra: Dict) -> Dict:
  """One output row: the reference's columns first, then memjax's."""
  refs = extra["matched_refs"]
  out = {"caption": first.get("caption"), "index": first.get("index"),
         "url": first.get("url"), "scores": first.get("scores"),
         "edge_scores": first.get("edge_scores"),
         "overfit_type": result.label if result and extra["verify_status"] == "ok" else None,
         "gen_seeds": result.gen_seeds if result else [],
         "retrieved_urls": refs,
         "mse_real_gen": result.mv_error if result else None,
         "template_indices": [str(i) for i in result.tv_matched_ids] if result else [],
         "prompt_id": prompt_id}
  if result:
    row = result.as_row()
    row.pop("overfit_type")
    for key in ("matched_ids", "tv_matched_ids", "rv_matched_ids", "missing_ids"):
      row[key] = [str(i) for i in row[key]]
    out.update(row)
  out.update({k: v for k, v in extra.items() if k != "matched_refs"})
  for name, value in first.items():  # the remaining input columns, kept
    if name in _PER_IMAGE or name in ("caption", "index", "url", "scores", "edge_scores",
                                      "prompt_id"):
      continue
    out["input_" + name if name in out else name] = value
  return out


def _embed_generated(cfg: VerifyConfig, gen_dir: str, embedder, store, order, by_prompt):
  """Loads, embeds and searches every generated image of the prompts in order.

  Returns:
    images: (prompt_id, seed) -> uint8 [256, 256, 3] (a quarter of float32,
      kept until the prompt is labelled); statuses: (prompt_id, seed) -> "ok"
      or why it is missing; neighbours: prompt_id -> {FAISS id: best
      similarity over the prompt's images}.
  """
  images, statuses, keys, vectors, pending = {}, {}, [], [], []

  def flush():
    vectors.append(embedder.embed([im for _, im in pending]))
    keys.extend(key for key, _ in pending)
    pending.clear()

  for pid in order:
    for r in by_prompt[pid]:
      read = images_lib.read_image(r["image_path"], gen_dir)
      status, error = read.status, read.detail
      if not r["image_path"] and r.get("status") not in (None, "ok"):
        error = f"not generated ({r['status']})"  # generate's reason, e.g. an empty caption
      statuses[(pid, r["seed"])] = status if status == "ok" else f"{status}: {error}"
      if read.usable:
        image = read.pil()
        images[(pid, r["seed"])] = images_lib.resize_uint8(image, labels_lib.IMAGE_SIZE)
        pending.append(((pid, r["seed"]), image))
        if len(pending) >= _EMBED_CHUNK:
          flush()
  flush()
  sims, ids = store.search(np.concatenate(vectors), cfg.k)
  neighbours = collections.defaultdict(dict)
  for (pid, _), row_sims, row_ids in zip(keys, sims, ids):
    best = neighbours[pid]
    for s, i in zip(row_sims, row_ids):
      if i >= 0 and s > best.get(int(i), -np.inf):
        best[int(i)] = float(s)
  return images, statuses, neighbours


def _templates(cfg: VerifyConfig, retrieved, group_keys, pid,
               memo: dict) -> List[masks_lib.Template]:
  """The retrieved group's templates under cfg.template_rule. `memo` keeps the
  group rule's agreement fractions by training-image pair (`_key`, which names a
  training image) across prompts; it is emptied past _MEMO_PAIRS entries."""
  if cfg.template_rule == "group":
    if len(memo) > _MEMO_PAIRS:
      memo.clear()
    return masks_lib.templates_by_agreement(
        retrieved, group_keys, group=pid, agree_low=cfg.template_agree_low,
        agree_high=cfg.template_agree_high, min_partners=cfg.template_min_partners,
        pixel_tol=cfg.template_pixel_tol, memo=memo)
  return masks_lib.templates_for_group(
      retrieved, group_keys, group=pid, sse_low=cfg.template_sse_low,
      sse_high=cfg.template_sse_high, pixel_tol=cfg.template_pixel_tol)


def _label_prompt(cfg, store, cache, own_images, pid, gen, images, statuses, best, memo):
  """Retrieved group, templates and label of one prompt -> (row, templates)."""
  first = gen[0]
  group_ids = sorted(best, key=lambda i: -best[i])  # most similar first
  group = store.training.rows(group_ids)
  loaded = [cache.get(("id", row["id"]), images_lib.image_ref(row)) for row in group]
  retrieved = [im for im, _, _ in loaded]
  group_keys = [_key(row) for row in group]
  refs = [images_lib.image_ref(row) for row in group]
  templates = _templates(cfg, retrieved, group_keys, pid, memo)
  own_row = own_images.find(first.get("index"), first.get("url"))
  own_ref = images_lib.image_ref(own_row) if own_row else first.get("url")
  own, own_status, own_error = cache.get(("ref", own_ref), own_ref)
  present = [r["seed"] for r in gen if (pid, r["seed"]) in images]
  result, matched_refs = None, []
  if present:
    generated = np.stack([images[(pid, s)] for s in present]).astype(np.float32) / 255.0
    result = labels_lib.label_prompt(generated, own, retrieved, templates,
                                     own_id=first.get("index"), retrieved_ids=group_keys,
                                     seeds=present, thresholds=cfg.thresholds)
    ref_of = dict(zip(map(str, group_keys), refs))
    matched_refs = ([own_ref] if result.label == "MV" else
                    [ref_of.get(str(i)) for i in result.matched_ids])
  status = "ok" if result else "no_generated_images"
  if result and result.label == "N" and own is None and not (result.n_retrieved or
                                                             result.n_templates):
    status = "nothing_compared"  # no training image could be read: N would be a guess
  extra = {
      "verify_status": status,
      "gen_status": [statuses[(pid, r["seed"])] for r in gen],
      "own_ref": own_ref, "own_load_status": own_status, "own_error": own_error or None,
      "own_in_index": own_row is not None and own_row.get("id") is not None,
      "retrieved_ids": [str(k) for k in group_keys], "retrieved_refs": refs,
      "retrieved_similarity": [best[i] for i in group_ids],
      "retrieved_status": [s for _, s, _ in loaded],
      "template_count": len(templates), "matched_refs": matched_refs}
  return _row(first, pid, result, extra), templates


def run(cfg: VerifyConfig) -> workdir_lib.Manifest:
  """Labels every prompt of cfg.generated into WORKDIR/verify; returns the manifest.

  Runs on one process (the caller runs it on process 0).
  """
  t_start = time.perf_counter()
  gen_dir = workdir_lib.resolve(cfg.generated, "generate")
  table = _read_generated(gen_dir, cfg.generated)
  store = retrieval.IndexStore(cfg.index, cfg.nprobe)
  embedder = _embedder(cfg, store.info)
  identity = cfg.identity(gen_dir, store)
  workdir_lib.check_run_config(cfg.workdir, STAGE, identity, cfg.overwrite)
  folder = workdir_lib.stage_dir(cfg.workdir, STAGE)
  by_prompt = collections.defaultdict(list)
  for r in table.to_pylist():
    by_prompt[r["prompt_id"]].append(r)
  order = list(by_prompt)[:cfg.max_prompts]  # in table order

  t0 = time.perf_counter()
  images, statuses, neighbours = _embed_generated(cfg, gen_dir, embedder, store, order,
                                                  by_prompt)
  embed_search_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  cache = _ImageCache(os.path.join(folder, workdir_lib.IMAGE_CACHE))
  own_images = _OwnImages(store)
  memo = {}  # the group rule's agreement fractions, by training-image pair
  out_rows, all_templates, counts = [], [], collections.Counter()
  progress = progress_lib.Progress(len(order), "prompts labelled", cfg.log_interval_s)
  for pid in order:
    row, templates = _label_prompt(cfg, store, cache, own_images, pid, by_prompt[pid], images,
                                   statuses, neighbours[pid], memo)
    for seed in (r["seed"] for r in by_prompt[pid]):
      images.pop((pid, seed), None)  # labelled: free its pixels
    out_rows.append(row)
    all_templates.extend(templates)
    counts[row["overfit_type"] or row["verify_status"]] += 1
    progress.update(1)
  label_s = time.perf_counter() - t0
  workdir_lib.remove(os.path.join(folder, workdir_lib.TEMPLATES))  # no stale PNGs
  templates_lib.save_templates(os.path.join(folder, workdir_lib.TEMPLATES), all_templates)
  workdir_lib.write_parquet(os.path.join(folder, workdir_lib.VERIFY_TABLE), _to_table(out_rows))
  logging.info("verify: %d prompts, labels %s", len(out_rows), dict(sorted(counts.items())))
  manifest = workdir_lib.Manifest(
      stage=STAGE, config=dataclasses.asdict(cfg), identity=identity,
      counts={"prompts": len(out_rows), "labels": dict(sorted(counts.items())),
              "templates": len(all_templates), "generated_images": len(statuses)},
      timings={"embed_search_s": embed_search_s, "label_s": label_s,
               "total_s": time.perf_counter() - t_start},
      rate=engine.rate(len(out_rows), label_s),
      rate_unit="prompts/s",
      outputs=dict({"table": workdir_lib.VERIFY_TABLE, "templates": workdir_lib.TEMPLATES},
                   **({"image_cache": workdir_lib.IMAGE_CACHE}  # only when it downloaded
                      if os.path.isdir(cache.cache_dir) else {})),
      runtime=distributed.runtime_info(),
      details={"thresholds": dataclasses.asdict(cfg.thresholds), "k": cfg.k,
               "index": {k: store.info.get(k) for k in ("ntotal", "dim", "index_factory",
                                                        "nprobe", "embedder")},
               "embedder_identity": embedder.identity})
  return workdir_lib.write_manifest(cfg.workdir, manifest)


_TYPES = {"scores": pa.float64(), "edge_scores": pa.float64(), "overfit_type": pa.string(),
          "gen_seeds": pa.list_(pa.int64()), "retrieved_urls": pa.list_(pa.string()),
          "mse_real_gen": pa.float64(), "template_indices": pa.list_(pa.string())}


def _to_table(out_rows: List[Dict]) -> pa.Table:
  """Rows -> table; a key absent from some rows is null there; the reference's
  columns get fixed types (an all-empty list column would be list<null>)."""
  names = list(dict.fromkeys(k for r in out_rows for k in r)) or list(_REFERENCE_COLUMNS)
  columns = {}
  for name in names:
    values = [r.get(name) for r in out_rows]
    columns[name] = pa.array(values, type=_TYPES.get(name))
  return pa.table(columns)
