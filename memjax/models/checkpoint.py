"""Reading and writing weight files in the diffusers layout, without torch.

`.safetensors` files are parsed here directly (an 8-byte header length, a JSON
header, raw little-endian tensors) and memory-mapped, so every dtype that real
checkpoints use (F32, F16, BF16) comes back as a numpy array without torch and
without reading the file twice. `.bin` (pickled PyTorch) files need torch, which
is imported only when such a file is read. Sharded weights
(`*.safetensors.index.json`) are followed.
"""
import json
import os
import struct
from typing import Dict, Tuple

import ml_dtypes
import numpy as np

from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """Returns {name: array} memory-mapped from a .safetensors file."""
  try:
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) != 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
      (n,) = struct.unpack("<Q", head)
      if n > os.path.getsize(path) - 8:
        raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
      header = json.loads(f.read(n))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from None
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
      raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    out[name] = data[begin:end].view(dtype).reshape(info["shape"])
  return out


def write_safetensors(path: str, tensors: Dict[str, np.ndarray]) -> None:
  """Writes float32/float16/bfloat16 numpy arrays as a .safetensors file."""
  names = {np.dtype(v): k for k, v in _DTYPES.items()}
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    header[name] = {"dtype": names[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align tensor data to 8 bytes

  def write(f):
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())

  workdir_lib.write_atomic(path, write)


def _read_bin(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top  # only for .bin files
  except ImportError:
    raise CheckpointError(f"{path}: reading .bin weights needs torch; convert the folder "
                          "to .safetensors or install memjax[reference]") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # pickle errors are many
    raise CheckpointError(f"{path}: cannot read PyTorch weights: {e}") from None
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
          for k, v in state.items()}


def find_weight_files(component_dir: str) -> Tuple[str, ...]:
  """The weight files of one component folder, safetensors preferred.

  Raises:
    CheckpointError: if the folder has none.
  """
  names = set(os.listdir(component_dir))
  for ext in (".safetensors", ".bin"):
    for stem in _WEIGHT_NAMES:
      if stem + ext in names:
        return (os.path.join(component_dir, stem + ext),)
      index = stem + ext + ".index.json"
      if index in names:
        with open(os.path.join(component_dir, index)) as f:
          shards = sorted(set(json.load(f)["weight_map"].values()))
        return tuple(os.path.join(component_dir, s) for s in shards)
  raise CheckpointError(
      f"{component_dir}: no weights found (expected one of "
      f"{', '.join(s + '.safetensors' for s in _WEIGHT_NAMES)} or .bin)")


def load_component_weights(component_dir: str):
  """Returns ({key: array}, {key: file}) for every weight of a component."""
  state, source = {}, {}
  for path in find_weight_files(component_dir):
    if not os.path.exists(path):
      raise CheckpointError(f"{path}: listed in the weight index but missing")
    tensors = read_safetensors(path) if path.endswith(".safetensors") else _read_bin(path)
    for k, v in tensors.items():
      state[k] = v
      source[k] = path
  return state, source
