"""Where a model's configs, weights, tokenizer and scheduler come from.

A model is either a diffusers folder (every vintage: `FolderFiles`) or a
single-file checkpoint in the original latent-diffusion layout (`SingleFile`:
`.safetensors`, or `.ckpt`/`.pt`/`.pth` through torch). Both answer the same
questions, so `loading.load_stable_diffusion` builds and converts the modules one
way whatever the files:

- `config(name)`: the component's diffusers config dict and where it came from;
- `weights(name)`: its state dict in diffusers' key names, and each key's file;
- `tokenizer()`, `scheduler_config()`.

A single file holds only weights. What they cannot tell comes from a diffusers
folder (`ModelOptions.model_config`: its configs, tokenizer and scheduler, as
diffusers' `from_single_file(config=...)` reads them), or else from Stable
Diffusion's own choices (`ldm_configs.infer_configs`), memjax's bundled CLIP
vocabulary, Stable Diffusion's training schedule, and two flags the file cannot
answer: `prediction_type` (required for SD2: the 768 px models predict v, the
512 px base models eps) and `image_size`.
"""
import dataclasses
import json
import math
import os
import tempfile
from typing import Optional, Tuple

from absl import logging
import ml_dtypes
import numpy as np

from memjax.data import tokenizer as tokenizer_lib
from memjax.models import checkpoint
from memjax.models import ldm_configs
from memjax.models import ldm_layout
from memjax.models import vae as vae_lib
from memjax.runtime.errors import CheckpointError, ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")
# Stable Diffusion's training schedule, as its diffusers folders write it (SD1.x and
# SD2.x alike); only prediction_type differs between them.
SD_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None}
# The image side a single file's family was trained at when --image_size is not
# given: SD1.x 512; SD2.x 768 for its v-prediction models, 512 for the eps base.
_DEFAULT_IMAGE_SIZE = {("sd1", "epsilon"): 512, ("sd1", "v_prediction"): 512,
                       ("sd2", "epsilon"): 512, ("sd2", "v_prediction"): 768}
_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")
# CLIP's vocabulary: 256 byte tokens, the same with `</w>`, the merges, BOS and EOS.
_VOCAB_BASE = 2 * 256 + 2


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """How to read a model beyond its path (each one a flag of the model stages).

  Attributes:
    variant: diffusers weight variant of a folder (`fp16`: `*.fp16.safetensors`);
      for a single file only `ema` (its EMA copy of the UNet).
    model_config: a diffusers folder whose configs, tokenizer and scheduler
      describe a single-file model.
    prediction_type: a single file's `epsilon` or `v_prediction` (no model_config).
    image_size: a single file's training image side in pixels (no model_config).
  """
  variant: Optional[str] = None
  model_config: Optional[str] = None
  prediction_type: Optional[str] = None
  image_size: Optional[int] = None


def is_single_file(model: str) -> bool:
  return os.path.isfile(model) and model.lower().endswith(ldm_layout.SINGLE_FILE_EXTS)


def read_json(path: str) -> dict:
  """A JSON object (a config file); ConfigError naming the file otherwise."""
  if not os.path.exists(path):
    raise ConfigError(f"{path}: missing")
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
    raise ConfigError(f"{path}: not valid JSON: {e}") from None
  if not isinstance(value, dict):
    raise ConfigError(f"{path}: must be a JSON object of config keys, got a JSON "
                      f"{_JSON_TYPES.get(type(value), type(value).__name__)}")
  return value


_JSON_TYPES = {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


class FolderFiles:
  """A diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
  scheduler/), with weights of one variant where it has them."""

  def __init__(self, folder: str, variant: Optional[str] = None):
    if not os.path.isdir(folder):
      raise ConfigError(f"{folder}: model folder does not exist")
    read_json(os.path.join(folder, "model_index.json"))
    self.folder, self.variant = folder, variant
    if variant and not any(
        variant in checkpoint.variants_in(os.path.join(folder, name))
        for name in _WEIGHT_FOLDERS if os.path.isdir(os.path.join(folder, name))):
      # as diffusers: a variant no component has is an error, not the plain weights
      raise CheckpointError(
          f"{folder}: --variant={variant}, but no component folder holds {variant} weights "
          f"(e.g. diffusion_pytorch_model.{variant}.safetensors)")

  def has(self, name: str) -> bool:
    return os.path.exists(os.path.join(self.folder, name, "config.json"))

  def config(self, name: str) -> Tuple[dict, str]:
    path = os.path.join(self.folder, name, "config.json")
    if not os.path.isdir(os.path.join(self.folder, name)):
      raise ConfigError(f"{os.path.join(self.folder, name)}: missing component folder "
                        f"'{name}'")
    return read_json(path), path

  def weights(self, name: str):
    files, _ = checkpoint.find_weight_files(os.path.join(self.folder, name), self.variant)
    return checkpoint.read_weight_files(files)

  def tokenizer(self) -> tokenizer_lib.CLIPTokenizer:
    tok_dir = os.path.join(self.folder, "tokenizer")
    if not os.path.isdir(tok_dir):
      raise ConfigError(f"{tok_dir}: missing component folder 'tokenizer'")
    return tokenizer_lib.CLIPTokenizer.from_folder(tok_dir)

  def scheduler_config(self) -> Tuple[dict, str]:
    path = os.path.join(self.folder, "scheduler", "scheduler_config.json")
    if not os.path.exists(path):
      raise ConfigError(f"{path}: missing (the model folder needs "
                        "scheduler/scheduler_config.json)")
    return read_json(path), path


class SingleFile:
  """A checkpoint in the original latent-diffusion layout, read by rule."""

  def __init__(self, path: str, options: ModelOptions):
    self.path, self.options = path, options
    if options.variant not in (None, "ema"):
      raise ConfigError(f"--variant={options.variant} names diffusers folder files; a single "
                        f"file ({path}) takes only --variant=ema (its EMA weights)")
    self.folder = FolderFiles(options.model_config) if options.model_config else None
    if self.folder and (options.prediction_type or options.image_size):
      raise ConfigError("--prediction_type and --image_size describe a single file without "
                        f"--model_config; {options.model_config} already says both (its "
                        "scheduler and unet configs)")
    text_layers = None
    if self.folder and self.folder.has("text_encoder"):
      text_layers = self.folder.config("text_encoder")[0].get("num_hidden_layers")
    self.parts = ldm_layout.split_components(ldm_layout.read_single_file(path), path,
                                             ema=options.variant == "ema",
                                             text_layers=text_layers)
    if self.folder:
      self.prediction_type = None
    else:
      self.prediction_type = options.prediction_type or self._default_prediction()
      self.inferred = ldm_configs.infer_configs(self.parts, path)
      self._set_sample_size()
    logging.info("%s: a %s single-file checkpoint (%s)", path, self.parts.family.upper(),
                 ", ".join(sorted(self.parts.states)))

  def _default_prediction(self) -> str:
    if self.parts.family == "sd1":
      return "epsilon"
    raise ConfigError(
        f"{self.path}: an SD2 checkpoint, which cannot tell whether it predicts v (SD2.x at "
        "768 px: --prediction_type=v_prediction) or the noise (SD2.x-base at 512 px: "
        "--prediction_type=epsilon); pass --prediction_type, or --model_config with its "
        "diffusers folder")

  def _set_sample_size(self) -> None:
    size = self.options.image_size or _DEFAULT_IMAGE_SIZE[(self.parts.family,
                                                            self.prediction_type)]
    vae = self.inferred.get("vae")
    factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae else 8
    if size % factor:
      raise ConfigError(f"--image_size={size} is not a multiple of the VAE's downsampling "
                        f"factor {factor}")
    if "unet" in self.inferred:
      self.inferred["unet"]["sample_size"] = size // factor
    if vae:
      vae["sample_size"] = size

  def has(self, name: str) -> bool:
    return name in self.parts.states

  def config(self, name: str) -> Tuple[dict, str]:
    if self.folder:
      config, source = self.folder.config(name)
      theirs = self.parts.scale_factor
      if name == "vae" and theirs is not None and not math.isclose(
          vae_lib.scaling_factor(config, source), theirs, rel_tol=1e-6):
        raise ConfigError(f"{self.path}: its VAE scale_factor {theirs} differs from "
                          f"{source}'s scaling_factor; the latents would be scaled wrongly")
      return config, source
    if name not in self.inferred:
      raise CheckpointError(self._missing(name))
    return self.inferred[name], f"{self.path} (its {name}, read off the weights)"

  def _missing(self, name: str) -> str:
    prefix = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
              "text_encoder": "cond_stage_model."}[name]
    return f"{self.path}: holds no {name} (no {prefix}* weights)"

  def weights(self, name: str):
    if name not in self.parts.states:
      raise CheckpointError(self._missing(name))
    state = self.parts.states[name]
    return state, {k: self.path for k in state}

  def tokenizer(self) -> tokenizer_lib.CLIPTokenizer:
    if self.folder:
      return self.folder.tokenizer()
    return bundled_tokenizer(self.inferred.get("text_encoder", {}).get("vocab_size", 49408),
                             self.parts.family, self.path)

  def scheduler_config(self) -> Tuple[dict, str]:
    if self.folder:
      config, source = self.folder.scheduler_config()
    else:
      config = dict(SD_SCHEDULER, prediction_type=self.prediction_type)
      source = f"Stable Diffusion's schedule with --prediction_type={self.prediction_type}"
    return config, source

  def check_schedule(self, alphas_cumprod: np.ndarray, source: str) -> None:
    """The file's own `alphas_cumprod` buffer (when it has one) against the
    scheduler's, to the precision the file stores it in (a float16 file rounds it):
    a fine-tune trained on another schedule is refused, not scored."""
    theirs = self.parts.alphas_cumprod
    if theirs is None:
      return
    try:  # float16, bfloat16, float32, ...
      rtol = 2 * float(ml_dtypes.finfo(theirs.dtype).eps)  # one rounding of the float64 values
    except ValueError:
      raise ConfigError(f"{self.path}: alphas_cumprod has dtype {theirs.dtype}, not a float "
                        "type") from None
    theirs = theirs.astype(np.float64)
    if theirs.shape != alphas_cumprod.shape or not np.allclose(
        theirs, alphas_cumprod, rtol=rtol, atol=0):
      n = min(len(theirs), len(alphas_cumprod))
      worst = (float(np.max(np.abs(theirs[:n] / alphas_cumprod[:n] - 1))) if n
               else float("nan"))
      raise ConfigError(
          f"{self.path}: its alphas_cumprod ({len(theirs)} steps) differ from {source}'s "
          f"({len(alphas_cumprod)} steps; largest relative difference {worst:.3g}); give "
          "--model_config with the scheduler it was trained with")


def bundled_tokenizer(vocab_size: int, family: str, source: str) -> tokenizer_lib.CLIPTokenizer:
  """CLIP's tokenizer from memjax's own vocabulary file, cut to the text encoder's
  vocabulary (SD's 49408, or a prefix of it), padding as the family does (SD1 with
  `<|endoftext|>`, SD2 with `!`)."""
  merges = vocab_size - _VOCAB_BASE
  if not 0 <= merges <= tokenizer_lib.CLIP_NUM_MERGES:
    raise ConfigError(f"{source}: the text encoder's vocabulary of {vocab_size} tokens is not "
                      f"CLIP's ({_VOCAB_BASE + tokenizer_lib.CLIP_NUM_MERGES}) or a prefix of "
                      "it; give --model_config with its tokenizer")
  pad = "!" if family == "sd2" else tokenizer_lib.EOS
  with tempfile.TemporaryDirectory() as folder:  # one reader of tokenizer files
    tokenizer_lib.write_tokenizer_folder(folder, num_merges=merges, pad_token=pad)
    return tokenizer_lib.CLIPTokenizer.from_folder(folder)


def open_model_files(model: str, options: ModelOptions = ModelOptions()):
  """FolderFiles or SingleFile for a --model path."""
  if options.prediction_type not in (None,) + PREDICTION_TYPES:
    raise ConfigError(f"--prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got "
                      f"{options.prediction_type!r}")
  if is_single_file(model):
    return SingleFile(model, options)
  if os.path.isfile(model):
    raise ConfigError(f"{model}: a file, but not a checkpoint memjax reads (a diffusers "
                      f"folder, or a single file ending {', '.join(ldm_layout.SINGLE_FILE_EXTS)})")
  for key in ("model_config", "prediction_type", "image_size"):
    if getattr(options, key):
      raise ConfigError(f"--{key} describes a single-file checkpoint; {model} is a diffusers "
                        "folder, whose own files say it")
  return FolderFiles(model, options.variant)
