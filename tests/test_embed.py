"""memjax.embed: open_clip image encoder from flags, random or a local checkpoint."""
import json

import numpy as np
import pytest
from PIL import Image

from memjax.data import embed
from memjax.runtime.errors import CheckpointError
from memjax.runtime.errors import InputError


def _images(n, seed=0, size=(48, 40)):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
  return embed.load_embedder("random", batch_size=3)


def test_random_embedder_is_normalised_batched_and_deterministic(tiny):
  images = _images(7)
  e = tiny.embed(images)
  assert e.shape == (7, tiny.dim) and e.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
  # The batch size (3) does not change a row; a second build (another process
  # building the same random encoder) gives the same vectors.
  np.testing.assert_allclose(tiny.embed(images[4:5])[0], e[4], atol=1e-6)
  again = embed.load_embedder("random", batch_size=32).embed(images)
  np.testing.assert_allclose(again, e, atol=1e-6)
  assert tiny.embed([]).shape == (0, tiny.dim)
  # Grayscale / RGBA inputs are converted to RGB like open_clip's loaders do.
  assert tiny.embed([images[0].convert("L"), images[0].convert("RGBA")]).shape == (2, tiny.dim)


def test_preprocessing_is_open_clips_eval_transform(tiny):
  import open_clip  # pylint: disable=g-import-not-at-top
  _, _, preprocess = open_clip.create_model_and_transforms(
      embed._TINY_ARCH, pretrained=None, **embed._TINY_KWARGS)
  image = _images(1, size=(50, 70))[0]
  np.testing.assert_array_equal(tiny.transform(image).numpy(), preprocess(image).numpy())


def _register_tiny_arch(tmp_path):
  """A named, tiny open_clip architecture (open_clip reads configs from JSON)."""
  import open_clip  # pylint: disable=g-import-not-at-top
  cfg = {"embed_dim": 16,
         "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                        "head_width": 16},
         "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 1,
                      "layers": 1}}
  path = tmp_path / "memjax-test-tiny.json"
  path.write_text(json.dumps(cfg))
  open_clip.add_model_config(str(path))
  return "memjax-test-tiny"


def test_local_checkpoint_loads_those_weights(tmp_path):
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  arch = _register_tiny_arch(tmp_path)
  torch.manual_seed(123)
  model = open_clip.create_model(arch, pretrained=None)
  ckpt = tmp_path / "weights.pt"
  torch.save(model.state_dict(), ckpt)
  e = embed.load_embedder(arch, str(ckpt))
  images = _images(4)
  x = torch.stack([e.transform(im) for im in images])
  with torch.no_grad():
    want = model.visual(x).numpy()
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(e.embed(images), want, atol=1e-5)
  assert e.identity["checkpoint"].startswith("sha256:")  # the file's content
  # The same architecture with random weights embeds differently.
  assert np.abs(embed.load_embedder(f"random:{arch}").embed(images) - want).max() > 1e-2


def test_clear_errors(tmp_path):
  with pytest.raises(InputError, match="needs --embedder_checkpoint"):
    embed.parse_embedder("ViT-L-14@openai", None)
  missing = str(tmp_path / "open_clip_pytorch_model.bin")
  with pytest.raises(InputError, match="open_clip_pytorch_model.bin: file does not exist"):
    embed.parse_embedder("ViT-L-14@openai", missing)
  with pytest.raises(InputError, match="unknown open_clip architecture 'ViT-Nope'"):
    embed.parse_embedder("ViT-Nope", missing)
  with pytest.raises(InputError, match="no tag 'nope'"):
    embed.parse_embedder("ViT-L-14@nope", missing)
  with pytest.raises(InputError, match="random weights"):
    embed.parse_embedder("random", missing)
  spec = embed.parse_embedder("ViT-L-14@openai", __file__)  # any existing file passes parsing
  assert spec.arch == "ViT-L-14" and spec.tag == "openai"


def test_checkpoint_of_another_architecture_is_a_checkpoint_error(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  arch = _register_tiny_arch(tmp_path)
  ckpt = tmp_path / "other.pt"
  torch.save({"visual.proj": torch.zeros(3, 3)}, ckpt)
  with pytest.raises(CheckpointError, match="other.pt"):
    embed.load_embedder(arch, str(ckpt))
