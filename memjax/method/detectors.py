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
(z, t_low), norms L2 over the whole latent of one image, as float32. Each score
is the mean over the detector's generations (start noises).

Noise (`noise_plan`): under the authors' protocol (AUTHORS) Wen's and Ren's code
draw a z of their own for every prompt (per_prompt; Wen 4 generations, Ren 1),
Jeon's and Asthana's one z shared by every prompt (1 generation); under the
"shared" protocol every detector reads the scan's shared z of every seed. A shared
z's unconditional outputs depend only on z: `make_shared_fn` computes them once
per seed, and each prompt then costs one conditional forward at t_first (with the
attention capture on when ren_le is asked for), one at t_low (asthana) and one JVP
over the [uncond; cond] pair (jeon). A per-prompt z has no shared pass: wen981
costs an unconditional and a conditional forward per prompt and generation.

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
SHARED, PER_PROMPT = "shared", "per_prompt"
PROTOCOLS = ("authors", SHARED)  # --detector_protocol
# The authors' released code: (noise, generations per prompt) of each detector.
AUTHORS = {"wen981": (PER_PROMPT, 4), "jeon": (SHARED, 1), "asthana": (SHARED, 1),
           "ren_le": (PER_PROMPT, 1)}


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


def noise_plan(names: Sequence[str], protocol: str, n_shared: int,
               generations: int = 0) -> Dict[str, Tuple[str, int]]:
  """detector -> (noise, generations): AUTHORS under "authors", else (SHARED,
  n_shared); `generations` > 0 replaces every count. ConfigError when a detector
  on shared noise needs more generations than the n_shared start noises."""
  if protocol not in PROTOCOLS:
    raise ConfigError(f"unknown detector protocol '{protocol}' (use {', '.join(PROTOCOLS)})")
  plan = {}
  for name in check_names(names):
    kind, count = AUTHORS[name] if protocol == "authors" else (SHARED, n_shared)
    plan[name] = (kind, int(generations) or count)
    if kind == SHARED and plan[name][1] > n_shared:
      raise ConfigError(f"{name} on shared noise needs {plan[name][1]} generations, but "
                        f"there are {n_shared} start noises (seeds)")
  return plan


def plan_noise(plan: Dict[str, Tuple[str, int]], kind: str) -> int:
  """The number of start noises of `kind` the plan needs (0: none)."""
  return max([g for k, g in plan.values() if k == kind], default=0)


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


def _plan(names: Sequence[str], plan, n_noise: int) -> Dict[str, Tuple[str, int]]:
  """The plan given, or every detector on all n_noise shared noises."""
  return dict(plan) if plan else {n: (SHARED, n_noise) for n in check_names(names)}


def make_shared_fn(text: Callable, unet: Callable, protocol: Protocol,
                   names: Sequence[str], plan: Optional[Dict] = None) -> Callable:
  """Returns f(text_params, unet_params, empty_ids [1, 77], noise [S, h, w, c]) ->
  the unconditional inputs of the detectors `names` (noise per `noise_plan`; None:
  all shared, every seed), for the first G shared noises G = plan_noise(SHARED):
    u_first [G, h, w, c] float32 raw output at (z, t_first) (wen981, jeon, asthana),
    u_low   [G, h, w, c] float32 raw output at (z, t_low) (asthana),
    ctx_u   [77, D] the empty prompt's context, in the model's dtype (jeon, and
            wen981 on per-prompt noise).
  (ren_le alone needs none: an empty dict.)
  """
  names = check_names(names)

  def shared(text_params, unet_params, empty_ids, noise):
    p = _plan(names, plan, noise.shape[0])
    on_shared = {n for n, (kind, _) in p.items() if kind == SHARED} - {"ren_le"}
    out = {}
    if not on_shared and p.get("wen981", (SHARED,))[0] == SHARED:
      return out
    ctx = text(text_params, empty_ids)
    if on_shared:
      x = noise[:plan_noise(p, SHARED)].astype(ctx.dtype)
      ctx_s = jnp.broadcast_to(ctx, (x.shape[0],) + ctx.shape[1:])
      out["u_first"] = _raw(unet, unet_params, x, protocol.t_first, ctx_s)
      if "asthana" in on_shared:
        out["u_low"] = _raw(unet, unet_params, x, protocol.t_low, ctx_s)
    if "jeon" in on_shared or "wen981" in set(p) - on_shared:
      out["ctx_u"] = ctx[0]
    return out

  return shared


def make_detectors_fn(unet: Callable, unet_f32: Optional[Callable],
                      unet_capture: Optional[Callable], schedule: Schedule,
                      protocol: Protocol, names: Sequence[str],
                      jvp_precision: Optional[str] = "highest",
                      ren_layer: str = REN_LAYER, plan: Optional[Dict] = None) -> Callable:
  """Returns detect(unet_params, ctx [B, 77, D], noise [S, h, w, c], shared,
  prompt_noise=None) -> {column: [B, G] float32} for the columns of the detectors
  `names` (`columns`), G each detector's generations (`noise_plan`; plan None: all
  on the shared noise, G = S).

  Args:
    unet: (params, x, t [B], ctx) -> raw output (`StableDiffusion.unet_out`).
    unet_f32: the same of a float32 clone of the module (jeon only).
    unet_capture: (params, x, t, ctx) -> (raw output, {ren_layer: {"query_mean":
      [B, heads, 77]}}) of a clone capturing ren_layer (ren_le only; `bind_unet`).
    ren_layer: the Flax path of Ren's transformer (REN_LAYER, SD's; a model without
      it, such as a tiny one, names another).
    plan: `noise_plan`'s detector -> (noise, generations).
  The function's arguments:
    shared: what `make_shared_fn` returned for the same noise and plan.
    prompt_noise: [B, G_p, h, w, c] each prompt's own start noises, G_p =
      plan_noise(plan, PER_PROMPT) (`noise.per_prompt_noise`); None without
      per-prompt detectors.
  """
  names = check_names(names)
  k = constants(schedule, protocol)
  f32 = jnp.float32
  if "jeon" in names and unet_f32 is None:
    raise ValueError("jeon needs unet_f32, the UNet of a float32 clone of the module")
  if "ren_le" in names and unet_capture is None:
    raise ValueError(f"ren_le needs unet_capture, a UNet capturing {ren_layer}")

  def one_generation(params, ctx, x, u_first, u_low, ctx_u, some) -> Dict[str, jax.Array]:
    """The detectors `some` at x [B, h, w, c]; u_first, u_low [B or 1, h, w, c]."""
    t_first = jnp.full((x.shape[0],), protocol.t_first, jnp.int32)
    res = {}
    if "ren_le" in some:
      out, captured = unet_capture(params, x, t_first, ctx)
      res["ren_le"] = ren_entropy(captured[ren_layer]["query_mean"])
    else:
      out = unet(params, x, t_first, ctx)
    if set(some) == {"ren_le"}:
      return res
    if u_first is None:  # per-prompt noise: the unconditional pass of each prompt's z
      u_first = unet(params, x, t_first, jnp.broadcast_to(ctx_u, ctx.shape)).astype(f32)
    d = out.astype(f32) - u_first
    norm = _norm(d)
    if "wen981" in some:
      res["wen981"] = norm
    if "asthana" in some:
      cos = jnp.mean(cosine_similarity(u_low, _raw(unet, params, x, protocol.t_low, ctx)
                                       - u_low), axis=(1, 2))
      n = k["asthana_norm"] * norm
      res.update(asthana=k["g1"] * n + k["g2"] * cos, asthana_norm=n, asthana_cos=cos)
    if "jeon" in some:
      res["jeon"] = k["jeon"] * _norm(jvp_difference(
          unet_f32, params, x[0], ctx_u, ctx, d, protocol.t_first, jvp_precision))
    return res

  def detect(unet_params, ctx, noise, shared, prompt_noise=None):
    # One generation at a time in a loop on the device (lax.map): the UNet, its
    # capture and the JVP compile once whatever the number of generations.
    p = _plan(names, plan, noise.shape[0])
    res = {}
    on_shared = tuple(n for n in names if p[n][0] == SHARED)
    if on_shared:
      g = plan_noise(p, SHARED)
      zeros = jnp.zeros((g,), f32)
      res.update(jax.lax.map(
          lambda a: one_generation(
              unet_params, ctx, jnp.broadcast_to(a[0].astype(ctx.dtype), (ctx.shape[0],)
                                                 + a[0].shape),
              a[1][None], a[2][None], shared.get("ctx_u"), on_shared),
          (noise[:g], shared.get("u_first", zeros), shared.get("u_low", zeros))))
    on_prompt = tuple(n for n in names if p[n][0] == PER_PROMPT)
    if on_prompt:
      if prompt_noise is None:
        raise ValueError(f"{', '.join(on_prompt)} on per-prompt noise need prompt_noise")
      res.update(jax.lax.map(
          lambda x: one_generation(unet_params, ctx, x.astype(ctx.dtype), None, None,
                                   shared.get("ctx_u"), on_prompt),
          jnp.moveaxis(prompt_noise, 1, 0)))
    # [G, B] -> [B, G], each column its own detector's generations.
    return {c: res[c][:p[n][1]].T.astype(f32) for n in names for c in COLUMNS[n]}

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
