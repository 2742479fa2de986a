"""The configs of an LDM single file's components, read off its weights' shapes.

`infer_configs` gives diffusers-style config dicts for what `ldm_layout.
split_components` converted; what the shapes cannot tell follows Stable
Diffusion's own choices (the constants below). Only numpy.
"""
import re
from typing import Callable, Dict, List, Tuple

import numpy as np

from memjax.models.ldm_layout import LdmParts
from memjax.runtime.errors import ConfigError

# Stable Diffusion's values of what the weights cannot tell.
SD_NORM_GROUPS = 32
SD_NORM_EPS = 1e-5
SD1_HEADS = 8  # SD1: 8 heads in every attention block
SD2_HEAD_CHANNELS = 64  # SD2: 64 channels per head
TEXT_HEAD_CHANNELS = 64  # both CLIP text encoders: 64 channels per head
VAE_SCALING_FACTOR = 0.18215

_UNET_FIXED = {"_class_name": "UNet2DConditionModel", "mid_block_type": "UNetMidBlock2DCrossAttn",
               "norm_num_groups": SD_NORM_GROUPS, "norm_eps": SD_NORM_EPS, "act_fn": "silu",
               "center_input_sample": False, "downsample_padding": 1,
               "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1,
               "upcast_attention": False}
_VAE_FIXED = {"_class_name": "AutoencoderKL", "act_fn": "silu",
              "norm_num_groups": SD_NORM_GROUPS, "scaling_factor": VAE_SCALING_FACTOR}


class _Weights:
  """One component's converted state, with errors that name the file's keys."""

  def __init__(self, parts: LdmParts, component: str, source: str):
    self.state = parts.states[component]
    self.origin = parts.origin.get(component, {})
    self.component = component
    self.source = source

  def file_key(self, key: str) -> str:
    return self.origin.get(key, key)

  def shape(self, key: str, what: str) -> Tuple[int, ...]:
    """The shape of weight `key`; ConfigError if the file lacks it."""
    if key not in self.state:
      raise ConfigError(f"{self.source}: the {self.component} has no weight '{key}' "
                        f"(needed for {what}); not an SD1/SD2 {self.component} memjax builds")
    return tuple(np.shape(self.state[key]))

  def refuse(self, key: str, why: str) -> ConfigError:
    return ConfigError(f"{self.source}: key '{self.file_key(key)}' {why}")

  def indices(self, pattern: str) -> List[int]:
    """Sorted distinct integers captured by `pattern` (matched at key starts)."""
    found = {int(m.group(1)) for k in self.state if (m := re.match(pattern, k))}
    return sorted(found)


def _count(weights: _Weights, pattern: str, what: str) -> int:
  """Number of list entries 0..n-1 that `pattern` captures; ConfigError on a gap."""
  found = weights.indices(pattern)
  if found != list(range(len(found))):
    raise ConfigError(f"{weights.source}: the {weights.component}'s {what} are numbered "
                      f"{found}, not 0..{len(found) - 1}")
  return len(found)


def _refuse_unbuilt_unet_parts(w: _Weights) -> None:
  """ConfigError for UNet parts memjax's UNet2DConditionModel does not build."""
  for key in sorted(w.state):
    if key.startswith("class_embedding."):
      raise w.refuse(key, "is a class/label embedding (label_emb, num_classes): memjax's "
                     "UNet has no class or added embeddings")
    m = re.search(r"\.transformer_blocks\.(\d+)\.", key)
    if m is not None and int(m.group(1)) >= 1:
      raise w.refuse(key, f"means transformer depth {int(m.group(1)) + 1}: memjax's UNet "
                     f"builds one transformer block per attention (SD1/SD2)")


def _unet_block_types(w: _Weights, levels: int, layers: int) -> Tuple[List[str], List[str]]:
  """down/up block types: CrossAttn where the level has attentions (all slots)."""
  types = {}
  for side, slots, cross, plain in (("down", layers, "CrossAttnDownBlock2D", "DownBlock2D"),
                                    ("up", layers + 1, "CrossAttnUpBlock2D", "UpBlock2D")):
    kinds = []
    for level in range(levels):
      count = len(w.indices(rf"{side}_blocks\.{level}\.attentions\.(\d+)\.proj_in\."))
      if count not in (0, slots):
        raise ConfigError(f"{w.source}: unet {side}_blocks.{level} has attention in {count} "
                          f"of its {slots} slots; memjax builds all or none")
      kinds.append(cross if count else plain)
    types[side] = kinds
  return types["down"], types["up"]


def _unet_heads(family: str, channels: List[int], down: List[str], up: List[str],
                w: _Weights):
  """attention_head_dim (diffusers' name for the head count) by SD's rule."""
  if family == "sd1":
    return SD1_HEADS
  with_attention = ({i for i, t in enumerate(down) if t.startswith("CrossAttn")} |
                    {len(up) - 1 - i for i, t in enumerate(up) if t.startswith("CrossAttn")} |
                    {len(channels) - 1})
  for i in sorted(with_attention):
    if channels[i] % SD2_HEAD_CHANNELS:
      raise ConfigError(f"{w.source}: unet block {i} has {channels[i]} channels, not a "
                        f"multiple of SD2's {SD2_HEAD_CHANNELS} channels per head; the "
                        f"head count cannot be inferred")
  return [max(1, c // SD2_HEAD_CHANNELS) for c in channels]


def _unet_config(parts: LdmParts, source: str) -> dict:
  w = _Weights(parts, "unet", source)
  _refuse_unbuilt_unet_parts(w)
  levels = _count(w, r"down_blocks\.(\d+)\.", "down blocks")
  layers = _count(w, r"down_blocks\.0\.resnets\.(\d+)\.", "resnets of down_blocks.0")
  if levels == 0 or layers == 0:
    raise ConfigError(f"{source}: the unet has no down blocks with resnets")
  channels = [w.shape(f"down_blocks.{i}.resnets.0.conv1.weight", "block_out_channels")[0]
              for i in range(levels)]
  down, up = _unet_block_types(w, levels, layers)
  mid = "mid_block.attentions.0."
  proj_in = w.shape(mid + "proj_in.weight", "the mid block's attention (memjax builds "
                    "UNetMidBlock2DCrossAttn)")
  cross = w.shape(mid + "transformer_blocks.0.attn2.to_k.weight", "cross_attention_dim")[1]
  config = dict(_UNET_FIXED)
  config.update({
      "in_channels": w.shape("conv_in.weight", "in_channels")[1],
      "out_channels": w.shape("conv_out.weight", "out_channels")[0],
      "down_block_types": down, "up_block_types": up,
      "block_out_channels": channels, "layers_per_block": layers,
      "attention_head_dim": _unet_heads(parts.family, channels, down, up, w),
      "cross_attention_dim": cross,
      "use_linear_projection": len(proj_in) == 2})
  return config


def _vae_config(parts: LdmParts, source: str) -> dict:
  w = _Weights(parts, "vae", source)
  levels = _count(w, r"encoder\.down_blocks\.(\d+)\.", "encoder down blocks")
  if levels == 0:
    raise ConfigError(f"{source}: the vae has no encoder down blocks")
  config = dict(_VAE_FIXED)
  if parts.scale_factor is not None:  # LDM's scale_by_std measured its own
    config["scaling_factor"] = parts.scale_factor
  config.update({
      "in_channels": w.shape("encoder.conv_in.weight", "in_channels")[1],
      "out_channels": w.shape("decoder.conv_out.weight", "out_channels")[0],
      "down_block_types": ["DownEncoderBlock2D"] * levels,
      "up_block_types": ["UpDecoderBlock2D"] * levels,
      "block_out_channels": [
          w.shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight", "block_out_channels")[0]
          for i in range(levels)],
      "layers_per_block": _count(w, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.",
                                 "resnets of encoder.down_blocks.0"),
      "latent_channels": w.shape("decoder.conv_in.weight", "latent_channels")[1]})
  return config


def _text_config(parts: LdmParts, source: str) -> dict:
  w = _Weights(parts, "text_encoder", source)
  vocab, hidden = w.shape("text_model.embeddings.token_embedding.weight", "vocab_size")
  if hidden % TEXT_HEAD_CHANNELS:
    raise ConfigError(f"{source}: the text encoder's hidden size {hidden} is not a multiple "
                      f"of CLIP's {TEXT_HEAD_CHANNELS} channels per head; the head count "
                      f"cannot be inferred")
  return {
      "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
      "vocab_size": vocab, "hidden_size": hidden,
      "intermediate_size": w.shape("text_model.encoder.layers.0.mlp.fc1.weight",
                                   "intermediate_size")[0],
      "num_hidden_layers": _count(w, r"text_model\.encoder\.layers\.(\d+)\.", "layers"),
      "num_attention_heads": hidden // TEXT_HEAD_CHANNELS,
      "max_position_embeddings": w.shape("text_model.embeddings.position_embedding.weight",
                                         "max_position_embeddings")[0],
      "hidden_act": "quick_gelu" if parts.family == "sd1" else "gelu",
      "layer_norm_eps": SD_NORM_EPS}


_CONFIG_BUILDERS: Dict[str, Callable[[LdmParts, str], dict]] = {
    "unet": _unet_config, "vae": _vae_config, "text_encoder": _text_config}


def infer_configs(parts: LdmParts, source: str) -> Dict[str, dict]:
  """diffusers-style config dicts of the components present, read off the shapes.

  What the weights cannot tell follows Stable Diffusion: 32 norm groups, eps 1e-5,
  flip_sin_to_cos, freq_shift 0, 8 heads per block (sd1) or 64 channels per head
  (sd2), upcast_attention False, VAE scaling factor 0.18215 (or the file's own
  `scale_factor` buffer, `LdmParts.scale_factor`), text heads of 64 channels,
  quick_gelu (OpenAI CLIP, sd1) or gelu (OpenCLIP, sd2). `sample_size` is left to
  the caller.

  Raises:
    ConfigError: naming the file and key, for what memjax's modules do not build
      (transformer depth > 1, class embeddings, a UNet without mid attention) or
      an architecture the SD rules cannot recover.
  """
  return {name: build(parts, source) for name, build in _CONFIG_BUILDERS.items()
          if name in parts.states}
