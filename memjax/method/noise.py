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


def noise_for_seeds(seeds: Sequence[int], shape_chw: Tuple[int, int, int]) -> np.ndarray:
  """[S, H, W, C] float32 noise, one draw per seed."""
  out = [np.asarray(jax.random.normal(jax.random.PRNGKey(int(s)), shape_chw, np.float32))
         for s in seeds]
  return np.stack(out).transpose(0, 2, 3, 1)


def load_noise(path: str, shape_chw: Tuple[int, int, int]) -> np.ndarray:
  """Reads a .npy of [S, C, H, W] or [C, H, W]; returns [S, H, W, C] float32."""
  if not os.path.exists(path):
    raise InputError(f"--noise: {path} does not exist")
  try:
    z = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise InputError(f"--noise: {path} is not a readable .npy array: {e}") from None
  if z.ndim == 3:
    z = z[None]
  if z.ndim != 4 or tuple(z.shape[1:]) != tuple(shape_chw):
    raise InputError(f"--noise: {path} has shape {z.shape}; the model needs "
                     f"[n_seeds, {', '.join(map(str, shape_chw))}] or "
                     f"[{', '.join(map(str, shape_chw))}]")
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
  seeds = [int(s) for s in seeds]
  if len(set(seeds)) != len(seeds):
    raise InputError(f"--seeds has duplicates: {seeds}")
  return noise_for_seeds(seeds, shape_chw), f"jax.random:{seeds}", seeds
