"""The blackbox score: edge consistency over N samples of one prompt.

ALGORITHMS.md section 3. Per prompt, on N >= 2 RGB images:

  img   = PIL resize to 256 x 256 (Lanczos), float32 / 255     # [256, 256, 3]
  gx    = scipy.ndimage.sobel(img, axis=0); gy = ...(axis=1)   # mode "reflect"
  edge  = sum_c hypot(gx, gy) > 1.5                            # [256, 256] bool
  score = mean(mean_n edge_n > 0.5)                            # consistent edges

scipy's sobel smooths with [1, 2, 1] along EVERY axis but the derivative's one,
the colour axis included: channel 0 <- 3 c0 + c1, 1 <- c0 + 2 c1 + c2,
2 <- c1 + 3 c2. Both versions here copy that.

- `edge_score_numpy` is the reference: scipy itself, bit for bit what the
  reference code computes. The blackbox stage uses it (the Lanczos resize runs on
  the host through PIL anyway, and scipy costs ~1 ms an image).
- `edge_scores_jax` is pure and jittable, for images already on a device. It
  reproduces scipy's arithmetic in float32: scipy accumulates each 1-D pass in
  float64 and stores float32, and glibc's hypotf rounds a float64 sqrt, so the
  sums are computed with error-free transformations (TwoSum, Dekker products)
  and rounded once. On CPU every Sobel value and magnitude equals scipy's bit
  for bit in the tests (a plain float32 version matches only about half of the
  magnitudes, and a magnitude an ulp off can flip a pixel at the threshold). A
  compiler that contracts a*b + c into an FMA could change the last bit of the
  error terms on other backends; the result is then still within an ulp.
"""
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

EDGE_SIZE = 256  # ALGORITHMS.md section 3: images are scored at 256 x 256.
EDGE_THRESHOLD = 1.5
CONSISTENCY = 0.5


# ---- reference (numpy / scipy / PIL) -------------------------------------------------

def resize_for_edges(image, size: int = EDGE_SIZE) -> np.ndarray:
  """A PIL RGB image or uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 1].

  PIL Lanczos on the 8-bit image, as the reference does; no crop (the aspect
  ratio is not kept).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    image = Image.fromarray(image, "RGB")
  if image.mode != "RGB":
    raise ValueError(f"expected an RGB image, got mode {image.mode}")
  resized = image.resize((size, size), Image.LANCZOS)
  return np.asarray(resized, dtype=np.float32) / 255


def edge_map_numpy(image: np.ndarray, threshold: float = EDGE_THRESHOLD) -> np.ndarray:
  """float32 [H, W, 3] in [0, 1] -> bool [H, W], scipy's Sobel exactly."""
  image = np.asarray(image, np.float32)
  gx = scipy.ndimage.sobel(image, axis=0)
  gy = scipy.ndimage.sobel(image, axis=1)
  return np.hypot(gx, gy).sum(axis=-1) > threshold


def edge_score_numpy(images: Union[np.ndarray, Sequence[np.ndarray]],
                     threshold: float = EDGE_THRESHOLD,
                     consistency: float = CONSISTENCY) -> float:
  """Fraction of consistent-edge pixels of N >= 2 float32 [H, W, 3] images in [0, 1]."""
  if len(images) < 2:
    raise ValueError(f"the edge score needs at least 2 images, got {len(images)}")
  edges = np.stack([edge_map_numpy(im, threshold) for im in images]).astype(np.float32)
  return float(np.mean(edges.mean(axis=0) > consistency))


# ---- jittable float32 version --------------------------------------------------------

def _two_sum(a, b):
  """s = fl(a + b) and the exact error e, a + b = s + e (Knuth)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _split(a):
  """Dekker: a = hi + lo with 12-bit halves, so hi*hi etc. are exact in float32."""
  c = 4097.0 * a
  hi = c - (c - a)
  return hi, a - hi


def _square(a):
  """p = fl(a * a) and its exact error."""
  p = a * a
  hi, lo = _split(a)
  return p, ((hi * hi - p) + 2.0 * hi * lo) + lo * lo


def _shift(x, axis: int, offset: int):
  """x[i + offset] along axis, with scipy's "reflect" border (edge sample repeated)."""
  n = x.shape[axis]
  idx = np.clip(np.arange(n) + offset, 0, n - 1)
  return jnp.take(x, jnp.asarray(idx), axis=axis)


def _smooth(x, axis: int):
  """[1, 2, 1] along axis, rounded once like scipy's float64 accumulator."""
  s, e = _two_sum(_shift(x, axis, -1), _shift(x, axis, 1))
  u, e2 = _two_sum(2.0 * x, s)
  return u + (e + e2)


def _sobel(x, axis: int):
  """scipy.ndimage.sobel(x, axis) on [..., H, W, C] float32 (leading axes batch)."""
  nd = x.ndim
  axis = axis % nd
  # x[i+1] - x[i-1] of two float32 is rounded once in float32 as in float64.
  out = _shift(x, axis, 1) - _shift(x, axis, -1)
  for other in range(nd - 3, nd):  # the image axes only, in scipy's order
    if other != axis:
      out = _smooth(out, other)
  return out


def _hypot(a, b):
  """float32 hypot rounded from an (almost) exact sqrt, like glibc's hypotf."""
  pa, ea = _square(a)
  pb, eb = _square(b)
  hi, e = _two_sum(pa, pb)
  lo = e + (ea + eb)
  r = jnp.sqrt(hi)
  # One Newton step on the double-float hi + lo: r + (hi + lo - r^2) / (2 r).
  rr, err = _square(r)
  resid = ((hi - rr) - err) + lo
  return jnp.where(r > 0, r + resid / (2.0 * jnp.where(r > 0, r, 1.0)), 0.0)


def edge_maps_jax(images: jax.Array, threshold: float = EDGE_THRESHOLD) -> jax.Array:
  """float32 [..., H, W, 3] in [0, 1] -> bool [..., H, W] (`edge_map_numpy`)."""
  images = images.astype(jnp.float32)
  h, w = images.ndim - 3, images.ndim - 2
  mag = _hypot(_sobel(images, h), _sobel(images, w))
  # numpy sums the 3 channels left to right in float32.
  return (mag[..., 0] + mag[..., 1]) + mag[..., 2] > threshold


def edge_scores_jax(images: jax.Array, threshold: float = EDGE_THRESHOLD,
                    consistency: float = CONSISTENCY) -> jax.Array:
  """Edge consistency of a batch: float32 [B, N, H, W, 3] in [0, 1] -> float32 [B].

  Pure and jittable; equal to `edge_score_numpy` per prompt.
  """
  edges = edge_maps_jax(images, threshold).astype(jnp.float32)  # [B, N, H, W]
  consistent = jnp.mean(edges, axis=1) > consistency
  return jnp.mean(consistent.astype(jnp.float32), axis=(1, 2))
