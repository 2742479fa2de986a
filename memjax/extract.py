"""python -m memjax.extract: the whole attack in one workdir.

    python -m memjax.extract --flagfile=configs/demo.flags --workdir=DIR

scan -> blackbox -> generate -> index -> verify -> metrics -> report, each the
stage's own run() in one process (`memjax.stages.extract`). Every option of every
stage is a flag here: `--<stage>_<option>` (e.g. --scan_seeds, --blackbox_top_k,
--generate_steps, --index_embedder, --verify_k, --report_top_k), except the
options every stage shares (--prompt_column, --csv_delimiter, --dtype,
--attention, --guidance_scale, --log_interval_s, --devices, and how --model is read:
--variant, --model_config, --prediction_type, --image_size), which reach every
stage that has them, and the wiring extract does itself (which stage reads which).
One stage may set its own --guidance_scale, --dtype, --attention or --devices
(--generate_guidance_scale=1 regenerates without guidance while the scan keeps
the shared 7.5); left unset, it takes the shared value.
"""
import json
from typing import Dict, List, Tuple

from absl import flags

from memjax import blackbox as blackbox_cmd
from memjax import generate as generate_cmd
from memjax import index as index_cmd
from memjax import metrics as metrics_cmd
from memjax import report as report_cmd
from memjax import scan as scan_cmd
from memjax import verify as verify_cmd
from memjax.cli import command
from memjax.cli import options
from memjax.cli.options import Opt
from memjax.stages import extract
from memjax.stages import metrics as metrics_lib

COMMANDS = {"scan": scan_cmd, "blackbox": blackbox_cmd, "generate": generate_cmd,
            "index": index_cmd, "verify": verify_cmd, "metrics": metrics_cmd,
            "report": report_cmd}
SHARED = ("prompt_column", "csv_delimiter", "dtype", "attention", "guidance_scale",
          "log_interval_s", "devices") + options.MODEL_FILE
# Shared options one stage may set for itself (`override_table`).
PER_STAGE = ("guidance_scale", "dtype", "attention", "devices")
OPTIONS = options.common("model", "prompts", "workdir") + [
    Opt("training_set", "Training-image table (url and/or image_path) to label against."),
    Opt("index", "An existing index (a memjax.index workdir) instead of --training_set."),
    Opt("stages", "Stages to run, in the order scan,blackbox,generate,index,verify,metrics,"
        "report."),
    Opt("overwrite", "Every stage discards a previous run with other settings."),
]


def flag_table() -> Dict[str, List[Tuple[str, Opt]]]:
  """extract's flag name -> the (stage, option) pairs it sets."""
  table: Dict[str, List[Tuple[str, Opt]]] = {}
  for stage, cmd in COMMANDS.items():
    wired = extract.wired_fields(stage)
    for o in cmd.OPTIONS:
      if o.field not in wired:
        name = o.name if o.field in SHARED else f"{stage}_{o.name}"
        table.setdefault(name, []).append((stage, o))
  return table


def override_table() -> Dict[str, Tuple[str, str, Opt]]:
  """--<stage>_<option> -> (the shared flag, stage, option) for each PER_STAGE option
  of each stage that has it."""
  return {f"{stage}_{o.name}": (name, stage, o)
          for name, targets in flag_table().items() for stage, o in targets
          if o.field in PER_STAGE}


def define(fv: flags.FlagValues = flags.FLAGS) -> None:
  options.define(extract.ExtractConfig, OPTIONS, fv)
  for name, targets in flag_table().items():
    kinds = {options.field_info(extract.CONFIGS[s], o.field) for s, o in targets}
    if len(kinds) != 1:
      raise ValueError(f"--{name}: the stages' types or defaults differ: {targets}")
    (kind, default), (_, first) = kinds.pop(), targets[0]
    help_text = first.help + (f" (stages: {', '.join(s for s, _ in targets)})"
                              if first.field in SHARED else "")
    options.define_flag(name, kind, default, help_text, first.choices, fv)
  for name, (shared, stage, o) in override_table().items():
    kind, _ = options.field_info(extract.CONFIGS[stage], o.field)
    options.define_flag(name, kind, None, f"{o.help} For the {stage} stage only (default: "
                        f"--{shared}).", o.choices, fv)


def build(fv: flags.FlagValues = flags.FLAGS) -> extract.ExtractConfig:
  stage_options: Dict[str, Dict] = {}
  for name, targets in flag_table().items():
    for stage, o in targets:
      kind, _ = options.field_info(extract.CONFIGS[stage], o.field)
      stage_options.setdefault(stage, {})[o.field] = options.parse_value(
          name, kind, fv[name].value)
  for name, (_, stage, o) in override_table().items():
    if fv[name].value is not None:
      kind, _ = options.field_info(extract.CONFIGS[stage], o.field)
      stage_options[stage][o.field] = options.parse_value(name, kind, fv[name].value)
  return options.build(extract.ExtractConfig, OPTIONS, fv, options=stage_options)


def summary(out) -> str:
  lines = []
  for name, rep in out["metrics"].items():
    lines.append(f"metrics against {name} labels:\n" + (
        f"not computed: {rep['error']}" if "error" in rep else metrics_lib.format_table(rep)))
  lines.append("extract timings: " + json.dumps({k: round(v, 1)
                                                 for k, v in out["timings"].items()}))
  if out["report"]:
    lines.append(f"report: {out['report']}")
  return "\n".join(lines)


if __name__ == "__main__":
  command.main(define, build, extract.run, summary)
