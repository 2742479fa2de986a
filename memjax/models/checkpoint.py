"""Reading and writing weight files in the diffusers layout, without torch.

`.safetensors` files are parsed here directly (an 8-byte header length, a JSON
header, raw little-endian tensors) and memory-mapped, so every dtype that real
checkpoints use (F32, F16, BF16) comes back as a numpy array without torch and
without reading the file twice. `.bin` (pickled PyTorch) files need torch, which
is imported only when such a file is read. Sharded weights
(`*.safetensors.index.json`) are followed.
"""
import json
import math
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


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """Returns {name: array} memory-mapped from a .safetensors file.

  Raises:
    CheckpointError: naming the file (and the tensor) if the header is not a
      safetensors header or a tensor's entry does not fit the file.
  """
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) != 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8:
        raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
      header = json.loads(f.read(n))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: not a safetensors file (the header is a JSON "
                          f"{type(header).__name__}, not an object of tensors)")
  data_size = size - 8 - n
  # np.memmap cannot map zero bytes; a file of empty tensors needs no mapping.
  data = (np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if data_size
          else np.zeros((0,), np.uint8))
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    where = f"{path}: tensor '{name}'"
    if not isinstance(info, dict):
      raise CheckpointError(f"{where}: header entry is not an object with dtype, shape "
                            f"and data_offsets (got {info!r:.80})")
    for key in ("dtype", "shape", "data_offsets"):
      if key not in info:
        raise CheckpointError(f"{where}: header entry has no '{key}'")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    dtype = _DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
      raise CheckpointError(f"{where}: unsupported dtype {code!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
      raise CheckpointError(f"{where}: 'shape' must be a list of non-negative integers, "
                            f"got {shape!r:.80}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or
        not all(_is_int(o) for o in offsets)):
      raise CheckpointError(f"{where}: 'data_offsets' must be [begin, end] integers, "
                            f"got {offsets!r:.80}")
    begin, end = offsets
    if not 0 <= begin <= end:
      raise CheckpointError(f"{where}: 'data_offsets' {offsets} are not 0 <= begin <= end")
    if end > data_size:
      raise CheckpointError(
          f"{where}: 'data_offsets' {offsets} end past the {data_size} data bytes of the "
          f"file (truncated or corrupt file)")
    want = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow
    if end - begin != want:
      raise CheckpointError(
          f"{where}: 'data_offsets' {offsets} span {end - begin} bytes, but dtype {code} "
          f"and shape {shape} need {want}")
    out[name] = data[begin:end].view(dtype).reshape(shape)
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
    raise CheckpointError(f"{path}: cannot read PyTorch weights: {_one_line(e)}") from None
  if not isinstance(state, dict):
    raise CheckpointError(f"{path}: not a PyTorch state dict (holds a "
                          f"{type(state).__name__}, not {{name: tensor}})")
  out = {}
  for k, v in state.items():
    if not isinstance(v, torch.Tensor):
      raise CheckpointError(f"{path}: entry '{k}' is a {type(v).__name__}, not a tensor")
    try:
      out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    except (TypeError, RuntimeError) as e:
      raise CheckpointError(f"{path}: tensor '{k}' of dtype {v.dtype} cannot be read: "
                            f"{_one_line(e)}") from None
  return out


def _one_line(e: Exception) -> str:
  return " ".join(str(e).split())


def _read_index(path: str, ext: str) -> Tuple[str, ...]:
  """The shard files a `*.index.json` lists in its weight_map, each checked to exist."""
  try:
    with open(path) as f:
      index = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read the weight index: {e}") from None
  if not isinstance(index, dict):
    raise CheckpointError(f"{path}: the weight index must be a JSON object with a "
                          f"'weight_map', got a JSON {type(index).__name__}")
  weight_map = index.get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise CheckpointError(f"{path}: key 'weight_map' must be a non-empty object "
                          f"{{weight name: shard file}}, got {weight_map!r:.80}")
  folder = os.path.dirname(path)
  shards = set()
  for key, shard in weight_map.items():
    if (not isinstance(shard, str) or not shard.endswith(ext) or
        os.path.basename(shard) != shard):
      raise CheckpointError(f"{path}: weight_map['{key}'] = {shard!r:.80} is not the name "
                            f"of a {ext} file next to the index")
    if not os.path.isfile(os.path.join(folder, shard)):
      raise CheckpointError(f"{path}: weight_map['{key}'] names shard {shard!r}, which is "
                            f"missing from {folder}")
    shards.add(shard)
  return tuple(os.path.join(folder, s) for s in sorted(shards))


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
        return _read_index(os.path.join(component_dir, index), ext)
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
