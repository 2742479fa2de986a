"""External images for the blackbox stage: images a user got from a system it
can only query (docs/method.md section 3), several per prompt, given as

- a folder with one subfolder per prompt; the caption is the subfolder's
  `prompt.txt` if there is one, else the subfolder's name; or
- a table (.parquet, .csv, .tsv, .jsonl) with a caption column and an image-path
  column, several rows per caption (relative paths are relative to the table).

Each group becomes one blackbox row; every image is read by `images.read_image`
and gets a status.
"""
import dataclasses
import hashlib
import os
from typing import List, Optional, Tuple

import numpy as np
import pyarrow as pa

from memjax.data import images as images_lib
from memjax.data import tables
from memjax.data.captions import clean_captions
from memjax.method import edges
from memjax.runtime import fingerprint
from memjax.runtime.errors import InputError

PROMPT_FILE = "prompt.txt"


@dataclasses.dataclass
class ImageGroup:
  """The images of one prompt: caption (None if unusable), its source, paths."""
  caption: Optional[str]
  caption_source: str
  paths: List[str]
  caption_status: str = "ok"


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(images_lib.IMAGE_EXTENSIONS)


def _read_caption_file(path: str) -> Tuple[Optional[str], str]:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise InputError(f"{path}: cannot read: {e}") from None
  if raw.startswith(b"\xef\xbb\xbf"):
    raw = raw[3:]
  texts, status = clean_captions([raw.strip(b"\r\n")])
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
  table = tables.open_prompts(path, caption_column, csv_delimiter)
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
  if os.path.isdir(path):
    tables_here = sorted(n for n in os.listdir(path) if n.endswith(".parquet"))
    folders = sorted(n for n in os.listdir(path) if not n.startswith(".") and
                     os.path.isdir(os.path.join(path, n)))
    if tables_here and folders:  # which one is meant? Never guess and drop the other.
      raise InputError(f"--images={path} holds both subfolders ({', '.join(folders[:3])}) and "
                       f"parquet tables ({', '.join(tables_here[:3])}): give the table's path, "
                       "or a folder with only the prompts' subfolders")
    if not tables_here:
      return groups_from_folder(path)
  return groups_from_table(path, caption_column, image_column, csv_delimiter)


def groups_table(groups: List[ImageGroup]) -> pa.Table:
  """The input columns of the external-image rows (without prompt_id)."""
  return pa.table({
      "caption": pa.array([g.caption for g in groups], pa.string()),
      "caption_source": pa.array([g.caption_source for g in groups], pa.string()),
      "image_paths": pa.array([g.paths for g in groups], pa.list_(pa.string())),
  })


class ExternalSource:
  """`--images` as rows: one per prompt group, read by range like a prompt table."""

  def __init__(self, path: str, caption_column: str = "caption",
               image_column: str = "image_path", csv_delimiter: Optional[str] = None,
               max_pixels: int = images_lib.DEFAULT_MAX_PIXELS):
    self.path = path
    self.groups = open_image_groups(path, caption_column, image_column, csv_delimiter)
    self.num_rows = len(self.groups)
    self._settings = {"images": os.path.abspath(path), "prompt_column": caption_column,
                      "image_column": image_column, "max_image_pixels": max_pixels}

  def identity(self) -> dict:
    """The settings and a digest of the listing: captions, paths and the content
    of every image (a replaced image changes it)."""
    digest = hashlib.sha256()
    for g in self.groups:
      contents = [fingerprint.content_identity(p) if os.path.isfile(p) else None
                  for p in g.paths]
      digest.update(repr((g.caption, g.caption_status, g.paths, contents)).encode("utf-8"))
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
  statuses, details, resized = [], [], []
  for path in group.paths:
    read = images_lib.read_image(path, max_pixels=max_pixels)
    statuses.append(read.status)
    details.append(read.detail)
    if read.usable:
      resized.append(images_lib.to_unit(read.pixels, edges.EDGE_SIZE))
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
