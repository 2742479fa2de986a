"""The key rules of the original LDM (CompVis) single-file layout.

`v1-5-pruned-emaonly.safetensors`, `v2-1_768-ema-pruned.ckpt` and most community
fine-tunes hold the whole `LatentDiffusion` module in one state dict. The rules
here rename its keys to the diffusers / transformers names that a diffusers folder
holds (`ldm_layout.split_components` applies them to a whole file). Each rule
returns the diffusers key, or None when no rule places the key. Only numpy.

Prefixes of the file:

- `model.diffusion_model.` (the UNet, `openaimodel.UNetModel`):
  `time_embed.{0,2}` -> `time_embedding.linear_{1,2}`; `input_blocks.0.0` ->
  `conv_in`; `out.{0,2}` -> `conv_norm_out`, `conv_out`. With L = layers_per_block,
  `input_blocks.i` (i >= 1) is level l, slot j = divmod(i - 1, L + 1): slot L is
  the downsampler (`.0.op` -> `down_blocks.l.downsamplers.0.conv`), else `.0` is
  `down_blocks.l.resnets.j` and `.1` is `down_blocks.l.attentions.j`.
  `middle_block.{0,1,2}` -> `mid_block.resnets.0`, `mid_block.attentions.0`,
  `mid_block.resnets.1`. `output_blocks.i` is level l, slot j = divmod(i, L + 1):
  `.0` -> `up_blocks.l.resnets.j`, `.1` -> `up_blocks.l.attentions.j`, and the
  `.1.conv` or `.2.conv` of slot L -> `up_blocks.l.upsamplers.0.conv`. ResBlock
  parts: `in_layers.{0,2}` -> `norm1`, `conv1`; `emb_layers.1` -> `time_emb_proj`;
  `out_layers.{0,3}` -> `norm2`, `conv2`; `skip_connection` -> `conv_shortcut`.
  SpatialTransformer parts (`norm`, `proj_in`, `transformer_blocks.*`,
  `proj_out`) already carry diffusers' names. `label_emb.*` (class embeddings)
  becomes `class_embedding.*`, which `ldm_configs.infer_configs` refuses.
- `model_ema.` (LDM's `LitEma`): a flat copy of every UNet weight, named
  `model_ema.diffusion_model` + the key after `model.diffusion_model.` with its
  dots removed (`input_blocks.1.0.in_layers.0.weight` ->
  `model_ema.diffusion_modelinput_blocks10in_layers0weight`), plus
  `model_ema.decay` and `model_ema.num_updates`. Used only when asked for.
- `first_stage_model.` (the VAE, `AutoencoderKL` of `ldm.modules.diffusionmodules.
  model`): `{encoder,decoder}.norm_out` -> `conv_norm_out`; `encoder.down.i.block.j`
  -> `encoder.down_blocks.i.resnets.j`; `encoder.down.i.downsample.conv` ->
  `encoder.down_blocks.i.downsamplers.0.conv`; `decoder.up.i` is decoder level
  n - 1 - i (LDM numbers the decoder from the lowest resolution's end:
  `decoder.up.{n-1}` runs first and is diffusers' `up_blocks.0`);
  `mid.block_{1,2}` -> `mid_block.resnets.{0,1}`; `mid.attn_1.{norm,q,k,v,proj_out}`
  -> `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`, whose 1 x 1
  conv weights [C, C, 1, 1] are squeezed to Linear weights [C, C];
  `nin_shortcut` -> `conv_shortcut`.
- `cond_stage_model.transformer.` (SD1: transformers' CLIPTextModel, family
  "sd1"): the keys after the prefix are transformers' own (`text_model.` is added
  where an old file lacks it); the `position_ids` buffer is ignored.
- `cond_stage_model.model.` (SD2: OpenCLIP's text tower, family "sd2"):
  `token_embedding` -> `text_model.embeddings.token_embedding`;
  `positional_embedding` -> `text_model.embeddings.position_embedding.weight`;
  `ln_final` -> `text_model.final_layer_norm`; `transformer.resblocks.i.{ln_1,ln_2,
  mlp.c_fc,mlp.c_proj,attn.out_proj}` -> `text_model.encoder.layers.i.{layer_norm1,
  layer_norm2,mlp.fc1,mlp.fc2,self_attn.out_proj}`; `attn.in_proj_weight` [3D, D]
  and `attn.in_proj_bias` [3D] are split, in that order, into `self_attn.q_proj`,
  `k_proj`, `v_proj`. SD2 conditions on the penultimate block's output (then
  `ln_final`), so the last block is dropped by default: diffusers' SD2 text
  encoder has `num_hidden_layers` = blocks - 1. `text_projection` and
  `logit_scale` (CLIP's contrastive head) are not used.
- Top level: the DDPM schedule buffers (`betas`, `alphas_cumprod`, ...); the
  file's `alphas_cumprod` is handed back for the loader to check against the
  scheduler. `scale_factor` (LDM's `scale_by_std=True`: the latent scale it
  measured on its first batch) is handed back as the VAE's `scaling_factor`.

Every key is either converted or listed as deliberately ignored; any other key
is refused (listed in one `CheckpointError`), never dropped silently.
"""
import re
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from memjax.runtime.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1: transformers' CLIPTextModel
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD2: OpenCLIP's text tower

# LDM's DDPM buffers (`LatentDiffusion.register_schedule`) and its loss weights.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights"})
EMA_BOOKKEEPING = frozenset({"model_ema.decay", "model_ema.num_updates"})
# OpenCLIP entries SD2 does not use: the contrastive head and the causal mask buffer.
OPENCLIP_UNUSED = frozenset({"text_projection", "logit_scale", "attn_mask"})
# LDM's `scale_factor` buffer (scale_by_std=True): the VAE's latent scale.
SCALE_FACTOR = "scale_factor"


def _rename_prefix(name: str, table: Iterable[Tuple[str, str]]) -> Optional[str]:
  """`name` with the first matching (old prefix, new prefix) of `table` swapped."""
  for old, new in table:
    if name.startswith(old):
      return new + name[len(old):]
  return None


_UNET_TOP = (("time_embed.0.", "time_embedding.linear_1."),
             ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."),
             ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             ("label_emb.0.0.", "class_embedding.linear_1."),
             ("label_emb.0.2.", "class_embedding.linear_2."),
             ("label_emb.", "class_embedding."))
_UNET_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."),
                ("emb_layers.1.", "time_emb_proj."), ("out_layers.0.", "norm2."),
                ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
_TRANSFORMER_PARTS = ("norm.", "proj_in.", "proj_out.", "transformer_blocks.")
_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)")
_MID_PARTS = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}


def _unet_resnet(prefix: str, tail: str) -> Optional[str]:
  renamed = _rename_prefix(tail, _UNET_RESNET)
  return None if renamed is None else prefix + renamed


def _unet_attention(prefix: str, tail: str) -> Optional[str]:
  return prefix + tail if tail.startswith(_TRANSFORMER_PARTS) else None


def unet_key(name: str, per_level: int) -> Optional[str]:
  """A UNet key after `model.diffusion_model.` -> its diffusers key.

  Args:
    name: e.g. `input_blocks.4.1.proj_in.weight`.
    per_level: layers_per_block + 1 (the block slots of one level).
  """
  top = _rename_prefix(name, _UNET_TOP)
  if top is not None:
    return top
  m = re.fullmatch(r"middle_block\.(\d+)\.(.+)", name)
  if m is not None:
    part, tail = _MID_PARTS.get(int(m.group(1))), m.group(2)
    if part is None:
      return None
    convert = _unet_attention if part.startswith("attentions") else _unet_resnet
    return convert(f"mid_block.{part}.", tail)
  m = _BLOCK.fullmatch(name)
  if m is None:
    return None
  kind, index, part, tail = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
  if kind == "input_blocks":
    if index == 0:
      return None
    level, slot = divmod(index - 1, per_level)
    if slot == per_level - 1:  # the level's downsampler
      if part == 0 and tail.startswith("op."):
        return f"down_blocks.{level}.downsamplers.0.conv.{tail[3:]}"
      return None
    where = f"down_blocks.{level}"
  else:
    level, slot = divmod(index, per_level)
    if slot == per_level - 1 and part in (1, 2) and tail.startswith("conv."):
      return f"up_blocks.{level}.upsamplers.0.{tail}"
    where = f"up_blocks.{level}"
  if part == 0:
    return _unet_resnet(f"{where}.resnets.{slot}.", tail)
  if part == 1:
    return _unet_attention(f"{where}.attentions.{slot}.", tail)
  return None


def unet_per_level(names: Iterable[str], source: str) -> int:
  """layers_per_block + 1, read off the numbering of the input and output blocks.

  With n levels and L resnets per level, the input blocks are conv_in, then per
  level L resnet slots and (but on the last level) a downsampler: n (L + 1) in
  all; the output blocks are L + 1 per level: n (L + 1) too.
  """
  inputs, outputs, downs = set(), set(), set()
  for name in names:
    m = re.match(r"(input|output)_blocks\.(\d+)\.", name)
    if m is None:
      continue
    (inputs if m.group(1) == "input" else outputs).add(int(m.group(2)))
    if re.match(r"input_blocks\.\d+\.0\.op\.", name):
      downs.add(int(m.group(2)))
  levels = len(downs) + 1
  count = max(inputs, default=-1) + 1
  per_level = count // levels
  expected_downs = {(i + 1) * per_level for i in range(levels - 1)}
  if (per_level < 2 or count != levels * per_level or downs != expected_downs or
      max(outputs, default=-1) + 1 != count):
    raise CheckpointError(
        f"{source}: the UNet's blocks do not follow the LDM layout ({count} "
        f"input_blocks, {max(outputs, default=-1) + 1} output_blocks, downsamplers at "
        f"input_blocks {sorted(downs)}): not an SD1/SD2 UNet memjax can read")
  return per_level


_VAE_SAME = ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
             "quant_conv.", "post_quant_conv.")
_VAE_TOP = tuple((p, p) for p in _VAE_SAME) + (
    ("encoder.norm_out.", "encoder.conv_norm_out."),
    ("decoder.norm_out.", "decoder.conv_norm_out."))
_VAE_RESNET_PARTS = (("norm1.", "norm1."), ("conv1.", "conv1."), ("norm2.", "norm2."),
                     ("conv2.", "conv2."), ("nin_shortcut.", "conv_shortcut."))
_VAE_ATTENTION_PARTS = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."),
                        ("v.", "to_v."), ("proj_out.", "to_out.0."))


def _vae_resnet(prefix: str, tail: str) -> Optional[str]:
  renamed = _rename_prefix(tail, _VAE_RESNET_PARTS)
  return None if renamed is None else prefix + renamed


def vae_key(name: str, up_levels: int) -> Optional[str]:
  """A VAE key after `first_stage_model.` -> its diffusers key."""
  top = _rename_prefix(name, _VAE_TOP)
  if top is not None:
    return top
  m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)", name)
  if m is not None:
    half, part, tail = m.groups()
    if part == "attn_1":
      renamed = _rename_prefix(tail, _VAE_ATTENTION_PARTS)
      return None if renamed is None else f"{half}.mid_block.attentions.0.{renamed}"
    return _vae_resnet(f"{half}.mid_block.resnets.{int(part[-1]) - 1}.", tail)
  m = re.fullmatch(r"(encoder\.down|decoder\.up)\.(\d+)\.(.+)", name)
  if m is None:
    return None
  where, level, tail = m.group(1), int(m.group(2)), m.group(3)
  if where == "decoder.up":
    where, level = "decoder.up_blocks", up_levels - 1 - level
  else:
    where = "encoder.down_blocks"
  m = re.fullmatch(r"block\.(\d+)\.(.+)", tail)
  if m is not None:
    return _vae_resnet(f"{where}.{level}.resnets.{m.group(1)}.", m.group(2))
  sampler = "upsample.conv." if where == "decoder.up_blocks" else "downsample.conv."
  if tail.startswith(sampler):
    kind = "upsamplers" if where == "decoder.up_blocks" else "downsamplers"
    return f"{where}.{level}.{kind}.0.conv.{tail[len(sampler):]}"
  return None


def as_linear(key: str, value: np.ndarray) -> np.ndarray:
  """VAE attention q/k/v/proj_out weights: 1 x 1 conv [C, C, 1, 1] (or Conv1d
  [C, C, 1]) -> Linear [C, C]; everything else as it is."""
  if ".attentions.0.to_" in key and key.endswith(".weight") and value.ndim in (3, 4):
    return value.reshape(value.shape[:2])
  return value


_OPENCLIP_TOP = (("token_embedding.", "text_model.embeddings.token_embedding."),
                 ("ln_final.", "text_model.final_layer_norm."))
_OPENCLIP_BLOCK = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
                   ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."),
                   ("attn.out_proj.", "self_attn.out_proj."))


def openclip_keys(name: str, value: np.ndarray) -> Optional[Dict[str, np.ndarray]]:
  """An OpenCLIP key after `cond_stage_model.model.` -> {diffusers key: array}
  (three of them for a fused q/k/v projection), or None."""
  if name == "positional_embedding":
    return {"text_model.embeddings.position_embedding.weight": value}
  top = _rename_prefix(name, _OPENCLIP_TOP)
  if top is not None:
    return {top: value}
  m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", name)
  if m is None:
    return None
  layer, tail = f"text_model.encoder.layers.{m.group(1)}.", m.group(2)
  if tail in ("attn.in_proj_weight", "attn.in_proj_bias"):
    if value.shape[0] % 3:
      return None
    size, leaf = value.shape[0] // 3, tail.rsplit("_", 1)[1]
    return {f"{layer}self_attn.{p}_proj.{leaf}": value[i * size:(i + 1) * size]
            for i, p in enumerate("qkv")}
  renamed = _rename_prefix(tail, _OPENCLIP_BLOCK)
  return None if renamed is None else {layer + renamed: value}




def ema_key(unet_rest: str) -> str:
  """LitEma's name for a UNet weight: `model_ema.diffusion_model` + dotless rest."""
  return EMA_PREFIX + "diffusion_model" + unet_rest.replace(".", "")


CLIP_PARTS = ("text_model.embeddings.", "text_model.encoder.layers.",
              "text_model.final_layer_norm.")


def clip_key(name: str) -> str:
  """An SD1 key after `cond_stage_model.transformer.` -> transformers' name
  (`text_model.` added where an old file lacks it); a text model part if it starts
  with one of CLIP_PARTS."""
  return name if name.startswith("text_model.") else "text_model." + name
