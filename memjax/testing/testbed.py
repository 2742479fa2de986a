"""A synthetic "mini-LAION" whose duplication structure is known.

memjax trains its own tiny Stable Diffusion on this data set (`python -m memjax.train`) and
ships it, so the attack can be checked against planted ground truth:

- unique: procedural scenes (a captioned shape on a plain, gradient or striped
  background, an uncaptioned second shape, random position, size and texture),
  each seen once. The caption fixes only part of the image, as alt-text does, so
  the model cannot reproduce these images: they should NOT be memorized.
  `small_shapes=False` and `second_shape=1` draw scenes that differ more from one
  another (a small shape on a plain ground lies close to every image on that
  ground, which the labeller's RV rule then matches).
- MV: scenes drawn the same way, each repeated `mv_copies` times under one
  caption. `mv_backgrounds="bright"` (testbed 1, the defaults): bright plain or
  striped backgrounds only (see BRIGHT); "any": every third MV scene on a dark or
  mid-gray background (DARK), the others on any other background and style.
- TV: template groups (a "product shot": fixed layout, fixed label blocks) where a
  fixed region changes between members; captions share a pattern ("<brand>
  <product> in <colour>"), like SD2's "Shaw Floors" images. `tv_layout="swatch"`
  (testbed 1, the defaults): a random scene with text bars and a small square whose
  colour changes. `tv_layout="layout"` (as Webster found them in LAION): a frame,
  a logo, text blocks on a pale ground, and an inset of 3/8 of the side that holds
  a colour swatch, a product (a shape of the named colour on white) or a photo (a
  small scene whose shape has the named colour), by template.
- RV: `rv_layout="shared"` (testbed 1, the defaults): one scene repeated under several
  captions (alt-text variants that name its content with different wording), each
  caption `rv_copies` times; every caption's own image is then the scene itself, so
  the labeller's MV rule claims them first. `rv_layout="variant"` (as Webster found
  RV in LAION): a source image duplicated `rv_source_copies` times under one
  caption (not an evaluation caption), and variants of that caption, each paired
  with its own image (another drawing of the same content, `rv_copies` times): a
  variant brings back the source image, which is not the one it was paired with.
  `rv_variants`: a variant has another prefix and suffix ("wording") or only
  another suffix ("suffix").
- heldout: captions from the same grammar never trained on (no image), none of
  them naming the content (colour, shape, background) of an MV or RV scene.

Everything is drawn from `numpy.random.default_rng(seed)`, so a spec gives the
same data set on every machine. Images are uint8 [S, S, 3].
"""
import dataclasses
import os
from typing import Dict, List, Tuple

import numpy as np

from memjax.runtime import workdir as workdir_lib

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (240, 220, 40), "orange": (245, 140, 30), "purple": (140, 50, 180),
    "pink": (245, 140, 190), "cyan": (60, 210, 220), "white": (245, 245, 245),
    "black": (20, 20, 20), "gray": (128, 128, 128), "brown": (120, 75, 35)}
SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")
STYLES = ("plain", "gradient", "striped")
PREFIXES = ("a photo of", "an illustration of", "a drawing of", "clipart of", "a poster of",
            "a picture of")
SIZES = ("small", "large", "")
SUFFIXES = ("", ", stock image", ", wallpaper", ", icon", ", sticker", ", hd", ", vector art",
            ", 4k", ", free download", ", pattern", ", design", ", sale", ", print")
BRANDS = ("velmora", "quintalo", "orbisco", "brakken", "sunnelt", "tarvique")
PRODUCTS = ("carpet sample", "tile swatch", "fabric swatch", "paint chip", "rug", "phone case")
KINDS = ("MV", "TV", "RV", "unique", "heldout")
# MV backgrounds: the DCS at t = 999 grows with the distance of the memorized image
# from the mean image, so memorized images on dark or gray backgrounds score like
# held-out captions (measured; benchmarks/train_testbed.md). MV images are drawn
# like the others but on a bright plain or striped background, as poster-like
# duplicated images are.
BRIGHT = ("yellow", "cyan", "pink", "white", "orange")
DARK = ("black", "gray", "brown", "purple")  # dark or mid-gray: a third of MV under "any"
MV_BACKGROUNDS = ("bright", "any")
TV_LAYOUTS = ("swatch", "layout")
RV_LAYOUTS = ("shared", "variant")
RV_VARIANTS = ("wording", "suffix")
# tv_layout="layout": what the inset of template g holds (g % 3) and its products.
INSETS = ("swatch", "product", "photo")
INSET_PRODUCTS = {"swatch": ("carpet sample", "tile swatch", "paint chip"),
                  "product": ("phone case", "mug", "tote bag"),
                  "photo": ("poster", "greeting card", "photo frame")}


@dataclasses.dataclass(frozen=True)
class TestbedSpec:
  """Sizes of the planted structure (defaults: testbed 1; configs/testbed.flags sets the
  shipped testbed 2)."""
  seed: int = 0
  image_size: int = 16
  num_unique: int = 1000
  num_mv: int = 20
  mv_copies: int = 150
  num_tv_groups: int = 2
  tv_members: int = 6
  tv_copies: int = 3
  num_rv: int = 3
  rv_captions: int = 5
  rv_copies: int = 4
  num_heldout: int = 200
  eval_unique: int = 100
  mv_backgrounds: str = "bright"  # MV_BACKGROUNDS
  tv_layout: str = "swatch"  # TV_LAYOUTS
  rv_layout: str = "shared"  # RV_LAYOUTS
  rv_source_copies: int = 60  # rv_layout="variant": copies of each source image
  # Scenes that differ more from one another: False drops the "small" size word and
  # draws an unsized shape at least 0.22 of the side (a small shape on a plain
  # ground is close to every other image on that ground).
  small_shapes: bool = True
  second_shape: float = 0.6  # probability of a scene's uncaptioned second shape
  # RV variant captions: "wording" (another prefix and suffix) or "suffix" (the
  # source caption's prefix and another suffix, as LAION's "<title> wallpaper" /
  # "<title> iphone case": the text encoder is causal, so every token before the
  # suffix is encoded as in the source caption).
  rv_variants: str = "wording"

  def __post_init__(self):
    for name, allowed in (("mv_backgrounds", MV_BACKGROUNDS), ("tv_layout", TV_LAYOUTS),
                          ("rv_layout", RV_LAYOUTS), ("rv_variants", RV_VARIANTS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {allowed}")
    if self.tv_members > len(COLORS) - 1:
      raise ValueError(f"tv_members={self.tv_members}: at most {len(COLORS) - 1} (one colour "
                       "each)")


@dataclasses.dataclass
class Scene:
  """What a caption says about an image (the rest of the image is random)."""
  prefix: str
  size: str
  color: str
  shape: str
  bg_color: str
  style: str
  suffix: str

  def caption(self) -> str:
    words = " ".join(w for w in (self.size, self.color, self.shape) if w)
    bg = self.bg_color + ("" if self.style == "plain" else " " + self.style)
    text = f"{self.prefix} a {words} on a {bg} background{self.suffix}"
    return text.replace(" a orange", " an orange")


def random_scene(rng: np.random.Generator, sizes: Tuple[str, ...] = SIZES) -> Scene:
  color, bg = rng.choice(list(COLORS), 2, replace=False)
  return Scene(str(rng.choice(PREFIXES)), str(rng.choice(sizes)), str(color),
               str(rng.choice(SHAPES)), str(bg), str(rng.choice(STYLES)),
               str(rng.choice(SUFFIXES)))


def _shape_mask(shape: str, yy, xx, cy, cx, r) -> np.ndarray:
  dy, dx = yy - cy, xx - cx
  if shape == "circle":
    return dy ** 2 + dx ** 2 <= r ** 2
  if shape == "square":
    return (np.abs(dy) <= r * 0.8) & (np.abs(dx) <= r * 0.8)
  if shape == "triangle":
    return (dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
  if shape == "ring":
    d = dy ** 2 + dx ** 2
    return (d <= r ** 2) & (d >= (0.55 * r) ** 2)
  if shape == "cross":
    w = max(r * 0.3, 0.6)
    return ((np.abs(dy) <= w) & (np.abs(dx) <= r)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))
  if shape == "diamond":
    return np.abs(dy) + np.abs(dx) <= r
  raise ValueError(shape)


def render(scene: Scene, rng: np.random.Generator, size: int, second_shape: float = 0.6,
           min_radius: float = 0.14) -> np.ndarray:
  """A random image that matches `scene`: uint8 [size, size, 3]. An uncaptioned
  second shape is drawn with probability `second_shape`; an unsized shape's radius
  is at least `min_radius` of the side."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  bg = np.array(COLORS[scene.bg_color], np.float32)
  img = np.broadcast_to(bg, (size, size, 3)).copy()
  if scene.style == "gradient":
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    img = img * (0.35 + 0.65 * ramp[..., None])
  elif scene.style == "striped":
    period = rng.integers(3, 6)
    stripes = ((xx if rng.random() < 0.5 else yy) // period % 2)[..., None]
    img = img * (1 - 0.45 * stripes)
  # An uncaptioned second shape: variation the caption does not determine.
  if rng.random() < second_shape:
    other = COLORS[str(rng.choice(list(COLORS)))]
    m = _shape_mask(str(rng.choice(SHAPES)), yy, xx, rng.uniform(2, size - 2),
                    rng.uniform(2, size - 2), size * rng.uniform(0.1, 0.18))
    img[m] = other
  lo, hi = {"small": (0.14, 0.2), "large": (0.3, 0.4), "": (min_radius, 0.4)}[scene.size]
  r = size * rng.uniform(lo, hi)
  cy, cx = rng.uniform(r * 0.8, size - r * 0.8, 2)
  img[_shape_mask(scene.shape, yy, xx, cy, cx, r)] = COLORS[scene.color]
  img = img + rng.normal(0, 6, img.shape)  # texture
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _template(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, Tuple[int, int, int]]:
  """A product-shot layout: image and the (y, x, side) of the region that varies."""
  img = render(random_scene(rng), rng, size).astype(np.float32)
  for row in range(2):  # "text" label blocks, fixed within a group
    y = size - 4 + 2 * row
    for x in range(1, size - 1, 3):
      if rng.random() < 0.7:
        img[y, x:x + 2] = 30
  side = max(size // 4, 3)
  y, x = rng.integers(1, size - side - 4, 2)
  return np.clip(img, 0, 255).astype(np.uint8), (int(y), int(x), int(side))


def _layout_template(rng: np.random.Generator, size: int
                     ) -> Tuple[np.ndarray, Tuple[int, int, int]]:
  """A LAION-like template: pale ground, frame, logo, text blocks; returns the image
  and the (y, x, side) of the inset its members fill."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  pale = np.array(COLORS[str(rng.choice(BRIGHT))], np.float32)
  img = np.broadcast_to(0.55 * pale + 0.45 * 245, (size, size, 3)).copy()
  brand = np.array(COLORS[str(rng.choice(("red", "green", "blue", "purple", "black")))],
                   np.float32)
  border = max(size // 16, 1)
  img[:border], img[-border:], img[:, :border], img[:, -border:] = brand, brand, brand, brand
  side = max(3 * size // 8, 3)
  left = rng.random() < 0.5  # inset on the left or the right half
  x = border + 2 if left else size - border - 2 - side
  y = border + 2
  # Logo: a shape of the brand colour in the other top corner.
  r = size * 0.09
  lx = size - border - 2 - r if left else border + 2 + r
  img[_shape_mask(str(rng.choice(SHAPES)), yy, xx, border + 2 + r, lx, r)] = brand
  # Text blocks: dark bars beside the inset (under the logo) and across the bottom.
  tx0 = x + side + 2 if left else border + 2
  tx1 = size - border - 2 if left else x - 2
  for row in range(int(border + 4 + 2 * r), y + side, 3):
    end = tx0 + int((tx1 - tx0) * rng.uniform(0.5, 1.0))
    img[row, tx0:end] = 40
  for row in range(y + side + 2, size - border - 1, 3):
    for x0 in range(border + 2, size - border - 2, 6):
      if rng.random() < 0.75:
        img[row, x0:x0 + 4] = 40
  img = img + rng.normal(0, 4, img.shape)
  return np.clip(np.round(img), 0, 255).astype(np.uint8), (int(y), int(x), int(side))


def _inset(rng: np.random.Generator, inset: str, color: str, side: int) -> np.ndarray:
  """What one template member shows in its inset: uint8 [side, side, 3]."""
  if inset == "swatch":
    img = np.broadcast_to(np.array(COLORS[color], np.float32), (side, side, 3)).copy()
    img = img + rng.normal(0, 10, img.shape)  # the swatch's weave
    return np.clip(np.round(img), 0, 255).astype(np.uint8)
  if inset == "product":
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    img = np.full((side, side, 3), 245.0, np.float32)
    c = (side - 1) / 2
    img[_shape_mask(str(rng.choice(SHAPES)), yy, xx, c, c, side * 0.42)] = COLORS[color]
    return np.clip(np.round(img + rng.normal(0, 3, img.shape)), 0, 255).astype(np.uint8)
  scene = random_scene(rng)
  while scene.bg_color == color:
    scene = random_scene(rng)
  return render(dataclasses.replace(scene, color=color, size="large"), rng, side)


def generate(spec: TestbedSpec) -> Dict[str, list]:
  """The data set as lists of records.

  Returns:
    {"images": [uint8 [S, S, 3]], "train": [dict(caption, image, kind, group,
    copies)], "eval": [dict(caption, kind, memorized, image)]} where `image`
    indexes "images" (-1: none).
  """
  rng = np.random.default_rng(spec.seed)
  s = spec.image_size
  images: List[np.ndarray] = []
  train: List[dict] = []
  used = set()
  memorized_scenes: List[Scene] = []

  def add_image(img):
    images.append(img)
    return len(images) - 1

  sizes = SIZES if spec.small_shapes else tuple(z for z in SIZES if z != "small")

  def draw(scene):
    return render(scene, rng, s, spec.second_shape, 0.14 if spec.small_shapes else 0.22)

  def fresh_scene():
    while True:
      scene = random_scene(rng, sizes)
      if scene.caption() not in used:
        used.add(scene.caption())
        return scene

  def mv_background_ok(scene, g):
    if spec.mv_backgrounds == "bright":
      return scene.bg_color in BRIGHT and scene.style != "gradient"
    return (scene.bg_color in DARK) == (g % 3 == 0)

  for g in range(spec.num_mv):
    scene = fresh_scene()
    while not mv_background_ok(scene, g):
      used.discard(scene.caption())
      scene = fresh_scene()
    train.append(dict(caption=scene.caption(), image=add_image(draw(scene)),
                      kind="MV", group=f"mv{g}", copies=spec.mv_copies,
                      tone="dark" if scene.bg_color in DARK else "bright"))
    memorized_scenes.append(scene)
  colors = list(COLORS)
  for g in range(spec.num_tv_groups):
    if spec.tv_layout == "swatch":
      base, (y, x, side) = _template(rng, s)
      brand, product = BRANDS[g % len(BRANDS)], PRODUCTS[g % len(PRODUCTS)]
    else:
      inset = INSETS[g % len(INSETS)]
      base, (y, x, side) = _layout_template(rng, s)
      products = INSET_PRODUCTS[inset]
      brand, product = BRANDS[g % len(BRANDS)], products[(g // len(INSETS)) % len(products)]
    # A product inset is a shape on white: a white product would not show.
    names = colors if spec.tv_layout == "swatch" or inset != "product" else [
        c for c in colors if c != "white"]
    for c in rng.choice(names, spec.tv_members, replace=False):
      img = base.copy()
      img[y:y + side, x:x + side] = (COLORS[str(c)] if spec.tv_layout == "swatch"
                                     else _inset(rng, inset, str(c), side))
      caption = f"{brand} {product} in {c}"
      used.add(caption)
      train.append(dict(caption=caption, image=add_image(img), kind="TV", group=f"tv{g}",
                        copies=spec.tv_copies))
  for g in range(spec.num_rv):
    scene = fresh_scene()
    index = add_image(draw(scene))
    memorized_scenes.append(scene)
    if spec.rv_layout == "variant":  # the source: not an evaluation caption
      train.append(dict(caption=scene.caption(), image=index, kind="RV_source",
                        group=f"rv{g}", copies=spec.rv_source_copies))
    variants = {}
    while len(variants) < spec.rv_captions:  # same content, other wording
      prefix = str(rng.choice(PREFIXES)) if spec.rv_variants == "wording" else scene.prefix
      v = dataclasses.replace(scene, prefix=prefix, suffix=str(rng.choice(SUFFIXES)))
      if v.caption() not in used:
        used.add(v.caption())
        variants[v.caption()] = v
    for caption in sorted(variants):
      own = index if spec.rv_layout == "shared" else add_image(
          draw(variants[caption]))
      train.append(dict(caption=caption, image=own, kind="RV", group=f"rv{g}",
                        copies=spec.rv_copies))
  for i in range(spec.num_unique):
    scene = fresh_scene()
    train.append(dict(caption=scene.caption(), image=add_image(draw(scene)),
                      kind="unique", group=f"u{i}", copies=1))

  evals = [dict(caption=r["caption"], kind=r["kind"], memorized=r["kind"] != "unique",
                image=r["image"], tone=r.get("tone"))
           for r in train if r["kind"] in ("MV", "TV", "RV")]
  uniques = [r for r in train if r["kind"] == "unique"][:spec.eval_unique]
  evals += [dict(caption=r["caption"], kind="unique", memorized=False, image=r["image"],
                 tone=None) for r in uniques]
  # A held-out caption naming a memorized scene's content (colour, shape and
  # background) with other wording brings that image back, as RV captions do: it
  # would be a memorized prompt labelled "not memorized". Held-out captions
  # describe other content.
  planted = {(s.color, s.shape, s.bg_color) for s in memorized_scenes}
  for _ in range(spec.num_heldout):
    scene = fresh_scene()
    while (scene.color, scene.shape, scene.bg_color) in planted:
      scene = fresh_scene()
    evals.append(dict(caption=scene.caption(), kind="heldout", memorized=False, image=-1,
                      tone=None))
  return {"images": images, "train": train, "eval": evals}


def write(data: Dict[str, list], out_dir: str) -> Dict[str, str]:
  """Writes images/NNNNN.png, train.parquet and eval_prompts.parquet under out_dir.

  eval_prompts.parquet's `tone` is "dark" or "bright" for an MV caption (its
  background), null for the others.

  `image_path` is relative to out_dir (the folder holding the parquets). Each file
  is written under a temporary name and renamed.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  paths = []
  for i, img in enumerate(data["images"]):
    rel = os.path.join("images", f"{i:05d}.png")
    image = Image.fromarray(img)
    workdir_lib.write_atomic(os.path.join(out_dir, rel),
                             lambda f, im=image: im.save(f, format="PNG", optimize=True))
    paths.append(rel)

  def save(rows, columns, name):
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    path = os.path.join(out_dir, name)
    workdir_lib.write_parquet(path, table)
    return path

  train = [dict(r, image_path=paths[r["image"]]) for r in data["train"]]
  # `index`: the row of train.parquet holding the caption's own training image (as
  # LAION's `index`), so verification can find it (the MV rule); None if held out.
  first_row = {}
  for row, r in enumerate(train):
    first_row.setdefault(r["image_path"], row)
  evals = [dict(r, image_path=paths[r["image"]] if r["image"] >= 0 else None,
                index=first_row.get(paths[r["image"]]) if r["image"] >= 0 else None)
           for r in data["eval"]]
  return {"train": save(train, ("caption", "image_path", "kind", "group", "copies"),
                        "train.parquet"),
          "eval": save(evals, ("caption", "kind", "memorized", "image_path", "index", "tone"),
                       "eval_prompts.parquet")}
