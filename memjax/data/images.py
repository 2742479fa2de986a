"""Image I/O of the blackbox stage: external images in, PNGs out.

External images (ALGORITHMS.md section 3: images a user got from a system it can
only query) come as
- a folder with one subfolder per prompt; the caption is the subfolder's
  `prompt.txt` if there is one, else the subfolder's name; or
- a table (.parquet, .csv, .tsv, .jsonl) with a caption column and an image-path
  column, several rows per caption (relative paths are relative to the table).

Reading never crashes and never invents pixels: every image gets a status.
"ok" and "ok_converted_from_<MODE>" (grayscale, RGBA, palette, CMYK, 16-bit:
converted to 8-bit RGB the way the reference does, alpha dropped, gray
repeated) are scored; "missing", "unreadable" (not an image, truncated,
corrupt), "too_large" (more pixels than the limit, checked from the header
before anything is decoded) and "unsupported_mode_<MODE>" are not. The reference
turns a file it cannot read into a black image; memjax does not.
"""
import dataclasses
import hashlib
import os
import warnings
from typing import List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memjax.data import prompts as prompts_lib
from memjax.runtime.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PROMPT_FILE = "prompt.txt"
# PIL's own decompression-bomb limit (about 9459 x 9459); PIL refuses twice this
# whatever memjax asks, so larger limits are capped there.
DEFAULT_MAX_PIXELS = 89_478_485
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclasses.dataclass
class ImageRead:
  """One external image: RGB uint8 [H, W, 3] pixels (None unless usable) and status."""
  path: str
  pixels: Optional[np.ndarray]
  status: str
  detail: str = ""

  @property
  def usable(self) -> bool:
    return self.pixels is not None


def _to_rgb(img) -> Tuple[Optional[np.ndarray], str]:
  """A loaded PIL image as uint8 [H, W, 3] and its status."""
  mode = img.mode
  if mode == "RGB":
    return np.asarray(img, np.uint8), "ok"
  if mode in _SIXTEEN_BIT:
    # PIL's convert("RGB") clips 16-bit values at 255 (a white image); scale.
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


def read_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageRead:
  """Reads one image file as RGB uint8, or says why not (see the module doc)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    return ImageRead(path, None, "missing", "no such file")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(path) as img:
        w, h = img.size
        if w * h > max_pixels:
          return ImageRead(path, None, "too_large", f"{w} x {h} pixels > {max_pixels}")
        if w == 0 or h == 0:
          return ImageRead(path, None, "unreadable", f"empty image {w} x {h}")
        img.load()
        pixels, status = _to_rgb(img)
  except Image.DecompressionBombError as e:
    return ImageRead(path, None, "too_large", str(e))
  except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
    # UnidentifiedImageError (an OSError): not an image; OSError: truncated.
    return ImageRead(path, None, "unreadable", f"{type(e).__name__}: {e}")
  if pixels is None:
    return ImageRead(path, None, status, "mode not supported")
  return ImageRead(path, np.ascontiguousarray(pixels), status)


def write_image_table(workdir: str, shard_dir: str) -> int:
  """WORKDIR/images.parquet: one row (prompt_id, caption, seed, path) per PNG that
  the shards in shard_dir list (columns gen_seeds, image_paths); returns the count."""
  from memjax.runtime import results  # pylint: disable=g-import-not-at-top
  data = results.open_shards(shard_dir).to_table(
      columns=["prompt_id", "caption", "gen_seeds", "image_paths"])
  data = data.filter(pc.is_valid(data["image_paths"]))
  parent = pc.list_parent_indices(data["image_paths"])
  table = pa.table({"prompt_id": pc.take(data["prompt_id"], parent),
                    "caption": pc.take(data["caption"], parent),
                    "seed": pc.list_flatten(data["gen_seeds"]),
                    "path": pc.list_flatten(data["image_paths"])})
  path = os.path.join(workdir, "images.parquet")
  tmp = f"{path}.{os.getpid()}.tmp"
  pq.write_table(table, tmp)
  os.replace(tmp, path)
  return table.num_rows


def write_png(path: str, pixels: np.ndarray) -> None:
  """Writes uint8 [H, W, 3] as a PNG under a temporary name, then renames it."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    Image.fromarray(np.asarray(pixels, np.uint8), "RGB").save(tmp, format="PNG")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@dataclasses.dataclass
class ImageGroup:
  """The images of one prompt: caption (None if unusable), its source, paths."""
  caption: Optional[str]
  caption_source: str
  paths: List[str]
  caption_status: str = "ok"


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _read_caption_file(path: str) -> Tuple[Optional[str], str]:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise InputError(f"{path}: cannot read: {e}") from None
  if raw.startswith(b"\xef\xbb\xbf"):
    raw = raw[3:]
  texts, status = prompts_lib.clean_captions([raw.strip(b"\r\n")])
  return texts[0], status[0]


def groups_from_folder(root: str) -> List[ImageGroup]:
  """One group per subfolder of root (sorted by name)."""
  subdirs = sorted(d for d in os.listdir(root)
                   if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
  groups = []
  for d in subdirs:
    folder = os.path.join(root, d)
    paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if _is_image(n)]
    prompt_file = os.path.join(folder, PROMPT_FILE)
    if os.path.isfile(prompt_file):
      caption, status = _read_caption_file(prompt_file)
      groups.append(ImageGroup(caption, PROMPT_FILE, paths, status))
    else:
      groups.append(ImageGroup(d, "folder_name", paths))
  if not groups:
    loose = [n for n in os.listdir(root) if _is_image(n)]
    raise InputError(f"--images={root}: no subfolders (one per prompt) found"
                     + (f"; it holds {len(loose)} images directly, put each prompt's "
                        "images in a subfolder named by the prompt or holding "
                        f"{PROMPT_FILE}" if loose else ""))
  return groups


def groups_from_table(path: str, caption_column: str = "caption",
                      image_column: str = "image_path",
                      csv_delimiter: Optional[str] = None) -> List[ImageGroup]:
  """Rows grouped by caption, in order of first appearance."""
  table = prompts_lib.open_prompts(path, caption_column, csv_delimiter)
  if image_column not in table.schema.names:
    raise InputError(f"{path}: no column '{image_column}'; its columns are: "
                     f"{', '.join(map(repr, table.schema.names))}. Pass --image_column=NAME.")
  chunk = table.read_prompts(0, table.num_rows)
  base = os.path.dirname(os.path.abspath(path))
  image_paths = chunk.table[image_column].to_pylist()
  groups, index = [], {}
  for row, (text, status, p) in enumerate(zip(chunk.texts, chunk.status, image_paths)):
    key = text if text is not None else ("<unusable>", status)
    if key not in index:
      index[key] = len(groups)
      groups.append(ImageGroup(text, f"{os.path.basename(path)}:{caption_column}", [], status))
    if isinstance(p, str) and p.strip():
      p = os.path.join(base, os.path.expanduser(p))
    else:
      p = f"<row {row}: no {image_column}>"  # read_image reports it as missing
    groups[index[key]].paths.append(p)
  return groups


def open_image_groups(path: str, caption_column: str = "caption",
                      image_column: str = "image_path",
                      csv_delimiter: Optional[str] = None) -> List[ImageGroup]:
  """`--images`: a folder of prompt subfolders, or a table of (caption, image path)."""
  if not os.path.exists(path):
    raise InputError(f"--images={path} does not exist")
  if os.path.isdir(path) and not any(n.endswith(".parquet") for n in os.listdir(path)):
    return groups_from_folder(path)
  return groups_from_table(path, caption_column, image_column, csv_delimiter)


def groups_table(groups: List[ImageGroup]) -> pa.Table:
  """The input columns of the external-image rows (without prompt_id)."""
  return pa.table({
      "caption": pa.array([g.caption for g in groups], pa.string()),
      "caption_source": pa.array([g.caption_source for g in groups], pa.string()),
      "image_paths": pa.array([g.paths for g in groups], pa.list_(pa.string())),
  })


# ---- external images as blackbox rows -------------------------------------------------

class ExternalSource:
  """`--images` as rows: one per prompt group, read by range like a prompt table."""

  def __init__(self, path: str, caption_column: str = "caption",
               image_column: str = "image_path", csv_delimiter: Optional[str] = None,
               max_pixels: int = DEFAULT_MAX_PIXELS):
    self.path = path
    self.groups = open_image_groups(path, caption_column, image_column, csv_delimiter)
    self.num_rows = len(self.groups)
    self._settings = {"images": os.path.abspath(path), "prompt_column": caption_column,
                      "image_column": image_column, "max_image_pixels": max_pixels}

  def identity(self) -> dict:
    """The settings and a digest of the listing (captions, paths, file sizes)."""
    digest = hashlib.sha256()
    for g in self.groups:
      sizes = [os.path.getsize(p) if os.path.isfile(p) else -1 for p in g.paths]
      digest.update(repr((g.caption, g.caption_status, g.paths, sizes)).encode("utf-8"))
    return dict(self._settings, listing=digest.hexdigest())

  def read(self, start: int, stop: int) -> List[ImageGroup]:
    return self.groups[start:stop]


def score_group(group: ImageGroup, threshold: float, consistency: float,
                max_pixels: int) -> Tuple[Optional[float], str, List[str], List[str], int]:
  """(edge score or None, row status, per-image statuses and details, images used).

  Row status: the caption's status if it is unusable; "too_few_images" with
  fewer than 2 usable images; else "ok", "ok_converted" (some images converted
  to RGB) or "ok_skipped_images" (scored on the usable ones; `image_status`
  says why the others were skipped).
  """
  from memjax.method import edges  # pylint: disable=g-import-not-at-top
  statuses, details, resized = [], [], []
  for path in group.paths:
    read = read_image(path, max_pixels)
    statuses.append(read.status)
    details.append(read.detail)
    if read.usable:
      resized.append(edges.resize_for_edges(read.pixels))
  if group.caption is None:
    return None, group.caption_status, statuses, details, 0
  if len(resized) < 2:
    return None, "too_few_images", statuses, details, len(resized)
  score = edges.edge_score_numpy(resized, threshold, consistency)
  if len(resized) < len(statuses):
    status = "ok_skipped_images"
  else:
    status = "ok" if all(s == "ok" for s in statuses) else "ok_converted"
  return score, status, statuses, details, len(resized)


def score_external(groups: List[ImageGroup], start: int, pool, threshold: float,
                   consistency: float, max_pixels: int) -> pa.Table:
  """Rows [start, start + len(groups)) of the blackbox output for external images."""
  futures = [pool.submit(score_group, g, threshold, consistency, max_pixels) for g in groups]
  out = [f.result() for f in futures]
  table = groups_table(groups)
  columns = {name: table[name] for name in table.column_names}
  columns.update({
      "prompt_id": pa.array(np.arange(start, start + len(groups), dtype=np.int64)),
      "image_status": pa.array([o[2] for o in out], pa.list_(pa.string())),
      "image_detail": pa.array([o[3] for o in out], pa.list_(pa.string())),
      "n_images": pa.array([len(g.paths) for g in groups], pa.int32()),
      "n_used": pa.array([o[4] for o in out], pa.int32()),
      "edge_scores": pa.array([o[0] for o in out], pa.float32()),
      "status": pa.array([o[1] for o in out], pa.string()),
  })
  return pa.table(columns)
