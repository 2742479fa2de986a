"""Template masks on disk: each template PNG with its mask PNG (0 / 255) beside
it, listed in `templates.parquet` (the verify stage's `templates/` folder)."""
import os
from typing import List, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memjax.data import images as images_lib
from memjax.method.masks import Template
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError

TABLE_NAME = "templates.parquet"


def _to_uint8(image: np.ndarray) -> np.ndarray:
  # Images read by `images.to_unit` are k / 255 exactly, so this
  # round trip through PNG is lossless.
  return np.clip(np.rint(np.asarray(image, np.float64) * 255.0), 0, 255).astype(np.uint8)


def save_templates(out_dir: str, templates: Sequence[Template],
                   table_name: str = TABLE_NAME) -> str:
  """Writes each template as `template_<n>.png` with `template_<n>_mask.png`
  beside it, and a table listing them; returns the table's path.

  Table columns: template (n), group, template_id, partner_id (as strings),
  sse, mask_fraction, height, width, image_path, mask_path (relative to
  out_dir). Call it once with every template: a second call replaces the
  table (atomically) and the files it names.
  """
  os.makedirs(out_dir, exist_ok=True)
  rows = {k: [] for k in ("template", "group", "template_id", "partner_id", "sse",
                          "mask_fraction", "height", "width", "image_path", "mask_path")}
  as_text = lambda v: None if v is None else str(v)
  for n, t in enumerate(templates):
    image_name, mask_name = f"template_{n:06d}.png", f"template_{n:06d}_mask.png"
    images_lib.write_png(os.path.join(out_dir, image_name), _to_uint8(t.image))
    images_lib.write_png(os.path.join(out_dir, mask_name),
                         np.repeat(np.where(t.mask, 255, 0).astype(np.uint8)[..., None], 3, -1))
    for key, value in (("template", n), ("group", as_text(t.group)),
                       ("template_id", as_text(t.template_id)),
                       ("partner_id", as_text(t.partner_id)), ("sse", float(t.sse)),
                       ("mask_fraction", t.mask_fraction), ("height", t.mask.shape[0]),
                       ("width", t.mask.shape[1]), ("image_path", image_name),
                       ("mask_path", mask_name)):
      rows[key].append(value)
  schema = pa.schema([("template", pa.int64()), ("group", pa.string()),
                      ("template_id", pa.string()), ("partner_id", pa.string()),
                      ("sse", pa.float64()), ("mask_fraction", pa.float64()),
                      ("height", pa.int64()), ("width", pa.int64()),
                      ("image_path", pa.string()), ("mask_path", pa.string())])
  path = os.path.join(out_dir, table_name)
  workdir_lib.write_parquet(path, pa.table(rows, schema=schema))
  return path


def load_templates(table_path: str, group=None) -> List[Template]:
  """Reads templates written by `save_templates` (only `group`'s if given).

  Raises:
    InputError: missing or unreadable table, template image or mask.
  """
  try:
    table = pq.read_table(table_path)
  except (OSError, pa.ArrowException) as e:
    raise InputError(f"template table {table_path}: cannot read: {e}") from None
  folder = os.path.dirname(os.path.abspath(table_path))
  out = []
  for row in table.to_pylist():
    if group is not None and row["group"] != str(group):
      continue
    reads = [images_lib.read_image(row[k], folder) for k in ("image_path", "mask_path")]
    bad = [r for r in reads if not r.usable]
    if bad:
      raise InputError(f"{table_path}, template {row['template']}: cannot read {bad[0].ref}: "
                       f"{bad[0].status} {bad[0].detail}")
    image = reads[0].pixels.astype(np.float32) / 255.0
    mask = reads[1].pixels[..., 0] > 127
    out.append(Template(image, mask, row["template_id"], row["partner_id"], row["sse"],
                        row["group"]))
  return out
