"""CLIP image encoder (open_clip's `VisionTransformer`) in Flax.

The image tower of the CLIP models memjax embeds images with (docs/method.md
section 5): a ViT with a bias-free patch-embedding convolution, a class token
and learned positional embeddings, a layer norm before the transformer
(`ln_pre`), pre-norm residual blocks (packed q/k/v projection, MLP with GELU or
OpenAI's QuickGELU), `ln_post` on the class token and a linear projection
(`proj`, no bias). This is open_clip's forward for its plain ViT configs
(`pool_type='tok'`, no layer scale, no patch dropout at inference, no
attentional pooler); the output is the un-normalised image embedding
[N, output_dim].

Parameter paths follow open_clip's state-dict keys without the `visual.` prefix
(`visual.transformer.resblocks.0.attn.in_proj_weight` <->
`transformer/resblocks_0/attn/in_proj/kernel`, transposed); the conversion is in
`memjax.models.clip_vision_load`.
"""
import dataclasses
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memjax.models.attention import multi_head_attention
from memjax.runtime.errors import InputError


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The shape of an open_clip ViT image tower.

  Attributes:
    image_size: input height = width, pixels.
    patch_size: side of a square patch (the conv1 kernel and stride).
    width: the transformer's channel count.
    layers: number of residual blocks.
    heads: attention heads (open_clip: width // head_width, head_width 64
      unless the model config says otherwise).
    mlp_ratio: MLP hidden width / width.
    output_dim: the embedding width (open_clip's `embed_dim`).
    quick_gelu: x * sigmoid(1.702 x) (OpenAI-trained weights) instead of
      the exact erf GELU of torch's nn.GELU.
    layer_norm_eps: epsilon of every layer norm.
  """
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  output_dim: int
  mlp_ratio: float = 4.0
  quick_gelu: bool = False
  layer_norm_eps: float = 1e-5

  @property
  def grid_size(self) -> int:
    """Patches per side (open_clip: image_size // patch_size)."""
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """Sequence length: the patches plus the class token."""
    return self.grid_size ** 2 + 1

  @property
  def mlp_width(self) -> int:
    """Hidden width of each block's MLP (open_clip: int(width * mlp_ratio))."""
    return int(self.width * self.mlp_ratio)

  @property
  def head_width(self) -> int:
    return self.width // self.heads

  def describe(self) -> str:
    """One line naming every shape of the config, for error messages."""
    return (f"image {self.image_size}, patch {self.patch_size}, width {self.width}, "
            f"{self.layers} layers, {self.heads} heads, mlp {self.mlp_width}, "
            f"output {self.output_dim}, {'quick_gelu' if self.quick_gelu else 'gelu'}")


def _vit(image_size, patch_size, width, layers, output_dim, head_width=64,
         quick_gelu=False) -> VisionConfig:
  return VisionConfig(image_size=image_size, patch_size=patch_size, width=width,
                      layers=layers, heads=width // head_width, output_dim=output_dim,
                      quick_gelu=quick_gelu)


# memjax's copies of open_clip's model configs (open_clip/model_configs/*.json:
# embed_dim -> output_dim, vision_cfg, quick_gelu); tests/test_clip_vision.py
# checks them against the installed open_clip.
_BASE = {
    "ViT-B-32": dict(image_size=224, patch_size=32, width=768, layers=12, output_dim=512),
    "ViT-B-16": dict(image_size=224, patch_size=16, width=768, layers=12, output_dim=512),
    "ViT-L-14": dict(image_size=224, patch_size=14, width=1024, layers=24, output_dim=768),
    "ViT-L-14-336": dict(image_size=336, patch_size=14, width=1024, layers=24,
                         output_dim=768),
    "ViT-H-14": dict(image_size=224, patch_size=14, width=1280, layers=32, output_dim=1024,
                     head_width=80),
}
TINY = "tiny"
ARCHS: Dict[str, VisionConfig] = {}
for _name, _kwargs in _BASE.items():
  ARCHS[_name] = _vit(**_kwargs)
  ARCHS[_name + "-quickgelu"] = _vit(quick_gelu=True, **_kwargs)
# The tiny random test encoder (`--embedder=random`): open_clip's ViT-B-32 with
# embed_dim=32, vision_cfg image_size=32, layers=2, width=64, patch_size=8,
# head_width=32 (memjax/testing/clip_tiny.py builds it in open_clip).
ARCHS[TINY] = _vit(image_size=32, patch_size=8, width=64, layers=2, output_dim=32,
                   head_width=32)
del _name, _kwargs


def _activation(quick_gelu: bool, x: jax.Array) -> jax.Array:
  if quick_gelu:
    return x * jax.nn.sigmoid(1.702 * x)  # open_clip's QuickGELU (OpenAI weights)
  return jax.nn.gelu(x, approximate=False)  # torch nn.GELU(): exact erf GELU


def _layer_norm(eps: float, dtype: Any, name: str, x: jax.Array) -> jax.Array:
  """LayerNorm computed in float32 (params `<name>/scale`, `<name>/bias`)."""
  y = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False,
                   name=name)(x.astype(jnp.float32))
  return y.astype(dtype)


def _scaled_normal(scale: float) -> Callable:
  """Initializer scale * N(0, 1), as open_clip initializes its embeddings."""
  def init(key, shape, dtype=jnp.float32):
    return scale * jax.random.normal(key, shape, dtype)
  return init


class VisionAttention(nn.Module):
  """Self-attention of torch's nn.MultiheadAttention, packed in_proj, [N, L, C]."""
  config: VisionConfig
  dtype: Any = jnp.float32
  attention: Optional[str] = None
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config.width
    qkv = nn.Dense(3 * c, dtype=self.dtype, precision=self.precision, name="in_proj")(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)  # torch packs in_proj_weight rows as [q; k; v]
    out = multi_head_attention(q, k, v, self.config.heads, kernel=self.attention)
    return nn.Dense(c, dtype=self.dtype, precision=self.precision, name="out_proj")(out)


class ResidualAttentionBlock(nn.Module):
  """open_clip's pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
  config: VisionConfig
  dtype: Any = jnp.float32
  attention: Optional[str] = None
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = _layer_norm(cfg.layer_norm_eps, self.dtype, "ln_1", x)
    x = x + VisionAttention(cfg, self.dtype, self.attention, self.precision, name="attn")(h)
    h = _layer_norm(cfg.layer_norm_eps, self.dtype, "ln_2", x)
    h = MLP(cfg, self.dtype, self.precision, name="mlp")(h)
    return x + h


class MLP(nn.Module):
  """c_fc -> GELU / QuickGELU -> c_proj, [N, L, C] -> [N, L, C]."""
  config: VisionConfig
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = nn.Dense(cfg.mlp_width, dtype=self.dtype, precision=self.precision, name="c_fc")(x)
    h = _activation(cfg.quick_gelu, h)
    return nn.Dense(cfg.width, dtype=self.dtype, precision=self.precision, name="c_proj")(h)


class Transformer(nn.Module):
  """`layers` residual blocks, params `resblocks_{i}`."""
  config: VisionConfig
  dtype: Any = jnp.float32
  attention: Optional[str] = None
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.config.layers):
      x = ResidualAttentionBlock(self.config, self.dtype, self.attention, self.precision,
                                 name=f"resblocks_{i}")(x)
    return x


class VisionTransformer(nn.Module):
  """open_clip's ViT image tower: normalised pixels [N, H, W, 3] -> [N, output_dim].

  Attributes:
    config: the architecture.
    dtype: computation dtype; layer norms and the attention softmax run in
      float32 whatever it is, and the output is float32.
    attention: the attention kernel (`memjax.models.attention`), None: memjax's
      choice.
    precision: matmul / conv precision (None: JAX's default; pass
      `jax.lax.Precision.HIGHEST` on GPUs to keep float32 matmuls out of TF32).
  """
  config: VisionConfig
  dtype: Any = jnp.float32
  attention: Optional[str] = None
  precision: Any = None

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """Embeds images.

    Args:
      pixels: [N, image_size, image_size, 3], preprocessed (resized, cropped,
        scaled to [0, 1] and normalised by the mean and std), NHWC.

    Returns:
      [N, output_dim] float32 image embeddings, not L2-normalised.

    Raises:
      InputError: if the pixels do not have the config's shape (trace time).
    """
    cfg = self.config
    want = (cfg.image_size, cfg.image_size, 3)
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
      raise InputError(f"CLIP image encoder: pixels must be [batch, {want[0]}, {want[1]}, 3], "
                       f"got shape {tuple(pixels.shape)}")
    scale = cfg.width ** -0.5
    x = nn.Conv(cfg.width, (cfg.patch_size, cfg.patch_size),
                strides=(cfg.patch_size, cfg.patch_size), padding="VALID", use_bias=False,
                dtype=self.dtype, precision=self.precision,
                name="conv1")(pixels.astype(self.dtype))
    n = x.shape[0]
    x = x.reshape(n, -1, cfg.width)  # row-major patches, as torch's reshape of [N, C, g, g]
    cls = self.param("class_embedding", _scaled_normal(scale), (cfg.width,))
    pos = self.param("positional_embedding", _scaled_normal(scale), (cfg.num_tokens, cfg.width))
    cls = jnp.broadcast_to(cls.astype(self.dtype), (n, 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)[None]
    x = _layer_norm(cfg.layer_norm_eps, self.dtype, "ln_pre", x)
    x = Transformer(cfg, self.dtype, self.attention, self.precision, name="transformer")(x)
    pooled = _layer_norm(cfg.layer_norm_eps, self.dtype, "ln_post", x[:, 0])
    proj = self.param("proj", _scaled_normal(scale), (cfg.width, cfg.output_dim))
    out = jnp.matmul(pooled, proj.astype(self.dtype), precision=self.precision)
    return out.astype(jnp.float32)


def init_params(config: VisionConfig, seed: int = 0) -> Dict[str, Any]:
  """Random float32 params for `config`, drawn by numpy from `default_rng(seed)`.

  Embeddings and `proj` are width**-0.5 * N(0, 1) as open_clip draws them,
  kernels N(0, 1 / fan_in), biases 0, layer-norm scales 1; the values are
  memjax's, not those of torch's init. numpy draws them (the same on every
  backend) because compiling JAX's threefry for every tensor takes seconds on
  a CPU; the tree's shapes come from `jax.eval_shape` (nothing is compiled).
  """
  model = VisionTransformer(config)
  shape = (1, config.image_size, config.image_size, 3)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape, jnp.float32)))["params"]
  rng = np.random.default_rng(seed)
  scale = config.width ** -0.5

  def draw(path, leaf):
    name = path[-1].key
    if name in ("class_embedding", "positional_embedding", "proj"):
      return (scale * rng.standard_normal(leaf.shape)).astype(np.float32)
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    return (np.ones if name == "scale" else np.zeros)(leaf.shape, np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def make_encoder(config: VisionConfig, dtype: Any = jnp.float32,
                 attention: Optional[str] = None, precision: Any = None) -> Callable:
  """A jitted fn(params, pixels [N, H, W, 3]) -> [N, output_dim] float32."""
  model = VisionTransformer(config, dtype=dtype, attention=attention, precision=precision)
  return jax.jit(lambda params, pixels: model.apply({"params": params}, pixels))


def param_count(params) -> int:
  """Number of scalars in a params tree."""
  return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
