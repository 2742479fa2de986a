"""A broken model folder or noise file fails with one MemjaxError line naming the
file and the key, never a Python traceback.

Each test copies a tiny model folder (tests/conftest.py) and breaks one thing:
safetensors files (truncated, bad headers), sharded weight indexes, the
scheduler config, component configs, weight dtypes, and --noise / --seeds.
"""
import json
import os
import shutil
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from memjax.method import noise as noise_lib
from memjax.models import checkpoint
from memjax.models import loading
from memjax.runtime.errors import CheckpointError, ConfigError, InputError, MemjaxError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")
SCHEDULER = os.path.join("scheduler", "scheduler_config.json")


@pytest.fixture
def model(tiny_sd1, tmp_path):
  """A fresh copy of the tiny SD1 folder, to break."""
  return shutil.copytree(tiny_sd1, str(tmp_path / "model"))


def _one_line(e: pytest.ExceptionInfo, *parts: str) -> str:
  """The error's message, checked to be one line naming every part."""
  msg = str(e.value)
  assert "\n" not in msg, msg
  for part in parts:
    assert part in msg, (part, msg)
  return msg


def _header(path: str):
  """(header dict, tensor bytes) of a .safetensors file."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n)), f.read()


def _write_raw(path: str, header, data: bytes) -> None:
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + data)


def _edit_json(path: str, **changes) -> None:
  with open(path) as f:
    d = json.load(f)
  d.update(changes)
  with open(path, "w") as f:
    json.dump(d, f)


def _first_tensor(header) -> str:
  return sorted(k for k in header if k != "__metadata__")[0]


# 1. .safetensors files whose header or data do not fit.

def test_truncated_safetensors(model):
  path = os.path.join(model, UNET_WEIGHTS)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 100)
  with pytest.raises(CheckpointError) as e:
    loading.load_stable_diffusion(model, components=("unet",))
  _one_line(e, path, "data_offsets", "truncated")


def test_safetensors_header_is_a_list(model):
  path = os.path.join(model, UNET_WEIGHTS)
  _write_raw(path, [1, 2, 3], b"\0" * 64)
  with pytest.raises(CheckpointError) as e:
    loading.load_stable_diffusion(model, components=("unet",))
  _one_line(e, path, "header")


@pytest.mark.parametrize("key", ["dtype", "shape", "data_offsets"])
def test_safetensors_entry_lacks_a_key(model, key):
  path = os.path.join(model, UNET_WEIGHTS)
  header, data = _header(path)
  name = _first_tensor(header)
  del header[name][key]
  _write_raw(path, header, data)
  with pytest.raises(CheckpointError) as e:
    loading.load_stable_diffusion(model, components=("unet",))
  _one_line(e, path, f"'{name}'", f"'{key}'")


@pytest.mark.parametrize("change", [
    lambda info, size: [size, size + 16],  # past the end of the file
    lambda info, size: [-4, info[1]],  # negative
    lambda info, size: [info[1], info[0]],  # reversed
    lambda info, size: [info[0], info[1] - 4],  # shorter than dtype x shape
    lambda info, size: "0-16",  # not a pair of integers
], ids=["past_end", "negative", "reversed", "wrong_length", "not_a_pair"])
def test_safetensors_offsets_outside_the_file(model, change):
  path = os.path.join(model, UNET_WEIGHTS)
  header, data = _header(path)
  name = _first_tensor(header)
  header[name]["data_offsets"] = change(header[name]["data_offsets"], len(data))
  _write_raw(path, header, data)
  with pytest.raises(CheckpointError) as e:
    loading.load_stable_diffusion(model, components=("unet",))
  _one_line(e, path, f"'{name}'", "data_offsets")


@pytest.mark.parametrize("key,value", [("shape", "3x3"), ("shape", [-1, 2]),
                                       ("shape", [2 ** 70, 2 ** 70]),
                                       ("dtype", "F8_E4M3"), ("dtype", 7)])
def test_safetensors_bad_shape_or_dtype(model, key, value):
  path = os.path.join(model, UNET_WEIGHTS)
  header, data = _header(path)
  name = _first_tensor(header)
  header[name][key] = value
  _write_raw(path, header, data)
  with pytest.raises(CheckpointError) as e:
    checkpoint.read_safetensors(path)
  _one_line(e, path, f"'{name}'", key if key == "shape" else "dtype")


def test_safetensors_entry_not_an_object(model):
  path = os.path.join(model, UNET_WEIGHTS)
  header, data = _header(path)
  name = _first_tensor(header)
  header[name] = [1, 2]
  _write_raw(path, header, data)
  with pytest.raises(CheckpointError) as e:
    checkpoint.read_safetensors(path)
  _one_line(e, path, f"'{name}'")


# 2. Unparseable scheduler config and weight indexes.

@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '"text"', "\xff"])
def test_unparseable_scheduler_config(model, content):
  path = os.path.join(model, SCHEDULER)
  with open(path, "w", encoding="latin-1") as f:
    f.write(content)
  with pytest.raises(ConfigError) as e:
    loading.load_stable_diffusion(model, components=())
  _one_line(e, path)


def _shard_unet(model: str):
  """Splits the UNet weights into two shards and a diffusers index; returns the
  index path and {tensor: shard}."""
  folder = os.path.join(model, "unet")
  tensors = {k: np.array(v) for k, v in
             checkpoint.read_safetensors(os.path.join(model, UNET_WEIGHTS)).items()}
  os.remove(os.path.join(model, UNET_WEIGHTS))
  names = sorted(tensors)
  shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
            "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
  weight_map = {}
  for shard, keys in shards.items():
    checkpoint.write_safetensors(os.path.join(folder, shard), {k: tensors[k] for k in keys})
    weight_map.update({k: shard for k in keys})
  index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
  with open(index, "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return index, weight_map


def test_sharded_weights_still_load(tiny_sd1, model):
  _shard_unet(model)
  want = loading.load_stable_diffusion(tiny_sd1, components=("unet",)).params["unet"]
  got = loading.load_stable_diffusion(model, components=("unet",)).params["unet"]
  from memjax.models import convert  # pylint: disable=g-import-not-at-top
  for path, value in convert.flatten(want).items():
    np.testing.assert_array_equal(convert.flatten(got)[path], value)


@pytest.mark.parametrize("content,key", [
    ("{not json", "weight index"),
    ("[1]", "weight index"),
    ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": [1, 2]}', "weight_map"),
    ('{"weight_map": {"conv_in.weight": 3}}', "weight_map['conv_in.weight']"),
], ids=["not_json", "list", "no_weight_map", "weight_map_list", "shard_not_a_name"])
def test_broken_weight_index(model, content, key):
  index, _ = _shard_unet(model)
  with open(index, "w") as f:
    f.write(content)
  with pytest.raises(CheckpointError) as e:
    loading.load_stable_diffusion(model, components=("unet",))
  _one_line(e, index, key)


def test_weight_index_lists_a_missing_shard(model):
  index, weight_map = _shard_unet(model)
  key = sorted(weight_map)[0]
  os.remove(os.path.join(model, "unet", weight_map[key]))
  with pytest.raises(CheckpointError) as e:
    loading.load_stable_diffusion(model, components=("unet",))
  _one_line(e, index, "weight_map[", weight_map[key], "missing")


# 3. Scheduler values of the wrong type or range.

@pytest.mark.parametrize("key,value", [
    ("beta_start", "abc"), ("beta_start", -0.001), ("beta_start", 1.0),
    ("beta_end", 1.5), ("beta_end", None), ("beta_end", True), ("beta_end", float("nan")),
    ("num_train_timesteps", 1), ("num_train_timesteps", 0), ("num_train_timesteps", -5),
    ("num_train_timesteps", 10.5), ("num_train_timesteps", "1000"),
    ("num_train_timesteps", 10 ** 30), ("prediction_type", "sample"),
    ("beta_schedule", "squaredcos_cap_v2"), ("steps_offset", "1"), ("steps_offset", -1),
    ("clip_sample", "false"), ("set_alpha_to_one", 0), ("clip_sample_range", float("nan")),
    ("timestep_spacing", 3),
])
def test_bad_scheduler_values(model, key, value):
  path = os.path.join(model, SCHEDULER)
  _edit_json(path, **{key: value})
  with pytest.raises(ConfigError) as e:
    loading.load_stable_diffusion(model, components=())
  _one_line(e, path, key)


def test_betas_that_add_no_noise(model):
  path = os.path.join(model, SCHEDULER)
  _edit_json(path, beta_start=0, beta_end=0.0)
  with pytest.raises(ConfigError) as e:
    loading.load_stable_diffusion(model, components=())
  _one_line(e, path, "beta_start", "beta_end")


def test_betas_that_leave_no_signal(model):
  path = os.path.join(model, SCHEDULER)
  _edit_json(path, beta_schedule="linear", beta_start=0.9, beta_end=0.99)
  with pytest.raises(ConfigError) as e:
    loading.load_stable_diffusion(model, components=())
  _one_line(e, path, "beta_end", "num_train_timesteps")


@pytest.mark.parametrize("n", [2, 500, 1000.0])
def test_fewer_train_timesteps_are_legal(model, n):
  _edit_json(os.path.join(model, SCHEDULER), num_train_timesteps=n)
  sd = loading.load_stable_diffusion(model, components=())
  assert sd.schedule.num_train_timesteps == int(n)
  assert sd.schedule.last_timestep == int(n) - 1
  assert np.isfinite(sd.schedule.sigma(sd.schedule.last_timestep))


# 4. Component configs: not an object, or values of the wrong type.

@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_component_config_is_a_list(model, component):
  path = os.path.join(model, component, "config.json")
  with open(path, "w") as f:
    json.dump([1, 2], f)
  with pytest.raises(ConfigError) as e:
    loading.load_stable_diffusion(model, components=(component,))
  _one_line(e, path, "JSON object")
  # Also when the component is not loaded (the config is still read).
  with pytest.raises(ConfigError) as e:
    loading.load_stable_diffusion(model, components=())
  _one_line(e, path, "JSON object")


@pytest.mark.parametrize("component,key,value", [
    ("unet", "sample_size", "64"), ("unet", "sample_size", [16]),
    ("unet", "sample_size", 0), ("unet", "block_out_channels", [32, "64"]),
    ("unet", "block_out_channels", 32), ("unet", "in_channels", "4"),
    ("unet", "norm_eps", "1e-5"), ("unet", "norm_eps", float("nan")),
    ("unet", "cross_attention_dim", [32]), ("unet", "attention_head_dim", "8"),
    ("unet", "layers_per_block", 1.0), ("unet", "use_linear_projection", "false"),
    ("unet", "down_block_types", "CrossAttnDownBlock2D"),
    ("vae", "block_out_channels", ["32", "64"]), ("vae", "scaling_factor", "0.18"),
    ("vae", "scaling_factor", float("inf")), ("vae", "latent_channels", 4.0),
    ("vae", "norm_num_groups", None),
    ("text_encoder", "hidden_size", "32"), ("text_encoder", "layer_norm_eps", float("nan")),
    ("text_encoder", "num_hidden_layers", [2]), ("text_encoder", "hidden_act", ["gelu"]),
    ("unet", "cross_attention_dim", 2 ** 40), ("vae", "latent_channels", 10 ** 30),
    ("text_encoder", "vocab_size", 2 ** 63),
])
def test_config_value_of_the_wrong_type(model, component, key, value):
  path = os.path.join(model, component, "config.json")
  _edit_json(path, **{key: value})
  with pytest.raises(ConfigError) as e:
    loading.load_stable_diffusion(model, components=(component,))
  _one_line(e, path, key)


@pytest.mark.parametrize("value", ["64", [16, "16"], None])
def test_sample_size_checked_for_the_latent_shape(model, value):
  """crosscheck reads the latent shape without loading the UNet."""
  path = os.path.join(model, "unet", "config.json")
  _edit_json(path, sample_size=value)
  sd = loading.load_stable_diffusion(model, components=())
  if value is None:  # unset: Stable Diffusion 1's 64
    assert sd.latent_shape_chw == (4, 64, 64)
    return
  with pytest.raises(ConfigError) as e:
    sd.latent_shape_chw  # pylint: disable=pointless-statement
  _one_line(e, path, "sample_size")


def test_sample_size_as_height_width(model):
  _edit_json(os.path.join(model, "unet", "config.json"), sample_size=[16, 24])
  assert loading.load_stable_diffusion(model, components=()).latent_shape_chw == (4, 16, 24)


def test_vae_scaling_factor_checked_without_the_vae(model):
  path = os.path.join(model, "vae", "config.json")
  _edit_json(path, scaling_factor="big")
  sd = loading.load_stable_diffusion(model, components=())
  with pytest.raises(ConfigError) as e:
    sd.vae_scaling_factor  # pylint: disable=pointless-statement
  _one_line(e, path, "scaling_factor")


def test_config_key_missing_is_not_a_key_error(model):
  """A key left out takes diffusers' default, so the weights no longer fit."""
  path = os.path.join(model, "unet", "config.json")
  with open(path) as f:
    cfg = json.load(f)
  del cfg["cross_attention_dim"]
  with open(path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(CheckpointError, match="weights do not match the config"):
    loading.load_stable_diffusion(model, components=("unet",))


# 5. Weights that are not floating point.

def _rewrite(path: str, fn) -> None:
  tensors = {k: np.array(v) for k, v in checkpoint.read_safetensors(path).items()}
  checkpoint.write_safetensors(path, fn(tensors))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_])
def test_integer_weights_are_refused(model, dtype):
  path = os.path.join(model, UNET_WEIGHTS)
  name = "conv_in.weight"
  _rewrite(path, lambda t: dict(t, **{name: t[name].astype(dtype)}))
  with pytest.raises(CheckpointError) as e:
    loading.load_stable_diffusion(model, components=("unet",))
  _one_line(e, path, f"'{name}'", str(np.dtype(dtype)))


def test_integer_weights_in_a_bin_file_are_refused(model):
  torch = pytest.importorskip("torch")
  folder = os.path.join(model, "unet")
  state = {k: torch.from_numpy(np.array(v)) for k, v in
           checkpoint.read_safetensors(os.path.join(model, UNET_WEIGHTS)).items()}
  state["conv_out.weight"] = state["conv_out.weight"].long()
  os.remove(os.path.join(model, UNET_WEIGHTS))
  path = os.path.join(folder, "diffusion_pytorch_model.bin")
  torch.save(state, path)
  with pytest.raises(CheckpointError) as e:
    loading.load_stable_diffusion(model, components=("unet",))
  _one_line(e, path, "'conv_out.weight'", "int64")


def test_all_integer_weights_are_one_line(model):
  path = os.path.join(model, UNET_WEIGHTS)
  _rewrite(path, lambda t: {k: v.astype(np.int64) for k, v in t.items()})
  with pytest.raises(CheckpointError) as e:
    loading.load_stable_diffusion(model, components=("unet",))
  _one_line(e, path, "int64", "more weights")


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_float_weights_are_accepted(tiny_sd1, model, dtype):
  path = os.path.join(model, UNET_WEIGHTS)
  _rewrite(path, lambda t: {k: v.astype(dtype) for k, v in t.items()})
  got = loading.load_stable_diffusion(model, components=("unet",)).params["unet"]
  want = loading.load_stable_diffusion(tiny_sd1, components=("unet",)).params["unet"]
  from memjax.models import convert  # pylint: disable=g-import-not-at-top
  for p, value in convert.flatten(want).items():
    np.testing.assert_array_equal(
        convert.flatten(got)[p], value.astype(dtype).astype(np.float32))


# 6. --noise files and --seeds.

SHAPE = (4, 2, 2)


def _noise(tmp_path, array) -> str:
  path = str(tmp_path / "noise.npy")
  np.save(path, array)
  return path


@pytest.mark.parametrize("array,words", [
    (np.zeros((0,) + SHAPE, np.float32), ["no noise rows"]),
    (np.full(SHAPE, "a"), ["dtype <U1"]),
    (np.zeros(SHAPE, np.complex64), ["dtype complex64"]),
    (np.zeros(SHAPE, np.int64), ["dtype int64"]),
    (np.zeros(SHAPE, np.bool_), ["dtype bool"]),
    (np.zeros(SHAPE, [("a", np.float32)]), ["dtype"]),
    (np.full(SHAPE, np.nan, np.float32), ["NaN"]),
    (np.zeros((3, 4, 2), np.float32), ["shape"]),
], ids=["no_rows", "string", "complex", "int", "bool", "record", "nan", "shape"])
def test_bad_noise_file(tmp_path, array, words):
  path = _noise(tmp_path, array)
  with pytest.raises(InputError) as e:
    noise_lib.start_noise(path, [0], SHAPE)
  _one_line(e, "--noise", path, *words)


@pytest.mark.parametrize("kind", ["npz", "empty"])
def test_noise_file_that_is_not_one_array(tmp_path, kind):
  path = str(tmp_path / "noise.npy")
  if kind == "npz":
    with open(path, "wb") as f:
      np.savez(f, z=np.zeros((1,) + SHAPE, np.float32))
  else:
    open(path, "wb").close()
  with pytest.raises(InputError) as e:
    noise_lib.start_noise(path, [0], SHAPE)
  _one_line(e, "--noise", path)


def test_object_noise_file(tmp_path):
  path = str(tmp_path / "noise.npy")
  np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
  with pytest.raises(InputError) as e:
    noise_lib.start_noise(path, [0], SHAPE)
  _one_line(e, "--noise", path)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_noise_files_are_accepted(tmp_path, dtype):
  z = np.random.default_rng(0).standard_normal((2,) + SHAPE).astype(dtype)
  got, _, rows = noise_lib.start_noise(_noise(tmp_path, z), [0], SHAPE)
  assert rows == [0, 1] and got.dtype == np.float32
  np.testing.assert_array_equal(got, z.astype(np.float32).transpose(0, 2, 3, 1))


@pytest.mark.parametrize("seeds,words", [
    ([2 ** 64], ["18446744073709551616", "64-bit"]),
    ([2 ** 63], ["64-bit"]),
    ([-2 ** 63 - 1], ["64-bit"]),
    ([1.5], ["not an integer"]),
    (["x"], ["not an integer"]),
    ([], ["no seeds"]),
    ([3, 3], ["duplicates"]),
])
def test_bad_seeds(seeds, words):
  with pytest.raises(InputError) as e:
    noise_lib.start_noise(None, seeds, SHAPE)
  _one_line(e, "--seeds", *words)


def test_seeds_at_the_ends_of_the_range_and_negative():
  seeds = [-2 ** 63, -1, 0, 2 ** 63 - 1]
  z, identity, rows = noise_lib.start_noise(None, seeds, SHAPE)
  assert z.shape == (4, 2, 2, 4) and rows == seeds and identity == f"jax.random:{seeds}"
  np.testing.assert_array_equal(z[2], noise_lib.noise_for_seeds([0], SHAPE)[0])


# The command line: one `error:` line, exit status 2, no traceback.

def _scan(tmp_path, model_dir, *flags):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a photo of a cat\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "memjax.scan", f"--model={model_dir}", f"--prompts={prompts}",
       f"--workdir={tmp_path / 'work'}", *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("breakage", ["truncated_weights", "scheduler_type", "seeds"])
def test_scan_command_reports_one_line(model, tmp_path, breakage):
  flags = []
  if breakage == "truncated_weights":
    path = os.path.join(model, UNET_WEIGHTS)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) - 100)
  elif breakage == "scheduler_type":
    path = os.path.join(model, SCHEDULER)
    _edit_json(path, beta_start="abc")
  else:
    path = "--seeds"
    flags = ["--seeds=18446744073709551616"]
  out = _scan(tmp_path, model, *flags)
  assert out.returncode == 2, out.stderr
  assert "Traceback" not in out.stderr + out.stdout, out.stderr
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, out.stderr
  assert path in errors[0], errors[0]


def test_errors_are_memjax_errors():
  assert all(issubclass(c, MemjaxError) for c in (CheckpointError, ConfigError, InputError))
