"""Loading a Stable Diffusion model into memjax: a diffusers folder, or a single
file in the original latent-diffusion layout (`model_files` says where each part
comes from). The diffusers layout:

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
import time
from typing import Dict, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from memjax.runtime.errors import ConfigError
from memjax.models import attention as attention_lib
from memjax.models import clip_text
from memjax.models import convert
from memjax.models import model_files
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
  sources: Dict[str, str] = dataclasses.field(default_factory=dict)  # where each config is

  def _config(self, name: str):
    """(component config dict, where it came from); ConfigError if the model has none."""
    if name not in self.configs:
      raise ConfigError(f"{self.model_dir}: has no {name} (no {name}/config.json)")
    return self.configs[name], self.sources[name]

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
  """scheduler/scheduler_config.json of a model folder."""
  return model_files.FolderFiles(model_dir).scheduler_config()[0]


def load_stable_diffusion(model: str, dtype: str = "float32",
                          components: Sequence[str] = COMPONENTS,
                          attention: Optional[str] = None,
                          options: model_files.ModelOptions = model_files.ModelOptions()
                          ) -> StableDiffusion:
  """Reads a model; returns memjax modules, params and tokenizer.

  Args:
    model: a diffusers folder (holding model_index.json), or a single-file
      checkpoint in the original latent-diffusion layout (`model_files`).
    dtype: "float32" or "bfloat16", for params and activations. The schedule
      stays float64/float32 whatever this is.
    components: which of unet, vae, text_encoder to load (the scan needs no VAE).
    attention: the attention kernel of every module (None: memjax's choice).
    options: variant, and what a single file cannot tell (`model_files.ModelOptions`).

  Raises:
    ConfigError / CheckpointError: naming the file and key of the first problem
      (for weights: every missing, unexpected or mis-shaped one).
  """
  if dtype not in _NP_DTYPES:
    raise ConfigError(f"dtype {dtype!r} is not supported (float32 or bfloat16)")
  files = model_files.open_model_files(model, options)
  compute_dtype = jnp.float32 if dtype == "float32" else jnp.bfloat16
  modules, params, configs, sources = {}, {}, {}, {}
  for name in COMPONENTS:
    if name not in components:
      if files.has(name):  # read and checked; the UNet's latent shape, the VAE's scale
        configs[name], sources[name] = files.config(name)
      continue
    start = time.perf_counter()
    cfg, path = files.config(name)
    configs[name], sources[name] = cfg, path
    module = modules[name] = build_module(name, cfg, path, compute_dtype, attention)
    state, source = files.weights(name)
    if name == "text_encoder":  # transformers >= 5 saves without the text_model. prefix
      source = {k if k.startswith("text_model.") else "text_model." + k: v
                for k, v in source.items()}
      state = clip_text.with_text_model_prefix(state)
    target = abstract_params(name, module, cfg)
    first_file = next(iter(source.values()), model)
    flat = convert.torch_to_flax(state, target, source=lambda k: source.get(k, first_file))
    params[name] = jax.tree.map(lambda a: np.asarray(a, _NP_DTYPES[dtype]), flat)
    logging.info("loaded %s from %s in %.2f s", name, model, time.perf_counter() - start)
  tokenizer = files.tokenizer()
  scheduler_config, scheduler_source = files.scheduler_config()
  schedule = Schedule.from_config(scheduler_config, scheduler_source)
  if isinstance(files, model_files.SingleFile):
    files.check_schedule(schedule.alphas_cumprod, scheduler_source)
  return StableDiffusion(
      model_dir=model, unet=modules.get("unet"), vae=modules.get("vae"),
      text_encoder=modules.get("text_encoder"), tokenizer=tokenizer,
      schedule=schedule, scheduler_config=scheduler_config, params=params, configs=configs,
      dtype=dtype, attention=attention, sources=sources)
