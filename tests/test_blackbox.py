"""memjax.blackbox / onestep / images: PyTorch parity, one compile, resume, bad images."""
import dataclasses
import os
import struct
import subprocess
import sys
import zlib

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memjax.data import image_groups
from memjax.data import images as images_lib
from memjax.method import edges
from memjax.method import onestep
from memjax.models import loading
from memjax.runtime import distributed
from memjax.runtime import shards
from memjax.runtime import sources
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError
from memjax.stages import blackbox

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(workdir):
  """Every row of WORKDIR/blackbox's shards (not its top_k.parquet), by prompt_id."""
  folder = workdir_lib.stage_dir(workdir, blackbox.STAGE)
  return shards.open_shards(folder).to_table().sort_by("prompt_id").to_pylist()


def _unit(pixels):
  """uint8 [H, W, 3] as the edge score sees it."""
  return images_lib.to_unit(pixels, edges.EDGE_SIZE)


# ---- one-step images against PyTorch diffusers ------------------------------------

@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_onestep_images_equal_pytorch_diffusers(style, tiny_sd1, tiny_sd2):
  from memjax.testing.torch_reference import TorchWhitebox  # pylint: disable=g-import-not-at-top
  model = {"sd1": tiny_sd1, "sd2": tiny_sd2}[style]
  sd = loading.load_stable_diffusion(model)
  z = np.random.default_rng(3).standard_normal((2, 4, 16, 16)).astype(np.float32)
  captions = ["a red cat", "a blue car on a beach", "house"]
  ids = np.asarray(sd.tokenizer.encode_batch(captions)["input_ids"], np.int32)
  mesh = distributed.local_mesh(2)
  # The stage's own step (padded batch of 4 over 2 devices), float and uint8.
  step = blackbox.make_step(sd, z.transpose(0, 2, 3, 1), 7.5, 4, mesh, as_uint8=False)
  got, finite = step.all(ids)
  ref = TorchWhitebox(model).onestep_images(captions, z, 7.5)
  diff = np.abs(got - ref).max()
  print(style, "max abs pixel diff", diff)
  assert got.shape == ref.shape == (3, 2, 32, 32, 3) and got.dtype == np.float32
  assert diff <= 1 / 255
  assert finite.shape == (3, 2) and finite.all()
  assert 0.05 < got.std() and (got > 0).mean() > 0.5 and (got < 1).mean() > 0.5  # not saturated
  assert step.compiles == 1
  # The stage's images are rounded on the device (as_uint8): the same as on the host.
  np.testing.assert_array_equal(np.asarray(onestep.to_uint8_jax(jnp.asarray(got))),
                                onestep.to_uint8(got))


# ---- the generated-image run -------------------------------------------------------

def _fake_scan_workdir(path, captions, scores):
  """A finished scan workdir (shards, run config, manifest) without running a scan."""
  table = pa.table({"caption": captions, "prompt_id": np.arange(len(captions), dtype=np.int64),
                    "scores": pa.array(scores, pa.float32()), "status": ["ok"] * len(captions)})
  workdir_lib.check_run_config(str(path), "scan", {"prompt_column": "caption"}, overwrite=False)
  shards.ShardWriter(workdir_lib.stage_dir(str(path), "scan")).write(table, 0, len(captions))
  workdir_lib.write_manifest(str(path), workdir_lib.Manifest(stage="scan", config={}))
  return str(path)


def test_run_on_scan_top_k_compiles_once_saves_pngs_and_resumes(tiny_sd1, tmp_path):
  captions = ["a cat", "low", "a dog", "", "a car", "a tree", "lower", "a house"]
  scores = [5.0, 0.1, 4.0, 9.0, 3.0, 2.0, 0.0, 1.0]
  scan_dir = _fake_scan_workdir(tmp_path / "scan", captions, scores)
  cfg = blackbox.BlackboxConfig(workdir=str(tmp_path / "w"), model=tiny_sd1, prompts=scan_dir,
                                top_k=6, seeds=(0, 1, 2), batch_size=2, shard_size=3,
                                save_images=True, devices=2)
  manifest = blackbox.run(cfg)
  folder = os.path.join(cfg.workdir, "blackbox")
  rows = _read(cfg.workdir)
  # Top 6 by scan score; the empty caption (9.0) is kept with its status, unscored.
  assert [r["caption"] for r in rows] == ["", "a cat", "a dog", "a car", "a tree", "a house"]
  assert [r["prompt_id"] for r in rows] == list(range(6))
  assert [r["scan_prompt_id"] for r in rows] == [3, 0, 2, 4, 5, 7]
  assert [r["scan_status"] for r in rows] == ["ok"] * 6
  assert [r["status"] for r in rows] == ["empty"] + ["ok"] * 5
  assert rows[0]["edge_scores"] is None and rows[0]["image_paths"] is None
  assert isinstance(manifest, workdir_lib.Manifest) and manifest.stage == "blackbox"
  assert manifest.runtime["compiles"] == 1  # 2 shards, padded last batches: one trace
  assert manifest.counts["scored"] == 5 and manifest.counts["images_written"] == 15
  assert manifest.counts["skipped"] == {"empty": 1}
  assert manifest.details == {"mode": "generated", "seeds": [0, 1, 2]}
  assert manifest.identity["source_stage"] == "scan" and manifest.identity["top_k"] == 6
  assert len(shards.list_shards(folder)) == 2
  # The PNGs are the scored images: the score recomputed from them is the same.
  for r in rows[1:]:
    assert r["gen_seeds"] == [0, 1, 2]
    assert r["image_paths"][1] == os.path.join("images", str(r["prompt_id"]), "1.png")
    pix = [np.asarray(Image.open(os.path.join(folder, p))) for p in r["image_paths"]]
    assert pix[0].shape == (32, 32, 3) and pix[0].dtype == np.uint8
    expected = edges.edge_score_numpy([_unit(p) for p in pix])
    assert abs(r["edge_scores"] - expected) <= 1e-7
  assert sorted(os.listdir(os.path.join(folder, "images"))) == ["1", "2", "3", "4", "5"]
  table = pq.read_table(os.path.join(folder, "images.parquet")).to_pylist()
  assert len(table) == 15 and table[0] == {"prompt_id": 1, "caption": "a cat", "seed": 0,
                                           "path": os.path.join("images", "1", "0.png")}
  top = pq.read_table(os.path.join(folder, "top_k.parquet"))
  assert top.num_rows == 5 and top["status"].to_pylist() == ["ok"] * 5
  assert top["edge_scores"].to_pylist() == sorted(top["edge_scores"].to_pylist(), reverse=True)
  assert manifest.outputs["top_k"] == "top_k.parquet"
  assert manifest.outputs["image_table"] == "images.parquet"
  # Resume: nothing left to do, nothing compiled; other settings are refused.
  again = blackbox.run(cfg)
  assert again.runtime["compiles"] == 0 and again.resumed_finished
  assert again.timings == manifest.timings  # those of the run that did the work
  assert _read(cfg.workdir) == rows
  with pytest.raises(InputError, match="guidance_scale"):
    blackbox.run(dataclasses.replace(cfg, guidance_scale=3.0))


def test_prompt_columns_statuses_and_config_errors(tiny_sd1, tmp_path):
  path = str(tmp_path / "p.jsonl")
  with open(path, "w") as f:
    f.write('{"text": "a cat", "status": 1}\n{"text": null}\n{"text": "dog"}\n')
  src = sources.open_rows(path, "text", None, max_prompts=2, stages=(("scan", "scores"),),
                          reserved=blackbox.OWN_COLUMNS)
  chunk = src.read(0, src.num_rows)
  assert src.num_rows == 2 and chunk.texts == ["a cat", None] and src.stage is None
  # A table's column named like one the stage writes keeps its values as input_<name>.
  cfg = blackbox.BlackboxConfig(workdir=str(tmp_path / "w"), model=tiny_sd1, prompts=path,
                                prompt_column="text", max_prompts=2, seeds=(0, 1),
                                batch_size=1, devices=1)
  m = blackbox.run(cfg)
  rows = _read(cfg.workdir)
  assert [r["caption"] for r in rows] == ["a cat", None] and rows[0]["text"] == "a cat"
  assert rows[0]["input_status"] == 1 and rows[1]["input_status"] is None
  assert [r["status"] for r in rows] == ["ok", "null"]
  assert rows[0]["edge_scores"] is not None and rows[1]["edge_scores"] is None
  assert rows[1]["gen_seeds"] is None and "image_paths" not in rows[0]  # no --save_images
  assert m.counts == {"rows": 2, "status": {"null": 1, "ok": 1}, "scored": 1,
                      "skipped": {"null": 1}}
  assert not os.path.exists(os.path.join(cfg.workdir, "blackbox", "images"))
  # An earlier stage's workdir that is not finished is refused.
  unfinished = tmp_path / "scan"
  os.makedirs(unfinished / "scan")
  with pytest.raises(InputError, match="no finished scan"):
    blackbox.run(dataclasses.replace(cfg, prompts=str(unfinished)))
  shards.ShardWriter(str(unfinished / "scan")).write(
      pa.table({"caption": ["a"], "prompt_id": [0], "scores": [1.0]}), 0, 1)
  with pytest.raises(InputError, match="not finished"):
    blackbox.run(dataclasses.replace(cfg, prompts=str(unfinished)))
  w = str(tmp_path / "w2")
  with pytest.raises(InputError, match="either --images"):
    blackbox.run(blackbox.BlackboxConfig(workdir=w, model=tiny_sd1, images=str(tmp_path)))
  with pytest.raises(InputError, match="--model and --prompts are required"):
    blackbox.run(blackbox.BlackboxConfig(workdir=w, prompts=path))
  with pytest.raises(InputError, match="at least 2 seeds"):
    blackbox.run(blackbox.BlackboxConfig(workdir=w, model=tiny_sd1, prompts=path, seeds=(0,)))
  with pytest.raises(InputError, match="shard_size must be >= 1"):
    blackbox.run(blackbox.BlackboxConfig(workdir=w, model=tiny_sd1, prompts=path,
                                         shard_size=0))
  assert not os.path.exists(w)  # nothing recorded for a refused configuration


# ---- external images ---------------------------------------------------------------

def _pattern(rng, size=64):
  """uint8 [size, size, 3]: blocks (sharp edges) plus a little noise."""
  base = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((size // 4, size // 4, 1)))
  return np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)


def _bomb_png(path, width, height):
  """A valid 1 x 1 PNG whose header claims width x height (nothing is decoded)."""
  Image.new("RGB", (1, 1)).save(path)
  data = bytearray(open(path, "rb").read())
  ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
  data[16:29] = ihdr
  data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
  open(path, "wb").write(bytes(data))


def _reference_pixels(path):
  """The reference's pil_img_to_torch channel handling, as uint8 [H, W, 3]."""
  a = np.array(Image.open(path))
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, axis=2)
  return np.ascontiguousarray(a[:, :, :3])


def _score(paths):
  return edges.edge_score_numpy([_unit(_reference_pixels(p)) for p in paths])


def _image_folder(root):
  rng = np.random.default_rng(0)
  base = _pattern(rng)

  def save(sub, name, img):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
    path = os.path.join(root, sub, name)
    img.save(path)
    return path

  good = [save("a cat on a table", f"{i}.png", Image.fromarray(_pattern(np.random.default_rng(1))))
          for i in range(3)]
  dog = [save("dog", "0.png", Image.fromarray(base).convert("L")),
         save("dog", "1.png", Image.fromarray(base).convert("RGBA")),
         save("dog", "2.jpg", Image.fromarray(base))]
  with open(os.path.join(root, "dog", "prompt.txt"), "w") as f:
    f.write("a dog, from prompt.txt\n")
  with open(os.path.join(root, "dog", "notes.md"), "w") as f:
    f.write("not an image, ignored")
  save("lonely", "0.png", Image.fromarray(base))
  os.makedirs(os.path.join(root, "broken"))
  with open(os.path.join(root, "broken", "0.png"), "wb") as f:
    f.write(b"not a png at all")
  full = save("broken", "1.png", Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)))
  data = open(full, "rb").read()
  open(full, "wb").write(data[:len(data) // 2])  # truncated
  broken_ok = [save("broken", f"{i}.png", Image.fromarray(_pattern(np.random.default_rng(i))))
               for i in (2, 3)]
  os.makedirs(os.path.join(root, "huge"))
  _bomb_png(os.path.join(root, "huge", "0.png"), 20000, 20000)  # beyond PIL's own limit
  save("huge", "1.png", Image.fromarray(np.zeros((400, 400, 3), np.uint8)))  # beyond ours
  save("huge", "2.png", Image.fromarray(base))
  wide = (np.asarray(Image.fromarray(base).convert("L")).astype(np.uint16) * 257)
  sixteen = [save("sixteen", "0.png", Image.fromarray(wide)),
             save("sixteen", "1.png", Image.fromarray(base).convert("L").convert("P"))]
  return {"good": good, "dog": dog, "broken_ok": broken_ok, "sixteen": sixteen}


def test_external_folder_gives_a_status_per_row_and_image(tmp_path):
  paths = _image_folder(str(tmp_path / "imgs"))
  cfg = blackbox.BlackboxConfig(workdir=str(tmp_path / "w"), images=str(tmp_path / "imgs"),
                                max_image_pixels=300 * 300, shard_size=4)
  manifest = blackbox.run(cfg)
  rows = {r["caption"]: r for r in _read(cfg.workdir)}
  assert list(rows) == ["a cat on a table", "broken", "a dog, from prompt.txt", "huge",
                        "lonely", "sixteen"]  # sorted by folder name
  status = {c: (r["status"], r["image_status"], r["n_used"]) for c, r in rows.items()}
  assert status == {
      "a cat on a table": ("ok", ["ok"] * 3, 3),
      "broken": ("ok_skipped_images", ["unreadable", "unreadable", "ok", "ok"], 2),
      "a dog, from prompt.txt": ("ok_converted", ["ok_converted_from_L",
                                                  "ok_converted_from_RGBA", "ok"], 3),
      "huge": ("too_few_images", ["too_large", "too_large", "ok"], 1),
      "lonely": ("too_few_images", ["ok"], 1),
      "sixteen": ("ok_converted", ["ok_converted_from_I;16", "ok_converted_from_P"], 2)}
  assert rows["a dog, from prompt.txt"]["caption_source"] == "prompt.txt"
  assert rows["lonely"]["caption_source"] == "folder_name"
  assert rows["huge"]["edge_scores"] is None and rows["lonely"]["edge_scores"] is None
  assert "400 x 400" in rows["huge"]["image_detail"][1]
  # Scores: the reference's reading (gray repeated, alpha dropped), no black images.
  assert rows["a cat on a table"]["edge_scores"] == pytest.approx(_score(paths["good"]), abs=1e-7)
  assert rows["a dog, from prompt.txt"]["edge_scores"] == pytest.approx(_score(paths["dog"]),
                                                                         abs=1e-7)
  assert rows["broken"]["edge_scores"] == pytest.approx(_score(paths["broken_ok"]), abs=1e-7)
  gray = np.asarray(Image.open(paths["sixteen"][1]).convert("L"))
  gray = _unit(np.repeat(gray[..., None], 3, axis=2))
  assert rows["sixteen"]["edge_scores"] == pytest.approx(
      edges.edge_score_numpy([gray, gray]), abs=1e-7)  # 16-bit scaled, not clipped white
  assert manifest.counts["scored"] == 4 and manifest.counts["skipped"] == {"too_few_images": 2}
  assert manifest.runtime["compiles"] == 0 and manifest.details["mode"] == "external"
  assert manifest.identity["max_image_pixels"] == 300 * 300
  assert len(shards.list_shards(os.path.join(cfg.workdir, "blackbox"))) == 2
  again = blackbox.run(cfg)  # resumes: nothing to do
  assert again.resumed_finished and again.timings == manifest.timings
  # Another image in a folder changes the listing: the run config no longer matches.
  Image.fromarray(_pattern(np.random.default_rng(9))).save(tmp_path / "imgs" / "lonely" / "1.png")
  with pytest.raises(InputError, match="listing"):
    blackbox.run(cfg)


def test_external_table_groups_rows_by_caption(tmp_path):
  rng = np.random.default_rng(5)
  os.makedirs(tmp_path / "imgs")
  for name in ("a", "b"):
    Image.fromarray(_pattern(rng)).save(tmp_path / "imgs" / f"{name}.png")
  rows = [("cat", "imgs/a.png"), ("bird", "imgs/a.png"), ("cat", "imgs/b.png"),
          ("cat", "imgs/missing.png"), ("", "imgs/a.png"), ("bird", "")]
  with open(tmp_path / "t.csv", "w") as f:
    f.write("caption,image_path\n" + "".join(f"{c},{p}\n" for c, p in rows))
  cfg = blackbox.BlackboxConfig(workdir=str(tmp_path / "w"), images=str(tmp_path / "t.csv"))
  blackbox.run(cfg)
  out = _read(cfg.workdir)
  assert [(r["caption"], r["status"], r["image_status"]) for r in out] == [
      ("cat", "ok_skipped_images", ["ok", "ok", "missing"]),
      ("bird", "too_few_images", ["ok", "missing"]),
      (None, "empty", ["ok"])]
  expected = _score([str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "b.png")])
  assert out[0]["edge_scores"] == pytest.approx(expected, abs=1e-7)
  with pytest.raises(InputError, match="no column 'path'"):
    image_groups.groups_from_table(str(tmp_path / "t.csv"), image_column="path")


def _one_error_line(stderr):
  """The `error: ...` line of a failed command (exactly one, no traceback)."""
  assert "Traceback" not in stderr, stderr[-2000:]
  lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, stderr[-2000:]
  return lines[0]


def test_command_line_external_images_and_one_line_errors(tmp_path):
  _image_folder(str(tmp_path / "imgs"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  cmd = [sys.executable, "-m", "memjax.blackbox", f"--images={tmp_path / 'imgs'}",
         f"--workdir={tmp_path / 'w'}", "--max_image_pixels=90000", "--shard_size=2"]
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "blackbox done: 4 scored" in done.stdout
  manifest = workdir_lib.read_manifest(str(tmp_path / "w"), "blackbox")
  assert manifest.config["max_image_pixels"] == 90000 and manifest.config["shard_size"] == 2
  assert len(shards.list_shards(str(tmp_path / "w" / "blackbox"))) == 3  # 6 groups / 2
  bad = subprocess.run(cmd[:3] + [f"--images={tmp_path / 'nope'}", f"--workdir={tmp_path / 'x'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "does not exist" in _one_error_line(bad.stderr)
  old = subprocess.run(cmd[:4] + [f"--workdir={tmp_path / 'y'}", "--blackbox_shard_size=2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert old.returncode != 0 and "blackbox_shard_size" in old.stderr  # the old name is gone


def test_flags_are_the_config_fields(tmp_path):
  from conftest import parse_command  # pylint: disable=g-import-not-at-top
  import memjax.blackbox as command  # pylint: disable=g-import-not-at-top
  cfg = parse_command(command, [f"--workdir={tmp_path}", "--images=imgs", "--shard_size=7",
                                "--save_images", "--seeds=0,1"])
  assert cfg == blackbox.BlackboxConfig(workdir=str(tmp_path), images="imgs", shard_size=7,
                                        save_images=True, seeds=[0, 1])
  defaults = parse_command(command, ["--workdir=w", "--images=i"])
  assert defaults == blackbox.BlackboxConfig(workdir="w", images="i",
                                             seeds=list(blackbox.DEFAULT_SEEDS))
  with pytest.raises(InputError, match="--model and --prompts are required"):
    parse_command(command, ["--workdir=w"])
