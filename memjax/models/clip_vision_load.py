"""open_clip image-tower weights -> params of `memjax.models.clip_vision`.

An open_clip CLIP checkpoint (`open_clip_pytorch_model.bin`,
`open_clip_model.safetensors`, or a training checkpoint's
`{"state_dict": ...}`) holds the whole model; the image tower's tensors are
the `visual.*` keys, converted by rule (`_rules`): linear weights are
transposed to Flax's [in, out] kernels, conv1's OIHW weight becomes an HWIO
kernel, embeddings, layer norms and `proj` are copied. The text tower's keys
are ignored. As open_clip's `load_state_dict`, a `module.` prefix (a
DistributedDataParallel save) is stripped; a state dict without the `visual.`
prefix is refused, as open_clip's strict load refuses it.

`.safetensors` files are read without torch; pickled files (`.bin`, `.pt`,
`.pth`) through torch.load(weights_only=True) when torch is installed. OpenAI's
TorchScript archives (`ViT-L-14.pt`) are refused: reading them would run code
from the file.
"""
import math
import os
import re
import zipfile
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

from memjax.models import checkpoint
from memjax.models.clip_vision import ARCHS, VisionConfig
from memjax.runtime.errors import CheckpointError, InputError

PREFIX = "visual."
_DDP_PREFIX = "module."
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")


def _block_rules(w: int, m: int):
  """(key suffix, param path, kind, shape) of one residual block, width w, MLP m.

  kind "linear" transposes torch's [out, in] weight to Flax's [in, out] kernel.
  """
  return (
      ("ln_1.weight", ("ln_1", "scale"), "copy", (w,)),
      ("ln_1.bias", ("ln_1", "bias"), "copy", (w,)),
      ("attn.in_proj_weight", ("attn", "in_proj", "kernel"), "linear", (3 * w, w)),
      ("attn.in_proj_bias", ("attn", "in_proj", "bias"), "copy", (3 * w,)),
      ("attn.out_proj.weight", ("attn", "out_proj", "kernel"), "linear", (w, w)),
      ("attn.out_proj.bias", ("attn", "out_proj", "bias"), "copy", (w,)),
      ("ln_2.weight", ("ln_2", "scale"), "copy", (w,)),
      ("ln_2.bias", ("ln_2", "bias"), "copy", (w,)),
      ("mlp.c_fc.weight", ("mlp", "c_fc", "kernel"), "linear", (m, w)),
      ("mlp.c_fc.bias", ("mlp", "c_fc", "bias"), "copy", (m,)),
      ("mlp.c_proj.weight", ("mlp", "c_proj", "kernel"), "linear", (w, m)),
      ("mlp.c_proj.bias", ("mlp", "c_proj", "bias"), "copy", (w,)),
  )


def _rules(config: VisionConfig) -> Iterator[Tuple[str, Tuple[str, ...], str, Tuple[int, ...]]]:
  """(open_clip key, param path, kind, open_clip shape) of every image-tower tensor."""
  w, p = config.width, config.patch_size
  yield PREFIX + "conv1.weight", ("conv1", "kernel"), "conv", (w, 3, p, p)
  yield PREFIX + "class_embedding", ("class_embedding",), "copy", (w,)
  yield PREFIX + "positional_embedding", ("positional_embedding",), "copy", (config.num_tokens, w)
  for name in ("ln_pre", "ln_post"):
    yield PREFIX + f"{name}.weight", (name, "scale"), "copy", (w,)
    yield PREFIX + f"{name}.bias", (name, "bias"), "copy", (w,)
  yield PREFIX + "proj", ("proj",), "copy", (w, config.output_dim)
  block = _block_rules(w, config.mlp_width)
  for i in range(config.layers):
    for suffix, path, kind, shape in block:
      yield (PREFIX + f"transformer.resblocks.{i}.{suffix}",
             ("transformer", f"resblocks_{i}") + path, kind, shape)


def _to_flax(kind: str, value: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if kind == "linear":
    return value.T
  return value


def strip_module_prefix(state: Mapping[str, Any]) -> Dict[str, Any]:
  """open_clip's rule: if the first key starts with 'module', drop 7 characters of every key."""
  keys = list(state)
  if keys and keys[0].startswith("module"):
    return {k[len(_DDP_PREFIX):]: v for k, v in state.items()}
  return dict(state)


def _check_visual_keys(state: Mapping[str, Any], source: str) -> None:
  if any(k.startswith(PREFIX) for k in state):
    return
  bare = "conv1.weight" in state or "class_embedding" in state
  hint = (" (the keys lack the 'visual.' prefix: a bare image-tower state dict, which "
          "open_clip does not load either)" if bare else "")
  some = ", ".join(repr(k) for k in list(state)[:3])
  raise CheckpointError(f"{source}: no 'visual.*' tensors, not an open_clip CLIP state dict "
                        f"(keys like {some or 'none'}){hint}")


def params_from_state_dict(state: Mapping[str, Any], config: VisionConfig,
                           source: str = "state dict") -> Dict[str, Any]:
  """Converts an open_clip CLIP state dict to `VisionTransformer` params.

  Args:
    state: {key: array} of a whole CLIP model (text keys are ignored) or of its
      image tower, keys prefixed `visual.` (a `module.` prefix is stripped).
    config: the architecture the params are for.
    source: the file (or a description), named in every error.

  Returns:
    A nested dict of float32 numpy arrays (`model.apply({"params": ...})`).

  Raises:
    CheckpointError: one line naming the key, for a missing `visual.*` tensor,
      one the architecture has no place for, or a shape mismatch.
  """
  state = strip_module_prefix(state)
  _check_visual_keys(state, source)
  params: Dict[str, Any] = {}
  expected = set()
  for key, path, kind, shape in _rules(config):
    expected.add(key)
    if key not in state:
      raise CheckpointError(f"{source}: tensor '{key}' is missing (an open_clip ViT image "
                            f"tower of {config.describe()} needs it)")
    value = np.asarray(state[key])
    if tuple(value.shape) != shape:
      raise CheckpointError(f"{source}: tensor '{key}' has shape {tuple(value.shape)}, but "
                            f"{config.describe()} needs {shape}")
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(_to_flax(kind, value.astype(np.float32)))
  unknown = sorted(k for k in state if k.startswith(PREFIX) and k not in expected)
  if unknown:
    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    raise CheckpointError(f"{source}: tensor '{unknown[0]}'{more} is not part of an open_clip "
                          f"ViT image tower of {config.describe()}")
  return params


def state_dict_from_params(params: Mapping[str, Any],
                           config: VisionConfig) -> Dict[str, np.ndarray]:
  """The inverse rule: params -> open_clip `visual.*` {key: float32 array}."""
  out = {}
  for key, path, kind, _ in _rules(config):
    node = params
    for name in path:
      node = node[name]
    value = np.asarray(node, np.float32)
    out[key] = np.ascontiguousarray(value.transpose(3, 2, 0, 1) if kind == "conv" else
                                    value.T if kind == "linear" else value)
  return out


def _shape(state: Mapping[str, Any], key: str, ndim: int, source: str) -> Tuple[int, ...]:
  if key not in state:
    raise CheckpointError(f"{source}: tensor '{key}' is missing, not an open_clip ViT "
                          "image tower")
  shape = tuple(np.shape(state[key]))
  if len(shape) != ndim:
    raise CheckpointError(f"{source}: tensor '{key}' has shape {shape}; an open_clip ViT "
                          f"image tower has a {ndim}-d tensor there")
  return shape


def infer_config(state: Mapping[str, Any], quick_gelu: bool = False,
                 head_width: Optional[int] = None, source: str = "state dict") -> VisionConfig:
  """The image-tower architecture read off the tensor shapes of a state dict.

  Width, patch size, layers, MLP ratio and output width are read off the
  shapes, the image size from the positional-embedding count (grid * patch).
  Heads and the activation are not in the shapes: heads are width //
  head_width, head_width 64 unless given (80 for width 1280, open_clip's
  ViT-H-14); `quick_gelu` is taken as given.

  Raises:
    CheckpointError: naming the key, if a tensor the reading needs is missing
      or shaped unlike an open_clip ViT image tower.
  """
  state = strip_module_prefix(state)
  _check_visual_keys(state, source)
  width, channels, ph, pw = _shape(state, PREFIX + "conv1.weight", 4, source)
  if channels != 3 or ph != pw:
    raise CheckpointError(f"{source}: tensor '{PREFIX}conv1.weight' has shape "
                          f"{(width, channels, ph, pw)}; memjax reads square patches of RGB")
  tokens, _ = _shape(state, PREFIX + "positional_embedding", 2, source)
  grid = math.isqrt(max(tokens - 1, 0))
  if grid * grid != tokens - 1 or grid == 0:
    raise CheckpointError(f"{source}: tensor '{PREFIX}positional_embedding' has {tokens} "
                          "rows, not a square grid of patches plus a class token")
  _, output_dim = _shape(state, PREFIX + "proj", 2, source)
  blocks = {int(m.group(1)) for k in state if k.startswith(PREFIX)
            for m in [_BLOCK.match(k[len(PREFIX):])] if m}
  layers = max(blocks) + 1 if blocks else 0
  if layers == 0:
    raise CheckpointError(f"{source}: no '{PREFIX}transformer.resblocks.*' tensors, not an "
                          "open_clip ViT image tower")
  mlp_width, _ = _shape(state, PREFIX + "transformer.resblocks.0.mlp.c_fc.weight", 2, source)
  if head_width is None:
    head_width = 80 if width == 1280 else 64
  mlp_ratio = mlp_width / width
  if int(width * mlp_ratio) != mlp_width:  # float rounding below an integer width
    mlp_ratio = math.nextafter(mlp_ratio, math.inf)
  return VisionConfig(image_size=grid * ph, patch_size=ph, width=width, layers=layers,
                      heads=max(1, width // head_width), output_dim=output_dim,
                      mlp_ratio=mlp_ratio, quick_gelu=quick_gelu)


_SHAPE_FIELDS = ("image_size", "patch_size", "width", "layers", "mlp_width", "output_dim")


def shape_of(config: VisionConfig) -> Dict[str, Any]:
  """The fields of a config that the weights determine."""
  return {f: getattr(config, f) for f in _SHAPE_FIELDS}


def arch_names_for(config: VisionConfig) -> Tuple[str, ...]:
  """Names in ARCHS (without -quickgelu twins) whose shapes are config's."""
  return tuple(n for n, c in ARCHS.items()
               if not n.endswith("-quickgelu") and shape_of(c) == shape_of(config))


def check_matches(state: Mapping[str, Any], config: VisionConfig, source: str,
                  arch: Optional[str] = None) -> None:
  """Raises a one-line CheckpointError if the weights' shapes are not config's."""
  found = infer_config(state, source=source)
  have, want = shape_of(found), shape_of(config)
  diffs = [f"{f} {have[f]} (wanted {want[f]})" for f in _SHAPE_FIELDS if have[f] != want[f]]
  if diffs:
    names = arch_names_for(found)
    like = f"; the file has the shapes of {' / '.join(names)}" if names else ""
    raise CheckpointError(f"{source}: weights of another architecture than "
                          f"{arch or 'the chosen one'}: {'; '.join(diffs)}{like}")


def _torchscript(path: str) -> bool:
  """Whether path is a TorchScript archive (a zip with code/ or constants.pkl)."""
  try:
    if not zipfile.is_zipfile(path):
      return False
    with zipfile.ZipFile(path) as z:
      return any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist())
  except (OSError, zipfile.BadZipFile):
    return False


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """{key: array} of an open_clip checkpoint file (see the module docstring).

  Raises:
    InputError: if the file does not exist.
    CheckpointError: one line naming the file, if it cannot be read as a
      state dict (TorchScript, numpy big_vision weights, corrupt, or pickled
      without torch installed).
  """
  if not os.path.isfile(path):
    raise InputError(f"{path}: CLIP weights file does not exist (memjax never downloads "
                     "weights)")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    return checkpoint.read_safetensors(path)
  if ext in (".npz", ".npy"):
    raise CheckpointError(f"{path}: numpy (big_vision) weights are not read; use the "
                          "open_clip_model.safetensors or open_clip_pytorch_model.bin of the model")
  if _torchscript(path):
    raise CheckpointError(f"{path}: a TorchScript archive (OpenAI's ViT-*.pt), which memjax "
                          "does not read (it would run code from the file); use the "
                          "open_clip_pytorch_model.bin / open_clip_model.safetensors of the "
                          "model")
  # A training checkpoint's {"state_dict": ...} is unwrapped as open_clip does.
  return checkpoint.read_torch_file(path, "checkpoint")


def load_vision_params(path: str, config: VisionConfig,
                       arch: Optional[str] = None) -> Dict[str, Any]:
  """Reads an open_clip checkpoint file into `VisionTransformer` params.

  Args:
    path: `.safetensors` (read without torch), or `.bin` / `.pt` / `.pth`
      (a pickled state dict; needs torch).
    config: the chosen architecture.
    arch: its name, for error messages.

  Raises:
    InputError: the file does not exist.
    CheckpointError: one line, if the file is unreadable, holds weights of
      another architecture (naming each differing shape), or has a missing,
      unknown or misshapen `visual.*` tensor.
  """
  state = read_state_dict(path)
  check_matches(state, config, path, arch)
  return params_from_state_dict(state, config, path)
