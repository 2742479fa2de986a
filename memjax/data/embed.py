"""CLIP image embeddings with memjax's Flax encoder, from a local checkpoint only.

The retrieval side of ground truth (docs/method.md section 5) embeds training and
generated images with one CLIP image encoder and compares them by inner product
of L2-normalised vectors. ViT-L/14 with OpenAI's weights matches the
precomputed LAION-2B-en image embeddings.

The encoder is open_clip's VisionTransformer restated in Flax
(`memjax.models.clip_vision`), its weights read from open_clip checkpoints by
rule (`memjax.models.clip_vision_load`: .safetensors without torch, .bin/.pt
through torch where it is installed), its evaluation transform in numpy/PIL
(`memjax.data.clip_preprocess`), batched under jit over the local devices (the
stage engine's `BoundStep`). No torch on this path; open_clip itself is the
reference it is tested against (`memjax.testing.open_clip_reference`).

Which encoder, from `--embedder` (and `--embedder_checkpoint`):
- `ViT-L-14@openai` + checkpoint FILE: the architecture `ViT-L-14` (one of
  `clip_vision.ARCHS`), weights from FILE (`open_clip_pytorch_model.bin`,
  `.safetensors`, `.pt`); the tag after `@` names open_clip's pretrained config,
  from which only the preprocessing (mean, std, interpolation, resize mode) and
  the activation (QuickGELU for OpenAI weights) are taken: nothing is downloaded,
  ever. Without a tag the architecture's defaults apply (OpenAI's mean/std,
  GELU: use `ViT-L-14-quickgelu` or `@openai` for OpenAI weights).
- `random`: the tiny test encoder (32 px, 2 layers), its weights shipped in
  memjax/assets/clip_tiny (open_clip's seeded random init, written once by
  `memjax.testing.clip_tiny`); hundreds of images per second on a CPU.
- `random:ARCH`: ARCH with memjax's seeded random weights, for dry runs.
"""
import dataclasses
import os
from typing import Optional, Sequence

import jax
import numpy as np

from memjax.data import clip_preprocess
from memjax.models import clip_vision
from memjax.models import clip_vision_load
from memjax.runtime import distributed
from memjax.runtime import fingerprint
from memjax.runtime.errors import InputError

RANDOM = "random"
RANDOM_SEED = 0
TINY = clip_vision.TINY
TINY_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "assets", "clip_tiny", "open_clip_model.safetensors")
# Matmuls at full float32 precision (no TF32 or bf16 passes on accelerators), as
# open_clip computes the reference embeddings.
PRECISION = "highest"


@dataclasses.dataclass(frozen=True)
class EmbedderSpec:
  """An encoder choice: architecture, pretrained tag, weights file or random."""
  arch: str
  tag: Optional[str] = None
  checkpoint: Optional[str] = None
  random: bool = False

  def describe(self) -> str:
    if self.random:
      return RANDOM if self.arch == TINY else f"{RANDOM}:{self.arch}"
    return self.arch + (f"@{self.tag}" if self.tag else "")

  def config(self) -> clip_vision.VisionConfig:
    """The architecture, with the tag's activation (as open_clip's force_quick_gelu)."""
    config = clip_vision.ARCHS[self.arch]
    entry = clip_preprocess.lookup(self.arch, self.tag)
    if entry is not None:
      config = dataclasses.replace(config, quick_gelu=bool(entry["quick_gelu"]))
    return config


def _check_arch(embedder: str, arch: str) -> None:
  if arch not in clip_vision.ARCHS or arch == TINY:
    known = ", ".join(a for a in clip_vision.ARCHS if a != TINY)
    raise InputError(f"--embedder={embedder}: unknown CLIP architecture '{arch}'; "
                     f"memjax has {known}")


def parse_embedder(embedder: str, checkpoint: Optional[str] = None) -> EmbedderSpec:
  """Parses `--embedder` / `--embedder_checkpoint`; checks names and files.

  Raises:
    InputError: unknown architecture or tag, a checkpoint given for a random
      encoder, or a named checkpoint file that is missing.
  """
  embedder = (embedder or "").strip()
  if not embedder:
    raise InputError("--embedder is empty")
  if embedder == RANDOM or embedder.startswith(RANDOM + ":"):
    if checkpoint:
      raise InputError(f"--embedder={embedder} uses random weights; drop "
                       f"--embedder_checkpoint={checkpoint}")
    arch = embedder[len(RANDOM) + 1:] or None
    if arch is None:
      return EmbedderSpec(TINY, random=True)
    _check_arch(embedder, arch)
    return EmbedderSpec(arch, random=True)
  arch, _, tag = embedder.partition("@")
  _check_arch(embedder, arch)
  try:
    clip_preprocess.lookup(arch, tag or None)
  except InputError as e:
    raise InputError(f"--embedder={embedder}: {e}") from None
  if not checkpoint:
    raise InputError(f"--embedder={embedder} needs --embedder_checkpoint=FILE, a local open_clip "
                     "checkpoint (memjax never downloads weights); for tests use "
                     "--embedder=random")
  if not os.path.isfile(checkpoint):
    raise InputError(f"--embedder_checkpoint={checkpoint}: file does not exist (weights for "
                     f"{embedder}; memjax never downloads them)")
  return EmbedderSpec(arch, tag or None, os.path.abspath(checkpoint))


class ImageEmbedder:
  """A CLIP image tower (Flax) with its evaluation transform.

  Attributes:
    spec: the `EmbedderSpec` it was built from.
    dim: the embedding width D.
    image_size: the encoder's input size (pixels).
    identity: JSON-able dict that changes when the embeddings would change.
  """

  def __init__(self, spec: EmbedderSpec, batch_size: int = 32,
               devices: Optional[int] = None):
    from memjax.runtime import engine  # pylint: disable=g-import-not-at-top
    self.spec = spec
    config = spec.config()
    if spec.arch == TINY:
      params = clip_vision_load.load_vision_params(TINY_WEIGHTS, config, TINY)
    elif spec.random:
      params = clip_vision.init_params(config, RANDOM_SEED)
    else:
      params = clip_vision_load.load_vision_params(spec.checkpoint, config, spec.arch)
    self.preprocess_cfg = clip_preprocess.preprocess_config(spec.arch, spec.tag,
                                                            config.image_size)
    self.image_size = (config.image_size, config.image_size)
    self.dim = config.output_dim
    model = clip_vision.VisionTransformer(config)

    def encode(p, pixels):
      with jax.default_matmul_precision(PRECISION):  # traced once, inside the jit
        return model.apply({"params": p}, pixels)

    pad = np.zeros(self.image_size + (3,), np.float32)
    self._step = engine.BoundStep(encode, params, max(1, int(batch_size)),
                                  distributed.local_mesh(devices), pad)
    self.identity = {
        "embedder": spec.describe(), "random_seed": RANDOM_SEED if spec.random else None,
        "checkpoint": fingerprint.content_identity(spec.checkpoint) if spec.checkpoint else None,
        "dim": self.dim, "preprocess": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self.preprocess_cfg).items()},
        "encoder": "memjax.models.clip_vision", "quick_gelu": config.quick_gelu}

  @property
  def batch_size(self) -> int:
    return self._step.batch_size

  def pixels(self, images: Sequence) -> np.ndarray:
    """PIL images (any size, any mode) -> [N, H, W, 3] float32, open_clip's transform."""
    return clip_preprocess.preprocess(images, self.preprocess_cfg)

  def embed(self, images: Sequence) -> np.ndarray:
    """PIL images (any size, any mode) -> [N, D] float32, unit L2 norm rows."""
    if not len(images):
      return np.zeros((0, self.dim), np.float32)
    return l2_normalize(np.asarray(self._step.all(self.pixels(images))))


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """[N, D] -> [N, D] float32 rows of unit norm (zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norms, 1e-12)


def load_embedder(embedder: str, checkpoint: Optional[str] = None,
                  batch_size: int = 32, devices: Optional[int] = None) -> ImageEmbedder:
  """Parses the choice and builds the encoder (see the module docstring)."""
  return ImageEmbedder(parse_embedder(embedder, checkpoint), batch_size, devices)
