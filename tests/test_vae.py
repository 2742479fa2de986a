"""memjax's Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL.

Tiny configs with every PyTorch weight perturbed (so unit norm scales and zero
biases cannot hide a swapped or missing weight), converted by rule, compared in
float32 at the acceptance tolerance max|flax - torch| / max|torch| <= 1e-4.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.runtime.errors import ConfigError
from memjax.models.convert import flatten, torch_to_flax
from memjax.models.vae import AutoencoderKL, VAEConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

_SOURCE = "vae/diffusion_pytorch_model.safetensors"
_TOL = 1e-4


def _config(block_out_channels=(32, 64), groups=8, **extra):
  n = len(block_out_channels)
  d = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
       "in_channels": 3, "out_channels": 3, "act_fn": "silu",
       "down_block_types": ["DownEncoderBlock2D"] * n,
       "up_block_types": ["UpDecoderBlock2D"] * n,
       "block_out_channels": list(block_out_channels), "layers_per_block": 1,
       "latent_channels": 4, "norm_num_groups": groups, "sample_size": 32,
       "scaling_factor": 0.18215, "force_upcast": True}
  d.update(extra)
  return d


_CONFIGS = {
    # Two levels: one downsampler, 32 x 32 -> 16 x 16.
    "two_level": _config(),
    # Three levels, 32 groups, 2 resnets per block: two downsamplers and two
    # upsamplers, so the decoder's reversed channel order is exercised.
    "three_level": _config((32, 64, 64), groups=32, layers_per_block=2),
    # The optional parts switched off.
    "bare": _config(use_quant_conv=False, use_post_quant_conv=False,
                    mid_block_add_attention=False, shift_factor=None),
    # null where diffusers tests a flag's truth builds what false builds.
    "null_flags": _config(use_quant_conv=None, use_post_quant_conv=None,
                          mid_block_add_attention=None, latents_mean=None,
                          latents_std=None, shift_factor=None, force_upcast=None),
    # vae/config.json of SD1.5 as first published (diffusers 0.6.0): no
    # norm_num_groups, scaling_factor or force_upcast keys (their defaults apply).
    "sd15_diffusers_0.6": {
        k: v for k, v in _config(groups=32, _diffusers_version="0.6.0").items()
        if k not in ("norm_num_groups", "scaling_factor", "force_upcast")},
}


def _torch_model(d, seed=0):
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(
      **{k: v for k, v in d.items() if not k.startswith("_")}).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  return model


def _state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _flax(d, x_nhwc, dtype=jnp.float32):
  module = AutoencoderKL(VAEConfig.from_dict(d, "vae/config.json"), dtype=dtype)
  abstract = jax.eval_shape(module.init, jax.random.key(0), x_nhwc)["params"]
  return module, abstract


def _rel(a, ref):
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_parity_with_diffusers(name):
  d = _CONFIGS[name]
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  model = _torch_model(d)
  module, abstract = _flax(d, x)
  params = torch_to_flax(_state(model), abstract, source=lambda k: _SOURCE)
  f = 2 ** (len(d["block_out_channels"]) - 1)
  assert module.config.downsample_factor == f
  z = rng.standard_normal((2, 32 // f, 32 // f, 4)).astype(np.float32)

  with torch.no_grad():
    dist = model.encode(_nchw(x)).latent_dist
    ref_mean, ref_logvar = _nhwc(dist.mean), _nhwc(dist.logvar)
    ref_image = _nhwc(model.decode(_nchw(z)).sample)
  encode = jax.jit(lambda p, x: module.apply({"params": p}, x,
                                             method=AutoencoderKL.encode))
  decode = jax.jit(lambda p, z: module.apply({"params": p}, z,
                                             method=AutoencoderKL.decode))
  mean, logvar = encode(params, x)
  image = decode(params, z)

  assert mean.shape == logvar.shape == (2, 32 // f, 32 // f, 4)
  assert image.shape == (2, 32, 32, 3)
  errors = {"mean": _rel(mean, ref_mean), "logvar": _rel(logvar, ref_logvar),
            "decode": _rel(image, ref_image)}
  print(name, errors)
  assert max(errors.values()) <= _TOL, errors


def _rename_old_attention(state, as_conv):
  """diffusers < 0.14 names (query/key/value/proj_attn); optionally with the
  q/k/v/out weights stored as 1 x 1 convs [C, C, 1, 1]."""
  out = {}
  for k, v in state.items():
    for new, old in ((".to_q.", ".query."), (".to_k.", ".key."),
                     (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
      if new in k:
        k = k.replace(new, old)
        if as_conv and k.endswith("weight"):
          v = v[:, :, None, None]
    out[k] = v
  return out


@pytest.mark.parametrize("as_conv", [False, True])
def test_old_attention_names_load(as_conv):
  d = _CONFIGS["two_level"]
  state = _state(_torch_model(d))
  _, abstract = _flax(d, np.zeros((1, 32, 32, 3), np.float32))
  old = _rename_old_attention(state, as_conv)
  assert any(".query." in k for k in old) and not any(".to_q." in k for k in old)
  want = flatten(torch_to_flax(state, abstract, source=lambda k: _SOURCE))
  got = flatten(torch_to_flax(old, abstract, source=lambda k: _SOURCE))
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg="/".join(path))


@pytest.mark.parametrize("key,value", [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"]),
    ("act_fn", "gelu"),
    ("shift_factor", 0.1159),
    ("latents_mean", [0.0, 0.0, 0.0, 0.0]),
    ("norm_num_groups", 7),
    ("layers_per_block", 0),
    ("use_quant_conv", "yes"),
    ("_class_name", "AutoencoderTiny"),
    ("num_attention_heads", 8),
])
def test_unsupported_config_names_source_and_key(key, value):
  with pytest.raises(ConfigError) as e:
    VAEConfig.from_dict(_config(**{key: value}), "model/vae/config.json")
  assert "model/vae/config.json" in str(e.value) and key in str(e.value)


def test_sd_config_parses_and_shapes_match():
  # Stable Diffusion 1.x's vae/config.json, as released.
  d = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0",
       "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
       "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
       "out_channels": 3, "sample_size": 512,
       "up_block_types": ["UpDecoderBlock2D"] * 4}
  cfg = VAEConfig.from_dict(d, "vae/config.json")
  assert cfg.scaling_factor == 0.18215 and cfg.downsample_factor == 8
  assert cfg.use_quant_conv and cfg.use_post_quant_conv and cfg.mid_block_add_attention
  module = AutoencoderKL(cfg)
  abstract = jax.eval_shape(module.init, jax.random.key(0),
                            jnp.zeros((1, 64, 64, 3)))["params"]
  # diffusers' parameter count for this config.
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract)) == 83_653_863
  out = jax.eval_shape(
      lambda z: module.apply(jax.tree.map(jnp.zeros_like, {"params": abstract}), z,
                             method=AutoencoderKL.decode),
      jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32))
  assert out.shape == (1, 512, 512, 3)


def test_bf16_smoke():
  d = _CONFIGS["two_level"]
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  module32, abstract = _flax(d, x)
  params = torch_to_flax(_state(_torch_model(d)), abstract, source=lambda k: _SOURCE)
  module16 = AutoencoderKL(module32.config, dtype=jnp.bfloat16)
  params16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
  (mean, logvar), image = jax.jit(
      lambda p, x: (module16.apply({"params": p}, x, method=AutoencoderKL.encode),
                    module16.apply({"params": p}, x)))(params16, x)
  ref_mean, _ = jax.jit(lambda p, x: module32.apply(
      {"params": p}, x, method=AutoencoderKL.encode))(params, x)
  for a in (mean, logvar, image):
    assert a.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(a)))
  assert image.shape == (1, 32, 32, 3)
  assert _rel(mean, ref_mean) < 5e-2
