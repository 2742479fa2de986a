"""Reading and writing weight files in the diffusers layout, without torch.

`.safetensors` files are parsed here directly (an 8-byte header length, a JSON
header, raw little-endian tensors) and memory-mapped, so every dtype that real
checkpoints use (F32, F16, BF16) comes back as a numpy array without torch and
without reading the file twice. `.bin` (pickled PyTorch) files need torch, which
is imported only when such a file is read (`read_torch_file`, which also reads the
`.ckpt` training checkpoints of `ldm_layout`). Sharded weights
(`*.safetensors.index.json`) are followed.

Variants are named as diffusers names them: `diffusion_pytorch_model.fp16.safetensors`,
`model.fp16.safetensors`, sharded as `<stem>.<ext>.index.fp16.json` (or the legacy
`<stem>.<ext>.fp16.index.json`) listing `<stem>.fp16-00001-of-00002.<ext>`.
"""
import contextlib
import json
import math
import os
import re
import struct
import zipfile
from typing import Dict, List, Optional, Tuple

from absl import logging

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


class _PickledClassReference:
  """Stands in for a class that a checkpoint's training bookkeeping names.

  LDM's PyTorch Lightning (1.4) keyed the saved callback states by the callback's
  class, so SD1's original `.ckpt` files reference
  `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`. The weights-only
  unpickler returns this inert class for that name (nothing is imported or run);
  the bookkeeping is then dropped with every other non-tensor entry.
  """


_BOOKKEEPING_CLASSES = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)
_TORCH_FILE_KINDS = ("weights", "checkpoint")


def _torch_load(torch, path: str):
  """torch.load with weights_only=True, Lightning's class names mapped to a stub."""
  stubs = [(_PickledClassReference, name) for name in _BOOKKEEPING_CLASSES]
  safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
  with safe_globals(stubs) if safe_globals is not None else contextlib.nullcontext():
    # Zip-format files (torch >= 1.6) are memory-mapped; legacy ones are read whole.
    return torch.load(path, map_location="cpu", weights_only=True,
                      mmap=zipfile.is_zipfile(path))


def _load_failure(path: str, what: str, e: Exception) -> CheckpointError:
  """A one-line CheckpointError for what torch.load raised."""
  text = _one_line(e)
  unsafe = re.search(r"GLOBAL ([\w.]+)", text)
  if unsafe is not None or "Weights only load failed" in text:
    named = f" ('{unsafe.group(1)}')" if unsafe is not None else ""
    return CheckpointError(
        f"{path}: holds pickled objects other than tensors{named}, which memjax does not "
        f"unpickle (torch.load weights_only=True runs no code from the file); convert it "
        f"to .safetensors with a tool you trust")
  return CheckpointError(f"{path}: cannot read the PyTorch {what} (truncated or "
                         f"corrupt?): {text[:300]}")


def read_torch_file(path: str, what: str) -> Dict[str, np.ndarray]:
  """{name: array} of a pickled PyTorch file, through torch.load(weights_only=True).

  No code from the file runs; zip-format files are memory-mapped; bfloat16
  tensors come back as float32 (numpy has no bfloat16 of torch's).

  Args:
    path: the file.
    what: "weights": a diffusers / transformers `.bin`, {name: tensor}, every
      entry a tensor; "checkpoint": a training checkpoint (LDM's `.ckpt`), its
      `{"state_dict": ...}` unwrapped and entries that are not tensors (epoch,
      global_step, callback states) dropped.

  Raises:
    CheckpointError: one line naming the file, if torch is missing, the file
      cannot be unpickled (truncated, corrupt, or pickling other objects than
      tensors), or it holds no {name: tensor} dict.
  """
  if what not in _TORCH_FILE_KINDS:
    raise ValueError(f"what must be one of {_TORCH_FILE_KINDS}, got {what!r}")
  try:
    import torch  # pylint: disable=g-import-not-at-top  # only for pickled files
  except ImportError:
    ext = os.path.splitext(path)[1] or "a pickled PyTorch file"
    raise CheckpointError(f"{path}: {ext} needs torch; install memjax[reference] or use "
                          ".safetensors weights") from None
  try:
    state = _torch_load(torch, path)
  except Exception as e:  # pylint: disable=broad-except  # pickle and zip errors are many
    raise _load_failure(path, what, e) from None
  while (what == "checkpoint" and isinstance(state, dict) and
         isinstance(state.get("state_dict"), dict)):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise CheckpointError(f"{path}: not a PyTorch state dict (holds a "
                          f"{type(state).__name__}, not {{name: tensor}})")
  out = {}
  for key, value in state.items():
    if not isinstance(key, str) or not isinstance(value, torch.Tensor):
      if what == "checkpoint":
        continue  # training bookkeeping
      problem = (f"is a {type(value).__name__}, not a tensor" if isinstance(key, str)
                 else f"is named by a {type(key).__name__}, not a string")
      raise CheckpointError(f"{path}: entry {key!r} {problem}")
    value = value.detach()
    try:
      out[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    except (TypeError, RuntimeError) as e:
      raise CheckpointError(f"{path}: tensor '{key}' of dtype {value.dtype} cannot be read: "
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


# A weight file or weight index of some variant: (stem).(variant)[-shard].(ext), or
# the indexes (stem).(ext).index.(variant).json and (stem).(ext).(variant).index.json.
_VARIANT_FILE = re.compile(
    rf"^(?:{'|'.join(_WEIGHT_NAMES)})\."
    rf"(?:(?P<v1>[^.]+?)(?:-\d{{5}}-of-\d{{5}})?\.(?:safetensors|bin)"
    rf"|(?:safetensors|bin)\.(?:index\.(?P<v2>[^.]+)|(?P<v3>[^.]+)\.index)\.json)$")


def variants_in(component_dir: str) -> Dict[str, List[str]]:
  """{variant: its weight files} of a component folder (e.g. {"fp16": [...]})."""
  found: Dict[str, List[str]] = {}
  for name in sorted(os.listdir(component_dir)):
    m = _VARIANT_FILE.match(name)
    variant = m and (m.group("v1") or m.group("v2") or m.group("v3"))
    if variant:
      found.setdefault(variant, []).append(name)
  return found


def _find(component_dir: str, names, variant: Optional[str]) -> Optional[Tuple[str, ...]]:
  """The weight files of one variant (None: the plain files), safetensors first."""
  for ext in (".safetensors", ".bin"):
    for stem in _WEIGHT_NAMES:
      single = f"{stem}.{variant}{ext}" if variant else stem + ext
      if single in names:
        return (os.path.join(component_dir, single),)
      indexes = ((f"{stem}{ext}.index.{variant}.json", f"{stem}{ext}.{variant}.index.json")
                 if variant else (f"{stem}{ext}.index.json",))
      for index in indexes:
        if index in names:
          return _read_index(os.path.join(component_dir, index), ext)
  return None


def find_weight_files(component_dir: str, variant: Optional[str] = None
                      ) -> Tuple[Tuple[str, ...], bool]:
  """(the weight files of one component folder, whether they are of `variant`).

  With a variant, its files are taken where the folder has them, else the plain
  files (as diffusers' pipelines do, with a warning). Safetensors are preferred.

  Raises:
    CheckpointError: if the folder has none; naming the variant files it holds
      when no variant was asked for.
  """
  names = set(os.listdir(component_dir))
  if variant:
    files = _find(component_dir, names, variant)
    if files:
      return files, True
  files = _find(component_dir, names, None)
  if files:
    if variant:
      logging.warning("%s: no %s weights; loading %s (as diffusers does)", component_dir,
                      variant, ", ".join(os.path.basename(f) for f in files))
    return files, False
  others = variants_in(component_dir)
  if others:
    listed = "; ".join(f"{', '.join(v)}" for v in others.values())
    hint = (f"pass --variant={' or --variant='.join(others)}" if not variant else
            f"--variant={variant} has none; the folder's variants: {', '.join(others)}")
    raise CheckpointError(f"{component_dir}: no weights without a variant; found variant "
                          f"weights {listed} ({hint})")
  raise CheckpointError(
      f"{component_dir}: no weights found (expected one of "
      f"{', '.join(s + '.safetensors' for s in _WEIGHT_NAMES)} or .bin)")


def read_weight_file(path: str) -> Dict[str, np.ndarray]:
  """{key: array} of one .safetensors (without torch) or .bin (through torch) file."""
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  return read_torch_file(path, "weights")


def load_component_weights(component_dir: str, variant: Optional[str] = None):
  """Returns ({key: array}, {key: file}) for every weight of a component."""
  return read_weight_files(find_weight_files(component_dir, variant)[0])


def read_weight_files(files) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
  """({key: array}, {key: file}) of a component's weight files."""
  state, source = {}, {}
  for path in files:
    if not os.path.exists(path):
      raise CheckpointError(f"{path}: listed in the weight index but missing")
    for k, v in read_weight_file(path).items():
      state[k] = v
      source[k] = path
  return state, source
