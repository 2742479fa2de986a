"""The UNet split at its first cross-attention (`memjax.models.unet_prefix`).

prefix (once per seed) + rest (per prompt) must equal the full forward of every
(seed, prompt) pair, and rest must not redo the prefix's work per prompt: its
output does not change when the prefix's params are NaN, and XLA counts the
prefix's FLOPs once per prompt fewer.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.models import convert
from memjax.models import loading
from memjax.models import unet_blocks
from memjax.models import unet_prefix
from memjax.testing import tiny

_S, _B, _SIDE = 2, 3, 8
_T = 999
# Params read only by the prefix, or only by its dead inputs in rest (the norms).
_DEAD = ("down_blocks_0/attentions_0/norm",
         "down_blocks_0/attentions_0/transformer_blocks_0/norm1",
         "down_blocks_0/attentions_0/transformer_blocks_0/norm2")


def _model(style, dtype=jnp.float32, attention=None, first="CrossAttnDownBlock2D",
           blocks=1, capture=()):
  """A tiny UNet of `style` (sd1: conv proj_in; sd2: linear) with `blocks` blocks,
  the first one `first`, the others cross-attention blocks; and its params."""
  cfg = tiny.tiny_configs(style)["unet"]
  types = [first] + ["CrossAttnDownBlock2D"] * (blocks - 1)
  cfg.update(block_out_channels=[32, 64][:blocks], layers_per_block=1, down_block_types=types,
             up_block_types=[t.replace("Down", "Up") for t in types[::-1]])
  if isinstance(cfg["attention_head_dim"], list):
    cfg["attention_head_dim"] = cfg["attention_head_dim"][:blocks]
  unet = loading.build_module("unet", cfg, "<unet>", dtype, attention).clone(capture=capture)
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), tiny.random_params("unet", cfg, 1))
  return unet, params


def _inputs(unet, dtype=jnp.float32):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((_S, _SIDE, _SIDE, 4))
  ctx = rng.standard_normal((_B, 77, unet.config.cross_attention_dim))
  return jnp.asarray(x, dtype), jnp.asarray(ctx, dtype)


def _compiled(unet, params, x, ctx):
  """Compiled prefix, rest and full forward (their FLOPs are read off them); rest
  and full return (output, {path: {mode: probabilities}}) of the module's capture."""
  mutable = {"mutable": ["intermediates"]} if unet.capture else {}

  def read(out):
    if not unet.capture:
      return out, {}
    return out[0], unet_blocks.read_capture(out[1]["intermediates"], unet.capture)

  def full(p, xx, c):  # full_forward, with the capture
    n = _S * _B
    xs = jnp.broadcast_to(xx[:, None], (_S, _B) + xx.shape[1:]).reshape((n,) + xx.shape[1:])
    cs = jnp.broadcast_to(c[None], (_S,) + c.shape).reshape((n,) + c.shape[1:])
    y, cap = read(unet.apply({"params": p}, xs, jnp.full((n,), _T), cs, **mutable))
    return y.reshape((_S, _B) + y.shape[1:]), cap

  pre = jax.jit(lambda p, xx: unet_prefix.prefix(unet, p, xx, _T)).lower(params, x).compile()
  state = pre(params, x)
  rest = jax.jit(lambda p, s, c: read(unet_prefix.rest(unet, p, s, c, **mutable))).lower(
      params, state, ctx).compile()
  return pre, rest, jax.jit(full).lower(params, x, ctx).compile()


def _flops(compiled):
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def _nan_prefix_params(unet, params):
  """params with every leaf only the prefix reads set to NaN."""
  owned = unet_prefix.state_keys(unet.config)
  if unet_prefix.prefix_paths(unet.config) == unet_prefix.CROSS_PATHS:
    owned += _DEAD
  flat = convert.flatten(params)
  hit = {k for k in flat if "/".join(k).startswith(owned)}
  assert len(hit) >= len(owned)
  return convert.unflatten({k: jnp.full_like(v, jnp.nan) if k in hit else v
                            for k, v in flat.items()}), len(hit)


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


_CAPTURE = (("down_blocks_0/attentions_0", "query_mean"),)


@pytest.mark.parametrize("style,attention,blocks,capture",
                         [("sd1", "xla", 1, ()), ("sd2", None, 1, _CAPTURE)])
def test_split_equals_full_forward_float32(style, attention, blocks, capture):
  unet, params = _model(style, attention=attention, blocks=blocks, capture=capture)
  x, ctx = _inputs(unet)
  pre, rest, full = _compiled(unet, params, x, ctx)
  state = pre(params, x)
  assert set(state) == {"/".join(p) for p in unet_prefix.CROSS_PATHS}
  assert all(v.shape[0] == _S for v in state.values())
  (got, got_cap), (want, want_cap) = rest(params, state, ctx), full(params, x, ctx)
  assert got.shape == (_S, _B, _SIDE, _SIDE, 4)
  assert _rel(got, want) <= 1e-6
  for path, mode in capture:  # the first cross-attention's probabilities, per pair
    assert _rel(got_cap[path][mode], want_cap[path][mode]) <= 1e-6
  # rest never reads the prefix's params: it does not redo its work per prompt.
  nan_params, n = _nan_prefix_params(unet, params)
  assert n > 10
  np.testing.assert_array_equal(np.asarray(rest(nan_params, state, ctx)[0]), np.asarray(got))
  if attention == "xla":  # no while loops: XLA's count is the work done
    saved = _flops(full) - _flops(rest)
    assert saved >= 0.99 * _B * _flops(pre), (saved, _flops(pre))


def test_split_bfloat16():
  """In bfloat16 the split stays within bfloat16's own error of the full forward
  (which is 1.4 to 1.8% of the largest output against float32 on these models)."""
  unet, params = _model("sd1", jnp.bfloat16)
  x, ctx = _inputs(unet, jnp.bfloat16)
  state = jax.jit(lambda p, xx: unet_prefix.prefix(unet, p, xx, _T))(params, x)
  got = jax.jit(lambda p, s, c: unet_prefix.rest(unet, p, s, c))(params, state, ctx)
  want = jax.jit(lambda p, xx, c: unet_prefix.full_forward(unet, p, xx, _T, c))(params, x, ctx)
  assert got.dtype == jnp.bfloat16 and state["conv_in"].dtype == jnp.bfloat16
  assert _rel(got, want) <= 0.03


def test_first_block_without_cross_attention():
  """A DownBlock2D first: the prefix is the time embedding and conv_in."""
  unet, params = _model("sd1", first="DownBlock2D")
  x, ctx = _inputs(unet)
  state = jax.jit(lambda p, xx: unet_prefix.prefix(unet, p, xx, _T))(params, x)
  assert set(state) == {"time_embedding", "conv_in"}
  rest = jax.jit(lambda p, s, c: unet_prefix.rest(unet, p, s, c))
  got = rest(params, state, ctx)
  want = jax.jit(lambda p, xx, c: unet_prefix.full_forward(unet, p, xx, _T, c))(params, x, ctx)
  assert _rel(got, want) <= 1e-6
  nan_params, _ = _nan_prefix_params(unet, params)
  np.testing.assert_array_equal(np.asarray(rest(nan_params, state, ctx)), np.asarray(got))
