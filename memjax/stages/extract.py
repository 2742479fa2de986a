"""The whole attack as one command: scan -> blackbox -> generate -> verify -> metrics -> report.

    python -m memjax.extract --flagfile=configs/demo.flags --workdir=DIR

Each stage is the library's own `run(Config)`, called in-process, in one workdir:

  DIR/scan/, manifest.json, top_k.parquet     memjax.scan: the DCS of every caption
  DIR/blackbox/, images/                      memjax.blackbox: edge scores and one-step
                                              images of the scan's top K
  DIR/generated/, generated.parquet           memjax.generate: multi-step images of them
  DIR/index/                                  memjax.index: the training images' index
                                              (built from --extract_training_set unless
                                              --extract_index names one)
  DIR/verify/                                 memjax.verify: TV/MV/RV/N labels
  DIR/metrics*.json                           memjax.metrics against each label source
  DIR/report/index.html                       memjax.report

Every stage resumes as the scan does (a rerun of the same command skips finished
work; other settings are refused unless --overwrite) and logs progress with its
rate and ETA. The demo (configs/demo.flags) labels against the shipped testbed's
training set with a tiny random image encoder (`--embedder=random`), which is
enough to find exact copies among small synthetic images; a real run indexes
its training set with CLIP ViT-L/14 (`--embedder=ViT-L-14@openai
--embedder_checkpoint=FILE`) or passes an index of precomputed LAION embeddings
as --extract_index.
"""
import dataclasses
import json
import os
import time
from typing import Dict, Optional, Sequence

from absl import flags
from absl import logging
import jax

from memjax.stages import blackbox
from memjax import cli
from memjax.data import embed
from memjax.stages import generate
from memjax.stages import metrics as metrics_lib
from memjax.stages import report
from memjax.runtime import results
from memjax.stages import scan
from memjax.stages import verify
from memjax.runtime.errors import InputError

STAGES = ("scan", "blackbox", "generate", "index", "verify", "metrics", "report")


@dataclasses.dataclass
class ExtractConfig:
  model: str
  prompts: str
  workdir: str
  training_set: Optional[str] = None  # table of training images (url / image_path)
  index: Optional[str] = None  # an existing memjax.index workdir instead
  prompt_column: str = "caption"
  batch_size: int = 64  # scan
  seeds: Sequence[int] = (0,)  # scan
  guidance_scale: float = 7.5
  dtype: str = "float32"
  max_prompts: Optional[int] = None
  top_k: int = 25  # prompts attacked by the blackbox and regenerated
  blackbox_seeds: Sequence[int] = blackbox.DEFAULT_SEEDS
  blackbox_batch_size: int = 8
  sampler: str = "heun"
  steps: int = 32
  generate_seeds: Sequence[int] = generate.DEFAULT_SEEDS
  generate_batch_size: int = 8
  embedder: str = "random"
  embedder_checkpoint: Optional[str] = None
  verify_k: int = 16
  k_list: Sequence[int] = (5, 10, 25, 100)
  overwrite: bool = False
  log_interval_s: float = 10.0
  stages: Sequence[str] = STAGES


def _index(cfg: ExtractConfig, out: str) -> Dict:
  """Builds the training-image index (memjax.index) in-process."""
  from memjax.stages import index as index_lib  # pylint: disable=g-import-not-at-top
  return index_lib.run(index_lib.IndexConfig(
      workdir=out, images=cfg.training_set, embedder=cfg.embedder,
      embedder_checkpoint=cfg.embedder_checkpoint, overwrite=cfg.overwrite,
      log_interval_s=cfg.log_interval_s))


def _metrics(cfg: ExtractConfig) -> Dict:
  """metrics.json against the verified labels (and metrics_planted.json against a
  table's planted `kind`, as the testbed's), each printed as a table."""
  out = {}
  sources = [("verified", os.path.join(cfg.workdir, "verify"), "overfit_type", "metrics.json")]
  try:
    names = results.open_shards(os.path.join(cfg.workdir, "scan")).schema.names
  except InputError:
    names = []
  if report.PLANTED_COLUMN in names:
    sources.append(("planted", os.path.join(cfg.workdir, "scan"), report.PLANTED_COLUMN,
                    "metrics_planted.json"))
  for name, labels, column, file in sources:
    try:
      rep = metrics_lib.run(metrics_lib.MetricsConfig(
          scores=[cfg.workdir], labels=labels, label_column=column, k_list=cfg.k_list,
          out=os.path.join(cfg.workdir, file)))
      print(f"metrics against {name} labels:\n{metrics_lib.format_table(rep)}")
      out[name] = rep
    except InputError as e:  # e.g. the top K holds no negatives: said, not fatal
      print(f"metrics against {name} labels not computed: {e}")
      out[name] = {"error": str(e)}
  return out


def run(cfg: ExtractConfig) -> Dict:
  """Runs the stages in order; returns {"timings": {stage: s}, "report": path}."""
  unknown = [s for s in cfg.stages if s not in STAGES]
  if unknown:
    raise InputError(f"--extract_stages: unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
  if "index" in cfg.stages and not cfg.index and not cfg.training_set:
    raise InputError("give --extract_training_set=TABLE (the training images to label against) "
                     "or --extract_index=DIR (a memjax.index workdir)")
  os.makedirs(cfg.workdir, exist_ok=True)
  timings, out = {}, {}
  index_dir = cfg.index or os.path.join(cfg.workdir, "index")
  common = dict(model=cfg.model, prompt_column=cfg.prompt_column,
                guidance_scale=cfg.guidance_scale, dtype=cfg.dtype, top_k=cfg.top_k,
                overwrite=cfg.overwrite, log_interval_s=cfg.log_interval_s)
  steps = {
      "scan": lambda: scan.run(scan.ScanConfig(
          prompts=cfg.prompts, workdir=cfg.workdir, batch_size=cfg.batch_size,
          seeds=list(cfg.seeds), max_prompts=cfg.max_prompts, **common)),
      "blackbox": lambda: blackbox.run(blackbox.BlackboxConfig(
          prompts=cfg.workdir, workdir=cfg.workdir, batch_size=cfg.blackbox_batch_size,
          seeds=list(cfg.blackbox_seeds), save_images=True, **common)),
      "generate": lambda: generate.run(generate.GenerateConfig(
          prompts=cfg.workdir, workdir=cfg.workdir, sampler=cfg.sampler, steps=cfg.steps,
          seeds=list(cfg.generate_seeds), batch_size=cfg.generate_batch_size, **common)),
      "index": lambda: None if cfg.index else _index(cfg, index_dir),
      "verify": lambda: verify.run(verify.VerifyConfig(
          generated=cfg.workdir, index=index_dir, workdir=os.path.join(cfg.workdir, "verify"),
          k=cfg.verify_k, overwrite=cfg.overwrite)),
      "metrics": lambda: _metrics(cfg),
      "report": lambda: report.run(report.ReportConfig(workdir=cfg.workdir, top_k=cfg.top_k,
                                                       k_list=tuple(cfg.k_list))),
  }
  for stage in STAGES:
    if stage not in cfg.stages:
      continue
    if stage not in ("scan", "blackbox", "generate") and jax.process_index() != 0:
      continue  # labels, metrics and the report: process 0 only
    logging.info("extract: stage %s", stage)
    t0 = time.perf_counter()
    out[stage] = steps[stage]()
    timings[stage] = time.perf_counter() - t0
    print(f"extract: {stage} done in {timings[stage]:.1f} s", flush=True)
  summary = {"timings": timings, "total_s": sum(timings.values()),
             "report": (out.get("report") or {}).get("path")}
  if jax.process_index() == 0:
    results.write_json_atomic(os.path.join(cfg.workdir, "extract.json"), summary)
  return summary


# ---- command line -----------------------------------------------------------------

_TRAINING = flags.DEFINE_string("extract_training_set", None,
                                "Training-image table (url and/or image_path) to label against.")
_INDEX_DIR = flags.DEFINE_string("extract_index", None,
                                 "An existing memjax.index workdir (instead of building one).")
_BB_SEEDS = flags.DEFINE_list("extract_blackbox_seeds", ["0", "1", "2", "3"],
                              "Seeds of the one-step samples of the blackbox stage.")
_BB_BATCH = flags.DEFINE_integer("extract_blackbox_batch_size", 8, "Blackbox prompts per step.")
_GEN_SEEDS = flags.DEFINE_list("extract_generate_seeds", ["0", "1", "2", "3"],
                               "Seeds of the multi-step regeneration.")
_GEN_BATCH = flags.DEFINE_integer("extract_generate_batch_size", 8, "Generate prompts per step.")
_STAGES = flags.DEFINE_list("extract_stages", list(STAGES), "Stages to run, in this order.")


def _config_from_flags() -> ExtractConfig:
  f = cli.common_flag_values(required=("model", "prompts", "workdir"))
  to_ints = lambda name, v: [int(x) for x in v] if all(x.strip().lstrip("-").isdigit()
                                                       for x in v) else _bad(name, v)
  return ExtractConfig(
      model=f["model"], prompts=f["prompts"], workdir=f["workdir"],
      training_set=_TRAINING.value, index=_INDEX_DIR.value, prompt_column=f["prompt_column"],
      batch_size=f["batch_size"], seeds=f["seeds"], guidance_scale=f["guidance_scale"],
      dtype=f["dtype"], max_prompts=f["max_prompts"], top_k=f["top_k"],
      blackbox_seeds=to_ints("extract_blackbox_seeds", _BB_SEEDS.value),
      blackbox_batch_size=_BB_BATCH.value, sampler=flags.FLAGS["sampler"].value,
      steps=flags.FLAGS["steps"].value,
      generate_seeds=to_ints("extract_generate_seeds", _GEN_SEEDS.value),
      generate_batch_size=_GEN_BATCH.value, embedder=embed.EMBEDDER_FLAG.value,
      embedder_checkpoint=embed.CHECKPOINT_FLAG.value, verify_k=flags.FLAGS["k"].value,
      k_list=[int(k) for k in flags.FLAGS["k_list"].value], overwrite=f["overwrite"],
      log_interval_s=f["log_interval_s"], stages=_STAGES.value)


def _bad(name, value):
  raise InputError(f"--{name} must be integers, got {','.join(value)}")


def main(argv):
  del argv
  cli.startup_from_flags()
  summary = run(_config_from_flags())
  if jax.process_index() == 0:
    print("extract timings: " + json.dumps({k: round(v, 1) for k, v in
                                             summary["timings"].items()}))
    if summary["report"]:
      print(f"report: {summary['report']}")


if __name__ == "__main__":
  cli.run_main(main)
