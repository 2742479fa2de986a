"""Identities of inputs by their content, recorded in run configs so that a resume
against changed inputs is refused (`workdir.check_run_config` names the file).

A file's identity is the sha256 of its bytes when it is at most 64 MiB (prompt
tables, noise files, configs, images: read whole, at about 1 GB/s), else of its
size and 64 evenly spaced 64 KiB samples, the first and last bytes included (model
weights of GBs: 4 MiB read). Size and mtime alone would miss a file rewritten
with other content of the same size.
"""
import hashlib
import os
from typing import Iterable

from memjax.runtime.errors import InputError

_FULL_BYTES = 64 << 20
_SAMPLES = 64
_SAMPLE_BYTES = 64 << 10
_CHUNK = 1 << 20
# Files of a model folder that matter: configs, scheduler, tokenizer and weights.
_MODEL_EXT = (".json", ".txt", ".model", ".yaml", ".yml", ".tiktoken", ".safetensors", ".bin",
              ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".npz")


def content_identity(path: str) -> str:
  """`sha256:<hex>` of the file's bytes, or `sampled:<hex>` of its size and 64
  samples when it is larger than 64 MiB."""
  try:
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      if size <= _FULL_BYTES:
        for block in iter(lambda: f.read(_CHUNK), b""):
          digest.update(block)
        return "sha256:" + digest.hexdigest()
      digest.update(str(size).encode())
      last = size - _SAMPLE_BYTES
      for i in range(_SAMPLES):
        f.seek(last * i // (_SAMPLES - 1))
        digest.update(f.read(_SAMPLE_BYTES))
      return "sampled:" + digest.hexdigest()
  except OSError as e:
    raise InputError(f"{path}: cannot read: {e}") from None


def files_identity(root: str, paths: Iterable[str]) -> str:
  """sha256 over (path relative to root, content identity) of several files."""
  entries = sorted(f"{os.path.relpath(p, root)}\t{content_identity(p)}" for p in paths)
  return "sha256:" + hashlib.sha256("\n".join(entries).encode("utf-8")).hexdigest()


def path_identity(path: str) -> str:
  """The content identity of a file, or of every file of a folder (its hidden
  files and subfolders' excluded), e.g. a folder of parquet files."""
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if not n.startswith((".", "_")) and
                   os.path.isfile(os.path.join(path, n)))
    return files_identity(path, [os.path.join(path, n) for n in names])
  return content_identity(path)


def model_identity(model_dir: str) -> str:
  """The content identity of a model: every config, scheduler, tokenizer and weight
  file of a folder, or the one file of a single-file checkpoint (weights of GBs by
  their sampled identity)."""
  if os.path.isfile(model_dir):
    return content_identity(model_dir)
  if not os.path.isdir(model_dir):
    raise InputError(f"model folder {model_dir} does not exist.")
  files = []
  for root, dirs, names in os.walk(model_dir, followlinks=True):
    dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .cache
    files += [os.path.join(root, n) for n in names
              if not n.startswith(".") and n.endswith(_MODEL_EXT)]
  if not files:
    raise InputError(f"model folder {model_dir} holds no config or weight files.")
  return files_identity(model_dir, files)
