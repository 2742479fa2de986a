"""open_clip's evaluation image transform, in numpy and PIL (no torch).

`preprocess` reproduces `open_clip.transform.image_transform_v2(cfg,
is_train=False)` applied to `image.convert("RGB")` (as memjax's embedder feeds
it), value for value:

- resize with PIL's `Image.resize` (what torchvision's `Resize` calls on a PIL
  image; PIL always antialiases bicubic and bilinear), sizes rounded as
  torchvision and open_clip round them:
  - "shortest", square target S: the short side becomes S, the long side
    int(S * long / short) (torchvision's `Resize(S)`);
  - "shortest", non-square target: open_clip's `ResizeKeepRatio` (always
    bicubic), each side round(side / min ratio);
  - "longest": `ResizeKeepRatio(longest=1)`, each side round(side / max ratio);
  - "squash": straight to the target size;
  no resize at all when the size already matches (torchvision skips it);
- centre crop, top = int(round((H - h) / 2)) (Python's half-to-even round), after
  padding with `fill_color` where the image is smaller (torchvision's
  `CenterCrop` pads with 0, open_clip's `CenterCropOrPad` with fill_color);
- uint8 / 255, then (x - mean) / std, all in float32.

The output is NHWC [N, H, W, 3] float32, the input layout of
`memjax.models.clip_vision.VisionTransformer`.

`PRETRAINED` holds memjax's copies of open_clip's per-tag preprocessing and
activation (open_clip/pretrained.py) for the architectures of
`memjax.models.clip_vision.ARCHS`; tests/test_clip_vision.py checks them
against the installed open_clip.
"""
import dataclasses
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from memjax.runtime.errors import InputError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
RESIZE_MODES = ("shortest", "longest", "squash")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """open_clip's `PreprocessCfg` (mode is always RGB); defaults are open_clip's."""
  image_size: Union[int, Tuple[int, int]] = 224
  mean: Tuple[float, float, float] = OPENAI_MEAN
  std: Tuple[float, float, float] = OPENAI_STD
  interpolation: str = "bicubic"
  resize_mode: str = "shortest"
  fill_color: int = 0

  def __post_init__(self):
    if self.interpolation not in INTERPOLATIONS:
      raise InputError(f"CLIP preprocessing: interpolation {self.interpolation!r} is not one "
                       f"of {', '.join(INTERPOLATIONS)}")
    if self.resize_mode not in RESIZE_MODES:
      raise InputError(f"CLIP preprocessing: resize_mode {self.resize_mode!r} is not one of "
                       f"{', '.join(RESIZE_MODES)}")

  @property
  def size(self) -> Tuple[int, int]:
    """(height, width) of the output."""
    s = self.image_size
    return (int(s), int(s)) if isinstance(s, (int, np.integer)) else (int(s[0]), int(s[1]))


def _tag(quick_gelu: bool = False, mean=OPENAI_MEAN, std=OPENAI_STD,
         interpolation: str = "bicubic", resize_mode: str = "shortest") -> dict:
  """One pretrained tag's entry (open_clip's `_pcfg` defaults)."""
  return dict(mean=mean, std=std, interpolation=interpolation, resize_mode=resize_mode,
              quick_gelu=quick_gelu)


_COMMONPOOL_B32 = ("commonpool_m_clip_s128m_b4k", "commonpool_m_laion_s128m_b4k",
                   "commonpool_m_image_s128m_b4k", "commonpool_m_text_s128m_b4k",
                   "commonpool_m_basic_s128m_b4k", "commonpool_m_s128m_b4k",
                   "datacomp_s_s13m_b4k", "commonpool_s_clip_s13m_b4k",
                   "commonpool_s_laion_s13m_b4k", "commonpool_s_image_s13m_b4k",
                   "commonpool_s_text_s13m_b4k", "commonpool_s_basic_s13m_b4k",
                   "commonpool_s_s13m_b4k")
_COMMONPOOL_B16 = ("datacomp_l_s1b_b8k", "commonpool_l_clip_s1b_b8k",
                   "commonpool_l_laion_s1b_b8k", "commonpool_l_image_s1b_b8k",
                   "commonpool_l_text_s1b_b8k", "commonpool_l_basic_s1b_b8k",
                   "commonpool_l_s1b_b8k")
_COMMONPOOL_L14 = ("commonpool_xl_clip_s13b_b90k", "commonpool_xl_laion_s13b_b90k",
                   "commonpool_xl_s13b_b90k")

# {architecture: {tag: preprocessing and activation}} (open_clip/pretrained.py).
PRETRAINED: Dict[str, Dict[str, dict]] = {
    "ViT-B-32": dict(
        openai=_tag(True), laion400m_e31=_tag(True), laion400m_e32=_tag(True),
        laion2b_e16=_tag(), laion2b_s34b_b79k=_tag(), datacomp_xl_s13b_b90k=_tag(),
        datacomp_m_s128m_b4k=_tag(), **{t: _tag() for t in _COMMONPOOL_B32},
        metaclip_400m=_tag(True), metaclip_fullcc=_tag(True)),
    "ViT-B-16": dict(
        openai=_tag(True), laion400m_e31=_tag(), laion400m_e32=_tag(),
        laion2b_s34b_b88k=_tag(), datacomp_xl_s13b_b90k=_tag(),
        **{t: _tag() for t in _COMMONPOOL_B16},
        dfn2b=_tag(True), metaclip_400m=_tag(True), metaclip_fullcc=_tag(True)),
    "ViT-L-14": dict(
        openai=_tag(True), laion400m_e31=_tag(), laion400m_e32=_tag(),
        laion2b_s32b_b82k=_tag(mean=INCEPTION_MEAN, std=INCEPTION_STD),
        datacomp_xl_s13b_b90k=_tag(), **{t: _tag() for t in _COMMONPOOL_L14},
        metaclip_400m=_tag(True), metaclip_fullcc=_tag(True), dfn2b=_tag(True),
        dfn2b_s39b=_tag()),
    "ViT-L-14-336": dict(openai=_tag(True)),
    "ViT-H-14": dict(
        laion2b_s32b_b79k=_tag(), metaclip_fullcc=_tag(True), metaclip_altogether=_tag(),
        dfn5b=_tag(True, resize_mode="squash")),
}
# open_clip lists the QuickGELU tags of each architecture under ARCH-quickgelu too.
for _arch, _tags in list(PRETRAINED.items()):
  PRETRAINED[_arch + "-quickgelu"] = {t: v for t, v in _tags.items() if v["quick_gelu"]}
del _arch, _tags


def clean_tag(tag: str) -> str:
  """open_clip's tag normalisation: lower case, '-' -> '_'."""
  return tag.lower().replace("-", "_")


def lookup(arch: str, tag: Optional[str]) -> Optional[dict]:
  """The PRETRAINED entry of arch@tag; None without a tag.

  Raises:
    InputError: for a tag memjax does not know for arch, naming the known ones.
  """
  if not tag:
    return None
  tags = PRETRAINED.get(arch, {})
  entry = tags.get(clean_tag(tag))
  if entry is None:
    known = ", ".join(tags) or "none"
    raise InputError(f"{arch}@{tag}: no pretrained tag '{tag}' for {arch}; known: {known}")
  return entry


def preprocess_config(arch: str, tag: Optional[str], image_size) -> PreprocessConfig:
  """The evaluation preprocessing of arch@tag at image_size (open_clip's defaults without a tag)."""
  entry = lookup(arch, tag)
  if entry is None:
    return PreprocessConfig(image_size=image_size)
  return PreprocessConfig(image_size=image_size, mean=entry["mean"], std=entry["std"],
                          interpolation=entry["interpolation"],
                          resize_mode=entry["resize_mode"])


def _keep_ratio_size(h: int, w: int, target: Tuple[int, int], longest: float):
  """open_clip's ResizeKeepRatio.get_params without its random factors: [h, w]."""
  ratio_h, ratio_w = h / target[0], w / target[1]
  ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1. - longest)
  return [round(x * 1. / ratio) for x in (h, w)]


def _shortest_edge_size(h: int, w: int, size: int):
  """torchvision's Resize(size) output [h, w]: short side size, long side truncated."""
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  return [new_long, new_short] if w <= h else [new_short, new_long]


def _resize(image: Image.Image, size, resample) -> Image.Image:
  """torchvision's F.resize on a PIL image: skipped when the size already matches."""
  if [image.height, image.width] == list(size):
    return image
  return image.resize((size[1], size[0]), resample)


def _center_crop(pixels: np.ndarray, size: Tuple[int, int], fill: int) -> np.ndarray:
  """torchvision's center_crop / open_clip's center_crop_or_pad on HWC uint8."""
  h, w = pixels.shape[:2]
  ch, cw = size
  if ch > h or cw > w:
    top, left = (ch - h) // 2 if ch > h else 0, (cw - w) // 2 if cw > w else 0
    bottom, right = (ch - h + 1) // 2 if ch > h else 0, (cw - w + 1) // 2 if cw > w else 0
    pixels = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), constant_values=fill)
    h, w = pixels.shape[:2]
    if (h, w) == (ch, cw):
      return pixels
  top = int(round((h - ch) / 2.0))
  left = int(round((w - cw) / 2.0))
  return pixels[top:top + ch, left:left + cw]


def resize_and_crop(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
  """One image -> uint8 [H, W, 3]: RGB, resized and centre-cropped as open_clip does."""
  image = image.convert("RGB")
  th, tw = cfg.size
  h, w = image.height, image.width
  resample = INTERPOLATIONS[cfg.interpolation]
  fill = 0
  if cfg.resize_mode == "squash":
    image = _resize(image, [th, tw], resample)
  elif cfg.resize_mode == "longest":
    image = _resize(image, _keep_ratio_size(h, w, (th, tw), 1.), resample)
    fill = cfg.fill_color
  elif th == tw:
    image = _resize(image, _shortest_edge_size(h, w, th), resample)
  else:  # open_clip's ResizeKeepRatio(size) keeps its default, bicubic
    image = _resize(image, _keep_ratio_size(h, w, (th, tw), 0.), INTERPOLATIONS["bicubic"])
  pixels = np.asarray(image, dtype=np.uint8)
  if pixels.shape[:2] != (th, tw):
    pixels = _center_crop(pixels, (th, tw), fill)
  return pixels


def normalize(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
  """uint8 [..., 3] -> float32 (x / 255 - mean) / std, in torchvision's float32 order."""
  x = pixels.astype(np.float32) / np.float32(255)
  mean = np.asarray(cfg.mean, np.float32)
  std = np.asarray(cfg.std, np.float32)
  return (x - mean) / std


def preprocess(images: Sequence[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
  """PIL images (any size, any mode) -> [N, H, W, 3] float32, open_clip's eval transform."""
  th, tw = cfg.size
  if not len(images):
    return np.zeros((0, th, tw, 3), np.float32)
  return normalize(np.stack([resize_and_crop(im, cfg) for im in images]), cfg)
