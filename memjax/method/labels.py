"""Ground-truth labels TV / MV / RV / N of one prompt (docs/method.md section 7).

A prompt's generated images g (seeds s = 0..S-1, 256 x 256 x 3 in [0, 1]) are
compared with training images; errors are SUMS of squared differences (SSE)
over all 196 608 values. Checked in the reference's order, first match wins:

1. TV: some g and template (T, M) with sum((T*M - g*M)**2) / mean(M) < tv.
2. MV: min over g of sum((g - R)**2) < mv, R the prompt's own training image.
3. RV: some g and retrieved training image Q with sum((g - Q)**2) < rv.
4. N otherwise.

Every threshold is a parameter (defaults 2500, 2500, 3000). The measured errors,
the seeds under the threshold and the matched image ids are returned next to
the label so a person can audit it (the reference called its thresholds
"relaxed" and removed false positives by hand).

A missing training image (dead link, unreadable file) is recorded as missing
and its comparison skipped; it is never compared as a black image (the
reference's quirk, which could only hide or invent matches). A prompt with
skipped comparisons still gets a label from the others; `complete` says so.
"""
import dataclasses
from typing import List, Optional, Sequence

import numpy as np

from memjax.runtime.errors import InputError

LABEL_ORDER = ("TV", "MV", "RV", "N")
IMAGE_SIZE = 256  # images are compared at 256 x 256 x 3 in [0, 1]


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """SSE thresholds; strict `<`. Per element, 2500 is an MSE of 0.0127."""
  tv: float = 2500.0
  mv: float = 2500.0
  rv: float = 3000.0


@dataclasses.dataclass
class LabelResult:
  """The label of one prompt and everything measured to reach it.

  Errors are None where the comparison could not be made (no template, image
  missing). Per-seed arrays are [S] in the order of `seeds`.

  Attributes:
    label: "TV", "MV", "RV" or "N".
    gen_seeds: the seeds whose image matched under the winning rule ([] for N).
    matched_ids: the training ids that matched under the winning rule
      (template ids for TV, the own id for MV, retrieved ids for RV).
    tv_error: min over seeds and templates of the masked error.
    tv_error_per_seed: [S] min over templates.
    tv_seeds, tv_matched_ids: seeds and template ids under `tv`.
    mv_error: min over seeds of the SSE to the own image.
    mv_error_per_seed: [S].
    mv_seeds: seeds under `mv`.
    rv_error: min over seeds and present retrieved images.
    rv_error_per_seed: [S] min over retrieved images.
    rv_seeds, rv_matched_ids: seeds and retrieved ids under `rv`.
    own_status: "ok", or "missing" when there was no own image to compare.
    missing_ids: ids of retrieved images that were missing (skipped).
    n_templates, n_retrieved: comparisons actually made.
    complete: no comparison was skipped for a missing image.
  """
  label: str
  gen_seeds: List[int]
  matched_ids: list
  tv_error: Optional[float]
  tv_error_per_seed: Optional[List[float]]
  tv_seeds: List[int]
  tv_matched_ids: list
  mv_error: Optional[float]
  mv_error_per_seed: Optional[List[float]]
  mv_seeds: List[int]
  rv_error: Optional[float]
  rv_error_per_seed: Optional[List[float]]
  rv_seeds: List[int]
  rv_matched_ids: list
  own_status: str
  missing_ids: list
  n_templates: int
  n_retrieved: int
  complete: bool

  def as_row(self) -> dict:
    """Columns for a results table (`overfit_type` is the reference's name)."""
    row = dataclasses.asdict(self)
    row["overfit_type"] = row.pop("label")
    return row


def _as_images(x, what: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise InputError(f"{what}: expected [S, H, W, 3] images, got shape {x.shape}")
  return x


def _check_shape(image, shape, what: str) -> np.ndarray:
  image = np.asarray(image, np.float64)
  if image.shape != shape:
    raise InputError(f"{what}: shape {image.shape} differs from the generated images' {shape}")
  return image


def _sse(g: np.ndarray, image: np.ndarray) -> np.ndarray:
  """[S] sums of squared differences of each g [S, ...] to image [...]."""
  d = (g - image[None]).reshape(len(g), -1)
  return np.einsum("sn,sn->s", d, d)


def _under(errors: np.ndarray, threshold: float, seeds) -> List[int]:
  return [int(s) for s, e in zip(seeds, errors) if e < threshold]


def label_prompt(generated, own=None, retrieved: Sequence = (), templates: Sequence = (),
                 own_id=None, retrieved_ids: Optional[Sequence] = None,
                 seeds: Optional[Sequence[int]] = None,
                 thresholds: Thresholds = Thresholds()) -> LabelResult:
  """Labels one prompt from its generated images (docs/method.md section 7, in order).

  Args:
    generated: [S, H, W, 3] float in [0, 1], the prompt's generated images.
    own: [H, W, 3] the prompt's own training image, or None when missing.
    retrieved: K retrieved training images [H, W, 3]; None for a missing one.
    templates: `masks.Template`s (or objects with .image [H, W, 3], .mask
      [H, W] and .template_id); an all-zero mask is skipped (0 / 0).
    own_id: recorded in matched_ids on an MV match.
    retrieved_ids: K ids of the retrieved images (default: their positions).
    seeds: S seeds of the generated images (default 0..S-1).
    thresholds: the three SSE thresholds.

  Returns:
    LabelResult.

  Raises:
    InputError: an image whose shape differs from the generated images'.
  """
  g = _as_images(generated, "generated images")
  shape = g.shape[1:]
  seeds = list(range(g.shape[0])) if seeds is None else [int(s) for s in seeds]
  if len(seeds) != g.shape[0]:
    raise InputError(f"{len(seeds)} seeds for {g.shape[0]} generated images")
  own_status = "ok" if own is not None else "missing"
  retrieved_ids = list(range(len(retrieved))) if retrieved_ids is None else list(retrieved_ids)
  if len(retrieved_ids) != len(retrieved):
    raise InputError(f"{len(retrieved_ids)} ids for {len(retrieved)} retrieved images")

  # TV: per seed, min over usable templates of sum(((T - g) * M)**2) / mean(M).
  tv_per_template, tv_ids = [], []
  for n, t in enumerate(templates):
    mask = np.asarray(t.mask, bool)
    if mask.shape != shape[:2]:
      raise InputError(f"template {getattr(t, 'template_id', n)}: mask shape {mask.shape} "
                       f"differs from the generated images' {shape[:2]}")
    if not mask.any():
      continue
    image = _check_shape(t.image, shape, f"template {getattr(t, 'template_id', n)}")
    m = mask[:, :, None].astype(np.float64)
    tv_per_template.append(_sse(g * m, image * m) / mask.mean())  # sum((T*M - g*M)**2) / mean(M)
    tv_ids.append(getattr(t, "template_id", n))
  tv = np.stack(tv_per_template, axis=1) if tv_per_template else None  # [S, T]

  mv = None
  if own is not None:
    r = _check_shape(own, shape, f"own training image {own_id}")
    mv = _sse(g, r)  # [S]

  rv_per_image, rv_ids, missing_ids = [], [], []
  for image, image_id in zip(retrieved, retrieved_ids):
    if image is None:
      missing_ids.append(image_id)
      continue
    q = _check_shape(image, shape, f"retrieved image {image_id}")
    rv_per_image.append(_sse(g, q))
    rv_ids.append(image_id)
  rv = np.stack(rv_per_image, axis=1) if rv_per_image else None  # [S, K_present]

  tv_seeds = [] if tv is None else _under(tv.min(1), thresholds.tv, seeds)
  tv_matched = [] if tv is None else [i for i, e in zip(tv_ids, tv.min(0)) if e < thresholds.tv]
  mv_seeds = [] if mv is None else _under(mv, thresholds.mv, seeds)
  rv_seeds = [] if rv is None else _under(rv.min(1), thresholds.rv, seeds)
  rv_matched = [] if rv is None else [i for i, e in zip(rv_ids, rv.min(0)) if e < thresholds.rv]

  if tv_seeds:
    label, gen_seeds, matched = "TV", tv_seeds, tv_matched
  elif mv_seeds:
    label, gen_seeds, matched = "MV", mv_seeds, [own_id]
  elif rv_seeds:
    label, gen_seeds, matched = "RV", rv_seeds, rv_matched
  else:
    label, gen_seeds, matched = "N", [], []
  as_list = lambda a: None if a is None else [float(v) for v in a]
  return LabelResult(
      label=label, gen_seeds=gen_seeds, matched_ids=matched,
      tv_error=None if tv is None else float(tv.min()),
      tv_error_per_seed=None if tv is None else as_list(tv.min(1)),
      tv_seeds=tv_seeds, tv_matched_ids=tv_matched,
      mv_error=None if mv is None else float(mv.min()), mv_error_per_seed=as_list(mv),
      mv_seeds=mv_seeds,
      rv_error=None if rv is None else float(rv.min()),
      rv_error_per_seed=None if rv is None else as_list(rv.min(1)),
      rv_seeds=rv_seeds, rv_matched_ids=rv_matched,
      own_status=own_status, missing_ids=missing_ids,
      n_templates=len(tv_ids), n_retrieved=len(rv_ids),
      complete=own is not None and not missing_ids)
