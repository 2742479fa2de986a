"""Command-line flags made from the stages' config dataclasses.

A command lists its options (`Opt`: a config field, its help, optionally another
flag name or a set of choices); `define` turns them into absl flags whose type and
default come from the dataclass field, so the library's default and the command
line's are one and the same; `build` turns the parsed flags back into the config.
Nothing is defined at import: a command defines its flags when it runs, so any
number of command modules import side by side.
"""
import collections.abc
import dataclasses
import sys
import typing
from typing import Any, Dict, List, Optional, Sequence

from absl import flags

from memjax.runtime.errors import MemjaxError

_MISSING = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class Opt:
  """One option of a command: config `field`, shown as --`flag` (default: field)."""
  field: str
  help: str
  flag: Optional[str] = None
  choices: Optional[Sequence[str]] = None

  @property
  def name(self) -> str:
    return self.flag or self.field


# Options several stages share, with one help text each.
COMMON = {o.field: o for o in (
    Opt("model", "Stable Diffusion model: a diffusers folder (any vintage), or a single-file "
        "checkpoint in the original layout (.safetensors; .ckpt needs torch)."),
    Opt("variant", "Weight variant of a diffusers folder (fp16: *.fp16.safetensors, as "
        "diffusers' variant=); for a single file only ema (its EMA weights)."),
    Opt("model_config", "A diffusers folder whose configs, tokenizer and scheduler describe "
        "a single-file --model (default: read off the weights, Stable Diffusion's choices)."),
    Opt("prediction_type", "What a single-file --model predicts (required for SD2: "
        "v_prediction for the 768 px models, epsilon for the 512 px base).",
        choices=("epsilon", "v_prediction")),
    Opt("image_size", "Training image side of a single-file --model (default 512; SD2 "
        "v_prediction 768)."),
    Opt("prompts", "Caption table (.parquet, .jsonl, .csv, .tsv, .txt), or a workdir whose "
        "earlier stage's best rows to take."),
    Opt("workdir", "Output folder (the unit of work: WORKDIR/<stage>/, resumable)."),
    Opt("prompt_column", "Caption column of the table."),
    Opt("csv_delimiter", "CSV delimiter (default: detected)."),
    Opt("batch_size", "Prompts per step, over all local devices."),
    Opt("seeds", "Start-noise seeds (jax.random); scores are the mean over seeds."),
    Opt("guidance_scale", "Classifier-free guidance scale w."),
    Opt("dtype", "Params and activations.", choices=("float32", "bfloat16")),
    Opt("attention", "Attention kernel (default: blocked on CPU, cuDNN for bf16/fp16 on GPU, "
        "else XLA).", choices=("xla", "cudnn", "blocked")),
    Opt("noise", ".npy start noise [n_seeds, C, H, W] or [C, H, W] (instead of --seeds)."),
    Opt("max_prompts", "Use only the first N rows."),
    Opt("top_k", "Rows kept in the stage's top_k.parquet, or taken from an earlier stage."),
    Opt("shard_size", "Rows per output shard."),
    Opt("overwrite", "Discard a previous run with other settings."),
    Opt("log_interval_s", "Seconds between progress lines."),
    Opt("devices", "Local devices to use (default: all)."),
    Opt("detectors", "Published one-step detectors beside the DCS, one column each: wen981 "
        "(Wen et al.), jeon (Jeon et al., a JVP), asthana (Asthana & Belagiannis, with "
        "asthana_norm and asthana_cos), ren_le (Ren et al.); all: every one. Each at its "
        "authors' (z, t): t = the first of 50 DDIM steps."),
    Opt("ren_layer", "The cross-attention ren_le reads (diffusers' name; SD's is "
        "down_blocks.1.attentions.1)."),
    Opt("detector_protocol", "authors: each detector's noise and generations as its "
        "authors' code draws them (wen981: 4 per prompt, ren_le: 1 per prompt, jeon and "
        "asthana: 1 shared by every prompt); shared: every detector on every --seeds' "
        "shared z (the DCS's protocol; cheaper: one unconditional pass per seed).",
        choices=("authors", "shared")),
    Opt("detector_generations", "Generations (start noises) of every detector, replacing "
        "the protocol's counts (0: the protocol's)."),
    Opt("detector_seed", "Seed of the per-prompt noises: prompt i's from "
        "fold_in(PRNGKey(seed), i) (the authors' seed = prompt index + seed)."),
)}


# How every model command reads --model beyond its path (`stages.common.ModelFileSettings`).
MODEL_FILE = ("variant", "model_config", "prediction_type", "image_size")
# The one-step detectors' settings (`stages.scan.DetectorSettings`).
DETECTORS = ("detectors", "ren_layer", "detector_protocol", "detector_generations",
             "detector_seed")


def common(*fields: str) -> List[Opt]:
  return [COMMON[f] for f in fields]


def _kind(hint) -> str:
  """The flag kind of a field's type: bool, int, float, str, ints, strs."""
  if typing.get_origin(hint) is typing.Union:  # Optional[X]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = args[0]
  origin = typing.get_origin(hint)
  if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
    args = typing.get_args(hint)
    return "ints" if args and args[0] is int else "strs"
  if hint in (bool, int, float, str):
    return hint.__name__
  raise TypeError(f"no flag kind for {hint!r}")


def field_info(cls, field: str):
  """(kind, default) of a config field (default None for a required field)."""
  hints = typing.get_type_hints(cls)
  f = {x.name: x for x in dataclasses.fields(cls)}[field]
  default = f.default
  if default is _MISSING and f.default_factory is not _MISSING:
    default = f.default_factory()
  return _kind(hints[field]), (None if default is _MISSING else default)


def define_flag(name: str, kind: str, default: Any, help_text: str,
                choices: Optional[Sequence[str]] = None,
                flag_values: flags.FlagValues = flags.FLAGS, module_name: Optional[str] = None):
  """One absl flag of a kind; list defaults are shown comma-separated."""
  kw = dict(flag_values=flag_values, module_name=module_name or sys.argv[0])
  if choices:
    return flags.DEFINE_enum(name, default, list(choices), help_text, **kw)
  if kind in ("ints", "strs"):
    value = None if default is None else [str(v) for v in default]
    return flags.DEFINE_list(name, value, help_text, **kw)
  define = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer,
            "float": flags.DEFINE_float, "str": flags.DEFINE_string}[kind]
  return define(name, default, help_text, **kw)


def define(cls, opts: Sequence[Opt], flag_values: flags.FlagValues = flags.FLAGS,
           prefix: str = "") -> None:
  """Defines --<prefix><opt.name> for each option, typed and defaulted by cls."""
  for o in opts:
    kind, default = field_info(cls, o.field)
    define_flag(prefix + o.name, kind, default, o.help, o.choices, flag_values)


def parse_value(name: str, kind: str, value):
  """A flag's parsed value as the config field wants it."""
  if value is None or kind != "ints":
    return list(value) if kind == "strs" and value is not None else value
  try:
    return [int(v) for v in value]
  except ValueError:
    raise MemjaxError(f"--{name} must be integers, got {','.join(value)}") from None


def values(cls, opts: Sequence[Opt], flag_values: flags.FlagValues = flags.FLAGS,
           prefix: str = "") -> Dict[str, Any]:
  """{field: value} of the defined options."""
  out = {}
  for o in opts:
    kind, _ = field_info(cls, o.field)
    out[o.field] = parse_value(prefix + o.name, kind, flag_values[prefix + o.name].value)
  return out


def build(cls, opts: Sequence[Opt], flag_values: flags.FlagValues = flags.FLAGS, **fixed):
  """The config from the parsed flags (and `fixed` fields); a required field left
  unset is an error."""
  kwargs = dict(values(cls, opts, flag_values), **fixed)
  names = {o.field: o.name for o in opts}
  for f in dataclasses.fields(cls):
    if f.default is _MISSING and f.default_factory is _MISSING and kwargs.get(f.name) is None:
      raise MemjaxError(f"--{names.get(f.name, f.name)} is required")
  return cls(**kwargs)
