"""Model variants and inputs shared by the benchmark scripts.

The attention kernel and the compute dtype are fields of the modules
(`loading.build_module(..., dtype, attention)`), so a variant of a model is the
same weights with its modules built again: no random weights drawn twice, no
global switch.
"""
import contextlib
import dataclasses
from typing import Optional, Sequence

import numpy as np

_SAME = object()


def variant(sd, dtype: Optional[str] = None, attention=_SAME):
  """`sd` (a `loading.StableDiffusion`) with its modules built for `dtype` and
  the attention kernel `attention` (None: memjax's choice; default: sd's own),
  its params cast to `dtype` (build `sd` in float32 to compare dtypes on the same
  weights)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from memjax.models import loading  # pylint: disable=g-import-not-at-top
  dtype = dtype or sd.dtype
  attention = sd.attention if attention is _SAME else attention
  compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  modules = {n: loading.build_module(n, sd.configs[n], f"<{n}>", compute, attention)
             for n in loading.COMPONENTS if getattr(sd, n) is not None}
  params = sd.params
  if dtype != sd.dtype:
    params = {n: jax.tree.map(lambda a: np.asarray(a, compute), p) for n, p in params.items()}
  return dataclasses.replace(sd, params=params, dtype=dtype, attention=attention, **modules)


def token_ids(sd, prompts: Sequence[str]) -> np.ndarray:
  """[len(prompts), 77] int32 token ids, as the stages tokenize a shard."""
  return np.ascontiguousarray(sd.tokenizer.encode_batch(list(prompts))["input_ids"], np.int32)


def random_ids(batch: int, high: int = 1000, seed: int = 0) -> np.ndarray:
  """[batch, 77] int32 random token ids below `high` (a fixed batch for timing)."""
  return np.random.default_rng(seed).integers(0, high, (batch, 77)).astype(np.int32)


# BoundSteps of the same engine as the stages' steps around parts of the model
# (gpu_profile.py times them, flop_count.py counts their FLOPs).


def text_step(sd, batch: int, mesh):
  """The text encoder alone: token ids [B, 77] -> context [B, 77, D]."""
  from memjax.runtime import engine  # pylint: disable=g-import-not-at-top
  from memjax.stages import common  # pylint: disable=g-import-not-at-top
  return engine.BoundStep(lambda b, ids: sd.text_embed(b["text_encoder"], ids),
                          {"text_encoder": sd.params["text_encoder"]}, batch, mesh,
                          common.empty_ids(sd))


def unet_step(sd, noise: np.ndarray, batch: int, mesh):
  """The UNet alone at the scan's timestep and input (sqrt(1 - abar) z of the
  first seed of noise [S, h, w, c]): context [B, 77, D] (host array, in the
  model's dtype) -> raw output [B, h, w, c]."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from memjax.method import whitebox  # pylint: disable=g-import-not-at-top
  from memjax.runtime import engine  # pylint: disable=g-import-not-at-top
  from memjax.stages import common  # pylint: disable=g-import-not-at-top
  t = sd.schedule.last_timestep
  scale = whitebox.timestep_constants(sd.schedule, t)["sqrt_one_minus_abar"]
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[sd.dtype]

  def fn(b, ctx):
    x = jnp.broadcast_to(b["x"], (ctx.shape[0],) + b["x"].shape)
    return sd.unet_out(b["unet"], x, jnp.full((ctx.shape[0],), t, jnp.int32), ctx)

  bound = {"unet": sd.params["unet"], "x": (scale * np.asarray(noise[0])).astype(dtype)}
  tokens = len(common.empty_ids(sd))  # 77
  pad = np.zeros((tokens, sd.configs["unet"]["cross_attention_dim"]), dtype)
  return engine.BoundStep(fn, bound, batch, mesh, pad)


@contextlib.contextmanager
def attention_left_out():
  """Every attention call returns its query instead, whichever kernel the modules
  use (XLA/cuDNN through `jax.nn.dot_product_attention`, or memjax's blocked one).
  A step traced inside (a new BoundStep, lowered or first called here) computes
  everything but attention; keep it inside while it is timed."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from memjax.models import attention  # pylint: disable=g-import-not-at-top
  real = jax.nn.dot_product_attention, attention.blocked_attention
  jax.nn.dot_product_attention = lambda q, k, v, **kw: q
  attention.blocked_attention = lambda q, k, v, *args, **kw: q.astype(jnp.float32)
  try:
    yield
  finally:
    jax.nn.dot_product_attention, attention.blocked_attention = real
