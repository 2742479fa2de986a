"""PyTorch state dicts <-> memjax Flax params, by rule.

memjax's Flax modules name their submodules exactly as diffusers / transformers
name theirs, with a list index joined to its list's name: PyTorch key
`down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight` is Flax path
`down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q/kernel`. The leaf is
chosen by what the Flax module holds at that path:

- `kernel`: a Linear weight [out, in] becomes [in, out]; a Conv weight
  [O, I, kh, kw] becomes [kh, kw, I, O]; a 1 x 1 Conv weight stored for a Flax
  Dense (old VAE attention checkpoints) is squeezed first.
- `scale` (LayerNorm, GroupNorm): the weight as it is.
- `embedding` (nn.Embed): the weight as it is.
- `bias`: as it is.

Every key and shape is checked against the abstract params of the module
(`jax.eval_shape` of its init, so nothing is initialised); all problems are
collected and raised as one `CheckpointError` that names the file and each key.
This module imports neither torch nor jax.numpy math beyond numpy.
"""
from typing import Callable, Dict, Mapping, Sequence, Tuple

import ml_dtypes
import numpy as np

from memjax.runtime.errors import CheckpointError

Path = Tuple[str, ...]

# Buffers that PyTorch modules save but that are not parameters.
_IGNORED_SUFFIXES = ("position_ids",)
# Old diffusers VAE attention names (before diffusers 0.14), renamed on load as
# diffusers itself does (`_convert_deprecated_attention_blocks`).
_DEPRECATED_ATTENTION = {"query": ("to_q",), "key": ("to_k",), "value": ("to_v",),
                         "proj_attn": ("to_out_0",)}
_MAX_LISTED = 20
# Weight dtypes memjax casts to the compute dtype; an integer, bool or complex tensor
# where a parameter belongs is a broken checkpoint, not something to cast.
_FLOAT_DTYPES = frozenset(np.dtype(d) for d in (np.float16, np.float32, np.float64,
                                                ml_dtypes.bfloat16))


def torch_key_to_path(key: str) -> Path:
  """`a.b.0.c.weight` -> ('a', 'b_0', 'c', 'weight')."""
  out = []
  for part in key.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def flatten(tree: Mapping, prefix: Path = ()) -> Dict[Path, object]:
  """Nested dicts -> {path tuple: leaf}."""
  flat = {}
  for name, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, prefix + (name,)))
    else:
      flat[prefix + (name,)] = value
  return flat


def unflatten(flat: Mapping[Path, object]) -> Dict:
  tree: Dict = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


def _fix_deprecated(path: Path) -> Path:
  if len(path) >= 2 and path[-2] in _DEPRECATED_ATTENTION:
    return path[:-2] + _DEPRECATED_ATTENTION[path[-2]] + path[-1:]
  return path


def _convert_leaf(module_path: Path, leaf: str, value: np.ndarray,
                  module_leaves: Sequence[str]):
  """Returns (flax path, converted array) or (None, None) if nothing fits."""
  if leaf == "bias" and "bias" in module_leaves:
    return module_path + ("bias",), value
  if leaf != "weight":
    return None, None
  if "kernel" in module_leaves:
    if value.ndim == 4:
      return module_path + ("kernel",), ("conv", value)
    if value.ndim == 2:
      return module_path + ("kernel",), value.T
    return module_path + ("kernel",), value
  for name in ("scale", "embedding"):
    if name in module_leaves:
      return module_path + (name,), value
  return None, None


def torch_to_flax(state: Mapping[str, np.ndarray], abstract_params: Mapping,
                  source: Callable[[str], str],
                  prefix: str = "") -> Dict:
  """Converts a PyTorch state dict to a Flax param tree, checking everything.

  Args:
    state: PyTorch key -> array (numpy: float16, bfloat16, float32 or float64).
    abstract_params: the module's params as `jax.ShapeDtypeStruct`s (from
      `jax.eval_shape`), nested dicts.
    source: key -> the file it came from, for error messages.
    prefix: a PyTorch key prefix to strip (e.g. "" for diffusers models).

  Returns:
    Nested dict of numpy arrays with the abstract tree's structure.

  Raises:
    CheckpointError: naming the first weight that is not floating point (one line),
      else every unexpected, missing or mis-shaped weight.
  """
  target = flatten(abstract_params)
  leaves_by_module: Dict[Path, list] = {}
  for path in target:
    leaves_by_module.setdefault(path[:-1], []).append(path[-1])

  out: Dict[Path, np.ndarray] = {}
  from_key: Dict[Path, str] = {}
  problems = []
  not_float = []  # (key, dtype) of weights that match a parameter but are not floats
  for key, value in state.items():
    name = key[len(prefix):] if prefix and key.startswith(prefix) else key
    if name.endswith(_IGNORED_SUFFIXES):
      continue
    path = torch_key_to_path(name)
    module_path = path[:-1]
    if module_path not in leaves_by_module:
      module_path = _fix_deprecated(path)[:-1]
    flax_path, converted = _convert_leaf(
        module_path, path[-1], np.asarray(value),
        leaves_by_module.get(module_path, ()))
    if flax_path is None or flax_path not in target:
      problems.append(f"{source(key)}: unexpected weight '{key}' "
                      f"(no parameter of the model built from the config matches it)")
      continue
    dtype = np.asarray(value).dtype
    if dtype not in _FLOAT_DTYPES:
      not_float.append((key, dtype))
      continue
    want = tuple(target[flax_path].shape)
    if isinstance(converted, tuple):  # conv weight, layout decided by target rank
      w = converted[1]
      if len(want) == 2 and w.shape[2:] == (1, 1):
        converted = w[:, :, 0, 0].T
      else:
        converted = np.transpose(w, (2, 3, 1, 0))
    if tuple(converted.shape) != want:
      problems.append(
          f"{source(key)}: weight '{key}' has shape {tuple(np.asarray(value).shape)}, "
          f"but the config implies {want} for parameter '{'/'.join(flax_path)}'")
      continue
    if flax_path in out:
      problems.append(f"{source(key)}: weight '{key}' duplicates '{from_key[flax_path]}'")
      continue
    out[flax_path] = converted
    from_key[flax_path] = key
  if not_float:
    key, dtype = not_float[0]
    more = f" (and {len(not_float) - 1} more weights)" if len(not_float) > 1 else ""
    raise CheckpointError(
        f"{source(key)}: weight '{key}' has dtype {dtype}{more}; memjax loads only "
        f"floating-point weights (float16, bfloat16, float32, float64)")
  for path in target:
    if path not in out:
      problems.append(f"{source('')}: missing weight for parameter '{'/'.join(path)}' "
                      f"(expected a PyTorch key like '{prefix}{flax_path_to_torch_key(path)}')")
  if problems:
    shown = problems[:_MAX_LISTED]
    more = len(problems) - len(shown)
    raise CheckpointError("weights do not match the config:\n  " + "\n  ".join(shown) +
                          (f"\n  ... and {more} more" if more else ""))
  return unflatten(out)


def flax_path_to_torch_key(path: Path) -> str:
  """Best-effort inverse of `torch_key_to_path` plus the leaf rule.

  Only list indices of names that diffusers uses as lists are split back; a name
  such as `linear_1` (time embedding) stays whole.
  """
  parts = []
  for name in path[:-1]:
    base, _, index = name.rpartition("_")
    if index.isdigit() and base in _LIST_NAMES:
      parts.extend([base, index])
    else:
      parts.append(name)
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1], path[-1])
  return ".".join(parts + [leaf])


_LIST_NAMES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "to_out", "net", "layers"})


def flax_to_torch(params: Mapping, prefix: str = "") -> Dict[str, np.ndarray]:
  """Inverse of `torch_to_flax`: Flax params -> PyTorch-named numpy state dict.

  Used to save models memjax builds or trains in the diffusers layout. A kernel
  of rank 4 is a Conv ([kh, kw, I, O] -> [O, I, kh, kw]); of rank 2 a Linear.
  """
  state = {}
  for path, value in flatten(params).items():
    value = np.asarray(value)
    if path[-1] == "kernel":
      value = np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T
    state[prefix + flax_path_to_torch_key(path)] = np.ascontiguousarray(value)
  return state
