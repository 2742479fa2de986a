"""Single-file Stable Diffusion checkpoints in the original LDM (CompVis) layout.

`read_single_file` reads such a file (`.safetensors` without torch; `.ckpt`,
`.pt`, `.pth` through `checkpoint.read_torch_file`), and `split_components` cuts
its state dict into the UNet, VAE and text encoder under diffusers / transformers
names by the rules of `memjax.models.ldm_keys`, so that `memjax.models.loading`
loads it through the same strict `convert.torch_to_flax` as a folder
(`ldm_configs.infer_configs` reads the architecture off the shapes).

Every key is either converted or listed as deliberately ignored; any other key
is refused (listed in one `CheckpointError`), never dropped silently.
"""
import dataclasses
import math
import os
import re
from typing import Dict, List, Mapping, Optional

import numpy as np

from memjax.models import checkpoint
from memjax.models import ldm_keys
from memjax.models.ldm_keys import (CLIP_PREFIX, EMA_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX,
                                    VAE_PREFIX)
from memjax.runtime.errors import CheckpointError

SINGLE_FILE_EXTS = (".safetensors", ".ckpt", ".pt", ".pth")
_MAX_LISTED = 20


@dataclasses.dataclass
class LdmParts:
  """The components of an LDM single file, with diffusers / transformers key names.

  Attributes:
    family: "sd1" (transformers CLIP text encoder under `cond_stage_model.transformer.`)
      or "sd2" (OpenCLIP under `cond_stage_model.model.`); a file without a text
      encoder is "sd2" if its UNet has linear projections (an SD2 trait), else "sd1".
    states: "unet", "vae", "text_encoder" -> {diffusers key: array}; a component
      absent from the file is absent here.
    ignored: keys of the file deliberately not used.
    alphas_cumprod: the file's `alphas_cumprod` buffer (a copy in the file's dtype:
      float16 files round it), else None.
    scale_factor: the file's `scale_factor` buffer (LDM's scale_by_std=True: the
      VAE's latent scale), else None; as the shortest decimal that reads back to
      the stored number (a float32 0.18215 is 0.18215, not 0.18214999...).
    origin: component -> {diffusers key: the file's key it came from}, for
      messages that name the file's own key.
  """
  family: str
  states: Dict[str, Dict[str, np.ndarray]]
  ignored: List[str]
  alphas_cumprod: Optional[np.ndarray]
  scale_factor: Optional[float] = None
  origin: Dict[str, Dict[str, str]] = dataclasses.field(default_factory=dict)


def read_single_file(path: str) -> Dict[str, np.ndarray]:
  """{key: array} of an LDM single file.

  `.safetensors` is memory-mapped without torch; `.ckpt` / `.pt` / `.pth` are
  unpickled by torch with `weights_only=True` (no code runs), `{"state_dict": ...}`
  unwrapped and training bookkeeping dropped.

  Raises:
    CheckpointError: naming the file, if it is missing, has another extension, or
      cannot be read.
  """
  ext = os.path.splitext(path)[1].lower()
  if ext not in SINGLE_FILE_EXTS:
    raise CheckpointError(f"{path}: not a single-file checkpoint (the name must end in "
                          f"{', '.join(SINGLE_FILE_EXTS)})")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: checkpoint file does not exist")
  if ext == ".safetensors":
    return checkpoint.read_safetensors(path)
  return checkpoint.read_torch_file(path, "checkpoint")


class _Split:
  """What the per-component converters collect: states, origins, leftovers."""

  def __init__(self, source: str):
    self.source = source
    self.states: Dict[str, Dict[str, np.ndarray]] = {}
    self.origin: Dict[str, Dict[str, str]] = {}
    self.ignored: List[str] = []
    self.unknown: List[str] = []

  def put(self, component: str, key: str, value: np.ndarray, file_key: str) -> None:
    state = self.states.setdefault(component, {})
    origin = self.origin.setdefault(component, {})
    if key in state:
      raise CheckpointError(f"{self.source}: keys '{origin[key]}' and '{file_key}' both "
                            f"convert to {component} weight '{key}'")
    state[key] = value
    origin[key] = file_key


def _group_by_prefix(state: Mapping[str, np.ndarray]) -> Dict[str, Dict[str, str]]:
  """{prefix: {rest: file key}} for the component prefixes, '' for the rest."""
  groups: Dict[str, Dict[str, str]] = {p: {} for p in (
      UNET_PREFIX, EMA_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPENCLIP_PREFIX, "")}
  for key in state:
    prefix = next((p for p in groups if p and key.startswith(p)), "")
    groups[prefix][key[len(prefix):]] = key
  return groups


def _split_unet(split: _Split, state, unet: Dict[str, str], ema_keys: Dict[str, str],
                ema: bool) -> None:
  """Converts the UNet, from `model.diffusion_model.*` or its `model_ema.*` copy."""
  per_level = ldm_keys.unet_per_level(unet, split.source)
  used_ema = set()
  missing_ema = []
  for rest, file_key in unet.items():
    key = ldm_keys.unet_key(rest, per_level)
    if key is None:
      split.unknown.append(file_key)
      continue
    if not ema:
      split.put("unet", key, state[file_key], file_key)
      continue
    ema_key = ldm_keys.ema_key(rest)
    if ema_key not in state:
      missing_ema.append(ema_key)
      continue
    split.put("unet", key, state[ema_key], ema_key)
    used_ema.add(ema_key)
    split.ignored.append(file_key)
  if missing_ema:
    raise CheckpointError(
        f"{split.source}: ema=True but the file has no EMA copy of the UNet "
        f"({len(missing_ema)} of {len(unet)} weights missing, e.g. '{missing_ema[0]}'); "
        f"load it without ema")
  for file_key in ema_keys.values():
    if file_key in ldm_keys.EMA_BOOKKEEPING or not ema:
      split.ignored.append(file_key)
    elif file_key not in used_ema:
      split.unknown.append(file_key)


def _split_vae(split: _Split, state, vae: Dict[str, str]) -> None:
  levels = {int(m.group(1)) for rest in vae
            if (m := re.match(r"decoder\.up\.(\d+)\.", rest))}
  up_levels = max(levels, default=-1) + 1
  for rest, file_key in vae.items():
    key = ldm_keys.vae_key(rest, up_levels)
    if key is None:
      split.unknown.append(file_key)
    else:
      split.put("vae", key, ldm_keys.as_linear(key, state[file_key]), file_key)


def _kept_layers(count: int, text_layers: Optional[int], default: int, split: _Split,
                 kind: str) -> int:
  keep = default if text_layers is None else text_layers
  if not 1 <= keep <= count:
    raise CheckpointError(
        f"{split.source}: cannot keep {keep} layers of the {kind} text encoder, which has "
        f"{count} (text_layers must be from 1 to {count})")
  return keep


def _layer_index(name: str, pattern: str) -> Optional[int]:
  m = re.match(pattern, name)
  return None if m is None else int(m.group(1))


def _split_clip(split: _Split, state, clip: Dict[str, str],
                text_layers: Optional[int]) -> None:
  """SD1's transformers CLIPTextModel: names kept, `text_model.` added if absent."""
  names = {ldm_keys.clip_key(rest): file_key for rest, file_key in clip.items()}
  pattern = r"text_model\.encoder\.layers\.(\d+)\."
  indices = {i for n in names if (i := _layer_index(n, pattern)) is not None}
  keep = _kept_layers(max(indices, default=-1) + 1, text_layers,
                      max(indices, default=-1) + 1, split, "CLIP")
  for name, file_key in names.items():
    index = _layer_index(name, pattern)
    if name.endswith("position_ids") or (index is not None and index >= keep):
      split.ignored.append(file_key)
    elif name.startswith(ldm_keys.CLIP_PARTS):
      split.put("text_encoder", name, state[file_key], file_key)
    else:
      split.unknown.append(file_key)


def _split_openclip(split: _Split, state, openclip: Dict[str, str],
                    text_layers: Optional[int]) -> None:
  """SD2's OpenCLIP text tower -> transformers CLIPTextModel names."""
  pattern = r"transformer\.resblocks\.(\d+)\."
  indices = {i for n in openclip if (i := _layer_index(n, pattern)) is not None}
  blocks = max(indices, default=-1) + 1
  keep = _kept_layers(blocks, text_layers, blocks - 1, split, "OpenCLIP")
  for rest, file_key in openclip.items():
    index = _layer_index(rest, pattern)
    if rest in ldm_keys.OPENCLIP_UNUSED or (index is not None and index >= keep):
      split.ignored.append(file_key)
      continue
    converted = ldm_keys.openclip_keys(rest, state[file_key])
    if converted is None:
      split.unknown.append(file_key)
      continue
    for key, value in converted.items():
      split.put("text_encoder", key, value, file_key)


def _family(groups: Mapping[str, Mapping[str, str]], state, source: str) -> str:
  """"sd1" / "sd2" from the text encoder's layout, else from the UNet's projections."""
  if groups[CLIP_PREFIX] and groups[OPENCLIP_PREFIX]:
    raise CheckpointError(f"{source}: the file holds both a CLIP "
                          f"({CLIP_PREFIX}*) and an OpenCLIP ({OPENCLIP_PREFIX}*) text "
                          f"encoder; memjax reads SD1/SD2 files with one of them")
  if groups[CLIP_PREFIX]:
    return "sd1"
  if groups[OPENCLIP_PREFIX]:
    return "sd2"
  proj_in = UNET_PREFIX + "middle_block.1.proj_in.weight"
  return "sd2" if proj_in in state and np.ndim(state[proj_in]) == 2 else "sd1"


def _raise_unknown(keys: List[str], source: str) -> None:
  shown = sorted(keys)[:_MAX_LISTED]
  more = f" and {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
  raise CheckpointError(
      f"{source}: {len(keys)} key(s) fit no rule of the SD1/SD2 LDM layout, so memjax "
      f"cannot tell what they change: {', '.join(shown)}{more}")


def _scale_factor(state: Mapping[str, np.ndarray], source: str) -> Optional[float]:
  """The `scale_factor` buffer as a Python float (None if the file has none): the
  shortest decimal that its dtype reads back to the stored number."""
  if ldm_keys.SCALE_FACTOR not in state:
    return None
  value = np.asarray(state[ldm_keys.SCALE_FACTOR])
  number = math.nan
  if value.size == 1 and value.dtype.kind in "fiuV":  # V: ml_dtypes' bfloat16
    try:
      number = float(str(value.reshape(())[()]))
    except ValueError:
      pass
  if not (math.isfinite(number) and number > 0):
    raise CheckpointError(
        f"{source}: key '{ldm_keys.SCALE_FACTOR}' (the VAE's latent scale) must hold one "
        f"positive number, got shape {list(value.shape)} of dtype {value.dtype}"
        + (f" = {value.reshape(-1)[0]}" if value.size == 1 else ""))
  return number


def split_components(state: Mapping[str, np.ndarray], source: str, ema: bool = False,
                     text_layers: Optional[int] = None) -> LdmParts:
  """Converts every key of an LDM state dict to diffusers / transformers names.

  Args:
    state: {file key: array} (`read_single_file`).
    source: the file, named in every error.
    ema: take the UNet from the `model_ema.*` copies (LitEma's flat names).
    text_layers: text encoder layers to keep (default: all for SD1's CLIP, all
      but the last for SD2's OpenCLIP, whose penultimate block conditions SD2).

  Returns:
    The converted components, the ignored keys and the `alphas_cumprod` and
    `scale_factor` buffers.

  Raises:
    CheckpointError: naming the file, if it has no `model.diffusion_model.*`
      keys, if ema=True and an EMA copy is missing, if `scale_factor` is not one
      positive number, or listing (up to 20) the keys no rule places.
  """
  groups = _group_by_prefix(state)
  if not groups[UNET_PREFIX]:
    raise CheckpointError(
        f"{source}: not a Stable Diffusion checkpoint in the LDM layout (no "
        f"'{UNET_PREFIX}*' keys); a diffusers folder is loaded by passing the folder, "
        f"not one of its weight files")
  split = _Split(source)
  family = _family(groups, state, source)
  _split_unet(split, state, groups[UNET_PREFIX], groups[EMA_PREFIX], ema)
  if groups[VAE_PREFIX]:
    _split_vae(split, state, groups[VAE_PREFIX])
  if groups[CLIP_PREFIX]:
    _split_clip(split, state, groups[CLIP_PREFIX], text_layers)
  if groups[OPENCLIP_PREFIX]:
    _split_openclip(split, state, groups[OPENCLIP_PREFIX], text_layers)
  for rest, file_key in groups[""].items():
    if rest in ldm_keys.SCHEDULE_BUFFERS:
      split.ignored.append(file_key)
    elif rest != ldm_keys.SCALE_FACTOR:  # read below
      split.unknown.append(file_key)
  if split.unknown:
    _raise_unknown(split.unknown, source)
  alphas = state.get("alphas_cumprod")
  return LdmParts(
      family=family, states=split.states, ignored=sorted(split.ignored),
      alphas_cumprod=None if alphas is None else np.array(alphas),
      scale_factor=_scale_factor(state, source), origin=split.origin)


