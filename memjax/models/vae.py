"""Stable Diffusion's VAE (diffusers `AutoencoderKL`) in Flax.

The attack decodes the predicted clean latents `x0_hat / scaling_factor` to
pixels (docs/method.md section 2), and the trained test model encodes images, so
memjax needs both halves. Only the architecture that Stable Diffusion 1.x, 2.x
and SDXL ship is built: `DownEncoderBlock2D` / `UpDecoderBlock2D` blocks, a
mid-block with one single-head self-attention, GroupNorm (eps 1e-6) and SiLU
everywhere; anything else in `vae/config.json` is refused with a `ConfigError`.

Submodules are named like diffusers' state-dict keys (`encoder/down_blocks_0/
resnets_1/conv2`), so `memjax.models.convert.torch_to_flax` loads a diffusers
checkpoint by rule. Activations are NHWC throughout.
"""
import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.runtime.errors import ConfigError
from memjax.models.attention import multi_head_attention


def _finite(v) -> bool:
  """A JSON number that is a finite float (NaN, Infinity and 1e400-sized ints are not)."""
  try:
    return math.isfinite(float(v))
  except OverflowError:
    return False


# diffusers' Encoder/Decoder pass resnet_eps=1e-6 to every GroupNorm and to the
# mid-block attention's GroupNorm.
_NORM_EPS = 1e-6
_MAX_INT = 2 ** 31 - 1  # the largest size taken from a config (an array dimension)
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
# Keys that describe the file, not the model, and keys diffusers uses only for
# pipeline policy (tiling size, fp16 upcasting) that do not change the math.
_IGNORED_KEYS = frozenset({"architectures", "transformers_version", "torch_dtype",
                           "sample_size", "force_upcast"})


def _check_object(d, source: str) -> None:
  if not isinstance(d, Mapping):
    raise ConfigError(f"{source}: must be a JSON object of config keys, got "
                      f"{type(d).__name__} {d!r:.60}")


def scaling_factor(d: Mapping[str, Any], source: str) -> float:
  """vae/config.json's scaling_factor (default SD1's 0.18215), a finite positive number."""
  _check_object(d, source)
  scale = d.get("scaling_factor", VAEConfig.scaling_factor)
  if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or
      not _finite(scale) or scale <= 0):
    raise ConfigError(f"{source}: 'scaling_factor' must be a finite positive number, "
                      f"got {scale!r:.60}")
  return float(scale)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The subset of diffusers' `AutoencoderKL` config that memjax supports."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @property
  def downsample_factor(self) -> int:
    """Image side / latent side: one stride-2 conv per block but the last."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], source: str) -> "VAEConfig":
    """Builds the config from diffusers' `vae/config.json` contents.

    Args:
      d: the parsed JSON object.
      source: the file it came from, named in every error.

    Raises:
      ConfigError: for a key or value memjax does not support.
    """
    _check_object(d, source)

    def fail(key, why):
      return ConfigError(f"{source}: '{key}' {why}")

    def pos_int(key, default):
      v = d.get(key, default)
      if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= _MAX_INT:
        raise fail(key, f"must be an integer from 1 to {_MAX_INT}, got {v!r}")
      return v

    def flag(key, default):
      """A true/false key; null is false, as diffusers reads it (it tests the truth
      of the value: null use_quant_conv builds no quant_conv there)."""
      v = d.get(key, default)
      if v is None:
        return False
      if not isinstance(v, bool):
        raise fail(key, f"must be true or false, got {v!r}")
      return v

    known = {f.name for f in dataclasses.fields(cls)} | {
        "down_block_types", "up_block_types", "act_fn", "shift_factor",
        "latents_mean", "latents_std"}
    for key in d:
      if key.startswith("_") or key in _IGNORED_KEYS or key in known:
        continue
      raise fail(key, "is not a key of diffusers' AutoencoderKL that memjax knows; "
                 "memjax cannot tell whether it changes the architecture")
    class_name = d.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
      raise fail("_class_name", f"is {class_name!r}; memjax supports only AutoencoderKL")

    channels = d.get("block_out_channels", cls.block_out_channels)
    if (not isinstance(channels, (list, tuple)) or not channels or
        any(isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= _MAX_INT
            for c in channels)):
      raise fail("block_out_channels", f"must be a non-empty list of positive "
                 f"integers, got {channels!r}")
    channels = tuple(channels)
    for key, block in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
      types = d.get(key, (block,))
      if not isinstance(types, (list, tuple)) or len(types) != len(channels):
        raise fail(key, f"must list one block per entry of block_out_channels "
                   f"({len(channels)}), got {types!r}")
      for t in types:
        if t != block:
          raise fail(key, f"contains {t!r}; memjax supports only {block!r}")
    act_fn = d.get("act_fn", "silu")
    if act_fn not in ("silu", "swish"):  # diffusers maps both to nn.SiLU
      raise fail("act_fn", f"is {act_fn!r}; memjax supports only 'silu'")
    shift = d.get("shift_factor")
    if shift is not None and shift != 0:
      raise fail("shift_factor", f"is {shift!r}; memjax supports only null or 0")
    for key in ("latents_mean", "latents_std"):
      if d.get(key) is not None:
        raise fail(key, "is set; memjax supports only null (per-channel latent "
                   "statistics are not implemented)")
    scale = scaling_factor(d, source)
    groups = pos_int("norm_num_groups", cls.norm_num_groups)
    for c in channels:
      if c % groups:
        raise fail("norm_num_groups", f"({groups}) must divide every entry of "
                   f"block_out_channels {list(channels)}")
    return cls(
        in_channels=pos_int("in_channels", cls.in_channels),
        out_channels=pos_int("out_channels", cls.out_channels),
        block_out_channels=channels,
        layers_per_block=pos_int("layers_per_block", cls.layers_per_block),
        latent_channels=pos_int("latent_channels", cls.latent_channels),
        norm_num_groups=groups,
        scaling_factor=scale,
        use_quant_conv=flag("use_quant_conv", cls.use_quant_conv),
        use_post_quant_conv=flag("use_post_quant_conv", cls.use_post_quant_conv),
        mid_block_add_attention=flag("mid_block_add_attention",
                                     cls.mid_block_add_attention))


def _group_norm(x: jax.Array, groups: int, name: str) -> jax.Array:
  """GroupNorm computed in float32 and cast back to x's dtype.

  Two-pass variance (`use_fast_variance=False`): the SD decoder's activations
  reach magnitudes where E[x^2] - E[x]^2 loses digits even in float32.
  """
  norm = nn.GroupNorm(num_groups=groups, epsilon=_NORM_EPS, dtype=jnp.float32,
                      use_fast_variance=False, name=name)
  return norm(x.astype(jnp.float32)).astype(x.dtype)


def _conv(features: int, size: int, name: str, dtype: Any, stride: int = 1,
          padding: Any = None) -> nn.Conv:
  """PyTorch-style Conv2d: `size` x `size`, zero padding `size // 2` by default."""
  if padding is None:
    padding = ((size // 2, size // 2),) * 2
  return nn.Conv(features, (size, size), strides=(stride, stride), padding=padding,
                 dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D` without time embedding: [B, H, W, Cin] -> [.., Cout]."""
  out_channels: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(_group_norm(x, self.groups, "norm1"))
    h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
    h = nn.silu(_group_norm(h, self.groups, "norm2"))
    # Dropout is 0 in every released VAE and off at inference anyway.
    h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
    return x + h  # output_scale_factor is 1 in the VAE


class AttentionBlock(nn.Module):
  """The mid-block's spatial self-attention: one head over all C channels.

  diffusers `Attention(heads=1, dim_head=C, residual_connection=True)` with a
  GroupNorm: q/k/v projections over the H * W positions, output projection,
  residual. [B, H, W, C] -> [B, H, W, C].
  """
  groups: int
  dtype: Any = jnp.float32
  attention: Optional[str] = None  # the kernel (`attention.multi_head_attention`)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = _group_norm(x, self.groups, "group_norm").reshape(b, h * w, c)
    q = nn.Dense(c, dtype=self.dtype, name="to_q")(y)
    k = nn.Dense(c, dtype=self.dtype, name="to_k")(y)
    v = nn.Dense(c, dtype=self.dtype, name="to_v")(y)
    o = multi_head_attention(q, k, v, num_heads=1, kernel=self.attention)
    o = nn.Dense(c, dtype=self.dtype, name="to_out_0")(o)
    return x + o.reshape(b, h, w, c)


class MidBlock2D(nn.Module):
  """diffusers `UNetMidBlock2D` (one layer): resnet, [attention], resnet."""
  groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32
  attention: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock2D(c, self.groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = AttentionBlock(self.groups, self.dtype, self.attention, name="attentions_0")(x)
    return ResnetBlock2D(c, self.groups, self.dtype, name="resnets_1")(x)


class Downsample2D(nn.Module):
  """Stride-2 3 x 3 conv: [B, H, W, C] -> [B, H/2, W/2, C].

  The VAE builds it with `padding=0`, for which diffusers pads (0, 1, 0, 1), i.e.
  one zero row at the bottom and one zero column at the right only, before the
  conv. Asymmetric conv padding does the same without a padded copy.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _conv(x.shape[-1], 3, "conv", self.dtype, stride=2,
                 padding=((0, 1), (0, 1)))(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2 then 3 x 3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, "conv", self.dtype)(x)


class DownEncoderBlock2D(nn.Module):
  """`num_layers` resnets, then a stride-2 downsampler unless last.

  [B, H, W, Cin] -> [B, H/2, W/2, out_channels] ([B, H, W, ...] for the last).
  """
  out_channels: int
  num_layers: int
  groups: int
  add_downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, self.dtype,
                        name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = Downsample2D(self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """`num_layers` resnets, then a x2 upsampler unless last.

  [B, H, W, Cin] -> [B, 2H, 2W, out_channels] ([B, H, W, ...] for the last).
  """
  out_channels: int
  num_layers: int
  groups: int
  add_upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, self.dtype,
                        name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = Upsample2D(self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Images [B, H, W, in] -> moments [B, H/f, W/f, 2 * latent] (before quant_conv)."""
  config: VAEConfig
  dtype: Any = jnp.float32
  attention: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, dt, g = self.config, self.dtype, self.config.norm_num_groups
    chans = cfg.block_out_channels
    x = _conv(chans[0], 3, "conv_in", dt)(x)
    for i, c in enumerate(chans):
      x = DownEncoderBlock2D(c, cfg.layers_per_block, g, i < len(chans) - 1, dt,
                             name=f"down_blocks_{i}")(x)
    x = MidBlock2D(g, cfg.mid_block_add_attention, dt, self.attention, name="mid_block")(x)
    x = nn.silu(_group_norm(x, g, "conv_norm_out"))
    return _conv(2 * cfg.latent_channels, 3, "conv_out", dt)(x)


class Decoder(nn.Module):
  """Latents [B, h, w, latent] (after post_quant_conv) -> images [B, h*f, w*f, out]."""
  config: VAEConfig
  dtype: Any = jnp.float32
  attention: Optional[str] = None

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg, dt, g = self.config, self.dtype, self.config.norm_num_groups
    chans = tuple(reversed(cfg.block_out_channels))  # widest first
    x = _conv(chans[0], 3, "conv_in", dt)(z)
    x = MidBlock2D(g, cfg.mid_block_add_attention, dt, self.attention, name="mid_block")(x)
    for i, c in enumerate(chans):
      # One resnet more than the encoder's blocks have, as in diffusers.
      x = UpDecoderBlock2D(c, cfg.layers_per_block + 1, g, i < len(chans) - 1, dt,
                           name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(x, g, "conv_norm_out"))
    return _conv(cfg.out_channels, 3, "conv_out", dt)(x)


class AutoencoderKL(nn.Module):
  """diffusers `AutoencoderKL`, NHWC.

  `init(rng, images)` creates every parameter (through `__call__`); call the
  halves with `apply(..., method=AutoencoderKL.encode / .decode)`.
  """
  config: VAEConfig
  dtype: Any = jnp.float32
  attention: Optional[str] = None

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype, self.attention)
    self.decoder = Decoder(cfg, self.dtype, self.attention)
    self.quant_conv: Optional[nn.Conv] = (
        _conv(2 * cfg.latent_channels, 1, None, self.dtype)
        if cfg.use_quant_conv else None)
    self.post_quant_conv: Optional[nn.Conv] = (
        _conv(cfg.latent_channels, 1, None, self.dtype)
        if cfg.use_post_quant_conv else None)

  def encode(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """The posterior of images x.

    Args:
      x: [B, H, W, in_channels] images in [-1, 1]; H and W multiples of
        `config.downsample_factor`.

    Returns:
      (mean, logvar), each [B, H/f, W/f, latent_channels] in `dtype`; logvar is
      clipped to [-30, 20] as diffusers' `DiagonalGaussianDistribution` does.
      Multiply a sample by `config.scaling_factor` to get diffusion latents.
    """
    h = self.encoder(x.astype(self.dtype))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """Images from latents.

    Args:
      z: [B, h, w, latent_channels] latents, already divided by
        `config.scaling_factor`.

    Returns:
      [B, h*f, w*f, out_channels] images in `dtype`, nominally in [-1, 1].
    """
    z = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Reconstruction from the posterior mean: [B, H, W, in] -> [B, H, W, out]."""
    mean, _ = self.encode(x)
    return self.decode(mean)
