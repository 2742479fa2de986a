"""Multi-step samplers with classifier-free guidance: DDIM and k-diffusion Heun.

docs/method.md section 4 (regeneration for ground truth). The whole sampling loop
runs inside ONE jitted function: a `lax.scan` over the UNet evaluations whose
body calls the UNet once (on the CFG pair [uncond; cond] stacked in one batch),
so a (steps, batch) pair compiles once and the UNet is traced once, whatever
the number of steps. Per-evaluation constants (timesteps, scalings) are
precomputed on the host in float64 by the `plan_*` functions and scanned over.

- DDIM (eta = 0) reproduces diffusers' `DDIMScheduler` as
  `StableDiffusionPipeline` runs it: the timestep spacing ("leading",
  "trailing", "linspace"), `steps_offset`, `set_alpha_to_one`, `clip_sample` and
  the DDIMScheduler defaults for keys the scheduler config does not set
  (a PNDM config read by `DDIMScheduler.from_config`). x_T = z (init sigma 1).
- Heun is k-diffusion's `sample_heun` (s_churn = 0) through `CompVisDenoiser` /
  `CompVisVDenoiser`, as the reference's `StableDiffusionKDiffusionPipeline`
  runs it: sigmas from diffusers' `LMSDiscreteScheduler` (sigma interpolated
  LINEARLY at t = linspace(T-1, 0, n), then 0; `sigma_interpolation="log"`
  gives k-diffusion's own `get_sigmas(n)` instead), x_T = sigmas[0] * z, the
  UNet fed the continuous t = sigma_to_t(sigma) (k-diffusion's default
  `quantize=False`; `quantize=True` rounds to the nearest discrete t), and the
  last step (to sigma 0) is an Euler step. With "log" sigmas its one-step case
  is the one-step sample of docs/method.md section 2 (LMS's one-step list starts
  at sigma(0) instead).

Images come out of the VAE as `clip(x / 2 + 0.5, 0, 1)`, float32 [0, 1].
Everything here is pure: no flags, no I/O.
"""
import dataclasses
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from memjax.method import onestep
from memjax.runtime.errors import ConfigError
from memjax.method.schedule import Schedule

SAMPLERS = ("heun", "ddim")
# DDIMScheduler.__init__ defaults (diffusers 0.42.1), for keys a config omits.
_DDIM_DEFAULTS = {"clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
                  "clip_sample_range": 1.0, "timestep_spacing": "leading",
                  "thresholding": False, "rescale_betas_zero_snr": False}


@dataclasses.dataclass(frozen=True)
class SamplerPlan:
  """The host-side constants of one sampler at one number of steps.

  Attributes:
    name: "ddim" or "heun".
    steps: sampler steps (Heun: 2 * steps - 1 UNet evaluations).
    table: per UNet evaluation, [E] float32 arrays scanned over by the loop.
    init_scale: x_T = init_scale * z.
    clip_sample: DDIM's x0 clamp range, or None.
    info: JSON-able description for manifests (timesteps or sigmas).
  """
  name: str
  steps: int
  table: Dict[str, np.ndarray]
  init_scale: float
  clip_sample: Optional[float] = None
  info: Optional[dict] = None

  @property
  def evaluations(self) -> int:
    return len(next(iter(self.table.values())))


def _check_steps(steps: int, num_train: int) -> None:
  if not 1 <= steps <= num_train:
    raise ConfigError(f"--steps={steps}: must be between 1 and num_train_timesteps={num_train}")


def ddim_timesteps(config: dict, steps: int, source: str = "scheduler_config") -> np.ndarray:
  """[steps] int64 timesteps, descending, as `DDIMScheduler.set_timesteps` makes them."""
  cfg = dict(_DDIM_DEFAULTS, **{k: v for k, v in config.items() if v is not None})
  n_train = int(cfg.get("num_train_timesteps", 1000))
  _check_steps(steps, n_train)
  spacing = cfg["timestep_spacing"]
  if spacing == "linspace":
    t = np.linspace(0, n_train - 1, steps).round()[::-1].astype(np.int64)
  elif spacing == "leading":
    ratio = n_train // steps
    t = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + int(cfg["steps_offset"])
  elif spacing == "trailing":
    ratio = n_train / steps
    t = np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1
  else:
    raise ConfigError(f"{source}: timestep_spacing = {spacing!r} is not supported "
                      "(leading, trailing, linspace)")
  if t.max() >= n_train or t.min() < 0:  # e.g. "leading" with steps_offset at steps = T
    raise ConfigError(f"--steps={steps}: with {source}'s timestep_spacing = {spacing!r} and "
                      f"steps_offset = {cfg['steps_offset']}, DDIM would start at timestep "
                      f"{int(t.max())}, outside [0, {n_train - 1}]; use fewer steps")
  return t


def plan_ddim(schedule: Schedule, scheduler_config: dict, steps: int,
              source: str = "scheduler/scheduler_config.json") -> SamplerPlan:
  """DDIM (eta = 0) constants for `steps` steps.

  Per evaluation, with a = abar[t], a' = abar[t - T // steps] (or the final
  alpha: 1 with set_alpha_to_one, else abar[0]) and m the guided model output:
  x0 = cx x + cm m, eps = ex x + em m, x <- sqrt(a') clip(x0) + sqrt(1 - a') eps.
  """
  cfg = dict(_DDIM_DEFAULTS, **{k: v for k, v in scheduler_config.items() if v is not None})
  for key in ("thresholding", "rescale_betas_zero_snr"):
    if cfg[key]:
      raise ConfigError(f"{source}: {key} = true is not supported by memjax's DDIM")
  abar = schedule.alphas_cumprod
  n_train = len(abar)
  t = ddim_timesteps(scheduler_config, steps, source)
  prev = t - n_train // steps  # diffusers' step(): whatever the spacing
  final = 1.0 if cfg["set_alpha_to_one"] else abar[0]
  a = abar[t]
  a_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], final)
  sa, s1a = np.sqrt(a), np.sqrt(1.0 - a)
  if schedule.prediction_type == "epsilon":
    cx, cm, ex, em = 1.0 / sa, -s1a / sa, np.zeros_like(a), np.ones_like(a)
  else:  # v: x0 = sqrt(a) x - sqrt(1-a) v, eps = sqrt(a) v + sqrt(1-a) x
    cx, cm, ex, em = sa, -s1a, s1a, sa
  table = {"t": t, "c_in": np.ones_like(a), "cx": cx, "cm": cm, "ex": ex, "em": em,
           "sa_prev": np.sqrt(a_prev), "s1a_prev": np.sqrt(1.0 - a_prev)}
  clip = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
  return SamplerPlan("ddim", steps, {k: np.asarray(v, np.float32) for k, v in table.items()},
                     1.0, clip, {"timesteps": t.tolist(), "eta": 0.0, "clip_sample": clip})


def heun_sigmas(schedule: Schedule, steps: int, interpolation: str = "linear") -> np.ndarray:
  """[steps + 1] float64 sigmas, descending, ending with 0.

  "linear": diffusers `LMSDiscreteScheduler.set_timesteps` (timestep_spacing
  "linspace"), the list the reference fed to `sample_heun`: np.interp of sigma
  at t = linspace(0, T-1, n, float32) reversed (for n = 1 that is t = 0, the
  smallest sigma). "log": k-diffusion's `DiscreteSchedule.get_sigmas(n)`,
  log-sigma interpolated at t = linspace(T-1, 0, n) (n = 1: t = T-1).
  """
  n_train = schedule.num_train_timesteps
  _check_steps(steps, n_train)
  sig = schedule.sigmas
  if interpolation == "linear":
    t = np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
    out = np.interp(t, np.arange(n_train), sig)
  elif interpolation == "log":
    t = np.linspace(n_train - 1, 0, steps, dtype=np.float32).astype(np.float64)
    lo, hi = np.floor(t).astype(int), np.ceil(t).astype(int)
    w = t - lo
    out = np.exp((1 - w) * np.log(sig[lo]) + w * np.log(sig[hi]))
  else:
    raise ConfigError(f"sigma interpolation {interpolation!r}: use 'linear' or 'log'")
  return np.concatenate([out, [0.0]])


def sigma_to_t(schedule: Schedule, sigma: np.ndarray, quantize: bool = False) -> np.ndarray:
  """k-diffusion `DiscreteSchedule.sigma_to_t`: the (fractional) timestep of sigma."""
  log_sigmas = np.log(schedule.sigmas)
  log_sigma = np.log(np.asarray(sigma, np.float64))
  dists = log_sigma[None] - log_sigmas[:, None]  # [T, N]
  if quantize:
    return np.abs(dists).argmin(axis=0).astype(np.float64)
  low = np.minimum(np.cumsum(dists >= 0, axis=0).argmax(axis=0), len(log_sigmas) - 2)
  w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
  return (1 - w) * low + w * (low + 1)


def plan_heun(schedule: Schedule, steps: int, interpolation: str = "linear",
              quantize: bool = False) -> SamplerPlan:
  """k-diffusion `sample_heun` constants: 2 * steps - 1 evaluations.

  Evaluation k is the first (Euler predictor) or `second` (corrector) stage of
  step i. The denoiser D(x, s) = c_skip x + c_out m(c_in x, sigma_to_t(s)) with
  c_in = 1 / sqrt(s^2 + 1); eps models c_skip = 1, c_out = -s; v models
  c_skip = 1 / (s^2 + 1), c_out = -s / sqrt(s^2 + 1).
  """
  sig = heun_sigmas(schedule, steps, interpolation)
  rows = []
  for i in range(steps):
    dt = sig[i + 1] - sig[i]
    rows.append((sig[i], dt, 0.0))
    if sig[i + 1] > 0:  # the step to sigma 0 is Euler: no corrector
      rows.append((sig[i + 1], dt, 1.0))
  s, dt, second = (np.array(c) for c in zip(*rows))
  if schedule.prediction_type == "epsilon":
    c_skip, c_out = np.ones_like(s), -s
  else:
    c_skip, c_out = 1.0 / (s ** 2 + 1), -s / np.sqrt(s ** 2 + 1)
  table = {"t": sigma_to_t(schedule, s, quantize), "c_in": 1.0 / np.sqrt(s ** 2 + 1),
           "c_skip": c_skip, "c_out": c_out, "sigma": s, "dt": dt, "second": second}
  return SamplerPlan("heun", steps, {k: np.asarray(v, np.float32) for k, v in table.items()},
                     float(sig[0]), None, {"sigmas": sig.tolist(), "interpolation": interpolation,
                                           "quantize": quantize})


def make_plan(sampler: str, schedule: Schedule, scheduler_config: dict, steps: int,
              **kw) -> SamplerPlan:
  if sampler == "ddim":
    return plan_ddim(schedule, scheduler_config, steps)
  if sampler == "heun":
    return plan_heun(schedule, steps, **kw)
  raise ConfigError(f"--sampler={sampler!r}: use one of {', '.join(SAMPLERS)}")


def _ddim_update(plan: SamplerPlan):
  def update(carry, row, m):
    x = carry[0]
    x0 = row["cx"] * x + row["cm"] * m
    eps = row["ex"] * x + row["em"] * m
    if plan.clip_sample is not None:
      x0 = jnp.clip(x0, -plan.clip_sample, plan.clip_sample)
    return (row["sa_prev"] * x0 + row["s1a_prev"] * eps,) + carry[1:]
  return update


def _heun_update(carry, row, m):
  """carry = (x, x_base, d_first): x is where the UNet was just evaluated."""
  x, x_base, d_first = carry
  denoised = row["c_skip"] * x + row["c_out"] * m
  d = (x - denoised) / row["sigma"]  # k-diffusion to_d
  second = row["second"] > 0
  x_new = jnp.where(second, x_base + 0.5 * (d_first + d) * row["dt"], x + d * row["dt"])
  return (x_new, jnp.where(second, x_base, x), jnp.where(second, d_first, d))


def make_sample_fn(text: Callable, unet: Callable, vae_decode: Callable,
                   plan: SamplerPlan, guidance_scale: float,
                   vae_scaling_factor: float, keep_diffs: bool = False) -> Callable:
  """Returns sample(params, input_ids, empty_ids, noise) -> dict (jit it once).

  Args (of the returned function):
    params: {"text_encoder", "unet", "vae"} Flax param trees.
    input_ids: [B, 77] int32 prompt tokens.
    empty_ids: [77] int32 tokens of the empty (unconditional) prompt.
    noise: [S, h, w, c] float32 start noise z, one per seed, shared by prompts.
  Returns:
    {"images": [B, S, H, W, 3] float32 in [0, 1], "latents": [B, S, h, w, c]}.

  `text(p, ids)`, `unet(p, x, t, ctx)` and `vae_decode(p, z)` take raw param
  trees (`StableDiffusion.text_embed`, `.unet_out`, `.vae_decode`).

  At guidance_scale 1 (and without keep_diffs) each step evaluates the
  conditional prediction alone: half the UNet work, and what diffusers computes.

  keep_diffs (for the trajectory detectors, `memjax.method.trajectory_detectors`):
  the output also has "diffs" [B, S, E, h, w, c] float32, every evaluation's raw
  m_c - m_u (E = plan.evaluations), "x_last" [B * S, h, w, c] the UNet input of
  the last evaluation (model dtype) and "cond" [B * S, 77, D] the prompts'
  contexts, row b * S + s. Without it the loop is the one it always was.
  """
  update = _ddim_update(plan) if plan.name == "ddim" else _heun_update
  xs = {k: jnp.asarray(v) for k, v in plan.table.items()}
  w = float(guidance_scale)

  def sample(params, input_ids, empty_ids, noise):
    b, s = input_ids.shape[0], noise.shape[0]
    cond = text(params["text_encoder"], input_ids)  # [B, 77, D]
    uncond = text(params["text_encoder"], empty_ids[None])  # [1, 77, D]
    n = b * s
    cond = jnp.repeat(cond, s, axis=0)  # [N, 77, D], row b * S + s
    # CFG pairs interleaved (row 2i uncond, 2i + 1 cond) rather than concatenated,
    # so that a batch sharded over devices keeps each pair on its device.
    ctx = jnp.stack([jnp.broadcast_to(uncond, cond.shape), cond], 1).reshape(
        (2 * n,) + cond.shape[1:])
    lat = noise.shape[1:]
    z = jnp.broadcast_to(noise[None].astype(jnp.float32), (b, s) + lat).reshape((n,) + lat)
    x = plan.init_scale * z

    def evaluate_cond(carry, row):  # w = 1: the conditional prediction alone
      x_one = (row["c_in"] * carry[0]).astype(cond.dtype)
      t = jnp.full((n,), row["t"], jnp.float32)
      m_c = unet(params["unet"], x_one, t, cond).astype(jnp.float32)
      return update(carry, row, m_c), None, x_one

    def evaluate_cfg(carry, row):
      x_one = (row["c_in"] * carry[0]).astype(ctx.dtype)
      x_in = jnp.broadcast_to(x_one[:, None], (n, 2) + lat).reshape((2 * n,) + lat)
      t = jnp.full((2 * n,), row["t"], jnp.float32)
      out = unet(params["unet"], x_in, t, ctx).astype(jnp.float32).reshape((n, 2) + lat)
      m_u, m_c = out[:, 0], out[:, 1]
      return update(carry, row, m_u + w * (m_c - m_u)), m_c - m_u, x_one

    evaluate = evaluate_cond if w == 1.0 and not keep_diffs else evaluate_cfg

    def body(carry, row):
      return evaluate(carry, row)[0], None

    def body_kept(carry, row):  # carry = (sampler carry, last UNet input)
      new, diff, x_one = evaluate(carry[0], row)
      return (new, x_one), diff

    init = (x, x, jnp.zeros_like(x))
    if keep_diffs:
      (carry, x_last), diffs = jax.lax.scan(body_kept, (init, x.astype(ctx.dtype)), xs)
    else:
      carry, _ = jax.lax.scan(body, init, xs)
    latents = carry[0]
    img = onestep.decode_images(vae_decode, params["vae"], latents, vae_scaling_factor, ctx.dtype)
    res = {"images": img.reshape((b, s) + img.shape[1:]),
           "latents": latents.reshape((b, s) + lat)}
    if keep_diffs:  # diffs [E, N, ...] -> [B, S, E, ...]
      res.update(diffs=jnp.moveaxis(diffs, 0, 1).reshape((b, s, diffs.shape[0]) + lat),
                 x_last=x_last, cond=cond)
    return res

  return sample


def sample_fn_for_model(sd, plan: SamplerPlan, guidance_scale: float,
                        unet: Optional[Callable] = None, keep_diffs: bool = False) -> Callable:
  """`make_sample_fn` bound to a `loading.StableDiffusion`.

  unet: optional replacement of `sd.unet_out` (tests count its traces).
  """
  return make_sample_fn(sd.text_embed, unet or sd.unet_out, sd.vae_decode, plan,
                        guidance_scale, sd.vae_scaling_factor, keep_diffs)
