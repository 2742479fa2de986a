"""memjax's Flax CLIP image encoder against open_clip: preprocessing, forward, files.

Run with -s to see the measured parity figures.
"""
import glob
import os

import numpy as np
import pytest
from PIL import Image

from memjax.data import clip_preprocess as cp
from memjax.models import checkpoint
from memjax.models import clip_vision as cv
from memjax.models import clip_vision_load as cvl
from memjax.runtime.errors import CheckpointError, InputError
from memjax.testing import clip_tiny

TESTBED_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "memjax", "assets", "testbed", "images")
_SMALL_TEXT = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)


def _odd_images():
  rng = np.random.default_rng(0)

  def rgb(h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

  rgba = Image.fromarray(rng.integers(0, 256, (29, 23, 4), dtype=np.uint8), "RGBA")
  return [rgb(17, 31), rgb(300, 200), rgb(200, 300), rgb(32, 32), rgb(5, 7),
          rgb(40, 40).convert("L"), rgba, rgb(33, 64).convert("P"), rgb(16, 16)]


_PREPROCESS_CASES = {
    "tiny": cp.PreprocessConfig(32),
    "openai-224": cp.PreprocessConfig(224),
    "inception-bilinear": cp.PreprocessConfig(48, cp.INCEPTION_MEAN, cp.INCEPTION_STD,
                                              "bilinear"),
    "non-square": cp.PreprocessConfig((24, 40)),
    "longest-fill": cp.PreprocessConfig(36, resize_mode="longest", fill_color=200),
    "squash": cp.PreprocessConfig(28, interpolation="bilinear", resize_mode="squash"),
}


@pytest.mark.parametrize("case", sorted(_PREPROCESS_CASES))
def test_preprocess_is_open_clips_eval_transform(case):
  pytest.importorskip("open_clip")
  from open_clip import transform as oc_transform  # pylint: disable=g-import-not-at-top
  cfg = _PREPROCESS_CASES[case]
  transform = oc_transform.image_transform_v2(oc_transform.PreprocessCfg(
      size=cfg.image_size, mean=cfg.mean, std=cfg.std, interpolation=cfg.interpolation,
      resize_mode=cfg.resize_mode, fill_color=cfg.fill_color), is_train=False)
  images = _odd_images()
  got = cp.preprocess(images, cfg)
  # As memjax's embedder feeds open_clip: convert("RGB") first.
  want = np.stack([transform(im.convert("RGB")).numpy().transpose(1, 2, 0) for im in images])
  assert got.shape == want.shape and got.dtype == np.float32
  print(f"\npreprocess {case}: max abs diff {np.abs(got - want).max():.3g}")
  np.testing.assert_array_equal(got, want)
  assert cp.preprocess([], cfg).shape == (0,) + cfg.size + (3,)


def _open_clip_model(arch, embed_dim, vision_cfg, quick_gelu=False, seed=0):
  """An open_clip CLIP model with every image-tower tensor random (biases, norms too)."""
  open_clip = pytest.importorskip("open_clip")
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = open_clip.create_model(arch, pretrained=None, embed_dim=embed_dim,
                                 vision_cfg=vision_cfg, text_cfg=_SMALL_TEXT,
                                 force_quick_gelu=quick_gelu).eval()
  with torch.no_grad():
    for name, p in model.visual.named_parameters():
      if p.ndim == 1 and name != "class_embedding":
        base = 1.0 if name.endswith("weight") else 0.0  # layer-norm scales around 1
        p.copy_(base + 0.2 * torch.randn_like(p))
  return model


def _torch_embed(model, pixels):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model.visual(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).numpy()


def _rel(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


# (name, open_clip arch, embed_dim, vision_cfg, quick_gelu, memjax config)
_PARITY_CASES = {
    "tiny": ("ViT-B-32", 32, dict(image_size=32, layers=2, width=64, patch_size=8,
                                  head_width=32), False,
             cv.ARCHS["tiny"]),
    "ViT-B-32-quickgelu-shrunk": (
        "ViT-B-32-quickgelu", 64, dict(image_size=224, layers=2, width=128, patch_size=32),
        True, cv.VisionConfig(224, 32, 128, 2, 2, 64, quick_gelu=True)),
    "ViT-L-14-shrunk": (
        "ViT-L-14", 48, dict(image_size=224, layers=2, width=128, patch_size=14), False,
        cv.VisionConfig(224, 14, 128, 2, 2, 48)),
    "ViT-H-14-shrunk-head80": (
        "ViT-H-14", 40, dict(image_size=56, layers=2, width=160, patch_size=14,
                             head_width=80), False,
        cv.VisionConfig(56, 14, 160, 2, 2, 40)),
}


@pytest.mark.parametrize("case", sorted(_PARITY_CASES))
def test_flax_forward_matches_open_clip(case):
  arch, dim, vision_cfg, quick_gelu, config = _PARITY_CASES[case]
  model = _open_clip_model(arch, dim, vision_cfg, quick_gelu)
  state = clip_tiny.visual_state_dict(model)
  found = cvl.infer_config(state, quick_gelu=quick_gelu,
                           head_width=vision_cfg.get("head_width"))
  assert found == config
  params = cvl.params_from_state_dict(state, config)
  pixels = np.random.default_rng(1).standard_normal(
      (3, config.image_size, config.image_size, 3)).astype(np.float32)
  got = np.asarray(cv.make_encoder(config)(params, pixels))
  want = _torch_embed(model, pixels)
  assert got.shape == (3, config.output_dim) and got.dtype == np.float32
  rel = _rel(got, want)
  print(f"\nparity {case}: relative max diff {rel:.3g}")
  assert rel <= 1e-4
  # The inverse rule gives back open_clip's tensors.
  back = cvl.state_dict_from_params(params, config)
  assert sorted(back) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_checkpoint_files_round_trip(tmp_path):
  pytest.importorskip("open_clip")
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  arch, dim, vision_cfg, quick_gelu, config = _PARITY_CASES["tiny"]
  model = _open_clip_model(arch, dim, vision_cfg, quick_gelu, seed=3)
  full = model.state_dict()  # text tower included, as open_clip's files are
  files = {"open_clip_model.safetensors": None, "open_clip_pytorch_model.bin": None,
           "epoch_1.pt": None}
  save_file({k: v.contiguous() for k, v in full.items()},
            str(tmp_path / "open_clip_model.safetensors"))
  torch.save(full, tmp_path / "open_clip_pytorch_model.bin")
  # A training checkpoint: {"state_dict": ...} of a DistributedDataParallel model.
  torch.save({"epoch": 1, "name": "run", "state_dict": {"module." + k: v for k, v in full.items()}},
             tmp_path / "epoch_1.pt")
  pixels = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
  want = _torch_embed(model, pixels)
  encode = cv.make_encoder(config)
  for name in files:
    files[name] = np.asarray(encode(cvl.load_vision_params(str(tmp_path / name), config),
                                    pixels))
    print(f"\nround trip {name}: relative max diff {_rel(files[name], want):.3g}")
    assert _rel(files[name], want) <= 1e-4
  for name in files:
    np.testing.assert_array_equal(files[name], files["open_clip_model.safetensors"])


def test_shipped_tiny_file_is_the_seed0_open_clip_encoder():
  pytest.importorskip("open_clip")
  shipped = checkpoint.read_safetensors(clip_tiny.ASSET)
  fresh = clip_tiny.visual_state_dict(clip_tiny.build_open_clip_tiny())
  assert sorted(shipped) == sorted(fresh)
  for k, v in fresh.items():
    assert shipped[k].dtype == np.float32
    np.testing.assert_array_equal(shipped[k], v, err_msg=k)
  assert cvl.infer_config(shipped, head_width=32) == cv.ARCHS["tiny"]
  from memjax.data import embed  # pylint: disable=g-import-not-at-top
  if hasattr(embed, "_TINY_KWARGS"):  # the torch embedder's own copy, while it has one
    assert (embed._TINY_ARCH, embed._TINY_KWARGS) == (clip_tiny.TINY_ARCH, clip_tiny.TINY_KWARGS)


def _cosine_top10(e):
  e = e / np.linalg.norm(e, axis=1, keepdims=True)
  sims = e @ e.T
  return np.argsort(-sims, axis=1, kind="stable")[:, :10], sims


def test_testbed_neighbours_are_those_of_the_open_clip_tiny_encoder():
  pytest.importorskip("open_clip")
  from memjax.data import embed  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(TESTBED_IMAGES, "*.png")))
  assert len(paths) > 1000
  images = []
  for p in paths:
    with Image.open(p) as im:
      images.append(im.copy())
  from memjax.testing import open_clip_reference  # pylint: disable=g-import-not-at-top
  torch_e = open_clip_reference.OpenClipEmbedder(embed.EmbedderSpec("tiny", random=True),
                                                 batch_size=256)
  want = torch_e.embed(images)
  config = cv.ARCHS["tiny"]
  params = cvl.load_vision_params(clip_tiny.ASSET, config, "tiny")
  pixels = cp.preprocess(images, cp.preprocess_config("tiny", None, config.image_size))
  got = np.asarray(cv.make_encoder(config)(params, pixels))
  got = got / np.linalg.norm(got, axis=1, keepdims=True)
  print(f"\ntestbed {len(images)} images: max abs diff of unit embeddings "
        f"{np.abs(got - want).max():.3g}")
  (top_got, _), (top_want, sims) = _cosine_top10(got), _cosine_top10(want)
  differ = np.flatnonzero((top_got != top_want).any(axis=1))
  print(f"testbed: {len(images) - differ.size} of {len(images)} top-10 lists identical; "
        f"the others swap neighbours tied in float32 (rows {differ.tolist()})")
  # Float32 sums in another order move a cosine by ~1e-7 (torch's own embeddings
  # move that much with the batch size), so neighbours whose cosines tie to
  # that precision may swap ranks; every rank must hold a neighbour as similar,
  # by the reference's cosines, as the reference's own.
  rows = np.arange(len(images))[:, None]
  gap = np.abs(sims[rows, top_got] - sims[rows, top_want])
  assert gap.max() <= 1e-6, f"image {gap.max(axis=1).argmax()}: gap {gap.max():.3g}"
  assert differ.size <= len(images) // 100


def test_clear_one_line_errors(tmp_path):
  tiny = cv.ARCHS["tiny"]
  shipped = dict(checkpoint.read_safetensors(clip_tiny.ASSET))

  def error(cls, path, config=tiny):
    with pytest.raises(cls) as e:
      cvl.load_vision_params(str(path), config)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    return str(e.value)

  assert "does not exist" in error(InputError, tmp_path / "nope.safetensors")
  msg = error(CheckpointError, clip_tiny.ASSET, cv.ARCHS["ViT-B-32"])
  assert "width 64 (wanted 768)" in msg and "layers 2 (wanted 12)" in msg

  def write(name, state):
    path = tmp_path / name
    checkpoint.write_safetensors(str(path), state)
    return path

  extra = dict(shipped, **{"visual.attn_pool.query": np.zeros((4,), np.float32)})
  assert "'visual.attn_pool.query'" in error(CheckpointError, write("extra.safetensors", extra))
  missing = {k: v for k, v in shipped.items() if k != "visual.ln_post.bias"}
  assert "'visual.ln_post.bias' is missing" in error(CheckpointError,
                                                     write("missing.safetensors", missing))
  bad = dict(shipped, **{"visual.class_embedding": np.zeros((65,), np.float32)})
  assert "'visual.class_embedding' has shape (65,)" in error(
      CheckpointError, write("shape.safetensors", bad))
  bare = {k[len("visual."):]: v for k, v in shipped.items()}
  assert "lack the 'visual.' prefix" in error(CheckpointError, write("bare.safetensors", bare))
  torch = pytest.importorskip("torch")
  script = tmp_path / "ViT-L-14.pt"
  torch.jit.script(torch.nn.Linear(2, 2)).save(str(script))
  assert "TorchScript" in error(CheckpointError, script)
  junk = tmp_path / "junk.bin"
  junk.write_bytes(b"not a pickle")
  error(CheckpointError, junk)


def test_init_params_has_the_loaded_tree():
  import jax  # pylint: disable=g-import-not-at-top
  tiny = cv.ARCHS["tiny"]
  loaded = cvl.load_vision_params(clip_tiny.ASSET, tiny)
  a, b = cv.init_params(tiny, 0), cv.init_params(tiny, 1)
  shape = lambda t: jax.tree_util.tree_map(np.shape, t)
  assert shape(a) == shape(loaded) and cv.param_count(a) == cv.param_count(loaded)
  again = jax.tree_util.tree_leaves(cv.init_params(tiny, 0))
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), again))
  assert not np.array_equal(a["proj"], b["proj"])
  out = cv.make_encoder(tiny)(a, np.zeros((2, 32, 32, 3), np.float32))
  assert out.shape == (2, 32) and bool(np.isfinite(out).all())
  with pytest.raises(InputError, match=r"\[batch, 32, 32, 3\]"):
    cv.make_encoder(tiny)(a, np.zeros((2, 3, 32, 32), np.float32))


_MEMJAX_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}


def test_arch_and_tag_copies_equal_open_clips():
  open_clip = pytest.importorskip("open_clip")
  for name, config in cv.ARCHS.items():
    if name == cv.TINY:
      oc = open_clip.get_model_config(clip_tiny.TINY_ARCH)
      oc = dict(oc, embed_dim=clip_tiny.TINY_KWARGS["embed_dim"],
                vision_cfg=dict(oc["vision_cfg"], **clip_tiny.TINY_KWARGS["vision_cfg"]))
    else:
      oc = open_clip.get_model_config(name)
    assert oc is not None, name
    v = oc["vision_cfg"]
    # Nothing that memjax's VisionTransformer does not reproduce.
    assert set(v) <= _MEMJAX_VISION_KEYS, (name, set(v) - _MEMJAX_VISION_KEYS)
    assert set(oc) <= {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}, name
    want = cv.VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"],
                           width=v["width"], layers=v["layers"],
                           heads=v["width"] // v.get("head_width", 64),
                           output_dim=oc["embed_dim"], mlp_ratio=v.get("mlp_ratio", 4.0),
                           quick_gelu=oc.get("quick_gelu", False))
    assert config == want, name
  for arch in cv.ARCHS:
    if arch == cv.TINY:
      continue
    assert sorted(cp.PRETRAINED[arch]) == sorted(open_clip.list_pretrained_tags_by_model(arch))
    for tag, entry in cp.PRETRAINED[arch].items():
      oc = open_clip.get_pretrained_cfg(arch, tag)
      want = {k: oc.get(k, False if k == "quick_gelu" else None) for k in entry}
      assert entry == want, (arch, tag)
  assert cp.PreprocessConfig(224) == cp.preprocess_config("ViT-L-14", None, 224)
  from open_clip import transform as oc_transform  # pylint: disable=g-import-not-at-top
  default = oc_transform.PreprocessCfg()
  assert (default.mean, default.std, default.interpolation, default.resize_mode) == (
      cp.OPENAI_MEAN, cp.OPENAI_STD, "bicubic", "shortest")
  with pytest.raises(InputError, match="known: openai"):
    cp.lookup("ViT-L-14-336", "laion2b")
