"""Writing memjax params as a Stable Diffusion folder in the diffusers layout.

The inverse of `loading.py`: configs as `config.json`, weights renamed to
PyTorch's keys (`convert.flax_to_torch`) in `.safetensors`, so the folder loads in
PyTorch `diffusers.StableDiffusionPipeline.from_pretrained` and in memjax through
the same code path as real weights. Used by the tiny-model builder and by training.
"""
import os
from typing import Dict, Optional

import numpy as np

from memjax.models import checkpoint
from memjax.runtime import workdir as workdir_lib
from memjax.models import convert

DIFFUSERS_VERSION = "0.42.1"
_WEIGHT_FILE = {"unet": "diffusion_pytorch_model.safetensors",
                "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}
_LIBRARY_CLASS = {"unet": ["diffusers", "UNet2DConditionModel"],
                  "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": ["transformers", "CLIPTextModel"],
                  "tokenizer": ["transformers", "CLIPTokenizer"]}


def save_component(model_dir: str, name: str, config: dict, params) -> str:
  """Writes `<model_dir>/<name>/config.json` and its float32 safetensors."""
  folder = os.path.join(model_dir, name)
  os.makedirs(folder, exist_ok=True)
  workdir_lib.write_json(os.path.join(folder, "config.json"), config)
  state = {k: np.asarray(v, np.float32) for k, v in convert.flax_to_torch(params).items()}
  path = os.path.join(folder, _WEIGHT_FILE[name])
  checkpoint.write_safetensors(path, state)
  return path


def save_stable_diffusion(model_dir: str, configs: Dict[str, dict], params: Dict[str, dict],
                          scheduler_config: dict,
                          extra_index: Optional[dict] = None) -> None:
  """Writes model_index.json, scheduler/, and each component in `params`.

  The tokenizer folder is written by the caller (`memjax.data.tokenizer`).
  """
  os.makedirs(model_dir, exist_ok=True)
  for name, p in params.items():
    save_component(model_dir, name, configs[name], p)
  os.makedirs(os.path.join(model_dir, "scheduler"), exist_ok=True)
  workdir_lib.write_json(os.path.join(model_dir, "scheduler", "scheduler_config.json"), scheduler_config)
  index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
           "feature_extractor": [None, None], "safety_checker": [None, None],
           "requires_safety_checker": False,
           "scheduler": ["diffusers", scheduler_config["_class_name"]]}
  index.update(_LIBRARY_CLASS)
  index.update(extra_index or {})
  workdir_lib.write_json(os.path.join(model_dir, "model_index.json"), index)
