"""The whole attack in one workdir: scan -> blackbox -> generate -> index -> verify
-> metrics -> report.

Each stage is the library's own `run(Config)`, called in-process, its config
built from the stage's defaults, `ExtractConfig.options[stage]` (the command
line's flags) and the wiring below (which stage reads which, in one workdir):

  scan      the DCS of every caption of `prompts`
  blackbox  edge scores and one-step images of the scan's top K
  generate  multi-step images of the blackbox's top K
  index     the training images' index (from `training_set`, unless `index`
            names an existing one)
  verify    TV/MV/RV/N labels of the generated images
  metrics   against the verified labels (`metrics/verified.json`) and, for a
            table with a planted `kind` column such as the testbed's, against
            those (`metrics/planted.json`)
  report    `report/index.html`

Every stage resumes (a rerun of the same command skips finished work; other
settings are refused unless `overwrite`) and logs progress with its rate and
ETA. `WORKDIR/extract/manifest.json` records the stages' configs and times.
"""
import dataclasses
import os
import time
from typing import Dict, Optional, Sequence

from absl import logging

from memjax.runtime import distributed
from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import blackbox
from memjax.stages import generate
from memjax.stages import index as index_lib
from memjax.stages import metrics as metrics_lib
from memjax.stages import report
from memjax.stages import scan
from memjax.stages import verify

STAGE = "extract"
STAGES = ("scan", "blackbox", "generate", "index", "verify", "metrics", "report")
CONFIGS = {"scan": scan.ScanConfig, "blackbox": blackbox.BlackboxConfig,
           "generate": generate.GenerateConfig, "index": index_lib.IndexConfig,
           "verify": verify.VerifyConfig, "metrics": metrics_lib.MetricsConfig,
           "report": report.ReportConfig}
# Stages that batch over the mesh run on every process; the others on process 0.
_EVERY_PROCESS = ("scan", "blackbox", "generate", "index")


@dataclasses.dataclass
class ExtractConfig:
  """The attack's inputs and, per stage, the settings that differ from its defaults.

  Attributes:
    model, prompts, workdir: the model folder, the caption table, the workdir.
    training_set: the training-image table to label against (builds the index).
    index: an existing index (a workdir or index folder) instead.
    stages: which stages to run, in the order of STAGES.
    overwrite: every stage discards a previous run with other settings.
    options: {stage: {config field: value}} for each stage's config.
  """
  model: str
  prompts: str
  workdir: str
  training_set: Optional[str] = None
  index: Optional[str] = None
  stages: Sequence[str] = STAGES
  overwrite: bool = False
  options: Dict[str, Dict] = dataclasses.field(default_factory=dict)


def _wiring(cfg: ExtractConfig) -> Dict[str, Dict]:
  """The fields extract sets itself: how the stages read each other."""
  w, model = cfg.workdir, {"model": cfg.model}
  common = {"workdir": w, "overwrite": cfg.overwrite}
  return {
      "scan": dict(common, prompts=cfg.prompts, **model),
      "blackbox": dict(common, prompts=w, images=None, save_images=True, **model),
      "generate": dict(common, prompts=w, **model),
      "index": dict(common, images=cfg.training_set),
      "verify": dict(common, generated=w, index=cfg.index or w),
      # every stage's rows carry `caption`: the metrics' caption join uses it
      "metrics": {"scores": [w], "workdir": w, "out": None, "prompt_column": "caption"},
      "report": {"workdir": w},
  }


def wired_fields(stage: str) -> Sequence[str]:
  """The fields of a stage's config that extract sets (not options)."""
  probe = ExtractConfig(model="", prompts="", workdir="")
  names = set(_wiring(probe)[stage])
  if stage == "metrics":
    names |= {"labels", "label_column", "name"}  # one run per label source
  return sorted(names)


def stage_configs(cfg: ExtractConfig) -> Dict[str, object]:
  """Each stage's config: defaults, then cfg.options[stage], then the wiring.

  Raises:
    InputError: an option that names no field of the stage's config, or one
      that extract sets itself.
  """
  unknown = [s for s in cfg.options if s not in CONFIGS]
  if unknown:
    raise InputError(f"options for unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
  wiring, out = _wiring(cfg), {}
  for stage, cls in CONFIGS.items():
    options = dict(cfg.options.get(stage) or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(options) - fields)
    if bad:
      raise InputError(f"{stage}: no setting {bad}; its settings: {', '.join(sorted(fields))}")
    wired = sorted(set(options) & set(wired_fields(stage)))
    if wired:
      raise InputError(f"{stage}: {wired} are set by extract itself (how the stages read "
                       "each other in one workdir)")
    values = dict(options, **wiring[stage])
    if stage == "metrics":
      values.update(labels=cfg.workdir)
    out[stage] = cls(**values)
  return out


def _metrics(cfg: ExtractConfig, base: metrics_lib.MetricsConfig) -> Dict:
  """Metrics against the verified labels, and against a planted `kind` column
  (the testbed's) when the scan has one; a source that cannot be scored says why."""
  sources = [("verified", cfg.workdir, "overfit_type")]
  scan_dir = workdir_lib.stage_dir(cfg.workdir, "scan")
  if shards.list_shards(scan_dir) and \
      report.PLANTED_COLUMN in shards.open_shards(scan_dir).schema.names:
    sources.append(("planted", scan_dir, report.PLANTED_COLUMN))
  out = {}
  for name, labels, column in sources:
    try:
      out[name] = metrics_lib.run(dataclasses.replace(base, labels=labels, label_column=column,
                                                      name=name))
    except InputError as e:  # e.g. the top K holds no negatives: said, not fatal
      out[name] = {"error": str(e)}
  return out


def run(cfg: ExtractConfig) -> Dict:
  """Runs the stages in order; returns {"timings": {stage: s}, "metrics", "report"}."""
  unknown = [s for s in cfg.stages if s not in STAGES]
  if unknown:
    raise InputError(f"--stages: unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
  if "index" in cfg.stages and not cfg.index and not cfg.training_set:
    raise InputError("give --training_set=TABLE (the training images to label against) "
                     "or --index=DIR (a memjax.index workdir)")
  configs = stage_configs(cfg)
  os.makedirs(cfg.workdir, exist_ok=True)
  steps = {
      "scan": lambda: scan.run(configs["scan"]),
      "blackbox": lambda: blackbox.run(configs["blackbox"]),
      "generate": lambda: generate.run(configs["generate"]),
      "index": lambda: None if cfg.index else index_lib.run(configs["index"]),
      "verify": lambda: verify.run(configs["verify"]),
      "metrics": lambda: _metrics(cfg, configs["metrics"]),
      "report": lambda: report.run(configs["report"]),
  }
  timings, out = {}, {}
  for stage in STAGES:
    if stage not in cfg.stages:
      continue
    if stage not in _EVERY_PROCESS and not distributed.is_main():
      continue  # labels, metrics and the report: process 0 only
    logging.info("extract: stage %s", stage)
    t0 = time.perf_counter()
    out[stage] = steps[stage]()
    timings[stage] = time.perf_counter() - t0
    print(f"extract: {stage} done in {timings[stage]:.1f} s", flush=True)
  page = out.get("report").details["path"] if out.get("report") else None
  summary = {"timings": timings, "total_s": sum(timings.values()),
             "metrics": out.get("metrics") or {}, "report": page}
  if distributed.is_main():
    workdir_lib.write_manifest(cfg.workdir, workdir_lib.Manifest(
        stage=STAGE, config=dataclasses.asdict(cfg),
        timings=dict(timings, total_s=summary["total_s"]),
        outputs={s: os.path.join("..", s) for s in cfg.stages if s in timings},
        runtime=distributed.runtime_info(),
        details={"stages": {s: dataclasses.asdict(c) for s, c in configs.items()},
                 "report": page}))
  return summary
