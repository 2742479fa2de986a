"""The reference image embedder: open_clip's own image tower and transform (PyTorch).

memjax embeds with its Flax encoder (`memjax.data.embed`); this is what it is
checked against, in the tests and benchmarks: the same `EmbedderSpec` built in
open_clip, its evaluation transform, its forward. torch and open_clip are imported
here only (memjax[reference]).
"""
from typing import Dict, List, Optional, Sequence

import numpy as np

from memjax.data import embed
from memjax.testing import clip_tiny


class OpenClipEmbedder:
  """`embed.ImageEmbedder`'s interface on open_clip: spec, dim, image_size, transform
  (open_clip's, a PIL image -> [3, H, W] torch tensor), embed(images)."""

  def __init__(self, spec: embed.EmbedderSpec, batch_size: int = 32,
               device: Optional[str] = None):
    import open_clip  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    self._torch = torch
    self.spec = spec
    self.batch_size = max(1, int(batch_size))
    self.device = device or "cpu"
    kwargs: Dict = dict(pretrained=None, pretrained_image=False, pretrained_text=False)
    if spec.arch == embed.TINY:
      model = clip_tiny.build_open_clip_tiny()
    else:
      if spec.tag:
        tag_cfg = open_clip.get_pretrained_cfg(spec.arch, spec.tag)
        kwargs["force_preprocess_cfg"] = {k: tag_cfg[k] for k in
                                          ("mean", "std", "interpolation", "resize_mode")
                                          if k in tag_cfg}
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
      with torch.random.fork_rng(devices=[]):
        torch.manual_seed(embed.RANDOM_SEED)
        model = open_clip.create_model(spec.arch, **kwargs)
      if spec.checkpoint:
        open_clip.load_checkpoint(model, spec.checkpoint)
    self.visual = model.visual.to(self.device).eval()
    from open_clip import transform as oc_transform  # pylint: disable=g-import-not-at-top
    self.transform = oc_transform.image_transform_v2(
        oc_transform.PreprocessCfg(**self.visual.preprocess_cfg), is_train=False)
    size = self.visual.image_size
    self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    with torch.inference_mode():
      self.dim = int(self.visual(torch.zeros((1, 3) + self.image_size)).shape[-1])

  def embed(self, images: Sequence) -> np.ndarray:
    """PIL images -> [N, D] float32 unit rows, through open_clip."""
    torch = self._torch
    out: List[np.ndarray] = []
    for start in range(0, len(images), self.batch_size):
      batch = [self.transform(im.convert("RGB")) for im in images[start:start + self.batch_size]]
      with torch.inference_mode():
        out.append(self.visual(torch.stack(batch).to(self.device)).float().cpu().numpy())
    if not out:
      return np.zeros((0, self.dim), np.float32)
    return embed.l2_normalize(np.concatenate(out))
