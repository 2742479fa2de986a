"""The one image reader, and the PNG writer.

Every image memjax reads goes through `read_image`: external images of the
blackbox stage (docs/method.md section 3), training images of the index and
verify stages (sections 5 and 7), generated PNGs. A reference is a local path
(relative to a base folder), a file:// URL or an http(s):// URL (kept in a cache
folder when given, dead links remembered there too).

Reading never crashes and never invents pixels: every image gets a status.
"ok" and "ok_converted_from_<MODE>" (grayscale, RGBA, palette, CMYK, 16-bit:
converted to 8-bit RGB, alpha dropped, gray repeated; 16-bit values scaled, where
PIL's own conversion would clip them to white) are usable; "missing" (no
reference, no file, dead link), "unreadable" (not an image, truncated, corrupt),
"too_large" (more pixels than the limit, checked from the header before anything
is decoded) and "unsupported_mode_<MODE>" are not. The reference turns a file it
cannot read into a black image; memjax does not.
"""
import dataclasses
import hashlib
import io
import os
import urllib.parse
import urllib.request
import warnings
from typing import Optional, Tuple

import numpy as np

from memjax.runtime import workdir as workdir_lib

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# PIL's own decompression-bomb limit (about 9459 x 9459); PIL refuses twice this
# whatever memjax asks, so larger limits are capped there.
DEFAULT_MAX_PIXELS = 89_478_485
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_HTTP_TIMEOUT_S = 20.0


@dataclasses.dataclass
class ImageRead:
  """One image: RGB uint8 [H, W, 3] pixels (None unless usable) and its status."""
  ref: Optional[str]
  pixels: Optional[np.ndarray]
  status: str
  detail: str = ""

  @property
  def usable(self) -> bool:
    return self.pixels is not None

  def pil(self):
    """The pixels as a PIL RGB image."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    return Image.fromarray(self.pixels, "RGB")


def _to_rgb(img) -> Tuple[Optional[np.ndarray], str]:
  """A loaded PIL image as uint8 [H, W, 3] and its status."""
  mode = img.mode
  if mode == "RGB":
    return np.asarray(img, np.uint8), "ok"
  if mode in _SIXTEEN_BIT:
    arr = np.asarray(img).astype(np.float64)
    gray = np.round(np.clip(arr, 0, 65535) / 257.0).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1), f"ok_converted_from_{mode}"
  if mode in ("F",):
    return None, f"unsupported_mode_{mode}"
  try:
    rgb = img.convert("RGB")  # L/1: gray repeated; RGBA/LA: alpha dropped; P: palette
  except (ValueError, OSError):
    return None, f"unsupported_mode_{mode}"
  return np.asarray(rgb, np.uint8), f"ok_converted_from_{mode}"


def _fetch(url: str, cache_dir: Optional[str]) -> Tuple[Optional[bytes], str]:
  """The bytes at url (from cache_dir if fetched before), or (None, why)."""
  path = os.path.join(cache_dir, hashlib.sha1(url.encode("utf-8")).hexdigest()) \
      if cache_dir else None
  if path and os.path.isfile(path):
    with open(path, "rb") as f:
      return f.read(), ""
  if path and os.path.isfile(path + ".missing"):
    with open(path + ".missing", encoding="utf-8") as f:
      return None, f.read()
  try:
    req = urllib.request.Request(url, headers={"User-Agent": "memjax"})
    with urllib.request.urlopen(req, timeout=_HTTP_TIMEOUT_S) as r:
      data, why = r.read(), ""
  except Exception as e:  # pylint: disable=broad-except  # any failure = a dead link
    data, why = None, f"{url}: {type(e).__name__}: {e}"
  if path:
    target, payload = (path, data) if data is not None else (path + ".missing",
                                                            why.encode("utf-8"))
    workdir_lib.write_atomic(target, lambda f: f.write(payload))
  return data, why


def read_image(ref: Optional[str], base_dir: Optional[str] = None,
               cache_dir: Optional[str] = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageRead:
  """Reads one image as RGB uint8, or says why not (see the module doc).

  Args:
    ref: a path (relative to base_dir unless absolute), file:// or http(s)://.
    base_dir: the folder relative paths start from.
    cache_dir: where downloaded images (and dead links) are kept.
    max_pixels: images with more pixels are "too_large".
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not isinstance(ref, str) or not ref.strip():
    return ImageRead(ref, None, "missing", "no url or image_path")
  ref = ref.strip()
  scheme = urllib.parse.urlparse(ref).scheme.lower()
  if scheme in ("http", "https"):
    data, error = _fetch(ref, cache_dir)
    if data is None:
      return ImageRead(ref, None, "missing", error)
    source, name = io.BytesIO(data), ref
  else:
    name = ref
    if scheme == "file":
      name = urllib.request.url2pathname(urllib.parse.urlparse(ref).path)
    elif base_dir and not os.path.isabs(name):
      name = os.path.join(base_dir, name)
    if not os.path.isfile(name):
      return ImageRead(ref, None, "missing", f"{name}: no such file")
    source = name
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(source) as img:
        w, h = img.size
        if w * h > max_pixels:
          return ImageRead(ref, None, "too_large", f"{w} x {h} pixels > {max_pixels}")
        if w == 0 or h == 0:
          return ImageRead(ref, None, "unreadable", f"empty image {w} x {h}")
        img.load()
        pixels, status = _to_rgb(img)
  except Image.DecompressionBombError as e:
    return ImageRead(ref, None, "too_large", str(e))
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises OSError, ValueError, SyntaxError, EOFError, MemoryError, ...
    # for a damaged or hostile file; the image is recorded, never used.
    return ImageRead(ref, None, "unreadable", f"{name}: {type(e).__name__}: {e}")
  if pixels is None:
    return ImageRead(ref, None, status, "mode not supported")
  return ImageRead(ref, np.ascontiguousarray(pixels), status)


def resize_uint8(image, size: int) -> np.ndarray:
  """A PIL image or uint8 [H, W, 3] -> uint8 [size, size, 3]: PIL Lanczos on the
  8-bit RGB image, no crop (the aspect ratio is not kept), as the reference."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    image = Image.fromarray(image, "RGB")
  if image.mode != "RGB":
    raise ValueError(f"expected an RGB image, got mode {image.mode}")
  return np.asarray(image.resize((size, size), Image.LANCZOS), np.uint8)


def to_unit(image, size: int) -> np.ndarray:
  """`resize_uint8` as float32 [size, size, 3] in [0, 1] (uint8 / 255): how the
  edge score (docs/method.md section 3) and the labels (section 7) see an image."""
  return resize_uint8(image, size).astype(np.float32) / 255


def write_png(path: str, pixels: np.ndarray) -> None:
  """Writes uint8 [H, W, 3] as a PNG, atomically."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.fromarray(np.asarray(pixels, np.uint8), "RGB")
  workdir_lib.write_atomic(path, lambda f: image.save(f, format="PNG"))


def image_ref(row: Optional[dict]) -> Optional[str]:
  """Where a training image is: `image_path` if set, else `url`."""
  if not row:
    return None
  for key in ("image_path", "url"):
    value = row.get(key)
    if isinstance(value, str) and value.strip():
      return value.strip()
  return None
