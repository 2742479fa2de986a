"""Identities of inputs, recorded in run configs so that a resume against other
inputs is refused: a model folder, a weight or checkpoint file."""
import hashlib
import os

from memjax.runtime.errors import InputError

# Hashed by content: configs, scheduler, tokenizer files. Weights: name, size.
_CONTENT_EXT = (".json", ".txt", ".model", ".yaml", ".yml", ".tiktoken")
_WEIGHT_EXT = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack",
               ".h5", ".onnx", ".npz")
_HEAD_BYTES = 1 << 20


def model_identity(model_dir: str) -> str:
  """sha256 over a model folder's configs (content) and weights (name, size).

  Weight bytes are not read (GBs); a changed weight file almost always changes
  its size or name, and every config, scheduler and tokenizer file is hashed.
  """
  if not os.path.isdir(model_dir):
    raise InputError(f"model folder {model_dir} does not exist.")
  entries = []
  for root, dirs, files in os.walk(model_dir, followlinks=True):
    dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .cache
    for name in files:
      if name.startswith("."):
        continue
      path = os.path.join(root, name)
      rel = os.path.relpath(path, model_dir).replace(os.sep, "/")
      if name.endswith(_CONTENT_EXT):
        with open(path, "rb") as f:
          digest = hashlib.sha256(f.read()).hexdigest()
        entries.append(f"content\t{rel}\t{digest}")
      elif name.endswith(_WEIGHT_EXT):
        entries.append(f"weights\t{rel}\t{os.path.getsize(path)}")
  if not entries:
    raise InputError(f"model folder {model_dir} holds no config or weight files.")
  return hashlib.sha256("\n".join(sorted(entries)).encode("utf-8")).hexdigest()


def file_identity(path: str) -> str:
  """`name:size:sha256 of the first MiB`: cheap on GB files, and tells another
  file of the same name apart."""
  with open(path, "rb") as f:
    head = hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()
  return f"{os.path.basename(path)}:{os.path.getsize(path)}:{head}"
