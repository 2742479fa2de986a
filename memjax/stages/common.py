"""What the model stages (scan, blackbox, generate, crosscheck) share: loading the
model with its identity, tokenizing a shard, the one-step constants, and putting
per-prompt results back into a shard's rows."""
import dataclasses
import os
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from memjax.data.tables import PromptChunk
from memjax.method import whitebox
from memjax.models import attention as attention_lib
from memjax.models import loading
from memjax.models import model_files
from memjax.runtime import checks
from memjax.runtime import fingerprint
from memjax.runtime.errors import InputError


@dataclasses.dataclass(kw_only=True)
class ModelFileSettings:
  """How every model stage reads --model beyond its path (`model_files.ModelOptions`)."""
  variant: Optional[str] = None
  model_config: Optional[str] = None
  prediction_type: Optional[str] = None
  image_size: Optional[int] = None

  def __post_init__(self):
    checks.at_least(self, 1, "image_size")
    checks.one_of(self, "prediction_type", (None,) + model_files.PREDICTION_TYPES)

  @property
  def model_options(self) -> model_files.ModelOptions:
    return model_files.ModelOptions(variant=self.variant, model_config=self.model_config,
                                    prediction_type=self.prediction_type,
                                    image_size=self.image_size)


def model_file_fields(cfg) -> Dict:
  """cfg's ModelFileSettings fields, to pass on to another stage's config."""
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelFileSettings)}


@dataclasses.dataclass(kw_only=True)
class ModelStageSettings(ModelFileSettings):
  """The settings scan, blackbox and generate share, with one default each (keyword
  only, after each stage's own fields)."""
  prompt_column: str = "caption"
  csv_delimiter: Optional[str] = None
  guidance_scale: float = 7.5
  dtype: str = "float32"
  attention: Optional[str] = None
  noise: Optional[str] = None
  max_prompts: Optional[int] = None
  top_k: int = 100
  overwrite: bool = False
  log_interval_s: float = 30.0
  devices: Optional[int] = None

  def __post_init__(self):
    super().__post_init__()
    checks.at_least(self, 1, "top_k", "max_prompts", "devices", "batch_size", "shard_size")
    checks.at_least(self, 0, "log_interval_s")
    checks.finite(self, "guidance_scale", "log_interval_s")
    checks.one_of(self, "dtype", ("float32", "bfloat16"))
    checks.one_of(self, "attention", (None,) + attention_lib.KERNELS)
    checks.seeds(self)
    if not self.seeds and not self.noise:
      raise InputError("--seeds must name at least one seed (or give --noise)")


def batch_for(cfg, n_rows: int) -> int:
  """--batch_size, cut to the rows there are (a 3-row table does not pad to 100000)."""
  return max(1, min(cfg.batch_size, n_rows))


def load_model(cfg, components: Sequence[str] = loading.COMPONENTS) -> loading.StableDiffusion:
  """The model of a stage config (its model, dtype, attention and model file settings)."""
  return loading.load_stable_diffusion(cfg.model, cfg.dtype, components, cfg.attention,
                                       cfg.model_options)


def model_identity(cfg) -> Dict:
  """What of the model a run config records: its files' content (and those of
  --model_config) and every setting that changes how it is read."""
  options = cfg.model_options
  out = {"model": os.path.abspath(cfg.model),
         "model_identity": fingerprint.model_identity(cfg.model),
         "dtype": cfg.dtype, "attention": cfg.attention}
  if options.model_config:
    out.update(model_config=os.path.abspath(options.model_config),
               model_config_content=fingerprint.model_identity(options.model_config))
  out.update({k: v for k, v in dataclasses.asdict(options).items()
              if v is not None and k != "model_config"})
  return out


@dataclasses.dataclass
class Tokenized:
  """The scorable rows of a shard, tokenized.

  Attributes:
    chunk: the rows (`PromptChunk`).
    valid: [n] bool, rows with a caption to score.
    rows: [n_valid] indices of those rows in the chunk.
    ids: [n_valid, 77] int32 token ids.
    n_tokens, truncated: [n_valid] per caption.
  """
  chunk: PromptChunk
  valid: np.ndarray
  rows: np.ndarray
  ids: np.ndarray
  n_tokens: np.ndarray
  truncated: np.ndarray


def tokenize(chunk: PromptChunk, tokenizer) -> Tokenized:
  valid = np.array([t is not None for t in chunk.texts], bool)
  enc = tokenizer.encode_batch([t for t in chunk.texts if t is not None])
  return Tokenized(chunk, valid, np.flatnonzero(valid),
                   np.ascontiguousarray(enc["input_ids"], np.int32), enc["n_tokens"],
                   enc["truncated"])


def empty_ids(sd: loading.StableDiffusion) -> np.ndarray:
  """[77] int32 tokens of the empty prompt (the unconditional input and the padding)."""
  return np.asarray(sd.tokenizer.encode_batch([""])["input_ids"][0], np.int32)


def onestep_bound(sd: loading.StableDiffusion, noise: np.ndarray, mesh, components) -> Dict:
  """Params of `components`, the start noise and e_u (the unconditional eps,
  once per seed, `whitebox.make_uncond_fn`), placed on the mesh."""
  from memjax.runtime import engine  # pylint: disable=g-import-not-at-top
  bound = engine.replicate({k: sd.params[k] for k in components}, mesh)
  bound["noise"] = engine.replicate(jnp.asarray(noise), mesh)
  uncond = jax.jit(whitebox.make_uncond_fn(sd.text_embed, sd.unet_out, sd.schedule,
                                           sd.schedule.last_timestep))
  bound["e_u"] = engine.replicate(uncond(bound["text_encoder"], bound["unet"],
                                         jnp.asarray(empty_ids(sd)[None]), bound["noise"]), mesh)
  return bound


def scatter(n: int, rows: np.ndarray, values: np.ndarray, dtype: pa.DataType) -> pa.Array:
  """Per-valid-row values -> an [n] column, null where no value."""
  full = np.zeros((n,) + values.shape[1:], values.dtype)
  full[rows] = values
  mask = np.ones(n, bool)
  mask[rows] = False
  return pa.array(full, type=dtype, mask=mask)


def scatter_list(n: int, rows: np.ndarray, values, dtype: pa.DataType) -> pa.Array:
  """Per-valid-row lists (or objects) -> an [n] column, null where no value."""
  full = [None] * n
  for i, v in zip(rows, values):
    full[int(i)] = v
  return pa.array(full, type=dtype)


def append_columns(table: pa.Table, columns: Dict[str, pa.Array]) -> pa.Table:
  for name, column in columns.items():
    if name in table.column_names:  # our own column wins (a source renames clashes)
      table = table.drop_columns([name])
    table = table.append_column(name, column)
  return table
