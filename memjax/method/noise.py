"""The starting noise z of every one-step and multi-step sampler.

A seed means the same z in every stage (scan, blackbox, generate): z =
`jax.random.normal(PRNGKey(seed), [C, H, W], float32)`, moved to NHWC. The
reference draws z with torch's CUDA generator, which JAX cannot reproduce, so an
explicit noise array can be given instead (`--noise=FILE.npy`, [S, C, H, W] or
[C, H, W], PyTorch's layout) to feed two implementations the same z.
"""
import hashlib
import os
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from memjax.runtime.errors import InputError


# jax.random.PRNGKey takes a signed 64-bit seed (negative seeds are fine).
SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 63 - 1


def check_seed(seed, flag: str = "--seeds") -> int:
  """One seed as an int; InputError naming the flag unless it is a signed 64-bit
  integer (an int, or a string or float that is exactly one)."""
  try:
    if isinstance(seed, (bool, np.bool_)):
      raise ValueError
    if isinstance(seed, (float, np.floating)):
      if not float(seed).is_integer():
        raise ValueError
    value = int(seed)  # ints, numpy ints, "12"
  except (TypeError, ValueError, OverflowError):
    raise InputError(f"{flag}: seed {seed!r:.40} is not an integer") from None
  if not SEED_MIN <= value <= SEED_MAX:
    raise InputError(f"{flag}: seed {value} is outside the signed 64-bit range "
                     f"[{SEED_MIN}, {SEED_MAX}] that jax.random.PRNGKey takes")
  return value


def check_seeds(seeds: Sequence[int], flag: str = "--seeds") -> List[int]:
  """The seeds as ints; InputError naming the flag for a seed `check_seed` refuses,
  a repeated seed, or no seeds at all."""
  out = [check_seed(s, flag) for s in seeds]
  if not out:
    raise InputError(f"{flag}: no seeds given")
  if len(set(out)) != len(out):
    raise InputError(f"{flag} has duplicates: {out}")
  return out


def noise_for_seeds(seeds: Sequence[int], shape_chw: Tuple[int, int, int]) -> np.ndarray:
  """[S, H, W, C] float32 noise, one draw per seed (S >= 1)."""
  seeds = [check_seed(s) for s in seeds]
  if not seeds:
    raise InputError("--seeds: no seeds given")
  out = [np.asarray(jax.random.normal(jax.random.PRNGKey(s), shape_chw, np.float32))
         for s in seeds]
  return np.stack(out).transpose(0, 2, 3, 1)


def load_noise(path: str, shape_chw: Tuple[int, int, int]) -> np.ndarray:
  """Reads a .npy of [S, C, H, W] or [C, H, W]; returns [S, H, W, C] float32."""
  if not os.path.exists(path):
    raise InputError(f"--noise: {path} does not exist")
  try:
    z = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
    raise InputError(f"--noise: {path} is not a readable .npy array: "
                     f"{' '.join(str(e).split()) or type(e).__name__}") from None
  if not isinstance(z, np.ndarray):  # an .npz archive: np.load returns its index
    getattr(z, "close", lambda: None)()
    raise InputError(f"--noise: {path} is an .npz archive, not one .npy array")
  if z.dtype.kind != "f":  # integers would be cast silently; strings, complex, records fail
    raise InputError(f"--noise: {path} has dtype {z.dtype}; the noise must be a "
                     f"floating-point array (float16, float32 or float64)")
  if z.ndim == 3:
    z = z[None]
  if z.ndim != 4 or tuple(z.shape[1:]) != tuple(shape_chw):
    raise InputError(f"--noise: {path} has shape {z.shape}; the model needs "
                     f"[n_seeds, {', '.join(map(str, shape_chw))}] or "
                     f"[{', '.join(map(str, shape_chw))}]")
  if not len(z):
    raise InputError(f"--noise: {path} has shape {z.shape}: no noise rows (need at least "
                     f"one [{', '.join(map(str, shape_chw))}] draw)")
  if not np.all(np.isfinite(z)):
    raise InputError(f"--noise: {path} holds NaN or infinite values")
  return np.ascontiguousarray(z.astype(np.float32).transpose(0, 2, 3, 1))


def start_noise(path: Optional[str], seeds: Sequence[int],
                shape_chw: Tuple[int, int, int]) -> Tuple[np.ndarray, str, List[int]]:
  """The start noise of a stage: from --noise if given, else one draw per seed.

  Returns:
    z [S, H, W, C] float32; its identity for the run config (the file's sha256, or
    the seeds); the seed label of each row (the rows of a --noise file are 0..S-1).
  """
  if path:
    z = load_noise(path, shape_chw)
    with open(path, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    return z, f"file:{digest}", list(range(len(z)))
  seeds = check_seeds(seeds)
  return noise_for_seeds(seeds, shape_chw), f"jax.random:{seeds}", seeds


def prompt_words(prompt_ids: np.ndarray) -> np.ndarray:
  """[B] non-negative int64 prompt ids -> [B, 2] int32, their high and low 32 bits
  (a jitted batch carries them beside the token ids)."""
  ids = np.asarray(prompt_ids, np.int64).astype(np.uint64)
  return np.stack([ids >> np.uint64(32), ids & np.uint64(0xFFFFFFFF)],
                  axis=1).astype(np.uint32).view(np.int32)


def per_prompt_noise(seed: int, words, generations: int,
                     shape_chw: Tuple[int, int, int]) -> jax.Array:
  """Each prompt's own start noises (the authors' per-prompt seeds of Wen et al. and
  Ren et al.), jittable: [B, 2] `prompt_words` -> [B, G, H, W, C] float32, prompt i's
  G draws = `jax.random.normal(fold_in(fold_in(PRNGKey(seed), hi_i), lo_i), [G, C,
  H, W])` moved to NHWC, the same for a prompt id in any batch, shard or process."""
  base = jax.random.PRNGKey(check_seed(seed, "--detector_seed"))

  def one(w):
    w = jax.lax.bitcast_convert_type(w, jnp.uint32)
    key = jax.random.fold_in(jax.random.fold_in(base, w[0]), w[1])
    z = jax.random.normal(key, (generations,) + tuple(shape_chw), jnp.float32)
    return z.transpose(0, 2, 3, 1)

  return jax.vmap(one)(jnp.asarray(words))
