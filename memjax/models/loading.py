"""Loading a Stable Diffusion folder in the diffusers layout into memjax.

    model_index.json
    unet/config.json          unet/diffusion_pytorch_model.safetensors (or .bin)
    vae/config.json           vae/diffusion_pytorch_model.safetensors
    text_encoder/config.json  text_encoder/model.safetensors
    tokenizer/                vocab.json, merges.txt, special_tokens_map.json, ...
    scheduler/scheduler_config.json

Weights are converted on the CPU, as numpy, by `convert.torch_to_flax` against
the module's abstract params (`jax.eval_shape`; nothing is initialised), then cast
to the requested dtype. The caller places them on devices (replicated over a mesh).
"""
import dataclasses
import json
import os
import time
from typing import Dict, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from memjax.runtime.errors import ConfigError
from memjax.models import attention as attention_lib
from memjax.models import checkpoint
from memjax.models import clip_text
from memjax.models import convert
from memjax.models import unet as unet_lib
from memjax.models import vae as vae_lib
from memjax.method.schedule import Schedule
from memjax.data.tokenizer import CLIPTokenizer

COMPONENTS = ("unet", "vae", "text_encoder")
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


@dataclasses.dataclass
class StableDiffusion:
  """Modules, params (numpy, nested dicts) and preprocessing of one model folder."""
  model_dir: str
  unet: Optional[unet_lib.UNet2DConditionModel]
  vae: Optional[vae_lib.AutoencoderKL]
  text_encoder: Optional[clip_text.CLIPTextModel]
  tokenizer: CLIPTokenizer
  schedule: Schedule
  scheduler_config: dict
  params: Dict[str, dict]
  configs: Dict[str, dict]
  dtype: str
  attention: Optional[str] = None

  def _config(self, name: str):
    """(component config dict, its path); ConfigError if the folder has none."""
    path = os.path.join(self.model_dir, name, "config.json")
    if name not in self.configs:
      raise ConfigError(f"{path}: missing (the model folder needs {name}/config.json)")
    return self.configs[name], path

  @property
  def latent_shape_chw(self):
    """(C, H, W) of the UNet's latents, from unet/config.json's sample_size."""
    return unet_lib.latent_shape_chw(*self._config("unet"))

  @property
  def vae_scaling_factor(self) -> float:
    return vae_lib.scaling_factor(*self._config("vae"))

  def vae_decode(self, vae_params, z):
    """The VAE decoder: latents [N, h, w, c] (already divided by the scaling
    factor) -> images [N, H, W, 3] in [-1, 1]."""
    return self.vae.apply({"params": vae_params}, z, method=type(self.vae).decode)

  def text_embed(self, text_params, ids):
    """Token ids [B, 77] -> the UNet context [B, 77, D]."""
    return self.text_encoder.apply({"params": text_params}, ids)

  def unet_out(self, unet_params, x, t, context):
    """The UNet's raw output (eps or v) at timesteps t for latents x [B, h, w, c]."""
    return self.unet.apply({"params": unet_params}, x, t, context)


def _read_json(path: str) -> dict:
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


def dummy_inputs(name: str, cfg):
  """Inputs that trace a component's init: cfg is its parsed config (UNetConfig,
  VAEConfig, CLIPTextConfig) or the raw config dict."""
  if isinstance(cfg, dict):
    cfg = {"unet": unet_lib.UNetConfig, "vae": vae_lib.VAEConfig,
           "text_encoder": clip_text.CLIPTextConfig}[name].from_dict(cfg, f"<{name} config>")
  if name == "unet":
    return (jnp.zeros((1, 8, 8, cfg.in_channels)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 77, cfg.cross_attention_dim)))
  if name == "vae":
    f = cfg.downsample_factor
    return (jnp.zeros((1, 8 * f, 8 * f, cfg.in_channels)),)
  return (jnp.zeros((1, min(77, cfg.max_position_embeddings)), jnp.int32),)


def build_module(name: str, cfg: dict, source: str, dtype=jnp.float32,
                 attention: Optional[str] = None):
  """The Flax module of one component from its config dict.

  attention: the attention kernel of every layer (None: memjax's choice per
    backend and dtype; see `memjax.models.attention`).
  """
  attention_lib.check_kernel(attention)
  if name == "unet":
    return unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.from_dict(cfg, source), dtype=dtype,
                                         attention=attention)
  if name == "vae":
    return vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_dict(cfg, source), dtype=dtype,
                                 attention=attention)
  if name == "text_encoder":
    return clip_text.CLIPTextModel(clip_text.CLIPTextConfig.from_dict(cfg, source), dtype=dtype,
                                   attention=attention)
  raise ValueError(name)


def abstract_params(name: str, module, cfg: dict):
  """The module's params as ShapeDtypeStructs, without initialising anything."""
  parsed = getattr(module, "config", None)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          *dummy_inputs(name, cfg if parsed is None else parsed))
  return shapes["params"]


def read_scheduler_config(model_dir: str) -> dict:
  """scheduler/scheduler_config.json of a model folder (the one reader of it)."""
  path = os.path.join(model_dir, "scheduler", "scheduler_config.json")
  if not os.path.exists(path):
    raise ConfigError(f"{path}: missing (the model folder needs scheduler/scheduler_config.json)")
  return _read_json(path)


def load_stable_diffusion(model_dir: str, dtype: str = "float32",
                          components: Sequence[str] = COMPONENTS,
                          attention: Optional[str] = None) -> StableDiffusion:
  """Reads a diffusers-layout folder; returns memjax modules, params and tokenizer.

  Args:
    model_dir: the folder holding model_index.json.
    dtype: "float32" or "bfloat16", for params and activations. The schedule
      stays float64/float32 whatever this is.
    components: which of unet, vae, text_encoder to load (the scan needs no VAE).
    attention: the attention kernel of every module (None: memjax's choice).

  Raises:
    ConfigError / CheckpointError: naming the file and key of the first problem
      (for weights: every missing, unexpected or mis-shaped one).
  """
  if dtype not in _NP_DTYPES:
    raise ConfigError(f"dtype {dtype!r} is not supported (float32 or bfloat16)")
  if not os.path.isdir(model_dir):
    raise ConfigError(f"{model_dir}: model folder does not exist")
  _read_json(os.path.join(model_dir, "model_index.json"))
  compute_dtype = jnp.float32 if dtype == "float32" else jnp.bfloat16
  modules, params, configs = {}, {}, {}
  for name in COMPONENTS:
    path = os.path.join(model_dir, name, "config.json")
    if name not in components:
      if os.path.exists(path):
        configs[name] = _read_json(path)
      continue
    if not os.path.isdir(os.path.join(model_dir, name)):
      raise ConfigError(f"{os.path.join(model_dir, name)}: missing component folder '{name}'")
    start = time.perf_counter()
    cfg = configs[name] = _read_json(path)
    module = modules[name] = build_module(name, cfg, path, compute_dtype, attention)
    state, source = checkpoint.load_component_weights(os.path.join(model_dir, name))
    if name == "text_encoder":  # transformers >= 5 saves without the text_model. prefix
      source = {k if k.startswith("text_model.") else "text_model." + k: v
                for k, v in source.items()}
      state = clip_text.with_text_model_prefix(state)
    target = abstract_params(name, module, cfg)
    first_file = next(iter(source.values()), os.path.join(model_dir, name))
    flat = convert.torch_to_flax(state, target, source=lambda k: source.get(k, first_file))
    params[name] = jax.tree.map(lambda a: np.asarray(a, _NP_DTYPES[dtype]), flat)
    logging.info("loaded %s from %s in %.2f s", name, model_dir, time.perf_counter() - start)
  tok_dir = os.path.join(model_dir, "tokenizer")
  if not os.path.isdir(tok_dir):
    raise ConfigError(f"{tok_dir}: missing component folder 'tokenizer'")
  scheduler_config = read_scheduler_config(model_dir)
  schedule = Schedule.from_config(
      scheduler_config, os.path.join(model_dir, "scheduler", "scheduler_config.json"))
  return StableDiffusion(
      model_dir=model_dir, unet=modules.get("unet"), vae=modules.get("vae"),
      text_encoder=modules.get("text_encoder"), tokenizer=CLIPTokenizer.from_folder(tok_dir),
      schedule=schedule, scheduler_config=scheduler_config, params=params, configs=configs,
      dtype=dtype, attention=attention)
