"""Multi-step memorization detectors read along a DDIM CFG trajectory.

Both are computed in the generate stage's own jitted sampling loop
(`sampling.make_sample_fn(..., keep_diffs=True)`), from x_T = z (DDIM's init sigma
is 1) with guidance w, in ONE pass: the loop keeps every evaluation's raw
d_s = m_c - m_u (eps, or v for v-prediction models, float32, whole latent of one
image), and Bright Ending's mask is read by one extra conditional-only UNet call
at the last step's input (its output unused, so the images are the ones the
sampler makes without detectors).

  wen_steps      (1 / n) sum_{s < n} ||d_s||_2                     (Wen et al.)
                 n = the `wen_steps` first DDIM steps
  bright_ending  (1 / T) sum_{s < T} ||m * d_s||_2 / mean(m)        (Chen et al.)
                 T = every DDIM step; m [h, w] broadcast over the channels

m is the cross-attention probability of the EOS token (index = the prompt's
token count with BOS and EOS, minus 1, at most 76) at the last step (t =
timesteps[-1], 1 for SD's 50 steps), conditional pass, heads averaged, then the
layers averaged: every transformer of down_blocks[0] (SD1: attentions 0 and 1,
the 64 x 64 ones at 512 px). The authors run BE twice (mask, then norms); here
the d_s are kept until the mask exists: steps x h x w x c float32 per image,
50 x 64 x 64 x 4 x 4 bytes = 3.3 MB at SD size (105 MB for a batch of 8 prompts x
4 seeds), plus one conditional UNet call per image (100 -> 101 evaluations).

Everything here is pure: no flags, no I/O; the caller binds and jits it.
"""
from typing import Callable, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp

from memjax.method import detectors
from memjax.runtime.errors import InputError

TRAJECTORY = ("wen_steps", "bright_ending")  # selectable detectors (= their columns)
MAX_TOKENS = 77


def check_names(names: Sequence[str]) -> Tuple[str, ...]:
  """The detectors of `names` ("all": every one) in TRAJECTORY's order; InputError
  for an unknown one."""
  names = list(names)
  if "all" in names:
    names = [n for n in names if n != "all"] + list(TRAJECTORY)
  unknown = [n for n in names if n not in TRAJECTORY]
  if unknown:
    raise InputError(f"--detectors: unknown {', '.join(unknown)} (use "
                     f"{', '.join(TRAJECTORY)} or all)")
  return tuple(n for n in TRAJECTORY if n in names)


def be_paths(transformer_paths: Sequence[str]) -> Tuple[str, ...]:
  """Bright Ending's layers: every transformer of down_blocks[0] (Flax paths)."""
  paths = tuple(p for p in transformer_paths if p.startswith("down_blocks_0/"))
  if not paths:
    raise InputError("bright_ending: the model's down_blocks[0] has no cross-attention "
                     f"(it has {', '.join(transformer_paths)})")
  return paths


def eos_index(n_tokens):
  """The EOS token's index: min(len(tokenizer.encode(prompt)), 77) - 1, where
  n_tokens counts the caption's tokens without BOS and EOS (before truncation)."""
  return jnp.minimum(jnp.asarray(n_tokens) + 2, MAX_TOKENS) - 1


def norms(x: jax.Array, lead: int) -> jax.Array:
  """L2 norm over every axis after the first `lead` ones, in float32."""
  x = x.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(lead, x.ndim))))


def wen_steps(diffs: jax.Array, n: int) -> jax.Array:
  """[..., E, h, w, c] per-step d_s -> [...] the mean of ||d_s|| over s < n."""
  lead = diffs.ndim - 3
  return jnp.mean(norms(diffs[..., :n, :, :, :], lead), axis=-1)


def be_mask(head_means: Sequence[jax.Array], eos: jax.Array, hw: Tuple[int, int]) -> jax.Array:
  """BE's mask [N, h, w] from each layer's head-averaged probabilities [N, h*w, 77]
  (layers averaged) at the EOS index eos [N]."""
  att = sum(a.astype(jnp.float32) for a in head_means) / len(head_means)  # [N, q, k]
  if att.shape[1] != hw[0] * hw[1]:
    raise InputError(f"bright_ending: its layers must run at the latent resolution {hw}; "
                     f"got {att.shape[1]} queries")
  m = jnp.take_along_axis(att, eos.astype(jnp.int32)[:, None, None], axis=2)[..., 0]
  return m.reshape((att.shape[0],) + tuple(hw))


def bright_ending_steps(diffs: jax.Array, mask: jax.Array) -> jax.Array:
  """diffs [N, E, h, w, c], mask [N, h, w] -> [N, E] ||m * d_s|| / mean(m)."""
  masked = diffs.astype(jnp.float32) * mask[:, None, :, :, None]
  return norms(masked, 2) / jnp.mean(mask, axis=(1, 2))[:, None]


def bind_capture(module, paths: Sequence[str]) -> Callable:
  """unet_capture(params, x, t, ctx) -> [head-mean probabilities [B, Lq, 77] of each
  path], a clone of the `UNet2DConditionModel` capturing the paths' attn2."""
  apply = detectors.capturing(module, [(p, "head_mean") for p in paths])

  def unet_capture(params, x, t, ctx):
    got = apply(params, x, t, ctx)[1]
    return [got[p]["head_mean"] for p in paths]

  return unet_capture


def make_trajectory_fn(sample: Callable, unet_capture: Callable, t_last: float,
                       names: Sequence[str], n_wen: int) -> Callable:
  """Returns f(params, input_ids [B, 77], eos [B], empty_ids [77], noise [S, h, w, c])
  -> the sampler's {"images", "latents"} and {name: [B, S] float32} per detector.

  Args:
    sample: `sampling.make_sample_fn(..., keep_diffs=True)` of a DDIM plan.
    unet_capture: `bind_capture`'s function (bright_ending only; else None).
    t_last: the plan's last timestep (where BE's mask is read).
    names: detectors of TRAJECTORY; n_wen: wen_steps' number of first steps.
  """
  names = check_names(names)

  def traj(params, input_ids, eos, empty_ids, noise):
    out = sample(params, input_ids, empty_ids, noise)
    diffs = out.pop("diffs")  # [B, S, E, h, w, c]
    x_last, cond = out.pop("x_last"), out.pop("cond")
    b, s = diffs.shape[:2]
    res: Dict[str, jax.Array] = dict(out)
    if "wen_steps" in names:
      res["wen_steps"] = wen_steps(diffs, n_wen)
    if "bright_ending" in names:
      t = jnp.full((x_last.shape[0],), t_last, jnp.float32)
      maps = unet_capture(params["unet"], x_last, t, cond)  # conditional pass only
      mask = be_mask(maps, jnp.repeat(eos, s), x_last.shape[1:3])  # [B * S, h, w]
      flat = diffs.reshape((b * s,) + diffs.shape[2:])
      res["bright_ending"] = jnp.mean(bright_ending_steps(flat, mask), axis=1).reshape(b, s)
    return res

  return traj
