"""The workdir layout, declared once, and the one way files get into it.

A workdir is the unit of work. Every stage writes only inside its own folder:

    WORKDIR/<stage>/run_config.json   what a resume must match (resumable stages)
    WORKDIR/<stage>/manifest.json     one `Manifest`: config, identity, counts,
                                      timings, rate, outputs, runtime
    WORKDIR/<stage>/part-*.parquet    row shards of a batched stage
    WORKDIR/<stage>/top_k.parquet     its K best rows (scan, blackbox)
    WORKDIR/<stage>/...               the stage's own outputs, named below

Stages: scan, blackbox, generate, index, verify, metrics, report, extract,
crosscheck. Every
module that reads or writes a stage's files takes the names from here. Every file
is written through `write_atomic`: a temporary name in the same folder, fsync,
rename, fsync of the folder, so a reader (or a resumed run) never sees half a
file and a killed writer leaves only a temporary file that the next run ignores.
"""
import dataclasses
import json
import os
import shutil
from typing import Any, BinaryIO, Callable, Dict, Optional

from memjax.runtime.errors import InputError

STAGES = ("scan", "blackbox", "generate", "index", "verify", "metrics", "report", "extract",
          "crosscheck")

# Files every stage may have.
RUN_CONFIG = "run_config.json"
MANIFEST = "manifest.json"
TOP_K = "top_k.parquet"
# Stage outputs, relative to the stage folder.
IMAGES = "images"  # blackbox, generate: images/<prompt_id>/<seed>.png
IMAGE_TABLE = "images.parquet"  # blackbox --save_images: one row per PNG
GENERATED_TABLE = "generated.parquet"  # generate: one row per (prompt, seed)
VERIFY_TABLE = "verify.parquet"  # verify: one row per prompt
TEMPLATES = "templates"  # verify: template PNGs, masks, templates.parquet
IMAGE_CACHE = "image_cache"  # verify: downloaded training images
FAISS_INDEX = "faiss.index"  # index
EMB_DIR, META_DIR = "img_emb", "metadata"  # index (LAION layout)
REPORT_PAGE = "index.html"  # report
REPORT_IMAGES = "img"  # report: every image the page shows
CROSSCHECK_TABLE = "crosscheck.parquet"  # crosscheck: both scores of every prompt


def stage_dir(workdir: str, stage: str) -> str:
  """WORKDIR/<stage>."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}")
  return os.path.join(workdir, stage)


def path(workdir: str, stage: str, *parts: str) -> str:
  """WORKDIR/<stage>/<parts...>."""
  return os.path.join(stage_dir(workdir, stage), *parts)


def resolve(location: str, stage: str) -> str:
  """The stage folder named by `location`: a workdir holding <stage>/, or the
  stage folder itself (its manifest says so). Else WORKDIR/<stage>, absent."""
  inside = os.path.join(location, stage)
  if os.path.isdir(inside):
    return inside
  manifest = os.path.join(location, MANIFEST)
  if os.path.isfile(manifest):
    try:
      if read_json(manifest).get("stage") == stage:
        return location
    except InputError:
      pass
  return inside


# ---- atomic writes ------------------------------------------------------------------

def _fsync_dir(folder: str) -> None:
  """Makes a rename durable; some filesystems cannot fsync a folder."""
  try:
    fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    pass


def tmp_name(path_: str, tag: str = "") -> str:
  """The temporary name `write_atomic` uses for path_ (a dot file beside it)."""
  folder, name = os.path.split(os.path.abspath(path_))
  return os.path.join(folder, f".{name}{tag}.{os.getpid()}.tmp")


def write_atomic(path_: str, write: Callable[[BinaryIO], Any], tmp: Optional[str] = None) -> None:
  """Calls write(file) on a temporary file, fsyncs it and renames it to path_.

  On any error the temporary file is removed and path_ is left as it was.
  """
  folder = os.path.dirname(os.path.abspath(path_))
  os.makedirs(folder, exist_ok=True)
  tmp = tmp or tmp_name(path_)
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path_)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync_dir(folder)


def write_json(path_: str, obj) -> None:
  """obj as indented JSON with sorted keys, atomically."""
  data = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
  write_atomic(path_, lambda f: f.write(data.encode("utf-8")))


def write_parquet(path_: str, table, **kwargs) -> None:
  """A pyarrow table as parquet, atomically."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  write_atomic(path_, lambda f: pq.write_table(table, f, **kwargs))


def write_text(path_: str, text: str) -> None:
  write_atomic(path_, lambda f: f.write(text.encode("utf-8")))


def read_json(path_: str):
  """The JSON in path_; InputError naming the file if it is missing or broken."""
  try:
    with open(path_, "rb") as f:
      return json.load(f)
  except FileNotFoundError:
    raise InputError(f"{path_} does not exist.") from None
  except (ValueError, OSError) as e:
    raise InputError(f"{path_}: cannot read as JSON: {e}") from None


def remove(path_: str) -> None:
  """Deletes a file or folder if it exists."""
  if os.path.isdir(path_) and not os.path.islink(path_):
    shutil.rmtree(path_)
  elif os.path.lexists(path_):
    os.remove(path_)


# ---- the manifest ---------------------------------------------------------------------

@dataclasses.dataclass
class Manifest:
  """What a stage did, written last to WORKDIR/<stage>/manifest.json.

  Attributes:
    stage: the stage's name.
    config: every field of the stage's config (the flags, resolved).
    identity: what a resume must match (the run config): inputs, model, noise.
    counts: rows and their statuses, images, labels: whatever the stage counts.
    timings: seconds by phase of the run that did the work (`total_s` always).
    rate: `rate_unit` per second of that run; None when it did nothing.
    rate_unit: e.g. "prompts/s", "images/s".
    outputs: name -> path relative to the stage folder.
    runtime: backend, JAX version, devices, processes, compiles.
    details: anything else the stage reports (sampler plan, thresholds, ...).
    resumed_finished: this run found the work done; timings and rate are those
      of the run that did it.
  """
  stage: str
  config: Dict
  identity: Dict = dataclasses.field(default_factory=dict)
  counts: Dict = dataclasses.field(default_factory=dict)
  timings: Dict = dataclasses.field(default_factory=dict)
  rate: Optional[float] = None
  rate_unit: str = ""
  outputs: Dict = dataclasses.field(default_factory=dict)
  runtime: Dict = dataclasses.field(default_factory=dict)
  details: Dict = dataclasses.field(default_factory=dict)
  resumed_finished: bool = False

  @classmethod
  def from_dict(cls, d: Dict) -> "Manifest":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def write_manifest(workdir: str, manifest: Manifest, did_work: bool = True) -> Manifest:
  """Writes the stage's manifest. A run that found the work done keeps the
  timings and rate of the manifest already there (a rerun is not a 0/s run)."""
  target = path(workdir, manifest.stage, MANIFEST)
  if not did_work and os.path.isfile(target):
    try:
      old = Manifest.from_dict(read_json(target))
      manifest.timings, manifest.rate = old.timings, old.rate
      manifest.resumed_finished = True
    except (InputError, TypeError):
      pass
  write_json(target, dataclasses.asdict(manifest))
  return manifest


def read_manifest(workdir: str, stage: str) -> Optional[Manifest]:
  """The stage's manifest, or None if the stage has not finished there."""
  target = path(workdir, stage, MANIFEST)
  if not os.path.isfile(target):
    return None
  return Manifest.from_dict(read_json(target))


# ---- the run config -------------------------------------------------------------------

def check_run_config(workdir: str, stage: str, config: Dict, overwrite: bool) -> str:
  """Records `config` for the stage, or checks it against the recorded one.

  Call it on process 0 only, before anything is written, and let the other
  processes wait (a barrier): with overwrite it deletes the stage's folder.

  Returns:
    "new" (nothing recorded), "resume" (same config) or "overwrite".

  Raises:
    InputError: the recorded config differs (the message lists each key, old
      and new value), or outputs exist without a recorded config.
  """
  folder = stage_dir(workdir, stage)
  record = os.path.join(folder, RUN_CONFIG)
  config = json.loads(json.dumps(config, sort_keys=True))  # tuples == lists
  fix = "Pass --overwrite to delete its outputs and start again, or use another --workdir."
  if overwrite:
    remove(folder)
    write_json(record, config)
    return "overwrite"
  if os.path.exists(record):
    try:
      old = read_json(record)
    except InputError as e:
      raise InputError(f"{e} {fix}") from None
    if old == config:
      return "resume"
    missing = "<not set>"
    changed = [k for k in sorted(set(old) | set(config))
               if old.get(k, missing) != config.get(k, missing)]
    lines = [f"  {k}: {json.dumps(old.get(k, missing))} -> {json.dumps(config.get(k, missing))}"
             for k in changed]
    for k in changed:  # an input's content identity: `<name>_content`, `model_identity`
      name = "model" if k == "model_identity" else k[:-len("_content")] \
          if k.endswith("_content") else None
      if name and config.get(name) and config.get(name) == old.get(name):
        lines.append(f"  {config[name]} changed since that run began (same path, other "
                     "content)")
    raise InputError(f"{workdir} holds a {stage} run with other settings ({record}):\n" +
                     "\n".join(lines) + "\n" + fix)
  leftovers = [n for n in os.listdir(folder) if not n.startswith(".")] \
      if os.path.isdir(folder) else []
  if leftovers:
    raise InputError(f"{folder} holds outputs ({', '.join(sorted(leftovers)[:3])}, ...) but "
                     f"{record} is missing, so they may come from other settings. " + fix)
  write_json(record, config)
  return "new"
