"""Building blocks of Stable Diffusion's UNet (diffusers 0.42 semantics), NHWC.

Each class reproduces one diffusers module for the settings SD1.x / SD2.x use
and is named so that its parameter paths equal diffusers' state-dict keys (see
`memjax.models.convert`): `ResnetBlock2D` (resnet.py), `Transformer2DModel`
(transformers/transformer_2d.py, continuous input, `layer_norm`, GEGLU),
`BasicTransformerBlock` and `FeedForward` (attention.py), `Attention` with
`AttnProcessor2_0` (attention_processor.py), `Downsample2D` / `Upsample2D`, and
the `CrossAttnDownBlock2D` / `DownBlock2D`, `CrossAttnUpBlock2D` / `UpBlock2D`
and `UNetMidBlock2DCrossAttn` blocks (unets/unet_2d_blocks.py). Which settings
are allowed is decided by `memjax.models.unet.UNetConfig.from_dict`.

Norms compute in float32 and cast back, so bfloat16 runs keep float32 statistics.
A captured cross-attention (`capture`, `CAPTURE_MODES`) sows its probabilities;
with no capture the traced program is the same as without the feature.
"""
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memjax.models.attention import multi_head_attention

# diffusers' Transformer2DModel builds its input GroupNorm with eps=1e-6 whatever
# the UNet's norm_eps, and its LayerNorms with its own default norm_eps=1e-5 (the
# UNet does not pass one).
_TRANSFORMER_GROUP_NORM_EPS = 1e-6
_LAYER_NORM_EPS = 1e-5
# Sown by a captured attn2, float32: "query_mean" [B, heads, Lk] (the probabilities
# averaged over the query pixels), "head_mean" [B, Lq, Lk] (averaged over heads).
CAPTURE_MODES = ("query_mean", "head_mean")
Capture = Tuple[Tuple[str, str], ...]  # (attentions_j, mode) pairs of a block


def group_norm(x: jax.Array, groups: int, eps: float, name: str) -> jax.Array:
  """GroupNorm in float32, cast back to x's dtype. Call inside a compact method.

  Two-pass variance (`use_fast_variance=False`) as PyTorch computes it; E[x^2] -
  E[x]^2 loses digits on the UNet's large activations.
  """
  norm = nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=jnp.float32,
                      use_fast_variance=False, name=name)
  return norm(x.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, name: str) -> jax.Array:
  """LayerNorm (eps 1e-5) in float32, cast back. Call inside a compact method."""
  norm = nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=jnp.float32,
                      use_fast_variance=False, name=name)
  return norm(x.astype(jnp.float32)).astype(x.dtype)


def conv(features: int, size: int, name: str, dtype: Any, stride: int = 1,
         padding: Any = None) -> nn.Conv:
  """PyTorch-style Conv2d: `size` x `size`, zero padding `size // 2` by default."""
  if padding is None:
    padding = ((size // 2, size // 2),) * 2
  return nn.Conv(features, (size, size), strides=(stride, stride), padding=padding,
                 dtype=dtype, name=name)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: int = 10000) -> jax.Array:
  """diffusers `get_timestep_embedding`, in float32 and in the same op order.

  Args:
    t: [B] timesteps (any real dtype; fractional values allowed).
    dim: embedding width.
    flip_sin_to_cos: put the cosines first (SD: True).
    freq_shift: `downscale_freq_shift` (SD: 0).
    max_period: the lowest frequency's period.

  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  exponent = exponent / (half - freq_shift)
  emb = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """linear_1, SiLU, linear_2: [B, C] -> [B, time_embed_dim]."""
  time_embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(x)
    return nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(nn.silu(x))


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D`, time_embedding_norm "default", pre-norm, SiLU.

  [B, H, W, Cin], temb [B, T] -> [B, H, W, out_channels].
  """
  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: Any = jnp.float32
  attention: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    h = nn.silu(group_norm(x, self.groups, self.eps, "norm1"))
    h = conv(self.out_channels, 3, "conv1", self.dtype)(h)
    # The time embedding goes through the nonlinearity in every resnet
    # (skip_time_act=False) and is added per channel before norm2.
    t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
    h = h + t[:, None, None, :]
    h = nn.silu(group_norm(h, self.groups, self.eps, "norm2"))
    # Dropout is off at inference.
    h = conv(self.out_channels, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
    out = x + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Attention(nn.Module):
  """diffusers `Attention` (no q/k/v bias, output bias), self- or cross-.

  x [B, Lq, C], context [B, Lk, Cctx] or None -> [B, Lq, C]. The inner width is
  heads * head_dim. Logits and softmax always run in float32 inside
  `multi_head_attention`, which is what SD2's `upcast_attention=True` asks for
  (diffusers' default SDPA processor ignores the flag; only its classic processor
  reads it), so the flag needs no code here. With `capture` (modes of
  CAPTURE_MODES) the probabilities are computed explicitly and sown.
  """
  heads: int
  head_dim: int
  dtype: Any = jnp.float32
  attention: Optional[str] = None  # the kernel (`attention.multi_head_attention`)
  capture: Tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    inner = self.heads * self.head_dim
    context = x if context is None else context
    q = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x)
    k = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
    v = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
    if self.capture:
      o = self._explicit(q, k, v)
    else:
      o = multi_head_attention(q, k, v, num_heads=self.heads, kernel=self.attention)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(o)

  def _explicit(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v in float32, sowing the probabilities' reductions."""
    (b, lq, _), lk, h, d = q.shape, k.shape[1], self.heads, self.head_dim
    f32 = jnp.float32
    qh = q.astype(f32).reshape(b, lq, h, d) * d ** -0.5
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", qh, k.astype(f32).reshape(b, lk, h, d)),
                       axis=-1)
    for mode in self.capture:  # checked by split_capture
      self.sow("intermediates", mode, p.mean(axis=2 if mode == "query_mean" else 1))
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(f32).reshape(b, lk, h, d))
    return o.reshape(b, lq, h * d).astype(q.dtype)


class GEGLU(nn.Module):
  """proj to 2 * inner, then hidden * gelu(gate) with EXACT (erf) GELU as F.gelu."""
  inner_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(2 * self.inner_dim, dtype=self.dtype, name="proj")(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """net.0 = GEGLU(dim -> 4 dim), net.1 = dropout, net.2 = Linear(4 dim -> dim)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    h = GEGLU(4 * dim, self.dtype, name="net_0")(x)
    return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-, cross- (attn2, sowing `capture`) attention, GEGLU: [B, L, D]."""
  heads: int
  head_dim: int
  dtype: Any = jnp.float32
  attention: Optional[str] = None
  capture: Tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    x = x + Attention(self.heads, self.head_dim, self.dtype, self.attention, name="attn1")(
        layer_norm(x, "norm1"))
    x = x + Attention(self.heads, self.head_dim, self.dtype, self.attention, self.capture,
                      name="attn2")(layer_norm(x, "norm2"), context)
    return x + FeedForward(self.dtype, name="ff")(layer_norm(x, "norm3"))


class Transformer2DModel(nn.Module):
  """Spatial transformer over the H * W positions (one transformer block).

  [B, H, W, C], context [B, L, Cctx] -> [B, H, W, C]. proj_in / proj_out are
  1 x 1 convs (SD1) or, with `use_linear_projection` (SD2), Linear layers applied
  after flattening the positions; both are the same map, only the weight layout
  differs. `capture`: the modes its cross-attention sows.
  """
  heads: int
  groups: int
  use_linear_projection: bool
  dtype: Any = jnp.float32
  attention: Optional[str] = None
  capture: Tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    head_dim = c // self.heads
    inner = self.heads * head_dim
    h = group_norm(x, self.groups, _TRANSFORMER_GROUP_NORM_EPS, "norm")
    if self.use_linear_projection:
      h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, hh * ww, c))
    else:
      h = conv(inner, 1, "proj_in", self.dtype)(h).reshape(b, hh * ww, inner)
    h = BasicTransformerBlock(self.heads, head_dim, self.dtype, self.attention, self.capture,
                              name="transformer_blocks_0")(h, context)
    if self.use_linear_projection:
      h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, hh, ww, c)
    else:
      h = conv(c, 1, "proj_out", self.dtype)(h.reshape(b, hh, ww, inner))
    return h + x


class Downsample2D(nn.Module):
  """3 x 3 stride-2 conv: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C].

  diffusers pads `padding` on every side, or, for padding 0, one zero row and
  column at the bottom/right only.
  """
  padding: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.padding
    pads = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
    return conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding=pads)(x)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch's `nearest` source index for each output index (float32 scale)."""
  scale = np.float32(in_size) / np.float32(out_size)
  idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, in_size - 1)


class Upsample2D(nn.Module):
  """Nearest-neighbour resize (x2, or to `size`), then a 3 x 3 conv.

  [B, H, W, C] -> [B, H', W', C]. diffusers forces the output size to the next
  skip connection's size when the latents are not a multiple of the total
  downsampling factor; x2 is the common case.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: Optional[Tuple[int, int]] = None) -> jax.Array:
    _, h, w, _ = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    else:
      x = jnp.take(x, _nearest_indices(h, size[0]), axis=1)
      x = jnp.take(x, _nearest_indices(w, size[1]), axis=2)
    return conv(x.shape[-1], 3, "conv", self.dtype)(x)


def split_capture(capture: Sequence[Tuple[str, str]],
                  paths: Sequence[str]) -> Dict[str, Capture]:
  """A UNet's (transformer path, mode) pairs as {block: ((attentions_j, mode), ...)};
  ValueError for a path not in `paths` (the UNet's transformers) or an unknown mode."""
  out: Dict[str, Capture] = {}
  for path, mode in dict.fromkeys(tuple(c) for c in capture):
    if path not in paths or mode not in CAPTURE_MODES:
      raise ValueError(f"cannot capture {mode!r} at {path!r}: the modes are "
                       f"{', '.join(CAPTURE_MODES)}; the UNet's transformers "
                       f"{', '.join(paths)}")
    block, attn = path.split("/")
    out[block] = out.get(block, ()) + ((attn, mode),)
  return out


def read_capture(intermediates, capture: Sequence[Tuple[str, str]]) -> Dict[str, Dict]:
  """{transformer path: {mode: array}} sown by a UNet with `capture`, from the
  "intermediates" of `apply(..., mutable=["intermediates"])`."""
  out: Dict[str, Dict] = {}
  for path, mode in capture:
    node = intermediates
    for key in path.split("/") + ["transformer_blocks_0", "attn2"]:
      node = node[key]
    out.setdefault(path, {})[mode] = node[mode][0]
  return out


def _modes(capture: Capture, j: int) -> Tuple[str, ...]:
  """The capture modes of a block's transformer attentions_j."""
  return tuple(m for a, m in capture if a == f"attentions_{j}")


class DownBlock(nn.Module):
  """`CrossAttnDownBlock2D` (heads set) or `DownBlock2D` (heads None).

  x [B, H, W, Cin] -> (x [B, H', W', out_channels], skips): one skip per resnet
  (after its attention) and one after the downsampler, in diffusers' order.
  """
  out_channels: int
  num_layers: int
  heads: Optional[int]
  add_downsample: bool
  groups: int
  eps: float
  use_linear_projection: bool
  downsample_padding: int
  dtype: Any = jnp.float32
  attention: Optional[str] = None
  capture: Capture = ()

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array,
               context: jax.Array) -> Tuple[jax.Array, Tuple[jax.Array, ...]]:
    skips = []
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, self.eps, dtype=self.dtype,
                        name=f"resnets_{j}")(x, temb)
      if self.heads is not None:
        x = Transformer2DModel(self.heads, self.groups, self.use_linear_projection,
                               self.dtype, self.attention, _modes(self.capture, j),
                               name=f"attentions_{j}")(x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.downsample_padding, self.dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class UpBlock(nn.Module):
  """`CrossAttnUpBlock2D` (heads set) or `UpBlock2D` (heads None).

  x [B, H, W, Cprev], skips (as many as resnets; the last one is consumed
  first), -> [B, H', W', out_channels], upsampled to `upsample_size` if
  `add_upsample`.
  """
  out_channels: int
  heads: Optional[int]
  add_upsample: bool
  groups: int
  eps: float
  use_linear_projection: bool
  dtype: Any = jnp.float32
  attention: Optional[str] = None
  capture: Capture = ()

  @nn.compact
  def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array,
               context: jax.Array,
               upsample_size: Optional[Tuple[int, int]] = None) -> jax.Array:
    for j, skip in enumerate(reversed(skips)):
      x = jnp.concatenate([x, skip], axis=-1)  # torch.cat([h, res], dim=1)
      x = ResnetBlock2D(self.out_channels, self.groups, self.eps, dtype=self.dtype,
                        name=f"resnets_{j}")(x, temb)
      if self.heads is not None:
        x = Transformer2DModel(self.heads, self.groups, self.use_linear_projection,
                               self.dtype, self.attention, _modes(self.capture, j),
                               name=f"attentions_{j}")(x, context)
    if self.add_upsample:
      x = Upsample2D(self.dtype, name="upsamplers_0")(x, upsample_size)
    return x


class MidBlock2DCrossAttn(nn.Module):
  """`UNetMidBlock2DCrossAttn` (one layer): resnet, transformer, resnet.

  [B, H, W, C] -> [B, H, W, C]; resnet outputs are divided by
  `output_scale_factor` (the UNet's mid_block_scale_factor).
  """
  heads: int
  groups: int
  eps: float
  use_linear_projection: bool
  output_scale_factor: float = 1.0
  dtype: Any = jnp.float32
  attention: Optional[str] = None
  capture: Capture = ()

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock2D(c, self.groups, self.eps, self.output_scale_factor, self.dtype,
                      name="resnets_0")(x, temb)
    x = Transformer2DModel(self.heads, self.groups, self.use_linear_projection,
                           self.dtype, self.attention, _modes(self.capture, 0),
                           name="attentions_0")(x, context)
    return ResnetBlock2D(c, self.groups, self.eps, self.output_scale_factor, self.dtype,
                         name="resnets_1")(x, temb)
