"""CLIP image embeddings with open_clip, from a local checkpoint only.

The retrieval side of ground truth (docs/method.md section 5) embeds training and
generated images with one CLIP image encoder and compares them by inner product
of L2-normalised vectors. ViT-L/14 with OpenAI's weights matches the
precomputed LAION-2B-en image embeddings.

Which encoder, from `--embedder` (and `--embedder_checkpoint`):
- `ViT-L-14@openai` + checkpoint FILE: the open_clip architecture `ViT-L-14`,
  weights from FILE (`open_clip_pytorch_model.bin`, `.safetensors`, `.pt`);
  the tag after `@` names open_clip's pretrained config, from which only the
  preprocessing (mean, std, interpolation, resize mode) and the activation
  (QuickGELU for OpenAI weights) are taken: nothing is downloaded, ever.
  Without a tag the architecture's defaults apply (OpenAI's mean/std, GELU:
  use `ViT-L-14-quickgelu` or `@openai` for OpenAI weights).
- `random:ARCH`: ARCH with random weights (seeded, so every process embeds
  alike), for tests and dry runs; `random` alone is a tiny ViT (32 px, 2
  layers) that embeds hundreds of images per second on a CPU.

torch and open_clip are imported only in this module, and only when an
embedder is built.
"""
import dataclasses
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from memjax.runtime import fingerprint
from memjax.runtime.errors import CheckpointError
from memjax.runtime.errors import InputError

RANDOM = "random"
RANDOM_SEED = 0
# The tiny test architecture: a ViT-B-32 config shrunk (open_clip merges these
# keyword arguments into the named config).
_TINY = "tiny"
_TINY_ARCH = "ViT-B-32"
_TINY_KWARGS = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
    text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")

@dataclasses.dataclass(frozen=True)
class EmbedderSpec:
  """An encoder choice: architecture, pretrained tag, weights file or random."""
  arch: str
  tag: Optional[str] = None
  checkpoint: Optional[str] = None
  random: bool = False

  def describe(self) -> str:
    if self.random:
      return RANDOM if self.arch == _TINY else f"{RANDOM}:{self.arch}"
    return self.arch + (f"@{self.tag}" if self.tag else "")


def parse_embedder(embedder: str, checkpoint: Optional[str] = None) -> EmbedderSpec:
  """Parses `--embedder` / `--embedder_checkpoint`; checks names and files.

  Raises:
    InputError: unknown architecture or tag, a checkpoint given for a random
      encoder, or a named checkpoint file that is missing.
  """
  import open_clip  # pylint: disable=g-import-not-at-top
  embedder = (embedder or "").strip()
  if not embedder:
    raise InputError("--embedder is empty")
  if embedder == RANDOM or embedder.startswith(RANDOM + ":"):
    if checkpoint:
      raise InputError(f"--embedder={embedder} uses random weights; drop "
                       f"--embedder_checkpoint={checkpoint}")
    arch = embedder[len(RANDOM) + 1:] or None
    if arch is None:
      return EmbedderSpec(_TINY, random=True)
    if arch not in open_clip.list_models():
      raise InputError(f"--embedder={embedder}: unknown open_clip architecture '{arch}'; "
                       f"known: {', '.join(open_clip.list_models())}")
    return EmbedderSpec(arch, random=True)
  arch, _, tag = embedder.partition("@")
  if arch not in open_clip.list_models():
    raise InputError(f"--embedder={embedder}: unknown open_clip architecture '{arch}'; "
                     f"known: {', '.join(open_clip.list_models())}")
  if tag and not open_clip.get_pretrained_cfg(arch, tag):
    raise InputError(f"--embedder={embedder}: open_clip knows no tag '{tag}' for {arch}; "
                     f"known: {', '.join(open_clip.list_pretrained_tags_by_model(arch))}")
  if not checkpoint:
    raise InputError(f"--embedder={embedder} needs --embedder_checkpoint=FILE, a local open_clip "
                     "checkpoint (memjax never downloads weights); for tests use "
                     "--embedder=random")
  if not os.path.isfile(checkpoint):
    raise InputError(f"--embedder_checkpoint={checkpoint}: file does not exist (weights for "
                     f"{embedder}; memjax never downloads them)")
  return EmbedderSpec(arch, tag or None, os.path.abspath(checkpoint))


class ImageEmbedder:
  """An open_clip image tower with its evaluation transform.

  Attributes:
    spec: the `EmbedderSpec` it was built from.
    dim: the embedding width D.
    image_size: the encoder's input size (pixels).
    identity: JSON-able dict that changes when the embeddings would change.
  """

  def __init__(self, spec: EmbedderSpec, batch_size: int = 32, device: Optional[str] = None):
    import open_clip  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    self._torch = torch
    self.spec = spec
    self.batch_size = max(1, int(batch_size))
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: Dict = dict(pretrained=None, pretrained_image=False, pretrained_text=False)
    if spec.arch == _TINY:
      arch = _TINY_ARCH
      kwargs.update(_TINY_KWARGS)
    else:
      arch = spec.arch
    if spec.tag:
      tag_cfg = open_clip.get_pretrained_cfg(arch, spec.tag)
      kwargs["force_preprocess_cfg"] = {k: tag_cfg[k] for k in _PREPROCESS_KEYS if k in tag_cfg}
      kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
    # Random weights from a fixed seed: index and verify, run as separate
    # processes, must build the same random encoder.
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(RANDOM_SEED)
      model = open_clip.create_model(arch, **kwargs)
    if spec.checkpoint:
      try:
        open_clip.load_checkpoint(model, spec.checkpoint)
      except (RuntimeError, KeyError, ValueError, OSError) as e:
        raise CheckpointError(
            f"{spec.checkpoint}: not an open_clip {spec.describe()} state dict (use the "
            "open_clip_pytorch_model.bin / .safetensors of the model; OpenAI's TorchScript "
            f".pt archives are not read): {str(e)[:2000]}") from None
    self.visual = model.visual.to(self.device).eval()
    del model  # the text tower is not needed
    # Exactly open_clip's evaluation transform (create_model_and_transforms).
    from open_clip import transform as oc_transform  # pylint: disable=g-import-not-at-top
    self.transform = oc_transform.image_transform_v2(
        oc_transform.PreprocessCfg(**self.visual.preprocess_cfg), is_train=False)
    with torch.inference_mode():
      size = model_image_size(self.visual)
      probe = torch.zeros((1, 3) + tuple(size), device=self.device)
      self.dim = int(self.visual(probe).shape[-1])
    self.image_size = model_image_size(self.visual)
    self.identity = {
        "embedder": spec.describe(), "random_seed": RANDOM_SEED if spec.random else None,
        "checkpoint": fingerprint.content_identity(spec.checkpoint) if spec.checkpoint else None,
        "dim": self.dim, "preprocess": {k: _jsonable(v)
                                        for k, v in self.visual.preprocess_cfg.items()},
        "open_clip_version": open_clip.__version__}

  def embed(self, images: Sequence) -> np.ndarray:
    """PIL images (any size, any mode) -> [N, D] float32, unit L2 norm rows."""
    torch = self._torch
    out: List[np.ndarray] = []
    for start in range(0, len(images), self.batch_size):
      batch = [self.transform(im.convert("RGB")) for im in images[start:start + self.batch_size]]
      with torch.inference_mode():
        feats = self.visual(torch.stack(batch).to(self.device)).float().cpu().numpy()
      out.append(feats)
    if not out:
      return np.zeros((0, self.dim), np.float32)
    return l2_normalize(np.concatenate(out))


def model_image_size(visual):
  size = visual.image_size
  return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _jsonable(v):
  return list(v) if isinstance(v, tuple) else v


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """[N, D] -> [N, D] float32 rows of unit norm (zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norms, 1e-12)


def load_embedder(embedder: str, checkpoint: Optional[str] = None,
                  batch_size: int = 32, device: Optional[str] = None) -> ImageEmbedder:
  """Parses the choice and builds the encoder (see the module docstring)."""
  return ImageEmbedder(parse_embedder(embedder, checkpoint), batch_size, device)
