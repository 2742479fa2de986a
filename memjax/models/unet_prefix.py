"""The UNet forward split at its first cross-attention: a per-seed prefix, a per-prompt rest.

The whitebox scan runs one UNet step per caption at a fixed start noise z and
timestep t (docs/method.md section 2). Everything the forward computes before the
first cross-attention reads the text context never reads it, so for S seeds and B
prompts it is the same for all B prompts of a seed:

  prefix(x [S, h, w, c], t) -> state, each array [S, ...]:
    time_embedding                  the timestep MLP (after the sinusoid)
    conv_in                         the input conv (also the first skip)
    down_blocks_0/resnets_0         the first ResNet
    .../attentions_0/proj_in        after the transformer's GroupNorm
    .../transformer_blocks_0/attn1  self-attention of norm1(h), before the residual
    .../transformer_blocks_0/attn2/to_q   the cross-attention's queries of norm2(h + attn1)
  rest(state, ctx [B, L, D]) -> [S, B, h, w, out_channels]

`rest` runs the UNet's own `__call__` on the S * B rows (seed-major: row s * B + b
is seed s, prompt b) with each recorded submodule call replaced by its state
broadcast over the prompts (Flax's `nn.intercept_methods`, matched by submodule
path). So it is the module's forward, not a copy: same dtype, attention kernel and
capture, and the arithmetic left is exactly the module's. What each prompt still
pays for in down block 0's first transformer: the two residual adds (elementwise),
attn2's keys, values and attention, and the feed-forward. The inputs of the
replaced calls (GroupNorm, norm1, norm2, the sinusoid) are still traced but dead;
XLA drops them when the function is jitted.

A first down block without cross-attention (`DownBlock2D`) gives the small prefix
`PLAIN_PATHS` (time embedding and conv_in only). No hook in unet.py is needed: the
paths are the diffusers state-dict names the converter relies on, and both
functions raise if one of them is not called.
"""
from typing import Any, Callable, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.models import unet as unet_lib

Path = Tuple[str, ...]
_BLOCK = ("down_blocks_0", "attentions_0", "transformer_blocks_0")
# In the order the forward calls them; the last one ends the prefix.
PLAIN_PATHS: Tuple[Path, ...] = (("time_embedding",), ("conv_in",))
CROSS_PATHS: Tuple[Path, ...] = PLAIN_PATHS + (
    ("down_blocks_0", "resnets_0"),
    ("down_blocks_0", "attentions_0", "proj_in"),
    _BLOCK + ("attn1",),
    _BLOCK + ("attn2", "to_q"),
)
State = Dict[str, jax.Array]
_CROSS_DOWN = "CrossAttnDownBlock2D"


class _Done(Exception):
  """Raised by the prefix's interceptor after its last recorded call."""


def prefix_paths(config: unet_lib.UNetConfig) -> Tuple[Path, ...]:
  """The submodule calls the prefix computes: CROSS_PATHS when down block 0 is a
  `CrossAttnDownBlock2D`, PLAIN_PATHS otherwise."""
  return CROSS_PATHS if config.down_block_types[0] == _CROSS_DOWN else PLAIN_PATHS


def state_keys(config: unet_lib.UNetConfig) -> Tuple[str, ...]:
  """The keys of `prefix`'s state: its paths joined with "/"."""
  return tuple(_key(p) for p in prefix_paths(config))


def _key(path: Sequence[str]) -> str:
  return "/".join(path)


def _call_path(context) -> Path:
  """The intercepted submodule's path, () for other methods than __call__."""
  if context.method_name != "__call__":
    return ()
  return tuple(context.module.path)


def prefix(unet: unet_lib.UNet2DConditionModel, params, x: jax.Array,
           t: Any) -> State:
  """The context-free part of the forward, once per start noise.

  Args:
    unet: the module (its config, dtype and attention kernel are used as is).
    params: its params.
    x: [S, h, w, in_channels] UNet inputs (one per seed).
    t: a scalar or [S] timesteps.

  Returns:
    {path: [S, ...]} the outputs of `prefix_paths(unet.config)`, in unet.dtype
    (the time embedding [S, 4 * C0]; conv_in and resnets_0 [S, h, w, C0];
    proj_in [S, h, w, C0] (conv, SD1) or [S, h * w, C0] (linear, SD2); attn1 and
    to_q [S, h * w, C0]).
  """
  paths = prefix_paths(unet.config)
  state: State = {}

  def record(next_fun, args, kwargs, context):
    path = _call_path(context)
    out = next_fun(*args, **kwargs)
    if path in paths:
      state[_key(path)] = out
      if path == paths[-1]:
        raise _Done()
    return out

  # attn2 reads the context only after its to_q call, where the prefix stops.
  dummy = jnp.zeros((x.shape[0], 1, unet.config.cross_attention_dim), unet.dtype)
  try:
    with nn.intercept_methods(record):
      unet.apply({"params": params}, x, t, dummy)
  except _Done:
    pass
  missing = [_key(p) for p in paths if _key(p) not in state]
  if missing:
    raise RuntimeError(f"the UNet forward never called {', '.join(missing)}: "
                       "unet_prefix.CROSS_PATHS no longer matches memjax.models.unet")
  return state


def rest(unet: unet_lib.UNet2DConditionModel, params, state: State, ctx: jax.Array,
         **apply_kwargs) -> Any:
  """The forward of every (seed, prompt) pair from the per-seed `state`.

  Args:
    unet: the module `state` was computed with.
    params: its params (those of the prefix's submodules are not read).
    state: `prefix`'s output for S seeds.
    ctx: [B, L, cross_attention_dim] text embeddings.
    **apply_kwargs: passed to `unet.apply` (e.g. mutable=["intermediates"] with a
      capturing module; the captures then have S * B rows, seed-major).

  Returns:
    [S, B, h, w, out_channels] in unet.dtype, equal to the full forward of
    x[s] with ctx[b] (`full_forward`); with `mutable`, (that, variables).
  """
  paths = prefix_paths(unet.config)
  conv_in = state[_key(("conv_in",))]
  s, b = conv_in.shape[0], ctx.shape[0]
  n = s * b

  def expand(a):
    return jnp.broadcast_to(a[:, None], (s, b) + a.shape[1:]).reshape((n,) + a.shape[1:])

  values = {_key(p): expand(state[_key(p)]) for p in paths}
  used = set()

  def replace(next_fun, args, kwargs, context):
    key = _key(_call_path(context))
    if key in values:
      used.add(key)
      return values[key]
    return next_fun(*args, **kwargs)

  # conv_in and the time embedding are replaced: the sample and timestep are dead.
  sample = jnp.zeros((n,) + conv_in.shape[1:3] + (unet.config.in_channels,), unet.dtype)
  context = jnp.broadcast_to(ctx[None], (s,) + ctx.shape).reshape((n,) + ctx.shape[1:])
  with nn.intercept_methods(replace):
    out = unet.apply({"params": params}, sample, jnp.zeros((), jnp.int32), context,
                     **apply_kwargs)
  if used != set(values):
    raise RuntimeError(f"the UNet forward never called {', '.join(sorted(set(values) - used))}")
  if isinstance(out, tuple):
    return out[0].reshape((s, b) + out[0].shape[1:]), out[1]
  return out.reshape((s, b) + out.shape[1:])


def full_forward(unet: unet_lib.UNet2DConditionModel, params, x: jax.Array, t: Any,
                 ctx: jax.Array) -> jax.Array:
  """The reference: the unsplit forward of every (seed, prompt) pair, [S, B, h, w, c]."""
  s, b = x.shape[0], ctx.shape[0]
  xs = jnp.broadcast_to(x[:, None], (s, b) + x.shape[1:]).reshape((s * b,) + x.shape[1:])
  cs = jnp.broadcast_to(ctx[None], (s,) + ctx.shape).reshape((s * b,) + ctx.shape[1:])
  ts = jnp.broadcast_to(jnp.atleast_1d(jnp.asarray(t))[:, None], (s, b)).reshape(s * b)
  out = unet.apply({"params": params}, xs, ts, cs)
  return out.reshape((s, b) + out.shape[1:])


def split(unet: unet_lib.UNet2DConditionModel) -> Tuple[Callable, Callable]:
  """(prefix_fn(params, x, t), rest_fn(params, state, ctx)) bound to `unet`."""
  return (lambda p, x, t: prefix(unet, p, x, t),
          lambda p, state, ctx: rest(unet, p, state, ctx))
