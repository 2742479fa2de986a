"""Template masks from near-duplicate training images (docs/method.md section 6).

Some memorized training images are templates: the same layout (a product
photo frame, a phone case mock-up, a poster border) repeated many times with a
varying part. The reference labels a generation "template verbatim" (TV) when
it matches such a template on its fixed part, but never released how it built
the masks; memjax builds them as the spec says:

- a template candidate is a pair (q, c) of images of one retrieved group (the
  k nearest training images of one prompt) with
  `SSE_LOW < sum((q - c)**2) < SSE_HIGH` over 256 x 256 x 3 values in [0, 1]:
  near-identical, but not identical (an identical pair says nothing about which
  part varies);
- `mask = sum over channels |q - c| < PIXEL_TOL`, eroded with a 3 x 3 square
  (drops isolated agreeing pixels), then dilated with a 6 x 6 square (closes
  the small holes JPEG noise leaves), scipy.ndimage binary morphology with
  border value 0;
- the template image is q; the mask is 1 where the template stays fixed.

The verify stage stores them with `memjax.data.templates`.
"""
import dataclasses
import itertools
from typing import List, Optional, Sequence

import numpy as np
import scipy.ndimage


SSE_LOW = 100.0
SSE_HIGH = 1000.0
PIXEL_TOL = 0.03
ERODE_SIZE = 3
DILATE_SIZE = 6


@dataclasses.dataclass
class Template:
  """A template image and its fixed-part mask.

  Attributes:
    image: [H, W, 3] float32 in [0, 1], the template q.
    mask: [H, W] bool, True where the template stays fixed.
    template_id: id of q (a training-set index or url), as given.
    partner_id: id of c, the near-duplicate the mask was measured against.
    sse: sum((q - c)**2) over all H * W * 3 values.
    group: the retrieved group (e.g. the prompt_id) the pair came from.
  """
  image: np.ndarray
  mask: np.ndarray
  template_id: object = None
  partner_id: object = None
  sse: float = float("nan")
  group: object = None

  @property
  def mask_fraction(self) -> float:
    """mean(M): the TV error divides by it (docs/method.md section 7, rule 1)."""
    return float(np.mean(self.mask))


def sse(a: np.ndarray, b: np.ndarray) -> float:
  """Sum of squared differences of two same-shape images, in float64."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
  return float(np.sum((a - b) ** 2))


def template_mask(q: np.ndarray, c: np.ndarray, pixel_tol: float = PIXEL_TOL,
                  erode_size: int = ERODE_SIZE,
                  dilate_size: int = DILATE_SIZE) -> np.ndarray:
  """The fixed-part mask of template q against its near-duplicate c.

  Args:
    q: [H, W, 3] float in [0, 1], the template.
    c: [H, W, 3] float in [0, 1], a near-duplicate of q.
    pixel_tol: a pixel agrees when its summed absolute channel difference is
      below this.
    erode_size: side of the square the agreement map is eroded with.
    dilate_size: side of the square the eroded map is then dilated with. For
      an even side, scipy puts the square's origin at index side // 2, so a
      6 x 6 dilation reaches 2 pixels up / left and 3 down / right.

  Returns:
    [H, W] bool mask, True where the template is fixed.
  """
  q = np.asarray(q, np.float64)
  c = np.asarray(c, np.float64)
  if q.shape != c.shape or q.ndim != 3:
    raise ValueError(f"expected two [H, W, C] images of one shape, got {q.shape}, {c.shape}")
  agree = np.sum(np.abs(q - c), axis=-1) < pixel_tol
  square = lambda n: np.ones((n, n), bool)
  eroded = scipy.ndimage.binary_erosion(agree, structure=square(erode_size), border_value=0)
  return scipy.ndimage.binary_dilation(eroded, structure=square(dilate_size), border_value=0)


def find_template_pairs(images: Sequence[Optional[np.ndarray]],
                        sse_low: float = SSE_LOW,
                        sse_high: float = SSE_HIGH) -> List[tuple]:
  """The near-duplicate pairs of one retrieved group.

  Args:
    images: K images [H, W, 3] in [0, 1] (one retrieved group, nearest first);
      None for a missing image, which pairs with nothing.
    sse_low, sse_high: a pair qualifies when sse_low < SSE < sse_high (strict).

  Returns:
    (i, j, sse) for every qualifying pair, i < j in group order: q = images[i]
    (the nearer neighbour) is the template, c = images[j] its partner.
  """
  present = [i for i, image in enumerate(images) if image is not None]
  pairs = []
  for i, j in itertools.combinations(present, 2):
    if images[i].shape != images[j].shape:
      continue  # loaders resize to one size; a stray size cannot be a duplicate.
    value = sse(images[i], images[j])
    if sse_low < value < sse_high:
      pairs.append((i, j, value))
  return pairs


def templates_for_group(images: Sequence[Optional[np.ndarray]],
                        ids: Optional[Sequence] = None, group=None,
                        sse_low: float = SSE_LOW, sse_high: float = SSE_HIGH,
                        pixel_tol: float = PIXEL_TOL, erode_size: int = ERODE_SIZE,
                        dilate_size: int = DILATE_SIZE) -> List[Template]:
  """Every template of one retrieved group (one per qualifying pair).

  A pair whose mask comes out empty is dropped: its TV error would be 0 / 0.

  Args:
    images: K images [H, W, 3] float in [0, 1]; None for a missing image.
    ids: K ids of the images (default: their positions).
    group: recorded on each template (e.g. the prompt_id).
    The rest: the rule's constants (docs/method.md section 6 defaults).

  Returns:
    Templates in pair order (nearest template first).
  """
  ids = list(range(len(images))) if ids is None else list(ids)
  if len(ids) != len(images):
    raise ValueError(f"{len(ids)} ids for {len(images)} images")
  out = []
  for i, j, value in find_template_pairs(images, sse_low, sse_high):
    mask = template_mask(images[i], images[j], pixel_tol, erode_size, dilate_size)
    if mask.any():
      out.append(Template(np.asarray(images[i], np.float32), mask, ids[i], ids[j], value,
                          group))
  return out
