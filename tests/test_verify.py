"""memjax.verify end to end on synthetic data: index, retrieval, masks, labels.

The training set holds an exact copy of a generated image (MV), a template
family (three images that differ only in one square: TV for a generation that
fills the square differently), an image a generation nearly copies although
its own training image is missing (RV), and an unrelated prompt (N).
"""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.ndimage
from PIL import Image

from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import index as index_lib
from memjax.stages import verify

SIZE = 256
SQUARE = (slice(60, 140), slice(90, 170))  # 80 x 80 pixels: the template's varying part


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # conftest.py


def _smooth(seed):
  """A distinct smooth image, uint8 [256, 256, 3] (exactly k / 255 when loaded)."""
  rng = np.random.default_rng(seed)
  small = rng.uniform(0.1, 0.9, (8, 8, 3))
  up = scipy.ndimage.zoom(small, (SIZE / 8, SIZE / 8, 1), order=1)
  return np.clip(np.rint(up * 255), 0, 255).astype(np.uint8)


def _with_square(base, value):
  out = base.copy()
  out[SQUARE] = value
  return out


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def _sse(a, b):
  return float(np.sum((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  root = tmp_path_factory.mktemp("verify")
  train = {  # index -> image; 300's file is missing on purpose
      100: _smooth(1),                     # A: copied exactly by prompt 0
      201: _with_square(_smooth(2), 60),  # template family: the square varies by 30/255
      202: _with_square(_smooth(2), 90),
      203: _with_square(_smooth(2), 120),
      400: _smooth(4),                     # prompt 3's own image, never generated
      500: _smooth(5),                     # B: nearly copied by prompt 2
      600: _smooth(6),
  }
  assert 100 < _sse(train[201], train[202]) < 1000  # a template pair by docs/method.md section 6
  rows = []
  for index, image in train.items():
    _save(str(root / "train" / f"{index}.png"), image)
    rows.append({"image_path": f"train/{index}.png", "caption": f"train {index}", "index": index})
  rows.append({"image_path": "train/300.png", "caption": "train 300", "index": 300})
  pq.write_table(pa.Table.from_pylist(rows), str(root / "train.parquet"))

  rng = np.random.default_rng(9)
  near_b = np.clip(train[500].astype(int) + rng.integers(-4, 5, train[500].shape), 0, 255)
  generated = {  # prompt_id -> (caption, index, {seed: image or None (file missing)})
      0: ("exact copy", 100, {0: train[100], 1: _smooth(10)}),
      1: ("template", 201, {0: _with_square(_smooth(2), 255)}),
      2: ("retrieved", 300, {0: near_b.astype(np.uint8)}),
      3: ("unrelated", 400, {0: _smooth(11), 1: None}),
      4: ("nothing generated", 600, {0: None}),
  }
  gen_rows = []
  for pid, (caption, index, images) in generated.items():
    for seed, image in images.items():
      rel = f"images/{pid}/{seed}.png"  # relative to the generate stage folder
      if image is not None:
        _save(str(root / "gen" / "generate" / rel), image)
      gen_rows.append({"prompt_id": pid, "caption": caption, "seed": seed, "sampler": "heun",
                       "steps": 4, "image_path": rel, "index": index,
                       "url": f"http://example.invalid/{index}.jpg", "scores": 10.0 - pid,
                       "overfit_type": "?"})
  pq.write_table(pa.Table.from_pylist(gen_rows),
                 str(root / "gen" / "generate" / "generated.parquet"))
  index_dir = str(root / "index")
  index_lib.run(index_lib.IndexConfig(workdir=index_dir, images=str(root / "train.parquet"),
                                      embedder="random"))
  return {"root": root, "train": train, "generated": generated, "index": index_dir}


def _run(synthetic, name="out", **kw):
  cfg = verify.VerifyConfig(generated=str(synthetic["root"] / "gen"), index=synthetic["index"],
                            workdir=str(synthetic["root"] / name), **kw)
  manifest = verify.run(cfg)
  table = pq.read_table(workdir_lib.path(cfg.workdir, "verify", "verify.parquet"))
  return manifest, {r["prompt_id"]: r for r in table.to_pylist()}, table


def test_labels_come_out_as_constructed(synthetic):
  manifest, rows, table = _run(synthetic)
  assert table.column_names[:10] == list(verify._REFERENCE_COLUMNS)
  assert {pid: r["overfit_type"] for pid, r in rows.items()} == {0: "MV", 1: "TV", 2: "RV",
                                                                  3: "N", 4: None}
  assert manifest.counts["labels"] == {"MV": 1, "N": 1, "RV": 1, "TV": 1,
                                     "no_generated_images": 1}
  assert manifest == workdir_lib.read_manifest(str(synthetic["root"] / "out"), "verify")
  assert rows[4]["verify_status"] == "no_generated_images" and rows[4]["gen_seeds"] == []

  mv = rows[0]
  assert mv["gen_seeds"] == [0] and mv["mse_real_gen"] == 0.0
  assert mv["own_load_status"] == "ok" and mv["own_in_index"]
  assert mv["retrieved_urls"][0].endswith("train/100.png")
  assert mv["caption"] == "exact copy" and mv["index"] == 100 and mv["scores"] == 10.0
  assert mv["input_overfit_type"] == "?"  # an input column of an output name is kept, renamed

  tv = rows[1]
  assert tv["gen_seeds"] == [0] and set(tv["template_indices"]) <= {"201", "202", "203"}
  assert tv["template_indices"] and tv["tv_error"] < 2500
  assert tv["rv_error"] > 3000 and tv["mv_error"] > 2500  # only the masked rule matches
  assert tv["template_count"] >= 1

  rv = rows[2]
  assert rv["own_load_status"] == "missing" and not rv["own_in_index"]
  assert rv["mse_real_gen"] is None and rv["mv_error"] is None
  assert rv["retrieved_urls"] == [os.path.join(str(synthetic["root"]), "train", "500.png")]
  assert rv["rv_matched_ids"] == ["500"] and rv["rv_error"] < 3000

  n = rows[3]
  assert n["gen_seeds"] == [] and n["template_indices"] == [] and n["retrieved_urls"] == []
  assert n["gen_status"][0] == "ok" and n["gen_status"][1].startswith("missing")
  assert n["mv_error"] > 2500 and n["rv_error"] > 3000
  assert len(n["retrieved_ids"]) == 7  # k=16 > 7 indexed images: all of them


def test_templates_are_stored_and_match_the_rule(synthetic):
  manifest, rows, _ = _run(synthetic, "out_masks")
  folder = synthetic["root"] / "out_masks" / "verify" / "templates"
  table = pq.read_table(str(folder / "templates.parquet")).to_pylist()
  assert len(table) == manifest.counts["templates"] > 0
  for t in table:
    assert (folder / t["image_path"]).exists() and (folder / t["mask_path"]).exists()
  # k=16 > 7 images: every prompt's group is the whole set (prompt 4, with no
  # generated image, has none), with the same two
  # pairs (201, 202) and (202, 203); (201, 203) differs too much (SSE > 1000).
  # The nearer neighbour of a pair is its template (q), the other its partner.
  got = sorted((t["group"],) + tuple(sorted((t["template_id"], t["partner_id"]))) for t in table)
  assert got == [(g, q, c) for g in "0123" for q, c in (("201", "202"), ("202", "203"))]
  first = table[0]
  q = synthetic["train"][int(first["template_id"])].astype(np.float64) / 255
  c = synthetic["train"][int(first["partner_id"])].astype(np.float64) / 255
  # Independent numpy/scipy implementation of the mask rule (docs/method.md section 6).
  agree = np.abs(q - c).sum(-1) < 0.03
  want = scipy.ndimage.binary_dilation(
      scipy.ndimage.binary_erosion(agree, np.ones((3, 3)), border_value=0),
      np.ones((6, 6)), border_value=0)
  got = np.asarray(Image.open(folder / first["mask_path"]).convert("L")) > 127
  np.testing.assert_array_equal(got, want)
  assert not got[SQUARE][5:-5, 5:-5].any() and got[:40].all()
  with open(synthetic["root"] / "out_masks" / "verify" / "manifest.json") as f:
    assert json.load(f)["details"]["thresholds"] == {"tv": 2500.0, "mv": 2500.0, "rv": 3000.0}


def test_thresholds_are_flags(synthetic):
  _, rows, _ = _run(synthetic, "out_strict", tv_threshold=1.0, mv_threshold=2500.0,
                    rv_threshold=1.0)
  assert {pid: r["overfit_type"] for pid, r in rows.items()} == {0: "MV", 1: "N", 2: "N", 3: "N",
                                                                  4: None}


def test_refuses_other_settings_and_bad_input(synthetic):
  _run(synthetic, "out_again", k=4)
  with pytest.raises(InputError, match="other settings"):
    _run(synthetic, "out_again", k=5)
  with pytest.raises(InputError, match="generated.parquet"):
    verify.run(verify.VerifyConfig(generated=str(synthetic["root"]), index=synthetic["index"],
                                   workdir=str(synthetic["root"] / "x")))
  with pytest.raises(InputError, match="queries must use the same encoder"):
    _run(synthetic, "out_enc", embedder="random:RN50")


def test_group_rule_labels_the_template_family(synthetic):
  manifest, rows, _ = _run(synthetic, "out_group", template_rule="group")
  assert {pid: r["overfit_type"] for pid, r in rows.items()} == {0: "MV", 1: "TV", 2: "RV",
                                                                  3: "N", 4: None}
  assert rows[1]["tv_error"] < 2500 and set(rows[1]["template_indices"]) <= {"201", "202", "203"}
  # the family's three images share a layout (they agree off the square): each
  # group holds one template, its nearest member against the other two
  folder = synthetic["root"] / "out_group" / "verify" / "templates"
  table = pq.read_table(str(folder / "templates.parquet")).to_pylist()
  assert len(table) == manifest.counts["templates"] == 4
  for t in table:
    assert sorted([t["template_id"]] + t["partner_id"].split(",")) == ["201", "202", "203"]
    mask = np.asarray(Image.open(folder / t["mask_path"]).convert("L")) > 127
    assert not mask[SQUARE][5:-5, 5:-5].any() and mask[:40].all()
  # another rule is another setting; the pair rule's identity is as before the group rule
  with pytest.raises(InputError, match="template_rule"):
    _run(synthetic, "out_group")
  cfg = verify.VerifyConfig(generated="g", index="i", workdir="w")
  assert verify.VerifyConfig.__dataclass_fields__["template_rule"].default == "pair"
  store = type("Store", (), {"directory": "i", "info": {}})()
  pair, group = (verify.VerifyConfig(generated="g", index="i", workdir="w", template_rule=r)
                 .identity("g", store) for r in ("pair", "group"))
  assert not {k for k in pair if "agree" in k or "partners" in k or k == "template_rule"}
  assert "template_sse_low" in pair and "template_sse_low" not in group
  assert group["template_rule"] == "group" and group["template_min_partners"] == 2
  assert cfg.identity("g", store) == pair


@pytest.mark.parametrize("kw, match", [
    ({"template_rule": "groups"}, "--template_rule=groups: use one of pair, group"),
    ({"template_agree_low": 0.9, "template_agree_high": 0.9}, "--template_agree_low"),
    ({"template_agree_high": 1.5}, "at most 1"),
    ({"template_agree_low": -0.1}, "--template_agree_low must be >= 0"),
    ({"template_agree_high": float("nan")}, "--template_agree_high must be a finite"),
    ({"template_min_partners": 0}, "--template_min_partners must be >= 1"),
])
def test_template_rule_config_errors(kw, match):
  with pytest.raises(InputError, match=match):
    verify.VerifyConfig(generated="g", index="i", workdir="w", **kw)
