"""Template masks from the images of one retrieved group (docs/method.md section 6).

Some memorized training images are templates: the same layout (a product
photo frame, a phone case mock-up, a poster border) repeated many times with a
varying part. The reference labels a generation "template verbatim" (TV) when
it matches such a template on its fixed part, but never released how it built
the masks. memjax has two rules; both work within one retrieved group (the k
nearest training images of one prompt, nearest first, [256, 256, 3] in
[0, 1]) and share the agreement map and its clean-up:

    agree(q, c) = sum over channels |q - c| < PIXEL_TOL
    clean(a)    = dilate(erode(a, 3 x 3 square), 6 x 6 square)

(scipy.ndimage binary morphology, border value 0: the erosion drops isolated
agreeing pixels, the dilation closes the small holes JPEG noise leaves). A
template is an image q and a mask, 1 where the template stays fixed.

- pair rule (`templates_for_group`, the default, the reference's constants): a
  pair (q, c), q before c in group order, with
  `SSE_LOW < sum((q - c)**2) < SSE_HIGH`; mask = clean(agree(q, c)). The window
  keeps near-duplicates that are not identical (an identical pair says nothing
  about which part varies), so it applies to near-identical re-encodings whose
  varying part is a few hundred pixels: a 64 x 64 inset that changes colour
  already has an SSE in the thousands and is never found.
- group rule (`templates_by_agreement`): two images share a layout when the
  fraction of pixels they agree on, f = mean(agree(q, c)), has
  `AGREE_LOW <= f < AGREE_HIGH` (identical copies say nothing; unrelated images
  agree on few pixels). Walking the group nearest first, an image not yet used
  with at least MIN_PARTNERS layout partners gives one template: mask =
  clean(pixels where q agrees with at least half of its partners); q, its
  partners and its identical copies are then used (they would give the same
  template again). It applies to a group holding several members of one
  layout, whatever the size of the varying region.

The verify stage (`--template_rule`) picks the rule and stores the templates
with `memjax.data.templates`.
"""
import dataclasses
import itertools
import math
from typing import List, Optional, Sequence

import numpy as np
import scipy.ndimage


SSE_LOW = 100.0
SSE_HIGH = 1000.0
PIXEL_TOL = 0.03
ERODE_SIZE = 3
DILATE_SIZE = 6
AGREE_LOW = 0.5
AGREE_HIGH = 0.999
MIN_PARTNERS = 2


@dataclasses.dataclass
class Template:
  """A template image and its fixed-part mask.

  Attributes:
    image: [H, W, 3] float32 in [0, 1], the template q.
    mask: [H, W] bool, True where the template stays fixed.
    template_id: id of q (a training-set index or url), as given.
    partner_id: id of c, the near-duplicate the mask was measured against
      (group rule: the ids of q's layout partners, in group order, joined by
      ",").
    sse: sum((q - c)**2) over all H * W * 3 values (group rule: with the
      partner of least SSE).
    group: the retrieved group (e.g. the prompt_id) the images came from.
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


def agreement(q: np.ndarray, c: np.ndarray, pixel_tol: float = PIXEL_TOL) -> np.ndarray:
  """[H, W] bool: the pixels where sum over channels |q - c| < pixel_tol.

  Raises:
    ValueError: q and c are not two [H, W, C] images of one shape.
  """
  q = np.asarray(q, np.float64)
  c = np.asarray(c, np.float64)
  if q.shape != c.shape or q.ndim != 3:
    raise ValueError(f"expected two [H, W, C] images of one shape, got {q.shape}, {c.shape}")
  return np.sum(np.abs(q - c), axis=-1) < pixel_tol


def clean_mask(agree: np.ndarray, erode_size: int = ERODE_SIZE,
               dilate_size: int = DILATE_SIZE) -> np.ndarray:
  """An agreement map eroded with an erode_size square, then dilated with a
  dilate_size square (scipy.ndimage, border value 0).

  For an even side, scipy puts the square's origin at index side // 2, so a
  6 x 6 dilation reaches 2 pixels up / left and 3 down / right.
  """
  square = lambda n: np.ones((n, n), bool)
  eroded = scipy.ndimage.binary_erosion(agree, structure=square(erode_size), border_value=0)
  return scipy.ndimage.binary_dilation(eroded, structure=square(dilate_size), border_value=0)


def template_mask(q: np.ndarray, c: np.ndarray, pixel_tol: float = PIXEL_TOL,
                  erode_size: int = ERODE_SIZE,
                  dilate_size: int = DILATE_SIZE) -> np.ndarray:
  """The pair rule's fixed-part mask of template q against its near-duplicate c.

  Args:
    q: [H, W, 3] float in [0, 1], the template.
    c: [H, W, 3] float in [0, 1], a near-duplicate of q.
    pixel_tol: a pixel agrees when its summed absolute channel difference is
      below this.
    erode_size, dilate_size: the squares of `clean_mask`.

  Returns:
    [H, W] bool mask, True where the template is fixed.
  """
  return clean_mask(agreement(q, c, pixel_tol), erode_size, dilate_size)


def _ids(images: Sequence, ids: Optional[Sequence]) -> list:
  ids = list(range(len(images))) if ids is None else list(ids)
  if len(ids) != len(images):
    raise ValueError(f"{len(ids)} ids for {len(images)} images")
  return ids


def _comparable_pairs(images: Sequence[Optional[np.ndarray]]):
  """(i, j), i < j in group order, of present images of one shape."""
  present = [i for i, image in enumerate(images) if image is not None]
  for i, j in itertools.combinations(present, 2):
    # loaders resize to one size; a stray size cannot share anything.
    if np.shape(images[i]) == np.shape(images[j]):
      yield i, j


def find_template_pairs(images: Sequence[Optional[np.ndarray]],
                        sse_low: float = SSE_LOW,
                        sse_high: float = SSE_HIGH) -> List[tuple]:
  """The pair rule's near-duplicate pairs of one retrieved group.

  Args:
    images: K images [H, W, 3] in [0, 1] (one retrieved group, nearest first);
      None for a missing image, which pairs with nothing.
    sse_low, sse_high: a pair qualifies when sse_low < SSE < sse_high (strict).

  Returns:
    (i, j, sse) for every qualifying pair, i < j in group order: q = images[i]
    (the nearer neighbour) is the template, c = images[j] its partner.
  """
  pairs = []
  for i, j in _comparable_pairs(images):
    value = sse(images[i], images[j])
    if sse_low < value < sse_high:
      pairs.append((i, j, value))
  return pairs


def templates_for_group(images: Sequence[Optional[np.ndarray]],
                        ids: Optional[Sequence] = None, group=None,
                        sse_low: float = SSE_LOW, sse_high: float = SSE_HIGH,
                        pixel_tol: float = PIXEL_TOL, erode_size: int = ERODE_SIZE,
                        dilate_size: int = DILATE_SIZE) -> List[Template]:
  """The pair rule: every template of one retrieved group (one per qualifying pair).

  A pair whose mask comes out empty is dropped: its TV error would be 0 / 0.

  Args:
    images: K images [H, W, 3] float in [0, 1]; None for a missing image.
    ids: K ids of the images (default: their positions).
    group: recorded on each template (e.g. the prompt_id).
    The rest: the rule's constants (docs/method.md section 6 defaults).

  Returns:
    Templates in pair order (nearest template first).
  """
  ids = _ids(images, ids)
  out = []
  for i, j, value in find_template_pairs(images, sse_low, sse_high):
    mask = template_mask(images[i], images[j], pixel_tol, erode_size, dilate_size)
    if mask.any():
      out.append(Template(np.asarray(images[i], np.float32), mask, ids[i], ids[j], value,
                          group))
  return out


def layout_partners(images: Sequence[Optional[np.ndarray]], agree_low: float = AGREE_LOW,
                    agree_high: float = AGREE_HIGH, pixel_tol: float = PIXEL_TOL,
                    ids: Optional[Sequence] = None, memo: Optional[dict] = None):
  """The group rule's layout partners and identical copies of each image.

  Args:
    images: K images [H, W, 3] in [0, 1]; None for a missing image (it has
      no partner).
    agree_low, agree_high: i and j share a layout when agree_low <= f_ij <
      agree_high, f_ij = mean(agreement(images[i], images[j], pixel_tol));
      f_ij >= agree_high makes them copies.
    pixel_tol: as in `agreement`.
    ids, memo: with both, f_ij is kept in memo under (ids[i], ids[j], pixel_tol)
      and read back by later calls (groups retrieved for other prompts share
      images), so ids must name the images' content (training ids).

  Returns:
    (partners, copies, fractions): partners[i] and copies[i] list positions in
    group order (empty for a missing image); fractions[(i, j)] = f_ij for
    every compared pair, i < j.
  """
  partners = [[] for _ in images]
  copies = [[] for _ in images]
  fractions = {}
  for i, j in _comparable_pairs(images):
    key = None if memo is None or ids is None else (ids[i], ids[j], pixel_tol)
    f = memo.get(key) if key is not None else None
    if f is None:
      f = float(np.mean(agreement(images[i], images[j], pixel_tol)))
      if key is not None:
        memo[key] = memo[(ids[j], ids[i], pixel_tol)] = f
    fractions[(i, j)] = f
    if agree_low <= f < agree_high:
      partners[i].append(j)
      partners[j].append(i)
    elif f >= agree_high:
      copies[i].append(j)
      copies[j].append(i)
  for lists in (partners, copies):
    for row in lists:
      row.sort()
  return partners, copies, fractions


def templates_by_agreement(images: Sequence[Optional[np.ndarray]],
                           ids: Optional[Sequence] = None, group=None,
                           agree_low: float = AGREE_LOW, agree_high: float = AGREE_HIGH,
                           min_partners: int = MIN_PARTNERS, pixel_tol: float = PIXEL_TOL,
                           erode_size: int = ERODE_SIZE,
                           dilate_size: int = DILATE_SIZE,
                           memo: Optional[dict] = None) -> List[Template]:
  """The group rule: one template per layout shared by enough images of the group.

  Walking the images nearest first, an image q not yet used with at least
  min_partners layout partners (`layout_partners`) gives a template: mask =
  `clean_mask`(pixels where q agrees with at least ceil(n / 2) of its n
  partners). q, its partners and its identical copies are then used. A
  template whose mask comes out empty is dropped (its TV error would be 0 / 0).

  Args:
    images: K images [H, W, 3] float in [0, 1]; None for a missing image.
    ids: K ids of the images (default: their positions).
    group: recorded on each template (e.g. the prompt_id).
    agree_low, agree_high: the layout window of the agreement fraction.
    min_partners: partners an image needs to give a template (>= 1).
    pixel_tol, erode_size, dilate_size: as in the pair rule.
    memo: `layout_partners`' memo of agreement fractions by id pair, shared by
      calls whose ids name the same images (needs `ids`).

  Returns:
    Templates in group order of their q; partner_id is the partners' ids
    joined by ",", sse the SSE of q with the partner of least SSE.
  """
  memo_ids = ids
  ids = _ids(images, ids)
  if min_partners < 1:
    raise ValueError(f"min_partners must be >= 1, got {min_partners}")
  partners, copies, _ = layout_partners(images, agree_low, agree_high, pixel_tol, memo_ids,
                                        memo)
  used, out = set(), []
  for i, ps in enumerate(partners):
    if i in used or len(ps) < min_partners:
      continue
    used.update([i] + ps + copies[i])
    votes = sum(agreement(images[i], images[j], pixel_tol).astype(np.int32) for j in ps)
    mask = clean_mask(votes >= math.ceil(len(ps) / 2), erode_size, dilate_size)
    if mask.any():
      nearest = min(sse(images[i], images[j]) for j in ps)
      out.append(Template(np.asarray(images[i], np.float32), mask, ids[i],
                          ",".join(str(ids[j]) for j in ps), nearest, group))
  return out
