"""The blackbox score: edge consistency over N samples of one prompt.

docs/method.md section 3. Per prompt, on N >= 2 RGB images:

  img   = PIL resize to 256 x 256 (Lanczos), float32 / 255     # `images.to_unit`
  gx    = scipy.ndimage.sobel(img, axis=0); gy = ...(axis=1)   # mode "reflect"
  edge  = sum_c hypot(gx, gy) > 1.5                            # [256, 256] bool
  score = mean(mean_n edge_n > 0.5)                            # consistent edges

scipy's sobel smooths with [1, 2, 1] along EVERY axis but the derivative's one,
the colour axis included: channel 0 <- 3 c0 + c1, 1 <- c0 + 2 c1 + c2,
2 <- c1 + 3 c2. This is scipy itself, so it is bit for bit what the reference
computes. The Lanczos resize runs on the host through PIL anyway (a device
version would have to reproduce PIL's filter), and scipy costs about 1 ms an
image, so the blackbox stage scores on the host, in a thread pool.
"""
from typing import Sequence, Union

import numpy as np
import scipy.ndimage

EDGE_SIZE = 256  # docs/method.md section 3: images are scored at 256 x 256.
EDGE_THRESHOLD = 1.5
CONSISTENCY = 0.5


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
