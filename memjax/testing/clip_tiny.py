"""The shipped tiny CLIP image encoder (`--embedder=random`), built in open_clip.

memjax's tiny random encoder used to be open_clip's ViT-B-32 config shrunk
(`TINY_KWARGS`), initialised by torch under `torch.manual_seed(0)` in a forked
RNG. Its image tower is shipped as
`memjax/assets/clip_tiny/open_clip_model.safetensors` (the `visual.*` tensors,
float32), so memjax embeds with the same weights without torch, and the
labels of the demo and the testbed stay those of the torch encoder.

Regenerate (needs torch and open_clip):
  python -m memjax.testing.clip_tiny [OUT.safetensors]
"""
import os
import sys
from typing import Dict

import numpy as np

from memjax.models import checkpoint

TINY_ARCH = "ViT-B-32"
TINY_KWARGS = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
    text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
SEED = 0
ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                     "clip_tiny", "open_clip_model.safetensors")


def build_open_clip_tiny():
  """The open_clip CLIP model of the tiny encoder, torch seed 0, RNG state kept."""
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(SEED)
    return open_clip.create_model(TINY_ARCH, pretrained=None, pretrained_image=False,
                                  pretrained_text=False, **TINY_KWARGS)


def visual_state_dict(model) -> Dict[str, np.ndarray]:
  """{`visual.*` key: float32 array} of an open_clip model's image tower."""
  return {"visual." + k: v.detach().cpu().float().numpy().copy()
          for k, v in model.visual.state_dict().items()}


def write_tiny(path: str = ASSET) -> str:
  """Builds the tiny encoder and writes its image tower as safetensors at path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  checkpoint.write_safetensors(path, visual_state_dict(build_open_clip_tiny()))
  return path


if __name__ == "__main__":
  print(write_tiny(*sys.argv[1:2]))
