"""Parity of memjax's Flax UNet with diffusers' `UNet2DConditionModel`.

Tiny SD1-style and SD2-style UNets are built in PyTorch from the same config
with every parameter perturbed (so a swapped, missing or mis-laid weight cannot
hide behind a zero bias or a unit norm scale), converted by rule with
`torch_to_flax` and run on identical inputs in float32. The acceptance
tolerance is max|flax - torch| / max|torch| <= 1e-4.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from memjax.runtime.errors import ConfigError
from memjax.models.convert import torch_to_flax
from memjax.models.unet import UNet2DConditionModel, UNetConfig

_SOURCE = "unet/config.json"
_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
_TOL = 1e-4

SD1_TINY = dict(
    block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8, sample_size=16)
# SD2 style: linear projections, upcast attention, and attention_head_dim as a
# list that diffusers reads as heads per block (2, 4, 8 heads of 16 channels).
SD2_TINY = dict(
    block_out_channels=(32, 64, 128), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 8), cross_attention_dim=64, norm_num_groups=8,
    use_linear_projection=True, upcast_attention=True, sample_size=16)
SD15_FULL = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8, cross_attention_dim=768, sample_size=64)


def _perturb(model: torch.nn.Module, seed: int) -> None:
  """Adds noise of half each tensor's spread (0.1 for constant ones: norms, biases)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      std = float(p.std()) if p.numel() > 1 else 0.0
      scale = 0.5 * std if std > 0 else 0.1
      p.add_(scale * torch.randn(p.shape, generator=gen))


class _Pair:
  """A perturbed diffusers UNet and its converted memjax twin, jitted once.

  config: a config.json's contents; diffusers builds from it (`from_config`) and
  memjax reads it as written (raw=True) or as diffusers saves it back (every key).
  """

  def __init__(self, config: dict, seed: int = 0, raw: bool = False):
    from diffusers import UNet2DConditionModel as TorchUNet  # pylint: disable=g-import-not-at-top
    torch.manual_seed(seed)
    self.torch_model = TorchUNet.from_config(config).eval()
    _perturb(self.torch_model, seed)
    # The full diffusers config (every key, as saved to config.json) must load.
    self.config = UNetConfig.from_dict(dict(config if raw else self.torch_model.config),
                                       _SOURCE)
    self.module = UNet2DConditionModel(self.config)
    self.cross = self.config.cross_attention_dim
    h = config["sample_size"]
    abstract = jax.eval_shape(
        self.module.init, jax.random.key(0), jnp.zeros((1, h, h, 4)), jnp.zeros((1,)),
        jnp.zeros((1, 7, self.cross)))["params"]
    state = {k: v.numpy() for k, v in self.torch_model.state_dict().items()}
    self.params = torch_to_flax(state, abstract, source=lambda k: _WEIGHTS)
    self.apply = jax.jit(lambda p, x, t, c: self.module.apply({"params": p}, x, t, c))

  def inputs(self, batch: int, side: int, tokens: int = 7, seed: int = 1):
    rng = np.random.RandomState(seed)
    x = rng.randn(batch, side, side, 4).astype(np.float32)
    ctx = rng.randn(batch, tokens, self.cross).astype(np.float32)  # differs per sample
    return x, ctx

  def reference(self, x: np.ndarray, t, ctx: np.ndarray) -> np.ndarray:
    """diffusers' output for NHWC x, as NHWC."""
    with torch.no_grad():
      out = self.torch_model(torch.from_numpy(x).permute(0, 3, 1, 2), t,
                             torch.from_numpy(ctx)).sample
    return out.permute(0, 2, 3, 1).numpy()


def _rel_err(got, want) -> float:
  return float(np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def sd1():
  return _Pair(SD1_TINY, seed=0)


@pytest.fixture(scope="module")
def sd2():
  return _Pair(SD2_TINY, seed=1)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
@pytest.mark.parametrize("t", [999, 500, "per-sample"])
def test_parity_with_diffusers(name, t, request):
  pair = request.getfixturevalue(name)
  x, ctx = pair.inputs(batch=2, side=16)
  # diffusers gets a Python int (broadcast over the batch) or a [B] tensor; memjax
  # always a [B] array, so every case shares one compiled function.
  t_torch = torch.tensor([999, 500]) if t == "per-sample" else t
  t_jax = jnp.asarray([999, 500] if t == "per-sample" else [t, t])
  want = pair.reference(x, t_torch, ctx)
  got = pair.apply(pair.params, x, t_jax, ctx)
  err = _rel_err(got, want)
  print(f"{name} t={t}: max|diff|/max|ref| = {err:.2e}")
  assert got.shape == want.shape == (2, 16, 16, 4)
  assert err <= _TOL


_DOWN = ["CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D"]
_TINY = {"block_out_channels": [32, 64], "down_block_types": _DOWN, "up_block_types": _UP,
         "cross_attention_dim": 32, "norm_num_groups": 8, "sample_size": 16}
# unet/config.json as real folders of each diffusers vintage hold it (every key and
# value of the original, the sizes shrunk): SD1.5 as first published (0.6.0), as
# diffusers 0.17's checkpoint conversion wrote it (`upcast_attention: null`, null for
# every unset option), SD2.1 (0.10), and the list forms diffusers also accepts.
_VINTAGES = {
    "sd15_diffusers_0.6": dict(
        _TINY, _class_name="UNet2DConditionModel", _diffusers_version="0.6.0",
        act_fn="silu", attention_head_dim=8, center_input_sample=False,
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
        layers_per_block=1, mid_block_scale_factor=1, norm_eps=1e-05, out_channels=4),
    "converted_diffusers_0.17": dict(
        _TINY, _class_name="UNet2DConditionModel", _diffusers_version="0.17.0",
        act_fn="silu", addition_embed_type=None, addition_embed_type_num_heads=64,
        attention_head_dim=8, center_input_sample=False, class_embed_type=None,
        class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3,
        cross_attention_norm=None, downsample_padding=1, dual_cross_attention=False,
        encoder_hid_dim=None, encoder_hid_dim_type=None, flip_sin_to_cos=True, freq_shift=0,
        in_channels=4, layers_per_block=1, mid_block_only_cross_attention=None,
        mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05,
        num_attention_heads=None, num_class_embeds=None, only_cross_attention=False,
        out_channels=4, projection_class_embeddings_input_dim=None,
        resnet_out_scale_factor=1.0, resnet_skip_time_act=False,
        resnet_time_scale_shift="default", time_cond_proj_dim=None,
        time_embedding_act_fn=None, time_embedding_dim=None,
        time_embedding_type="positional", timestep_post_act=None, upcast_attention=None,
        use_linear_projection=False),
    "sd21_diffusers_0.10": dict(
        _TINY, _class_name="UNet2DConditionModel", _diffusers_version="0.10.0.dev0",
        act_fn="silu", attention_head_dim=[2, 4], center_input_sample=False,
        cross_attention_dim=64, downsample_padding=1, dual_cross_attention=False,
        flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=1,
        mid_block_scale_factor=1, norm_eps=1e-05, num_class_embeds=None,
        only_cross_attention=False, out_channels=4, upcast_attention=True,
        use_linear_projection=True),
    "list_forms": dict(
        _TINY, layers_per_block=[1, 1], cross_attention_dim=[32, 32],
        only_cross_attention=[False, False], transformer_layers_per_block=[1, 1],
        attention_head_dim=[4, 8]),
    # null where diffusers tests a flag's truth: false, even for flip_sin_to_cos
    # (default true), which changes the timestep embedding.
    "null_flags": dict(
        _TINY, flip_sin_to_cos=None, use_linear_projection=None, upcast_attention=None,
        center_input_sample=None, dual_cross_attention=None, attention_type=None,
        class_embeddings_concat=None, resnet_skip_time_act=None, dropout=0.1),
}


@pytest.mark.parametrize("name", sorted(_VINTAGES))
def test_configs_of_every_diffusers_vintage(name):
  """memjax reads the config as written and computes what diffusers builds from it."""
  pair = _Pair(_VINTAGES[name], seed=3, raw=True)
  x, ctx = pair.inputs(batch=2, side=16)
  want = pair.reference(x, torch.tensor([981, 20]), ctx)
  err = _rel_err(pair.apply(pair.params, x, jnp.asarray([981, 20]), ctx), want)
  print(f"{name}: max|diff|/max|ref| = {err:.2e}")
  assert err <= 1e-5
  if name == "null_flags":
    assert not pair.config.flip_sin_to_cos and not pair.config.use_linear_projection


@pytest.mark.parametrize("key", ["mid_block_type", "resnet_time_scale_shift",
                                 "time_embedding_type", "conv_in_kernel", "act_fn",
                                 "only_cross_attention", "norm_eps", "attention_head_dim"])
def test_null_that_diffusers_cannot_build_is_refused_by_name(key):
  with pytest.raises(ConfigError, match=rf"^unet/config\.json: {key}"):
    UNetConfig.from_dict(dict(SD1_TINY, **{key: None}), _SOURCE)


def test_heads_follow_diffusers_naming_quirk(sd1, sd2):
  # attention_head_dim is the number of heads when num_attention_heads is unset.
  assert sd1.config.heads == (8, 8)
  assert sd2.config.heads == (2, 4, 8)
  assert UNetConfig.from_dict({"attention_head_dim": 8, "num_attention_heads": 5,
                               "block_out_channels": [320, 640, 1280, 1280]},
                              _SOURCE).heads == (5, 5, 5, 5)


def test_latent_side_not_multiple_of_downsampling(sd1):
  # 15 -> 8 on the way down; diffusers forces the upsampler back to 15, not 16.
  x, ctx = sd1.inputs(batch=1, side=15)
  want = sd1.reference(x, 250, ctx)
  got = sd1.apply(sd1.params, x, jnp.asarray([250]), ctx)
  assert got.shape == want.shape == (1, 15, 15, 4)
  assert _rel_err(got, want) <= _TOL


def test_bfloat16_smoke(sd1):
  x, ctx = sd1.inputs(batch=2, side=16)
  ref = np.asarray(sd1.apply(sd1.params, x, jnp.asarray([700, 700]), ctx))
  module = UNet2DConditionModel(sd1.config, dtype=jnp.bfloat16)
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.bfloat16), sd1.params)
  got = jax.jit(lambda p, x, c: module.apply({"params": p}, x, 700, c))(params, x, ctx)
  assert got.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(got, np.float32)).all()
  err = _rel_err(got, ref)
  print(f"bf16 vs fp32: max|diff|/max|ref| = {err:.2e}")
  assert err < 5e-2


def test_unsupported_block_type_names_source_and_key():
  d = dict(SD1_TINY, down_block_types=["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"])
  with pytest.raises(ConfigError) as e:
    UNetConfig.from_dict(d, _SOURCE)
  assert str(e.value).startswith(
      "unet/config.json: down_block_types[1] = 'SimpleCrossAttnDownBlock2D' is not supported")


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"), ("addition_embed_type", "text_time"),
    ("encoder_hid_dim", 768), ("time_cond_proj_dim", 256), ("conv_in_kernel", 7),
    ("attention_type", "gated"), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("num_class_embeds", 10), ("dual_cross_attention", True),
    ("only_cross_attention", True), ("transformer_layers_per_block", [1, 2]),
    ("resnet_time_scale_shift", "scale_shift"), ("time_embedding_type", "fourier"),
    ("layers_per_block", [1, 2]), ("cross_attention_dim", [32, 64]),
])
def test_unsupported_values_name_the_key(key, value):
  with pytest.raises(ConfigError, match=rf"^unet/config\.json: {key}"):
    UNetConfig.from_dict(dict(SD1_TINY, **{key: value}), _SOURCE)


@pytest.mark.parametrize("key,value,why", [
    ("some_future_key", 1, "is not a key"),
    ("norm_num_groups", 12, "must divide"),
    ("attention_head_dim", 3, "do not divide"),
    ("attention_head_dim", [8, 8, 8], "list of 2"),
    ("up_block_types", ["UpBlock2D"], "one block per entry"),
])
def test_malformed_configs_are_refused(key, value, why):
  with pytest.raises(ConfigError, match=rf"unet/config\.json: {key}.*{why}"):
    UNetConfig.from_dict(dict(SD1_TINY, **{key: value}), _SOURCE)


@pytest.mark.slow
def test_full_sd15_parity_and_timing():
  """The real SD1.5 architecture, random weights, 64 x 64 latents, batch 1."""
  start = time.perf_counter()
  pair = _Pair(SD15_FULL, seed=0)
  print(f"\nbuild + perturb + convert: {time.perf_counter() - start:.1f} s")
  x, ctx = pair.inputs(batch=1, side=64, tokens=77)
  start = time.perf_counter()
  want = pair.reference(x, 500, ctx)
  print(f"diffusers forward (torch CPU): {time.perf_counter() - start:.1f} s")
  t = jnp.asarray([500])
  start = time.perf_counter()
  got = jax.block_until_ready(pair.apply(pair.params, x, t, ctx))
  print(f"memjax first forward (compile + run): {time.perf_counter() - start:.1f} s")
  start = time.perf_counter()
  got = jax.block_until_ready(pair.apply(pair.params, x, t, ctx))
  print(f"memjax second forward (run): {time.perf_counter() - start:.1f} s")
  err = _rel_err(got, want)
  print(f"SD1.5 t=500: max|diff|/max|ref| = {err:.2e}")
  assert err <= 1e-3
