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
