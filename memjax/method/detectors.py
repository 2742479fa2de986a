"""One-step memorization detectors beside the DCS, as their authors' code computes them.

Every detector here reads the UNet at its authors' (x, t): x = z, the start noise
itself (DDIM's init sigma is 1, not the DCS's sqrt(1 - abar) z), at t_first, the
first of the 50 DDIM timesteps of the model's own scheduler config (981 for SD's
steps_offset = 1 and "leading" spacing), and for Asthana also at t_low =
timesteps[-3] (41). "Raw" is the UNet's output as it is (eps, or v for
v-prediction models); sigma^2 = 1 - abar[t_first].

  wen981   ||c1 - u1||                                   (Wen et al., first step)
  jeon     k_j ||(J_c - J_u)(c1 - u1)||, J = d raw / d x  (Jeon et al., a JVP in float32)
           k_j = 1 / sigma^2 (eps) or abar / sigma^4 (v)
  asthana  g1 * asthana_norm + g2 * asthana_cos           (Asthana & Belagiannis)
           asthana_norm = k_a ||c1 - u1||, k_a = 1 (eps) or sqrt(abar) / sigma^2 (v)
           asthana_cos  = mean over pixels of cos_channels(u2, c2 - u2)
           (g1, g2) = (1, 2) (eps) or (1, 0.1) (v)
  ren_le   -sum_k a_k ln a_k, a = the conditional cross-attention probabilities of
           down_blocks[1].attentions[1] averaged over heads and query pixels (Ren et al.)

with c1, u1 the raw conditional / unconditional outputs at (z, t_first), c2, u2 at
(z, t_low), norms L2 over the whole latent of one image, as float32. The
unconditional outputs depend only on z: `make_shared_fn` computes them once per
seed, and each prompt then costs one conditional forward at t_first (with the
attention capture on when ren_le is asked for), one at t_low (asthana) and one JVP
over the [uncond; cond] pair (jeon).

Everything here is pure: no flags, no I/O; the caller binds and jits it.
"""
import contextlib
import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from memjax.method import sampling
from memjax.method.schedule import Schedule
from memjax.models import unet_blocks
from memjax.runtime.errors import ConfigError

ONE_STEP = ("wen981", "jeon", "asthana", "ren_le")  # selectable detectors
COLUMNS = {"wen981": ("wen981",), "jeon": ("jeon",),
           "asthana": ("asthana", "asthana_norm", "asthana_cos"), "ren_le": ("ren_le",)}
PROTOCOL_STEPS = 50  # every author's DDIM step count
REN_LAYER = "down_blocks_1/attentions_1"  # Ren's "LE" layer (32 x 32 in SD1 at 512 px)
# Asthana's (g1 on the norm, g2 on the cosine) per prediction type (SD1, SD2).
ASTHANA_GAMMAS = {"epsilon": (1.0, 2.0), "v_prediction": (1.0, 0.1)}
COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default


@dataclasses.dataclass(frozen=True)
class Protocol:
  """The timesteps the detectors read: t_first = timesteps[0], t_low = timesteps[-3]."""
  t_first: int
  t_low: int

  @classmethod
  def from_scheduler(cls, scheduler_config: dict, steps: int = PROTOCOL_STEPS) -> "Protocol":
    """From diffusers' DDIM timesteps of `steps` steps for a scheduler config."""
    t = sampling.ddim_timesteps(scheduler_config, steps)
    if len(t) < 3:
      raise ConfigError(f"the one-step detectors need at least 3 DDIM steps, got {steps}")
    return cls(t_first=int(t[0]), t_low=int(t[-3]))


def check_names(names: Sequence[str]) -> Tuple[str, ...]:
  """The detectors of `names` in ONE_STEP's order; ValueError for an unknown one."""
  unknown = [n for n in names if n not in ONE_STEP]
  if unknown or not names:
    raise ValueError(f"unknown or no one-step detectors {unknown or list(names)} "
                     f"(use {', '.join(ONE_STEP)})")
  return tuple(n for n in ONE_STEP if n in names)


def columns(names: Sequence[str]) -> Tuple[str, ...]:
  """The output columns of the detectors `names`."""
  return tuple(c for n in check_names(names) for c in COLUMNS[n])


def constants(schedule: Schedule, protocol: Protocol) -> Dict[str, float]:
  """The per-model constants: jeon's k_j, asthana's k_a, g1, g2 (Python floats)."""
  abar = float(schedule.alphas_cumprod[protocol.t_first])
  s2 = 1.0 - abar  # sigma^2
  v = schedule.prediction_type == "v_prediction"
  g1, g2 = ASTHANA_GAMMAS[schedule.prediction_type]
  return {"jeon": abar / s2 ** 2 if v else 1.0 / s2,
          "asthana_norm": abar ** 0.5 / s2 if v else 1.0, "g1": g1, "g2": g2}


def cosine_similarity(x1: jax.Array, x2: jax.Array, axis: int = -1,
                      eps: float = COSINE_EPS) -> jax.Array:
  """torch.nn.functional.cosine_similarity (torch >= 1.12's ATen op): each vector
  divided by max(its norm, eps), then the dot product over `axis`."""
  n1 = jnp.maximum(jnp.linalg.norm(x1, axis=axis, keepdims=True), eps)
  n2 = jnp.maximum(jnp.linalg.norm(x2, axis=axis, keepdims=True), eps)
  return jnp.sum((x1 / n1) * (x2 / n2), axis=axis)


def entropy(p: jax.Array, axis: int = -1) -> jax.Array:
  """-sum p ln p over `axis` in float32 (0 ln 0 = 0)."""
  p = p.astype(jnp.float32)
  return -jnp.sum(jax.scipy.special.xlogy(p, p), axis=axis)


def ren_entropy(query_mean: jax.Array) -> jax.Array:
  """[B, heads, Lk] probabilities averaged over the queries -> [B] Ren's entropy
  (heads averaged first, every token kept)."""
  return entropy(jnp.mean(query_mean.astype(jnp.float32), axis=1))


def _norm(x: jax.Array) -> jax.Array:
  """[B, ...] -> [B] L2 norm over everything but the batch axis."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))))


def _raw(unet: Callable, params, x: jax.Array, t: int, ctx: jax.Array) -> jax.Array:
  """The UNet's raw output at timestep t, as float32."""
  return unet(params, x, jnp.full((x.shape[0],), t, jnp.int32), ctx).astype(jnp.float32)


def jvp_difference(unet_f32: Callable, params, z: jax.Array, ctx_u: jax.Array,
                   ctx: jax.Array, direction: jax.Array, t: int,
                   precision: Optional[str] = "highest") -> jax.Array:
  """(J_c - J_u) direction, J = d raw(x, t, .) / d x at x = z, all in float32.

  One forward-mode JVP over the batch [uncond; cond] as Jeon's code runs it.
  Args:
    unet_f32: (params, x, t, ctx) -> raw output, of a float32 module.
    params: the UNet params, any dtype (cast to float32 here).
    z: [h, w, c] the start noise; ctx_u: [L, D] the empty prompt's context.
    ctx: [B, L, D] the prompts' contexts; direction: [B, h, w, c].
    precision: matmul/conv precision of the JVP ("highest": no TF32 or bf16 passes
      on accelerators), None for JAX's default.
  Returns:
    [B, h, w, c] float32.
  """
  f32 = jnp.float32
  b = ctx.shape[0]
  p32 = jax.tree.map(lambda a: jnp.asarray(a, f32), params)
  x = jnp.broadcast_to(z.astype(f32), (2 * b,) + z.shape)
  c = jnp.concatenate([jnp.broadcast_to(ctx_u.astype(f32), (b,) + ctx_u.shape),
                       ctx.astype(f32)])
  d = direction.astype(f32)
  scope = (jax.default_matmul_precision(precision) if precision
           else contextlib.nullcontext())
  with scope:
    _, tangent = jax.jvp(lambda xx: _raw(unet_f32, p32, xx, t, c), (x,),
                         (jnp.concatenate([d, d]),))
  return tangent[b:] - tangent[:b]


def make_shared_fn(text: Callable, unet: Callable, protocol: Protocol,
                   names: Sequence[str]) -> Callable:
  """Returns f(text_params, unet_params, empty_ids [1, 77], noise [S, h, w, c]) ->
  the per-seed unconditional inputs of the detectors `names`:
    u_first [S, h, w, c] float32 raw output at (z, t_first) (wen981, jeon, asthana),
    u_low   [S, h, w, c] float32 raw output at (z, t_low) (asthana),
    ctx_u   [77, D] the empty prompt's context, in the model's dtype (jeon).
  (ren_le alone needs none: an empty dict.)
  """
  names = check_names(names)

  def shared(text_params, unet_params, empty_ids, noise):
    out = {}
    if not set(names) - {"ren_le"}:
      return out
    ctx = text(text_params, empty_ids)
    ctx_s = jnp.broadcast_to(ctx, (noise.shape[0],) + ctx.shape[1:])
    x = noise.astype(ctx.dtype)
    out["u_first"] = _raw(unet, unet_params, x, protocol.t_first, ctx_s)
    if "asthana" in names:
      out["u_low"] = _raw(unet, unet_params, x, protocol.t_low, ctx_s)
    if "jeon" in names:
      out["ctx_u"] = ctx[0]
    return out

  return shared


def make_detectors_fn(unet: Callable, unet_f32: Optional[Callable],
                      unet_capture: Optional[Callable], schedule: Schedule,
                      protocol: Protocol, names: Sequence[str],
                      jvp_precision: Optional[str] = "highest",
                      ren_layer: str = REN_LAYER) -> Callable:
  """Returns detect(unet_params, ctx [B, 77, D], noise [S, h, w, c], shared) ->
  {column: [B, S] float32} for the columns of the detectors `names` (`columns`).

  Args:
    unet: (params, x, t [B], ctx) -> raw output (`StableDiffusion.unet_out`).
    unet_f32: the same of a float32 clone of the module (jeon only).
    unet_capture: (params, x, t, ctx) -> (raw output, {ren_layer: {"query_mean":
      [B, heads, 77]}}) of a clone capturing ren_layer (ren_le only; `bind_unet`).
    ren_layer: the Flax path of Ren's transformer (REN_LAYER, SD's; a model without
      it, such as a tiny one, names another).
  The function's arguments:
    shared: what `make_shared_fn` returned for the same noise.
  """
  names = check_names(names)
  k = constants(schedule, protocol)
  f32 = jnp.float32
  if "jeon" in names and unet_f32 is None:
    raise ValueError("jeon needs unet_f32, the UNet of a float32 clone of the module")
  if "ren_le" in names and unet_capture is None:
    raise ValueError(f"ren_le needs unet_capture, a UNet capturing {ren_layer}")

  def one_seed(params, ctx, z, u_first, u_low, ctx_u) -> Dict[str, jax.Array]:
    x = jnp.broadcast_to(z.astype(ctx.dtype), (ctx.shape[0],) + z.shape)
    t_first = jnp.full((x.shape[0],), protocol.t_first, jnp.int32)
    res = {}
    if "ren_le" in names:
      out, captured = unet_capture(params, x, t_first, ctx)
      res["ren_le"] = ren_entropy(captured[ren_layer]["query_mean"])
    else:
      out = unet(params, x, t_first, ctx)
    if set(names) == {"ren_le"}:
      return res
    d = out.astype(f32) - u_first[None]
    norm = _norm(d)
    if "wen981" in names:
      res["wen981"] = norm
    if "asthana" in names:
      u2 = u_low[None]
      cos = jnp.mean(cosine_similarity(u2, _raw(unet, params, x, protocol.t_low, ctx) - u2),
                     axis=(1, 2))
      n = k["asthana_norm"] * norm
      res.update(asthana=k["g1"] * n + k["g2"] * cos, asthana_norm=n, asthana_cos=cos)
    if "jeon" in names:
      res["jeon"] = k["jeon"] * _norm(jvp_difference(
          unet_f32, params, z, ctx_u, ctx, d, protocol.t_first, jvp_precision))
    return res

  def detect(unet_params, ctx, noise, shared):
    # One seed at a time in a loop on the device (lax.map): the UNet, its capture
    # and the JVP compile once whatever the number of seeds.
    zeros = jnp.zeros(noise.shape[:1], f32)
    per_seed = jax.lax.map(
        lambda a: one_seed(unet_params, ctx, a[0], a[1], a[2], shared.get("ctx_u")),
        (noise, shared.get("u_first", zeros), shared.get("u_low", zeros)))
    return {c: per_seed[c].T.astype(f32) for c in columns(names)}  # [S, B] -> [B, S]

  return detect


def bind_unet(module, ren_layer: str = REN_LAYER) -> Tuple[Callable, Callable, Callable]:
  """(unet, unet_f32, unet_capture) of a `UNet2DConditionModel` for
  `make_detectors_fn`: the module as it is, a float32 clone, and a clone capturing
  ren_layer's query-mean attention, returning (raw output, {path: {mode: array}})."""
  f32 = module.clone(dtype=jnp.float32)

  def unet(params, x, t, ctx):
    return module.apply({"params": params}, x, t, ctx)

  def unet_f32(params, x, t, ctx):
    return f32.apply({"params": params}, x, t, ctx)

  return unet, unet_f32, capturing(module, ((ren_layer, "query_mean"),))


def capturing(module, capture: Sequence[Tuple[str, str]]) -> Callable:
  """(params, x, t, ctx) -> (raw output, {path: {mode: array}}) of a clone of the
  `UNet2DConditionModel` with `capture` ((transformer path, mode), ...) on."""
  cap = module.clone(capture=tuple(tuple(c) for c in capture))

  def unet_capture(params, x, t, ctx):
    out, state = cap.apply({"params": params}, x, t, ctx, mutable=["intermediates"])
    return out, unet_blocks.read_capture(state["intermediates"], cap.capture)

  return unet_capture
