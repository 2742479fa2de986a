"""Stable Diffusion's denoiser (diffusers `UNet2DConditionModel`) in Flax.

The attack's score is a function of the UNet's noise prediction eps(x_t, t, c)
(docs/method.md sections 2 and 3), so this is the model memjax runs most. Only the
architecture of the SD1.x / SD2.x family is built: `CrossAttnDownBlock2D` /
`DownBlock2D`, `CrossAttnUpBlock2D` / `UpBlock2D`, a `UNetMidBlock2DCrossAttn`,
one transformer layer per attention, sinusoidal timestep embedding, no class or
added embeddings. Any other value in `unet/config.json` is refused with a
`ConfigError` naming the key, since running it anyway would silently compute a
different function.

Submodules are named like diffusers' state-dict keys (`down_blocks_0/
attentions_1/transformer_blocks_0/attn1/to_q`), so
`memjax.models.convert.torch_to_flax` loads a diffusers checkpoint by rule.
Activations are NHWC throughout.
"""
import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.runtime.errors import ConfigError
from memjax.models import unet_blocks as blocks


def _finite(v) -> bool:
  """A JSON number that is a finite float (NaN, Infinity and 1e400-sized ints are not)."""
  try:
    return math.isfinite(float(v))
  except OverflowError:
    return False


_CROSS_DOWN, _DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _UP = "CrossAttnUpBlock2D", "UpBlock2D"
_MID = "UNetMidBlock2DCrossAttn"

# Keys of diffusers 0.42's UNet2DConditionModel whose only memjax-supported value
# is the one SD uses (each listed value gives the same math as the default).
_FIXED = {
    "mid_block_type": (_MID,),
    "act_fn": ("silu", "swish"),  # diffusers maps both to nn.SiLU
    "dual_cross_attention": (False,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "num_class_embeds": (None,),  # set alone, diffusers still adds a class embedding
    "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
}
# Keys that do not change the forward pass of the blocks memjax builds: bookkeeping
# (sample_size), training only (dropout), or read by diffusers only for block
# types or embeddings that the keys above already exclude.
_IGNORED = frozenset({
    "sample_size", "dropout", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim", "resnet_skip_time_act",
    "resnet_out_scale_factor", "mid_block_only_cross_attention",
    "cross_attention_norm", "addition_embed_type_num_heads",
    "architectures", "transformers_version", "torch_dtype"})
# Keys a list of identical values may spell: only these per-block values work.
_PER_BLOCK_FIXED = {"only_cross_attention": False, "transformer_layers_per_block": 1}
# Keys of _FIXED that diffusers builds the same with null (it tests their truth, or
# treats null as the default). Measured with diffusers 0.42 (docs/models.md); null
# elsewhere in _FIXED builds another model (mid_block_type) or fails in diffusers.
_NULL_IS_DEFAULT = frozenset({"dual_cross_attention", "class_embeddings_concat",
                              "attention_type"})
# Keys diffusers takes per block or as one value; a list of one repeated value is
# the same model as that value.
_ONE_OR_PER_BLOCK = ("layers_per_block", "cross_attention_dim")

IntOrTuple = Union[int, Tuple[int, ...]]
# The latent side when unet/config.json has no sample_size (SD1's 512 px / 8).
DEFAULT_SAMPLE_SIZE = 64


# The largest size memjax takes from a config: an array dimension, not an overflow.
MAX_INT = 2 ** 31 - 1


def _is_int(v) -> bool:
  """An int of a config (not a bool), at most MAX_INT."""
  return isinstance(v, int) and not isinstance(v, bool) and v <= MAX_INT


def check_object(d, source: str) -> None:
  """ConfigError unless d is a JSON object (a config file that is a list is not)."""
  if not isinstance(d, Mapping):
    raise ConfigError(f"{source}: must be a JSON object of config keys, got "
                      f"{type(d).__name__} {d!r:.60}")


def sample_size_hw(d: Mapping[str, Any], source: str) -> Optional[Tuple[int, int]]:
  """(h, w) of `sample_size` (one positive integer or [h, w]), None if unset."""
  v = d.get("sample_size")
  if v is None:
    return None
  if _is_int(v) and v >= 1:
    return (v, v)
  if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v):
    return (v[0], v[1])
  raise ConfigError(f"{source}: sample_size must be a positive integer or [height, width] "
                    f"of positive integers, got {v!r:.60}")


def latent_shape_chw(d: Mapping[str, Any], source: str) -> Tuple[int, int, int]:
  """(C, H, W) of the latents a unet/config.json describes: in_channels and
  sample_size (default 64, Stable Diffusion 1's), each checked."""
  check_object(d, source)
  c = d.get("in_channels", UNetConfig.in_channels)
  if not _is_int(c) or c < 1:
    raise ConfigError(f"{source}: in_channels must be an integer from 1 to {MAX_INT}, "
                      f"got {c!r:.60}")
  h, w = sample_size_hw(d, source) or (DEFAULT_SAMPLE_SIZE, DEFAULT_SAMPLE_SIZE)
  return (c, h, w)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The subset of diffusers' `UNet2DConditionModel` config that memjax supports.

  Defaults are diffusers' (an SD1.x UNet except for cross_attention_dim).
  """
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  down_block_types: Tuple[str, ...] = (_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, _DOWN)
  up_block_types: Tuple[str, ...] = (_UP, _CROSS_UP, _CROSS_UP, _CROSS_UP)
  cross_attention_dim: int = 1280
  attention_head_dim: IntOrTuple = 8
  num_attention_heads: Optional[IntOrTuple] = None
  use_linear_projection: bool = False
  upcast_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  downsample_padding: int = 1
  center_input_sample: bool = False
  mid_block_scale_factor: float = 1.0
  sample_size: Optional[Any] = None  # the training resolution; no effect on the math

  @property
  def heads(self) -> Tuple[int, ...]:
    """Attention heads per down block (up blocks use them reversed, mid the last).

    diffusers' naming quirk: with `num_attention_heads` unset, `attention_head_dim`
    is the NUMBER of heads (SD1: 8 heads everywhere; SD2: (5, 10, 20, 20) heads,
    i.e. 64 channels per head). diffusers 0.42 itself refuses a set
    `num_attention_heads`; memjax reads it as the number of heads.
    """
    value = (self.attention_head_dim if self.num_attention_heads is None
             else self.num_attention_heads)
    if isinstance(value, int):
      return (value,) * len(self.block_out_channels)
    return tuple(value)

  @property
  def transformer_paths(self) -> Tuple[str, ...]:
    """Every transformer's path, e.g. "down_blocks_1/attentions_1", in forward order."""
    k = self.layers_per_block
    return (tuple(f"down_blocks_{i}/attentions_{j}" for i, t in enumerate(self.down_block_types)
                  if t == _CROSS_DOWN for j in range(k)) + ("mid_block/attentions_0",) +
            tuple(f"up_blocks_{i}/attentions_{j}" for i, t in enumerate(self.up_block_types)
                  if t == _CROSS_UP for j in range(k + 1)))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], source: str) -> "UNetConfig":
    """Builds the config from diffusers' `unet/config.json` contents.

    Args:
      d: the parsed JSON object.
      source: the file it came from, named in every error.

    Raises:
      ConfigError: for a key or value memjax does not support.
    """
    check_object(d, source)

    def fail(key, why):
      return ConfigError(f"{source}: {key} {why}")

    def unsupported(key, value, hint=""):
      return fail(key, f"= {value!r} is not supported{hint}")

    is_int = _is_int

    def pos_int(key, default, minimum=1):
      v = d.get(key, default)
      if not is_int(v) or v < minimum:
        raise fail(key, f"must be an integer from {minimum} to {MAX_INT}, got {v!r}")
      return v

    def number(key, default, positive=False):
      v = d.get(key, default)
      if (isinstance(v, bool) or not isinstance(v, (int, float)) or
          not _finite(v) or (positive and v <= 0)):
        raise fail(key, f"must be a finite {'positive ' if positive else ''}number, "
                 f"got {v!r}")
      return float(v)  # a JSON integer too (1e30 written as digits overflows jnp ints)

    def flag(key, default):
      """A true/false key; null is false, as diffusers reads it (it tests the truth
      of the value: null flip_sin_to_cos is false there, not its default true)."""
      v = d.get(key, default)
      if v is None:
        return False
      if not isinstance(v, bool):
        raise fail(key, f"must be true or false, got {v!r}")
      return v

    fields = {f.name for f in dataclasses.fields(cls)}
    for key in d:
      if not (key.startswith("_") or key in fields or key in _FIXED or key in _IGNORED
              or key in _PER_BLOCK_FIXED):
        raise fail(key, "is not a key of diffusers' UNet2DConditionModel that memjax "
                   "knows; memjax cannot tell whether it changes the architecture")
    class_name = d.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
      raise unsupported("_class_name", class_name,
                        " (memjax builds only UNet2DConditionModel)")
    for key, allowed in _FIXED.items():
      if key in d and d[key] is None and key in _NULL_IS_DEFAULT:
        continue
      if key in d and not any(d[key] == a and type(d[key]) is type(a) for a in allowed):
        raise unsupported(key, d[key], f" (memjax supports only {allowed[0]!r})")

    channels = d.get("block_out_channels", cls.block_out_channels)
    if (not isinstance(channels, (list, tuple)) or not channels or
        not all(is_int(c) and c >= 1 for c in channels)):
      raise fail("block_out_channels", f"must be a non-empty list of positive "
                 f"integers, got {channels!r}")
    channels = tuple(channels)
    n = len(channels)
    for key, value in _PER_BLOCK_FIXED.items():
      v = d.get(key, value)
      items = v if isinstance(v, (list, tuple)) else [v]
      if isinstance(v, (list, tuple)) and len(v) != n:
        raise fail(key, f"must have one entry per block ({n}), got {v!r}")
      for i, item in enumerate(items):
        if item != value or type(item) is not type(value):
          name = f"{key}[{i}]" if isinstance(v, (list, tuple)) else key
          raise unsupported(name, item, f" (memjax supports only {value!r})")

    types = {}
    for key, default, allowed in (
        ("down_block_types", cls.down_block_types, (_CROSS_DOWN, _DOWN)),
        ("up_block_types", cls.up_block_types, (_CROSS_UP, _UP))):
      v = d.get(key, default)
      if not isinstance(v, (list, tuple)) or len(v) != n:
        raise fail(key, f"must list one block per entry of block_out_channels ({n}), "
                   f"got {v!r}")
      out = []
      for i, t in enumerate(v):
        # diffusers strips a legacy "UNetRes" prefix before dispatching.
        name = t[7:] if isinstance(t, str) and t.startswith("UNetRes") else t
        if name not in allowed:
          raise unsupported(f"{key}[{i}]", t, f" (memjax supports {' and '.join(allowed)})")
        out.append(name)
      types[key] = tuple(out)

    def one_value(key, default):
      """An integer >= 1, also spelled as a list of it once per block."""
      v = d.get(key, default)
      if (isinstance(v, (list, tuple)) and len(v) == n and v and
          all(x == v[0] and type(x) is type(v[0]) for x in v)):
        v = v[0]
      if not is_int(v) or v < 1:
        raise unsupported(key, d.get(key, default),
                          " (memjax supports one integer >= 1, or a list of it per block)")
      return v

    layers, cross = (one_value(k, getattr(cls, k)) for k in _ONE_OR_PER_BLOCK)

    def per_block(key, default, allow_none):
      v = d.get(key, default)
      if v is None and allow_none:
        return None
      if is_int(v) and v >= 1:
        return v
      if (isinstance(v, (list, tuple)) and len(v) == n and
          all(is_int(x) and x >= 1 for x in v)):
        return tuple(v)
      raise fail(key, f"must be a positive integer or a list of {n}, got {v!r}")

    sample_size_hw(d, source)  # checked here; kept as written (no effect on the math)
    head_dim = per_block("attention_head_dim", cls.attention_head_dim, False)
    num_heads = per_block("num_attention_heads", None, True)
    groups = pos_int("norm_num_groups", cls.norm_num_groups)
    config = cls(
        in_channels=pos_int("in_channels", cls.in_channels),
        out_channels=pos_int("out_channels", cls.out_channels),
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=types["down_block_types"],
        up_block_types=types["up_block_types"],
        cross_attention_dim=cross,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        use_linear_projection=flag("use_linear_projection", cls.use_linear_projection),
        upcast_attention=flag("upcast_attention", cls.upcast_attention),
        norm_num_groups=groups,
        norm_eps=number("norm_eps", cls.norm_eps, positive=True),
        flip_sin_to_cos=flag("flip_sin_to_cos", cls.flip_sin_to_cos),
        freq_shift=number("freq_shift", cls.freq_shift),
        downsample_padding=pos_int("downsample_padding", cls.downsample_padding, 0),
        center_input_sample=flag("center_input_sample", cls.center_input_sample),
        mid_block_scale_factor=number("mid_block_scale_factor",
                                      cls.mid_block_scale_factor, positive=True),
        sample_size=d.get("sample_size"))
    # Blocks whose heads are used: cross-attention down blocks, the up blocks
    # (which read the per-block lists reversed) and the mid block (the last entry).
    with_attention = ({i for i, t in enumerate(config.down_block_types) if t == _CROSS_DOWN}
                      | {n - 1 - i for i, t in enumerate(config.up_block_types)
                         if t == _CROSS_UP} | {n - 1})
    for i, (c, h) in enumerate(zip(channels, config.heads)):
      if c % groups:
        raise fail("norm_num_groups", f"({groups}) must divide every entry of "
                   f"block_out_channels {list(channels)}")
      if i in with_attention and c % h:
        key = "attention_head_dim" if num_heads is None else "num_attention_heads"
        raise fail(key, f"gives {h} heads for block {i}, which do not divide its "
                   f"{c} channels")
    half = channels[0] // 2
    if half - config.freq_shift == 0:
      raise fail("freq_shift", f"= {config.freq_shift!r} makes the timestep "
                 f"embedding divide by zero")
    return config


class UNet2DConditionModel(nn.Module):
  """diffusers `UNet2DConditionModel` (SD1.x / SD2.x family), NHWC.

  `init(rng, sample, timesteps, encoder_hidden_states)` creates every parameter.
  `capture`: (transformer path, mode) pairs whose cross-attention (attn2) sows its
  softmax probabilities into "intermediates" (`unet_blocks.CAPTURE_MODES`; read them
  with `unet_blocks.read_capture`).
  """
  config: UNetConfig
  dtype: Any = jnp.float32
  attention: Optional[str] = None  # the attention kernel (`attention.multi_head_attention`)
  capture: Tuple[Tuple[str, str], ...] = ()

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: Union[jax.Array, int, float],
               encoder_hidden_states: jax.Array) -> jax.Array:
    """Predicts the noise (or v, per the scheduler's prediction_type).

    Args:
      sample: [B, H, W, in_channels] noisy latents.
      timesteps: a scalar or [B] (int or float) timesteps.
      encoder_hidden_states: [B, L, cross_attention_dim] text embeddings.

    Returns:
      [B, H, W, out_channels] in `dtype`.
    """
    cfg, dt = self.config, self.dtype
    chans, heads = cfg.block_out_channels, cfg.heads
    n = len(chans)
    common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                  use_linear_projection=cfg.use_linear_projection, dtype=dt,
                  attention=self.attention)
    cap = blocks.split_capture(self.capture, cfg.transformer_paths)
    b = sample.shape[0]
    x = sample.astype(dt)
    if cfg.center_input_sample:
      x = 2 * x - 1.0
    context = encoder_hidden_states.astype(dt)

    # Timestep embedding in float32 (diffusers' Timesteps always returns f32),
    # cast to the compute dtype before the MLP as diffusers does.
    t = jnp.broadcast_to(jnp.atleast_1d(jnp.asarray(timesteps)), (b,))
    t_emb = blocks.timestep_embedding(t, chans[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    emb = blocks.TimestepEmbedding(4 * chans[0], dt, name="time_embedding")(t_emb.astype(dt))

    x = blocks.conv(chans[0], 3, "conv_in", dt)(x)
    skips = [x]
    for i, kind in enumerate(cfg.down_block_types):
      x, res = blocks.DownBlock(
          chans[i], cfg.layers_per_block, heads[i] if kind == _CROSS_DOWN else None,
          add_downsample=i < n - 1, downsample_padding=cfg.downsample_padding,
          capture=cap.get(f"down_blocks_{i}", ()), name=f"down_blocks_{i}", **common)(
              x, emb, context)
      skips.extend(res)

    x = blocks.MidBlock2DCrossAttn(heads[-1], output_scale_factor=cfg.mid_block_scale_factor,
                                   capture=cap.get("mid_block", ()), name="mid_block",
                                   **common)(x, emb, context)

    rev_chans, rev_heads = chans[::-1], heads[::-1]
    for i, kind in enumerate(cfg.up_block_types):
      k = cfg.layers_per_block + 1
      res, skips = skips[-k:], skips[:-k]
      # Upsample to the next skip's size: x2 when the latent side is a multiple of
      # 2 ** (n - 1), otherwise the size diffusers forces (forward_upsample_size).
      size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
      x = blocks.UpBlock(
          rev_chans[i], rev_heads[i] if kind == _CROSS_UP else None,
          add_upsample=i < n - 1, capture=cap.get(f"up_blocks_{i}", ()),
          name=f"up_blocks_{i}", **common)(x, res, emb, context, size)

    x = nn.silu(blocks.group_norm(x, cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out"))
    return blocks.conv(cfg.out_channels, 3, "conv_out", dt)(x)
