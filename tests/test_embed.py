"""memjax.data.embed: the Flax CLIP image encoder from flags, random or a local
checkpoint, checked against open_clip's own (memjax.testing.open_clip_reference)."""
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
  # building the same encoder) gives the same vectors.
  np.testing.assert_allclose(tiny.embed(images[4:5])[0], e[4], atol=1e-6)
  again = embed.load_embedder("random", batch_size=32).embed(images)
  np.testing.assert_allclose(again, e, atol=1e-6)
  assert tiny.embed([]).shape == (0, tiny.dim)
  # Grayscale / RGBA inputs are converted to RGB like open_clip's loaders do.
  assert tiny.embed([images[0].convert("L"), images[0].convert("RGBA")]).shape == (2, tiny.dim)


def test_tiny_encoder_is_open_clips(tiny):
  """The shipped tiny weights and memjax's transform embed as open_clip does."""
  from memjax.testing import open_clip_reference  # pylint: disable=g-import-not-at-top
  ref = open_clip_reference.OpenClipEmbedder(tiny.spec)
  image = _images(1, size=(50, 70))[0]
  np.testing.assert_array_equal(tiny.pixels([image])[0],
                                ref.transform(image).numpy().transpose(1, 2, 0))
  images = _images(5)
  assert np.abs(tiny.embed(images) - ref.embed(images)).max() <= 1e-5


def test_checkpoint_of_a_real_architecture_embeds_as_open_clip(tmp_path):
  """ViT-B-32 with OpenAI's preprocessing and QuickGELU (the @openai tag), random
  torch weights saved as open_clip's state dict, read by memjax without torch
  (.safetensors): the embeddings of open_clip loading the same file."""
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from memjax.models import checkpoint  # pylint: disable=g-import-not-at-top
  from memjax.testing import open_clip_reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(123)
  model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
  ckpt = str(tmp_path / "open_clip_model.safetensors")
  checkpoint.write_safetensors(ckpt, {k: v.numpy() for k, v in model.state_dict().items()})
  del model
  e = embed.load_embedder("ViT-B-32@openai", ckpt, batch_size=4)
  assert e.identity["quick_gelu"] and e.identity["checkpoint"].split(":")[0] in ("sha256", "sampled")
  images = _images(4, size=(300, 200))
  want = open_clip_reference.OpenClipEmbedder(e.spec).embed(images)
  got = e.embed(images)
  rel = np.abs(got - want).max() / np.abs(want).max()
  print(f"\nViT-B-32@openai, checkpoint-loaded: relative max diff {rel:.2e}")
  assert rel <= 1e-4
  # The same architecture with random weights embeds differently.
  assert np.abs(embed.load_embedder("random:ViT-B-32").embed(images) - want).max() > 1e-2


def test_clear_errors(tmp_path):
  with pytest.raises(InputError, match="needs --embedder_checkpoint"):
    embed.parse_embedder("ViT-L-14@openai", None)
  missing = str(tmp_path / "open_clip_pytorch_model.bin")
  with pytest.raises(InputError, match="open_clip_pytorch_model.bin: file does not exist"):
    embed.parse_embedder("ViT-L-14@openai", missing)
  with pytest.raises(InputError, match="unknown CLIP architecture 'ViT-Nope'"):
    embed.parse_embedder("ViT-Nope", missing)
  with pytest.raises(InputError, match="no pretrained tag 'nope'"):
    embed.parse_embedder("ViT-L-14@nope", missing)
  with pytest.raises(InputError, match="random weights"):
    embed.parse_embedder("random", missing)
  with pytest.raises(InputError, match="unknown CLIP architecture 'tiny'"):
    embed.parse_embedder("tiny", missing)
  spec = embed.parse_embedder("ViT-L-14@openai", __file__)  # any existing file passes parsing
  assert spec.arch == "ViT-L-14" and spec.tag == "openai" and spec.config().quick_gelu


def test_checkpoint_of_another_architecture_is_a_checkpoint_error(tmp_path):
  ckpt = str(tmp_path / "other.safetensors")
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copy(embed.TINY_WEIGHTS, ckpt)  # the tiny encoder's weights, named ViT-B-32
  with pytest.raises(CheckpointError, match="other.safetensors"):
    embed.load_embedder("ViT-B-32", ckpt)
