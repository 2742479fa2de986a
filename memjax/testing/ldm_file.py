"""Writes a diffusers model folder as an LDM (CompVis) single-file checkpoint.

The inverse of `memjax.models.ldm_keys`, written separately from it (diffusers
names -> LDM names, one rule per module kind), so tests can check both against
each other and against PyTorch diffusers' own `from_single_file`. The file holds
what released SD checkpoints hold:

- `model.diffusion_model.*`: the UNet in `openaimodel.UNetModel` numbering.
- `first_stage_model.*`: the VAE, its mid-block attention as 1 x 1 conv weights
  `q`, `k`, `v`, `proj_out` [C, C, 1, 1] and `norm`.
- sd1: `cond_stage_model.transformer.text_model.*` (transformers' names) and the
  `position_ids` buffer; sd2: OpenCLIP's `cond_stage_model.model.*` with fused
  `attn.in_proj_weight` / `in_proj_bias` (q, k, v concatenated), `text_projection`,
  `logit_scale`, and one extra random last resblock that SD2 does not use (SD2
  conditions on the penultimate block).
- The DDPM schedule buffers of the scheduler config (`betas`, `alphas_cumprod`, ...),
  and, when asked for, LDM's `scale_factor` buffer.
- With ema=True: `model_ema.*`, LitEma's flat copy of the UNet (perturbed, so a
  test can tell which copy was read), `model_ema.decay` and `model_ema.num_updates`.
"""
import json
import os
import re
from typing import Callable, Dict, List, Optional, Tuple

import ml_dtypes
import numpy as np

from memjax.models import checkpoint
from memjax.models import clip_text

Rules = List[Tuple[str, Callable[..., str]]]

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2",
                  "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                  "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                         "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _rename(key: str, rules: Rules) -> str:
  """The first rule whose regex matches all of `key`, applied to its groups."""
  for pattern, build in rules:
    m = re.fullmatch(pattern, key)
    if m is not None:
      return build(*m.groups())
  raise ValueError(f"no LDM rule for diffusers key {key!r}")


def _resnet(module: str, rest: str) -> str:
  """A diffusers ResnetBlock2D key tail (`norm1.weight`) -> LDM's ResBlock's."""
  return f"{_RESNET_TO_LDM[module]}.{rest}"


def unet_to_ldm(state: Dict[str, np.ndarray], config: dict) -> Dict[str, np.ndarray]:
  """diffusers UNet2DConditionModel keys -> `openaimodel.UNetModel` keys."""
  per = config["layers_per_block"] + 1
  last = per - 1
  up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
  resnet = r"(norm1|conv1|time_emb_proj|norm2|conv2|conv_shortcut)\.(.+)"
  rules: Rules = [
      (r"time_embedding\.linear_1\.(.+)", lambda r: f"time_embed.0.{r}"),
      (r"time_embedding\.linear_2\.(.+)", lambda r: f"time_embed.2.{r}"),
      (r"conv_in\.(.+)", lambda r: f"input_blocks.0.0.{r}"),
      (r"conv_norm_out\.(.+)", lambda r: f"out.0.{r}"),
      (r"conv_out\.(.+)", lambda r: f"out.2.{r}"),
      (r"down_blocks\.(\d+)\.resnets\.(\d+)\." + resnet,
       lambda l, j, m, r: f"input_blocks.{1 + int(l) * per + int(j)}.0.{_resnet(m, r)}"),
      (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
       lambda l, j, r: f"input_blocks.{1 + int(l) * per + int(j)}.1.{r}"),
      (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
       lambda l, r: f"input_blocks.{1 + int(l) * per + last}.0.op.{r}"),
      (r"mid_block\.resnets\.(0|1)\." + resnet,
       lambda i, m, r: f"middle_block.{2 * int(i)}.{_resnet(m, r)}"),
      (r"mid_block\.attentions\.0\.(.+)", lambda r: f"middle_block.1.{r}"),
      (r"up_blocks\.(\d+)\.resnets\.(\d+)\." + resnet,
       lambda l, j, m, r: f"output_blocks.{int(l) * per + int(j)}.0.{_resnet(m, r)}"),
      (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
       lambda l, j, r: f"output_blocks.{int(l) * per + int(j)}.1.{r}"),
      (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
       lambda l, r: (f"output_blocks.{int(l) * per + last}."
                     f"{2 if up_attention[int(l)] else 1}.conv.{r}")),
  ]
  return {_rename(k, rules): v for k, v in state.items()}


def _shortcut(module: str) -> str:
  """diffusers' VAE resnet module name -> LDM's (only the shortcut differs)."""
  return "nin_shortcut" if module == "conv_shortcut" else module


def vae_to_ldm(state: Dict[str, np.ndarray], config: dict) -> Dict[str, np.ndarray]:
  """diffusers AutoencoderKL keys -> LDM's, attention weights as 1 x 1 convs."""
  levels = len(config["block_out_channels"])
  resnet = r"(norm1|conv1|norm2|conv2|conv_shortcut)\.(.+)"
  rules: Rules = [
      (r"(encoder|decoder)\.conv_norm_out\.(.+)", lambda h, r: f"{h}.norm_out.{r}"),
      (r"((?:encoder|decoder)\.conv_(?:in|out)|quant_conv|post_quant_conv)\.(.+)",
       lambda p, r: f"{p}.{r}"),
      (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\." + resnet,
       lambda i, j, m, r: f"encoder.down.{i}.block.{j}.{_shortcut(m)}.{r}"),
      (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
       lambda i, r: f"encoder.down.{i}.downsample.conv.{r}"),
      (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\." + resnet,
       lambda i, j, m, r: f"decoder.up.{levels - 1 - int(i)}.block.{j}.{_shortcut(m)}.{r}"),
      (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
       lambda i, r: f"decoder.up.{levels - 1 - int(i)}.upsample.conv.{r}"),
      (r"(encoder|decoder)\.mid_block\.resnets\.(0|1)\." + resnet,
       lambda h, i, m, r: f"{h}.mid.block_{int(i) + 1}.{_shortcut(m)}.{r}"),
      (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)"
       r"\.(.+)", lambda h, m, r: f"{h}.mid.attn_1.{_VAE_ATTENTION_TO_LDM[m]}.{r}"),
  ]
  out = {}
  for key, value in state.items():
    name = _rename(key, rules)
    if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", name) and value.ndim == 2:
      value = value[:, :, None, None]
    out[name] = value
  return out


def clip_to_ldm(state: Dict[str, np.ndarray], config: dict) -> Dict[str, np.ndarray]:
  """SD1: transformers' names under `cond_stage_model.transformer.`, plus position_ids."""
  out = {f"cond_stage_model.transformer.{k}": v
         for k, v in clip_text.with_text_model_prefix(state).items()}
  out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (
      np.arange(config["max_position_embeddings"], dtype=np.int64)[None])
  return out


def openclip_to_ldm(state: Dict[str, np.ndarray], config: dict,
                    rng: np.random.Generator) -> Dict[str, np.ndarray]:
  """SD2: OpenCLIP's text tower, q/k/v fused, plus one unused random last block."""
  state = clip_text.with_text_model_prefix(state)
  prefix = "cond_stage_model.model."
  layers, hidden = config["num_hidden_layers"], config["hidden_size"]
  out = {
      prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
      prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
      prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
      prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
      prefix + "text_projection": rng.standard_normal((hidden, hidden)).astype(np.float32),
      prefix + "logit_scale": np.asarray(np.log(1 / 0.07), np.float32),
  }
  for i in range(layers):
    src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
    for name, ldm in _OPENCLIP_LAYER.items():
      for leaf in ("weight", "bias"):
        out[f"{dst}{ldm}.{leaf}"] = state[f"{src}{name}.{leaf}"]
    for leaf in ("weight", "bias"):
      out[f"{dst}attn.in_proj_{leaf}"] = np.concatenate(
          [state[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
  # The last block, which SD2's penultimate-layer conditioning never runs.
  extra = f"{prefix}transformer.resblocks.{layers}."
  template = {k[len(f"{prefix}transformer.resblocks.0."):]: v for k, v in out.items()
              if k.startswith(f"{prefix}transformer.resblocks.0.")}
  for name, value in template.items():
    out[extra + name] = rng.standard_normal(value.shape).astype(np.float32)
  return out


def schedule_buffers(scheduler: dict) -> Dict[str, np.ndarray]:
  """LDM's `register_schedule` buffers (float32) for a linear / scaled_linear schedule."""
  n = scheduler.get("num_train_timesteps", 1000)
  start, end = scheduler["beta_start"], scheduler["beta_end"]
  if scheduler.get("beta_schedule", "linear") == "scaled_linear":
    betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
  else:
    betas = np.linspace(start, end, n, dtype=np.float64)
  alphas = np.cumprod(1.0 - betas)
  prev = np.append(1.0, alphas[:-1])
  posterior = betas * (1.0 - prev) / (1.0 - alphas)
  buffers = {
      "betas": betas, "alphas_cumprod": alphas, "alphas_cumprod_prev": prev,
      "sqrt_alphas_cumprod": np.sqrt(alphas),
      "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas),
      "log_one_minus_alphas_cumprod": np.log(1.0 - alphas),
      "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas),
      "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas - 1),
      "posterior_variance": posterior,
      "posterior_log_variance_clipped": np.log(np.maximum(posterior, 1e-20)),
      "posterior_mean_coef1": betas * np.sqrt(prev) / (1.0 - alphas),
      "posterior_mean_coef2": (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas)}
  return {k: v.astype(np.float32) for k, v in buffers.items()}


def ema_key(unet_key: str) -> str:
  """LitEma's flat name of `model.diffusion_model.<rest>`."""
  return "model_ema.diffusion_model" + unet_key[len("model.diffusion_model."):].replace(".", "")


def ema_copy(unet: Dict[str, np.ndarray], rng: np.random.Generator) -> Dict[str, np.ndarray]:
  """`model_ema.*`: every UNet weight perturbed, plus LitEma's two buffers."""
  out = {ema_key(k): (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
         for k, v in unet.items()}
  out["model_ema.decay"] = np.asarray(0.9999, np.float32)
  out["model_ema.num_updates"] = np.asarray(1000, np.int32)
  return out


def _load(model_dir: str, name: str) -> Dict[str, np.ndarray]:
  state, _ = checkpoint.load_component_weights(os.path.join(model_dir, name))
  return {k: np.asarray(v) for k, v in state.items()}


def ldm_state(model_dir: str, family: str, ema: bool = False,
              seed: int = 0) -> Dict[str, np.ndarray]:
  """The LDM state dict of a diffusers folder (float32 where the folder is)."""
  if family not in ("sd1", "sd2"):
    raise ValueError(f"family must be 'sd1' or 'sd2', got {family!r}")
  rng = np.random.default_rng(seed)
  configs = {n: _read_json(os.path.join(model_dir, n, "config.json"))
             for n in ("unet", "vae", "text_encoder")}
  scheduler = _read_json(os.path.join(model_dir, "scheduler", "scheduler_config.json"))
  unet = {"model.diffusion_model." + k: v
          for k, v in unet_to_ldm(_load(model_dir, "unet"), configs["unet"]).items()}
  out = dict(unet)
  out.update({"first_stage_model." + k: v
              for k, v in vae_to_ldm(_load(model_dir, "vae"), configs["vae"]).items()})
  text = _load(model_dir, "text_encoder")
  out.update(clip_to_ldm(text, configs["text_encoder"]) if family == "sd1" else
             openclip_to_ldm(text, configs["text_encoder"], rng))
  out.update(schedule_buffers(scheduler))
  if ema:
    out.update(ema_copy(unet, rng))
  return out


def _cast(state: Dict[str, np.ndarray], dtype) -> Dict[str, np.ndarray]:
  return {k: (v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v)
          for k, v in state.items()}


def _save_ckpt(path: str, state: Dict[str, np.ndarray]) -> None:
  """`torch.save` of {"state_dict": ...} plus training bookkeeping, as LDM saves."""
  import torch  # pylint: disable=g-import-not-at-top  # only for .ckpt output
  tensors = {}
  for key, value in state.items():
    if value.dtype == ml_dtypes.bfloat16:
      tensors[key] = torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16)
    else:
      tensors[key] = torch.from_numpy(np.array(value))
  torch.save({"epoch": 1, "global_step": 1000, "state_dict": tensors}, path)


def write_ldm_file(model_dir: str, path: str, family: str, ema: bool = False,
                   dtype=np.float32, scale_factor: Optional[float] = None) -> str:
  """Writes `model_dir` (a diffusers folder) as an LDM single file at `path`.

  Args:
    family: "sd1" (CLIP text encoder) or "sd2" (OpenCLIP, plus an unused block).
    ema: also write a perturbed `model_ema.*` copy of the UNet.
    dtype: the float dtype of every floating tensor (float32, float16, bfloat16).
    scale_factor: also write LDM's `scale_factor` buffer (scale_by_std=True), a
      0-dim tensor of `dtype`.

  Returns:
    path. `.safetensors` through `checkpoint.write_safetensors`; `.ckpt`, `.pt`
    and `.pth` through `torch.save({"state_dict": ...})`.
  """
  state = ldm_state(model_dir, family, ema)
  if scale_factor is not None:
    state["scale_factor"] = np.asarray(scale_factor, np.float32)
  state = _cast(state, dtype)
  if path.endswith(".safetensors"):
    checkpoint.write_safetensors(path, state)
  else:
    _save_ckpt(path, state)
  return path
