"""memjax.method.masks against an independent numpy restatement of docs/method.md
section 6, and memjax.data.templates (templates on disk).

The rule, restated here without scipy: pairs (i < j) of present images with
100 < SSE < 1000; agree = sum_c |q - c| < 0.03; erode with a 3 x 3 square
(a pixel stays 1 when all 9 neighbours are 1, outside the image counts as 0);
dilate with a 6 x 6 square (a pixel becomes 1 when any pixel at offsets -2..3
in both axes is 1: scipy centres an even square at index 3); template = q.

The group rule, restated: f_ij = mean(agree(i, j)); partners when 0.5 <= f < 0.999;
the first unused image with >= 2 partners gives mask = the same erosion and
dilation of (number of partners q agrees with >= ceil(n / 2)).
"""
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.ndimage
from PIL import Image

from memjax.data import templates as templates_lib
from memjax.method import labels
from memjax.method import masks
from memjax.runtime.errors import InputError

N = 256


def _shifted(a, dy, dx):
  """out[y, x] = a[y + dy, x + dx], 0 outside."""
  h, w = a.shape
  out = np.zeros_like(a)
  ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
  xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
  out[yd, xd] = a[ys, xs]
  return out


def _agree(q, c):
  return np.abs(q.astype(np.float64) - c).sum(-1) < 0.03


def _rule_mask(q, c):
  return _clean(_agree(q, c))


def _clean(agree):
  eroded = np.ones_like(agree)
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      eroded &= _shifted(agree, dy, dx)
  dilated = np.zeros_like(agree)
  for dy in range(-2, 4):
    for dx in range(-2, 4):
      dilated |= _shifted(eroded, dy, dx)
  return dilated


def _rule_templates(images):
  out = []
  for i in range(len(images)):
    for j in range(i + 1, len(images)):
      if images[i] is None or images[j] is None:
        continue
      e = np.sum((images[i].astype(np.float64) - images[j]) ** 2)
      if 100 < e < 1000:
        m = _rule_mask(images[i], images[j])
        if m.any():
          out.append((i, j, e, m))
  return out


def _image(rng):
  return rng.integers(0, 256, (N, N, 3)).astype(np.float32) / 255


def _group():
  rng = np.random.default_rng(0)
  q = _image(rng)
  # a template with a changed region, plus JPEG-like noise that leaves small holes
  c = np.clip(q + rng.uniform(-0.012, 0.012, q.shape), 0, 1).astype(np.float32)
  c[100:120, 30:60] = rng.random((20, 30, 3))
  big = q.copy()
  big[:60, :60] = rng.random((60, 60, 3))  # too large a change: SSE > 1000
  flat = np.clip(q + 0.03, 0, 1).astype(np.float32)  # every pixel disagrees: empty mask
  return {"q": q, "copy": q.copy(), "c": c, "shifted": np.roll(q, 3, axis=1),
          "unrelated": _image(rng), "missing": None, "big": big, "flat": flat}


def test_sse_and_pairs_follow_the_rule():
  g = _group()
  names = list(g)
  images = list(g.values())
  sse = lambda a, b: masks.sse(g[a], g[b])
  assert sse("q", "copy") == 0
  assert 100 < sse("q", "c") < 1000
  assert 100 < sse("q", "flat") < 1000
  assert sse("q", "big") > 1000 and sse("q", "shifted") > 1000 and sse("q", "unrelated") > 1000
  got = masks.find_template_pairs(images)
  want = [(i, j) for i in range(len(images)) for j in range(i + 1, len(images))
          if images[i] is not None and images[j] is not None
          and 100 < np.sum((images[i].astype(np.float64) - images[j]) ** 2) < 1000]
  assert [(i, j) for i, j, _ in got] == want
  assert {(names[i], names[j]) for i, j in want} >= {("q", "c"), ("copy", "c"), ("q", "flat")}


def test_templates_equal_independent_rule():
  images = list(_group().values())
  ids = [f"train_{i}" for i in range(len(images))]
  got = masks.templates_for_group(images, ids, group=7)
  want = _rule_templates(images)
  assert len(got) == len(want) > 0
  for t, (i, j, e, m) in zip(got, want):
    assert (t.template_id, t.partner_id, t.group) == (ids[i], ids[j], 7)
    np.testing.assert_array_equal(t.mask, m)
    np.testing.assert_array_equal(t.image, images[i])
    assert t.sse == pytest.approx(e, rel=1e-12)
  # the changed region is not fixed; most of the rest is, the noise holes closed
  q_c = got[0]
  assert not q_c.mask[103:117, 33:57].any()  # the dilation eats 2-3 px into it
  agree = np.abs(images[0].astype(np.float64) - images[2]).sum(-1) < 0.03
  outside = np.ones((N, N), bool)
  outside[96:124, 26:64] = False
  assert (~agree & outside).sum() > 100  # noise holes exist before the morphology
  inner = outside.copy()
  inner[[0, 1, 2, -3, -2, -1]] = inner[:, [0, 1, 2, -3, -2, -1]] = False
  assert q_c.mask[inner].all()  # and closed after it, away from the image border
  # the pair whose every pixel disagrees is in the SSE window but its mask is
  # empty, so it gives no template (its TV error would be 0 / 0)
  flat = list(_group()).index("flat")
  assert (0, flat) in {(i, j) for i, j, _ in masks.find_template_pairs(images)}
  assert (ids[0], ids[flat]) not in {(t.template_id, t.partner_id) for t in got}


def test_template_mask_edges_and_shapes():
  rng = np.random.default_rng(1)
  q = _image(rng)
  c = q.copy()
  c[10, 10] = 1 - c[10, 10]  # one disagreeing pixel
  c[200:203, 0:3] += 0.5
  m = masks.template_mask(q, c)
  np.testing.assert_array_equal(m, _rule_mask(q, c))
  assert m[10, 10] and m[128, 128]  # one hole is closed by the dilation
  # border: the erosion clears row 0 (outside = 0), the dilation restores it
  assert m[0, 0] and m[0, 255] and m[255, 0]
  with pytest.raises(ValueError):
    masks.template_mask(q, c[:100])


def test_save_and_load_templates(tmp_path):
  images = list(_group().values())
  templates = masks.templates_for_group(images, [f"id{i}" for i in range(len(images))], group=3)
  assert len(templates) >= 2
  path = templates_lib.save_templates(str(tmp_path / "tpl"), templates)
  assert path == str(tmp_path / "tpl" / "templates.parquet")
  table = pq.read_table(path).to_pylist()
  assert len(table) == len(templates)
  for row, t in zip(table, templates):
    # the mask lies beside its template
    assert os.path.dirname(row["mask_path"]) == os.path.dirname(row["image_path"])
    assert os.path.exists(tmp_path / "tpl" / row["image_path"])
    assert os.path.exists(tmp_path / "tpl" / row["mask_path"])
    assert row["template_id"] == t.template_id and row["group"] == "3"
    assert row["mask_fraction"] == t.mask_fraction
    assert row["partner_id"] == t.partner_id and row["sse"] == t.sse
    assert (row["height"], row["width"]) == t.mask.shape
    # The mask is an RGB PNG of 0 and 255.
    with Image.open(tmp_path / "tpl" / row["mask_path"]) as mask_png:
      assert mask_png.mode == "RGB"
      mask_pixels = np.asarray(mask_png)
    assert set(np.unique(mask_pixels)) <= {0, 255}
    np.testing.assert_array_equal(mask_pixels[..., 0] == 255, t.mask)
    np.testing.assert_array_equal(mask_pixels[..., 0], mask_pixels[..., 2])
  back = templates_lib.load_templates(path, group=3)
  assert len(back) == len(templates) and templates_lib.load_templates(path, group=4) == []
  assert [t.template_id for t in templates_lib.load_templates(path)] == [
      t.template_id for t in back]  # no group: every row
  for a, b in zip(back, templates):
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.mask.dtype == bool and a.image.dtype == np.float32
    np.testing.assert_array_equal(a.image, b.image)  # uint8 / 255 survives PNG exactly
    assert (a.template_id, a.partner_id, a.group) == (b.template_id, b.partner_id, "3")
    assert a.sse == b.sse
  with pytest.raises(InputError, match="nope.parquet"):
    templates_lib.load_templates(str(tmp_path / "nope.parquet"))
  # A damaged or missing PNG is an error naming the table and the template.
  row = table[1]
  (tmp_path / "tpl" / row["mask_path"]).write_bytes(b"not a png")
  with pytest.raises(InputError, match=r"templates.parquet, template 1: .*unreadable"):
    templates_lib.load_templates(path)
  os.remove(tmp_path / "tpl" / row["image_path"])
  with pytest.raises(InputError, match=r"template 1: .*missing"):
    templates_lib.load_templates(path)
  assert len(templates_lib.load_templates(path, group=5)) == 0  # others' rows are not read


def test_a_grayscale_mask_png_still_loads(tmp_path):
  rng = np.random.default_rng(2)
  mask = rng.random((N, N)) < 0.5
  t = masks.Template(_image(rng), mask, "a", "b", 123.0, 1)
  path = templates_lib.save_templates(str(tmp_path), [t])
  row = pq.read_table(path).to_pylist()[0]
  Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L").save(tmp_path / row["mask_path"])
  (back,) = templates_lib.load_templates(path)
  np.testing.assert_array_equal(back.mask, mask)


def test_check_of_docs_method_md():
  """docs/method.md section 6: q = 0, c = q + 0.2 on rows and columns 100..131."""
  q = np.zeros((N, N, 3), np.float32)
  c = q.copy()
  c[100:132, 100:132] = 0.2
  assert masks.sse(q, c) == pytest.approx(122.88, rel=1e-6)
  (t,) = masks.templates_for_group([q, c])
  hole = np.zeros((N, N), bool)
  hole[101:130, 101:130] = True
  np.testing.assert_array_equal(t.mask, ~hole)
  assert t.mask.sum() == 64695 and round(t.mask_fraction, 6) == 0.987167


# The group rule on a synthetic template family: a fixed layout (frame, logo,
# dark text bars on a textured background) whose 64 x 64 inset changes colour
# per member, every member re-encoded (+-1/255 noise, sparse specks).
INSET = (slice(150, 214), slice(40, 104))
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 60, 220), (240, 220, 40), (30, 210, 220),
           (120, 120, 120)]


def _texture(seed):
  rng = np.random.default_rng(seed)
  small = rng.uniform(60, 200, (16, 16, 3))
  return scipy.ndimage.zoom(small, (N / 16, N / 16, 1), order=1) + rng.uniform(-25, 25, (N, N, 3))


def _unit(array):
  return (np.clip(np.rint(array), 0, 255).astype(np.uint8) / 255).astype(np.float32)


def _member(colour, seed, background=1):
  rng = np.random.default_rng(100 + seed)
  im = _texture(background)
  im[:8] = im[-8:] = im[:, :8] = im[:, -8:] = (20, 30, 90)  # frame
  yy, xx = np.mgrid[:N, :N]
  im[(yy - 50) ** 2 + (xx - 200) ** 2 < 28 ** 2] = (250, 180, 20)  # logo: a disc...
  im[(abs(yy - 50) < 6) & (abs(xx - 200) < 20)] = (255, 255, 255)  # ...with a bar
  for r in (30, 50, 70, 90):
    im[r:r + 8, 24:144 - r] = (15, 15, 15)  # text
  im[INSET] = colour
  im[INSET] += np.linspace(-20, 20, 64)[None, :, None]
  im += rng.integers(-1, 2, im.shape)
  specks = rng.random((N, N)) < 0.002
  im[specks] += rng.choice([-40, 40], (int(specks.sum()), 3))
  return _unit(im)


def _template_group():
  """5 members and 3 unrelated images, shuffled; returns (images, member positions)."""
  members = [_member(COLOURS[i], i) for i in range(5)]
  unrelated = [_unit(_texture(50 + i)) for i in range(3)]
  images = [unrelated[0], members[2], unrelated[1], members[0], members[4], unrelated[2],
            members[1], members[3]]
  return images, [1, 3, 4, 6, 7]


def _fixed():
  fixed = np.ones((N, N), bool)
  fixed[INSET] = False
  return fixed


def test_group_rule_finds_a_template_the_pair_rule_misses():
  images, members = _template_group()
  # measured: the members' SSEs run from 1465 to 6400, all above the pair window
  pair_sse = [masks.sse(images[i], images[j]) for i in members for j in members if i < j]
  assert 1400 < min(pair_sse) and max(pair_sse) < 6500
  assert masks.templates_for_group(images) == []
  ids = [f"train_{i}" for i in range(len(images))]
  (t,) = masks.templates_by_agreement(images, ids, group=5)
  assert (t.template_id, t.group) == ("train_1", 5)  # the nearest member
  assert t.partner_id == "train_3,train_4,train_6,train_7"
  assert t.sse == pytest.approx(min(masks.sse(images[1], images[j]) for j in members[1:]))
  np.testing.assert_array_equal(t.image, images[1])
  # against the restated rule: agreement with at least ceil(4 / 2) = 2 partners
  votes = sum(_agree(images[1], images[j]).astype(int) for j in members[1:])
  np.testing.assert_array_equal(t.mask, _clean(votes >= math.ceil(4 / 2)))
  # the mask is the complement of the inset, less the dilation border (measured
  # IoU 0.9939: a 61 x 61 hole in the 64 x 64 inset)
  fixed = _fixed()
  iou = (t.mask & fixed).sum() / (t.mask | fixed).sum()
  assert iou > 0.95 and not (fixed & ~t.mask).any() and (~t.mask).sum() == 61 * 61
  # the layout partners: members among themselves only (measured f 0.933 .. 0.934,
  # unrelated pairs at most 0.0006)
  partners, copies, fractions = masks.layout_partners(images)
  assert [p for p in partners] == [[] if i not in members else [j for j in members if j != i]
                                   for i in range(len(images))]
  assert copies == [[]] * len(images)
  assert all(0.9 < f < 0.95 if {i, j} <= set(members) else f < 0.01
             for (i, j), f in fractions.items())


def test_group_rule_memo_reuses_fractions_across_groups(monkeypatch):
  """With a memo, a pair of ids seen in an earlier group is not compared again, and
  the templates are those computed without it."""
  images, _ = _template_group()
  ids = [f"train_{i}" for i in range(len(images))]
  plain = masks.templates_by_agreement(images, ids, group=1)
  calls = []
  agreement = masks.agreement
  monkeypatch.setattr(masks, "agreement", lambda *a, **k: calls.append(1) or agreement(*a, **k))
  memo = {}
  first = masks.templates_by_agreement(images, ids, group=1, memo=memo)
  n_pairs = len(images) * (len(images) - 1) // 2
  assert len(calls) == n_pairs + 4  # every pair, then the 4 partners' votes
  calls.clear()
  order = [3, 1, 4, 6, 7, 0]  # another group, sharing images: only the votes again
  again = masks.templates_by_agreement([images[i] for i in order], [ids[i] for i in order],
                                       group=2, memo=memo)
  assert len(calls) == 4
  plain += masks.templates_by_agreement([images[i] for i in order], [ids[i] for i in order],
                                        group=2)
  for t, u in zip(plain, first + again):
    np.testing.assert_array_equal(t.mask, u.mask)
  assert [t.template_id for t in first + again] == ["train_1", "train_3"]
  assert [t.partner_id for t in first + again] == [t.partner_id for t in plain]


def test_group_rule_tv_error():
  images, _ = _template_group()
  (t,) = masks.templates_by_agreement(images)
  same_layout = _member(COLOURS[5], 9)  # a new inset colour
  unrelated = _unit(_texture(77))
  errors = [labels.label_prompt(g[None], templates=[t]).tv_error for g in (same_layout, unrelated)]
  assert errors[0] < 200 < labels.Thresholds.tv < 10000 < errors[1]  # measured 136 and 10410
  assert labels.label_prompt(same_layout[None], templates=[t]).label == "TV"


def test_group_rule_edges():
  images, members = _template_group()
  m = [images[i] for i in members]
  by = masks.templates_by_agreement
  assert by([m[0], m[0].copy(), m[0].copy()]) == []  # identical copies say nothing
  assert by([_unit(_texture(60 + i)) for i in range(4)]) == []  # unrelated: no layout
  # missing images are skipped, ids kept in place
  (t,) = by([None, m[0], None, m[1], m[2]], ids="abcde")
  assert (t.template_id, t.partner_id) == ("b", "d,e")
  # min_partners: 5 members have 4 partners each
  assert len(by(images, min_partners=4)) == 1 and by(images, min_partners=5) == []
  assert by(m[:2]) == [] and len(by(m[:2], min_partners=1)) == 1
  with pytest.raises(ValueError, match="min_partners"):
    by(m, min_partners=0)
  # the agreement window: the members agree on 93% of the pixels
  assert by(images, agree_low=0.95) == [] and by(images, agree_high=0.9) == []
  # a copy of the template (f >= 0.999) is used with it, not a second template
  (t,) = by([m[0], m[0].copy()] + m[1:])
  assert (t.template_id, t.partner_id) == (0, "2,3,4,5")
  # two layouts in one group: one template each, nearest first
  other = [_member(COLOURS[i], 20 + i, background=2) for i in range(3)]
  got = by([other[0], m[0], other[1], m[1], other[2], m[2]])
  assert [(t.template_id, t.partner_id) for t in got] == [(0, "2,4"), (1, "3,5")]
  with pytest.raises(ValueError, match="ids"):
    by(m, ids=[1])
