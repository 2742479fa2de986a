"""LDM (CompVis) single-file checkpoints: key rules, configs from shapes, errors.

Tiny folders that follow Stable Diffusion's own rules (`tiny` styles sd1_file and
sd2_file: 32 norm groups, 8 heads per block for SD1, 64 channels per head for SD2
and for the text encoders) are written as LDM files by `memjax.testing.ldm_file`;
`memjax.models.ldm_layout` and `ldm_configs` must give back the folder's configs
and weights exactly, and PyTorch diffusers'
`from_single_file` (an independent reader) must load the same files to the same
models as `from_pretrained` on the folder.
"""
import json
import os
import sys
import types

import ml_dtypes
import numpy as np
import pytest

from memjax.models import checkpoint
from memjax.models import clip_text
from memjax.models import convert
from memjax.models import ldm_configs
from memjax.models import ldm_layout
from memjax.models import loading
from memjax.runtime.errors import CheckpointError, ConfigError
from memjax.testing import ldm_file
from memjax.testing import tiny

FAMILIES = ("sd1", "sd2")
COMPONENTS = ("unet", "vae", "text_encoder")
TEXT_LAYERS = tiny.tiny_configs("sd1_file")["text_encoder"]["num_hidden_layers"]
# Folder config keys that are bookkeeping, not architecture (or set by the loader).
NOT_ARCHITECTURE = frozenset({"_diffusers_version", "sample_size", "bos_token_id",
                              "eos_token_id", "pad_token_id", "projection_dim", "torch_dtype"})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("ldm_folders")
  return {f: tiny.build_tiny_model(str(root / f), f"{f}_file", seed=10 * i, num_merges=1000)
          for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def files(folders, tmp_path_factory):
  """{family: .safetensors LDM file with an EMA copy}."""
  root = tmp_path_factory.mktemp("ldm_files")
  return {f: ldm_file.write_ldm_file(folders[f], str(root / f"{f}.safetensors"), f, ema=True)
          for f in FAMILIES}


def folder_weights(folder: str, component: str):
  state, _ = checkpoint.load_component_weights(os.path.join(folder, component))
  return clip_text.with_text_model_prefix(state) if component == "text_encoder" else state


def folder_config(folder: str, component: str) -> dict:
  with open(os.path.join(folder, component, "config.json")) as f:
    return json.load(f)


def split(path: str, **kwargs) -> ldm_layout.LdmParts:
  return ldm_layout.split_components(ldm_layout.read_single_file(path), path, **kwargs)


def assert_same_state(got, want):
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key].shape == want[key].shape, key
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ----------------------------------------------------------------------------
# The rules recover the folder.


@pytest.mark.parametrize("family", FAMILIES)
def test_split_and_infer_give_back_the_folder(folders, files, family):
  parts = split(files[family])
  configs = ldm_configs.infer_configs(parts, files[family])
  assert parts.family == family
  assert sorted(configs) == sorted(COMPONENTS) == sorted(parts.states)
  for name in COMPONENTS:
    want = {k: v for k, v in folder_config(folders[family], name).items()
            if k not in NOT_ARCHITECTURE}
    assert configs[name] == want, name
    assert_same_state(parts.states[name], folder_weights(folders[family], name))


@pytest.mark.parametrize("family", FAMILIES)
def test_ignored_keys_are_exactly_the_known_unused(files, family):
  state = ldm_layout.read_single_file(files[family])
  parts = ldm_layout.split_components(state, files[family])
  used = {k for origin in parts.origin.values() for k in origin.values()}
  assert sorted(used | set(parts.ignored)) == sorted(state)
  assert not used & set(parts.ignored)
  expected = ({k for k in state if k.startswith("model_ema.")} |
              set(ldm_file.schedule_buffers(tiny.tiny_configs()["scheduler"])))
  if family == "sd1":
    expected.add("cond_stage_model.transformer.text_model.embeddings.position_ids")
  else:  # the unused last block and the contrastive head
    expected |= {k for k in state if k.startswith(
        f"cond_stage_model.model.transformer.resblocks.{TEXT_LAYERS}.")}
    expected |= {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
  assert set(parts.ignored) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_alphas_cumprod_is_handed_back(folders, files, family):
  parts = split(files[family])
  with open(os.path.join(folders[family], "scheduler", "scheduler_config.json")) as f:
    scheduler = json.load(f)
  betas = np.linspace(scheduler["beta_start"] ** 0.5, scheduler["beta_end"] ** 0.5,
                      scheduler["num_train_timesteps"], dtype=np.float64) ** 2
  assert parts.alphas_cumprod.dtype == np.float32  # as the file stores it
  np.testing.assert_allclose(parts.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_memjax_modules_take_the_converted_weights(files, family):
  """The loader's own strict check: every key and shape of the built module."""
  parts = split(files[family])
  configs = ldm_configs.infer_configs(parts, files[family])
  for name in COMPONENTS:
    module = loading.build_module(name, configs[name], files[family])
    target = loading.abstract_params(name, module, configs[name])
    params = convert.torch_to_flax(parts.states[name], target, source=lambda k: files[family])
    assert len(convert.flatten(params)) == len(convert.flatten(target))


def test_text_layers_chooses_the_blocks_kept(files):
  sd2 = split(files["sd2"], text_layers=TEXT_LAYERS + 1)
  assert ldm_configs.infer_configs(sd2, files["sd2"])["text_encoder"]["num_hidden_layers"] == 3
  assert not any("resblocks" in k for k in sd2.ignored)
  sd1 = split(files["sd1"], text_layers=1)
  assert ldm_configs.infer_configs(sd1, files["sd1"])["text_encoder"]["num_hidden_layers"] == 1
  assert "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight" in sd1.ignored


def test_a_file_without_text_encoder_or_vae(files):
  state = {k: v for k, v in ldm_layout.read_single_file(files["sd2"]).items()
           if k.startswith("model.diffusion_model.")}
  parts = ldm_layout.split_components(state, "unet_only.safetensors")
  assert parts.family == "sd2"  # linear projections
  assert sorted(parts.states) == ["unet"] and parts.alphas_cumprod is None
  assert sorted(ldm_configs.infer_configs(parts, "unet_only.safetensors")) == ["unet"]


def test_scale_factor_becomes_the_vae_scaling_factor(folders, files, tmp_path):
  """LDM's scale_by_std=True saves the latent scale it measured as `scale_factor`."""
  default = split(files["sd1"])
  assert default.scale_factor is None
  assert ldm_configs.infer_configs(default, files["sd1"])["vae"]["scaling_factor"] == 0.18215
  path = ldm_file.write_ldm_file(folders["sd1"], str(tmp_path / "scaled.ckpt"), "sd1",
                                 scale_factor=0.13025)
  state = ldm_layout.read_single_file(path)
  assert state["scale_factor"].shape == () and state["scale_factor"].dtype == np.float32
  parts = ldm_layout.split_components(state, path)
  assert parts.scale_factor == 0.13025  # the float32's shortest decimal, not 0.1302500069
  used = {k for origin in parts.origin.values() for k in origin.values()}
  assert set(state) - used - set(parts.ignored) == {"scale_factor"}
  configs = ldm_configs.infer_configs(parts, path)
  assert configs["vae"]["scaling_factor"] == 0.13025
  assert configs["unet"] == ldm_configs.infer_configs(default, files["sd1"])["unet"]
  half = ldm_file.write_ldm_file(folders["sd1"], str(tmp_path / "half.safetensors"), "sd1",
                                 dtype=ml_dtypes.bfloat16, scale_factor=0.13025)
  assert split(half).scale_factor == float(str(ml_dtypes.bfloat16(0.13025)))
  for bad in (np.zeros((), np.float32), np.full((2,), 0.1, np.float32),
              np.asarray(np.nan, np.float32), np.asarray(True)):
    message = raises_one_line(CheckpointError, "'scale_factor' .* must hold one positive",
                              ldm_layout.split_components, dict(state, scale_factor=bad), path)
    assert path in message


# ----------------------------------------------------------------------------
# EMA copies, .ckpt files, dtypes.


def test_ema_takes_the_perturbed_copy_and_default_ignores_it(folders, files):
  state = ldm_layout.read_single_file(files["sd1"])
  default = ldm_layout.split_components(state, files["sd1"])
  ema = ldm_layout.split_components(state, files["sd1"], ema=True)
  folder = folder_weights(folders["sd1"], "unet")
  assert_same_state(default.states["unet"], folder)
  ema_keys = sorted(k for k in state if k.startswith("model_ema."))
  assert set(ema_keys) <= set(default.ignored)
  assert sorted(ema.states["unet"]) == sorted(folder)
  for key, file_key in ema.origin["unet"].items():
    assert file_key.startswith("model_ema.diffusion_model")
    np.testing.assert_array_equal(ema.states["unet"][key], state[file_key])
    assert not np.array_equal(ema.states["unet"][key], folder[key]), key
  assert {k for k in state if k.startswith("model.diffusion_model.")} <= set(ema.ignored)
  assert {"model_ema.decay", "model_ema.num_updates"} <= set(ema.ignored)
  for name in ("vae", "text_encoder"):
    assert_same_state(ema.states[name], default.states[name])


@pytest.mark.parametrize("family", FAMILIES)
def test_ckpt_round_trip_matches_safetensors(folders, files, tmp_path, family):
  path = ldm_file.write_ldm_file(folders[family], str(tmp_path / "model.ckpt"), family,
                                 ema=True)
  from_ckpt, from_st = split(path, ema=True), split(files[family], ema=True)
  assert sorted(from_ckpt.states) == sorted(from_st.states)
  for name in from_st.states:
    assert_same_state(from_ckpt.states[name], from_st.states[name])
  assert from_ckpt.ignored == from_st.ignored
  np.testing.assert_array_equal(from_ckpt.alphas_cumprod, from_st.alphas_cumprod)


def test_half_precision_files(folders, tmp_path):
  st = split(ldm_file.write_ldm_file(folders["sd1"], str(tmp_path / "half.safetensors"),
                                     "sd1", dtype=np.float16))
  ckpt = split(ldm_file.write_ldm_file(folders["sd1"], str(tmp_path / "bf16.ckpt"), "sd1",
                                       dtype=ml_dtypes.bfloat16))
  for name, want in ((n, folder_weights(folders["sd1"], n)) for n in COMPONENTS):
    for key, value in want.items():
      assert st.states[name][key].dtype == np.float16
      np.testing.assert_array_equal(st.states[name][key], value.astype(np.float16))
      assert ckpt.states[name][key].dtype == np.float32  # bfloat16 comes back as float32
      np.testing.assert_array_equal(
          ckpt.states[name][key], value.astype(ml_dtypes.bfloat16).astype(np.float32))


class _Foreign:
  """A class a hostile or exotic .ckpt could reference."""


def test_ckpt_with_lightning_callbacks_loads_and_foreign_objects_do_not(tmp_path,
                                                                         monkeypatch):
  """SD1's original .ckpt files key their callback states by Lightning's
  ModelCheckpoint class; that name is read as an inert stub, nothing else is."""
  torch = pytest.importorskip("torch")
  name = "pytorch_lightning.callbacks.model_checkpoint"
  model_checkpoint = type("ModelCheckpoint", (), {"__module__": name})
  lightning, foreign = str(tmp_path / "lightning.ckpt"), str(tmp_path / "foreign.ckpt")
  weights = {"model.diffusion_model.out.2.bias": torch.ones(4)}
  with monkeypatch.context() as m:  # a fake pytorch_lightning, importable while saving
    for module in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
      m.setitem(sys.modules, module, types.ModuleType(module))
    sys.modules[name].ModelCheckpoint = model_checkpoint
    torch.save({"epoch": 3, "global_step": 1000, "state_dict": weights,
                "callbacks": {model_checkpoint: {"best_model_score": torch.tensor(0.5),
                                                 "dirpath": "logs/checkpoints"}}}, lightning)
  torch.save({"state_dict": weights, "extra": _Foreign()}, foreign)
  state = ldm_layout.read_single_file(lightning)
  assert sorted(state) == ["model.diffusion_model.out.2.bias"]
  np.testing.assert_array_equal(state["model.diffusion_model.out.2.bias"], np.ones(4))
  message = raises_one_line(CheckpointError, "pickled objects other than tensors",
                            ldm_layout.read_single_file, foreign)
  assert foreign in message and "_Foreign" in message and ".safetensors" in message


def test_one_torch_reader_for_bin_weights_and_ckpt_checkpoints(tmp_path):
  """`.bin` weights must be {name: tensor}; a training checkpoint's state_dict is
  unwrapped and its bookkeeping dropped. Zip files are memory-mapped, legacy ones
  read whole; bfloat16 comes back as float32."""
  torch = pytest.importorskip("torch")
  saved = {"state_dict": {"a": torch.arange(3, dtype=torch.bfloat16)}, "epoch": 3}
  for zipped in (True, False):
    path = str(tmp_path / f"zip{zipped}.pt")
    torch.save(saved, path, _use_new_zipfile_serialization=zipped)
    got = checkpoint.read_torch_file(path, "checkpoint")
    assert list(got) == ["a"] and got["a"].dtype == np.float32
    np.testing.assert_array_equal(got["a"], [0, 1, 2])
    message = raises_one_line(CheckpointError, "entry 'state_dict' is a dict, not a tensor",
                              checkpoint.read_torch_file, path, "weights")
    assert path in message
  with pytest.raises(ValueError, match="what must be one of"):
    checkpoint.read_torch_file(path, "ckpt")


# ----------------------------------------------------------------------------
# PyTorch diffusers reads the same files the same way (independent proof).


def _torch_outputs(torch, unet, vae, text, rng, vocab):
  sample = torch.from_numpy(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
  context = torch.from_numpy(rng.standard_normal((2, 77, 64)).astype(np.float32))
  image = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32))
  ids = torch.from_numpy(rng.integers(0, vocab, (2, 77)))
  with torch.no_grad():
    return {"unet": unet(sample, torch.tensor([10, 900]), encoder_hidden_states=context).sample,
            "vae": vae(image).sample,  # encode (posterior mode) then decode
            "text_encoder": text(ids)[0]}


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_from_single_file_matches_from_pretrained(folders, files, family):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  folder = folders[family]
  pipe = diffusers.StableDiffusionPipeline.from_single_file(
      files[family], config=folder, local_files_only=True)
  ref = {"unet": diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
         "vae": diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae"),
         "text_encoder": transformers.CLIPTextModel.from_pretrained(
             folder, subfolder="text_encoder")}
  # diffusers loads single files with strict=False: a weight it did not find would
  # stay at its random init, so every tensor is compared, not only outputs.
  for name, model in ref.items():
    got, want = getattr(pipe, name).state_dict(), model.state_dict()
    assert sorted(got) == sorted(want), name
    for key in want:
      assert torch.equal(got[key], want[key]), (name, key)
  vocab = folder_config(folder, "text_encoder")["vocab_size"]
  got = _torch_outputs(torch, pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval(),
                       np.random.default_rng(0), vocab)
  want = _torch_outputs(torch, ref["unet"].eval(), ref["vae"].eval(),
                        ref["text_encoder"].eval(), np.random.default_rng(0), vocab)
  for name in COMPONENTS:
    assert float((got[name] - want[name]).abs().max()) <= 1e-5, name
  assert pipe.scheduler.config.prediction_type == (
      "epsilon" if family == "sd1" else "v_prediction")


def test_diffusers_extract_ema_reads_the_same_copy(folders, files):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  parts = split(files["sd2"], ema=True)
  unet = diffusers.UNet2DConditionModel.from_single_file(
      files["sd2"], config=folders["sd2"], subfolder="unet", extract_ema=True,
      local_files_only=True)
  got = unet.state_dict()
  assert sorted(got) == sorted(parts.states["unet"])
  for key, value in parts.states["unet"].items():
    assert torch.equal(got[key], torch.from_numpy(np.array(value))), key


def test_open_clip_runs_the_sd2_text_encoder_as_sd2_does(folders, files):
  """OpenCLIP's own text tower takes the file's `cond_stage_model.model.*` keys
  (strict) and, run as SD2 runs it (every block but the last, then ln_final),
  gives the folder's CLIPTextModel output."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  open_clip_transformer = pytest.importorskip("open_clip.transformer")
  prefix = "cond_stage_model.model."
  state = {k[len(prefix):]: torch.from_numpy(np.array(v))
           for k, v in ldm_layout.read_single_file(files["sd2"]).items()
           if k.startswith(prefix) and k != prefix + "logit_scale"}
  vocab, width = state["token_embedding.weight"].shape
  tower = open_clip_transformer.TextTransformer(
      context_length=77, vocab_size=vocab, width=width, heads=width // 64,
      layers=TEXT_LAYERS + 1, output_dim=width, act_layer=torch.nn.GELU)
  tower.load_state_dict(state, strict=True)
  tower.eval()
  ids = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, (2, 77)))
  reference = transformers.CLIPTextModel.from_pretrained(
      folders["sd2"], subfolder="text_encoder").eval()

  def run(blocks):
    x = tower.token_embedding(ids) + tower.positional_embedding
    for block in blocks:
      x = block(x, attn_mask=tower.attn_mask)
    return tower.ln_final(x)

  with torch.no_grad():
    want = reference(ids)[0]
    assert float((run(tower.transformer.resblocks[:-1]) - want).abs().max()) <= 1e-5
    assert float((run(tower.transformer.resblocks) - want).abs().max()) > 1e-2


def _sd21_configs() -> dict:
  """stabilityai/stable-diffusion-2-1's architecture (768-v)."""
  configs = tiny.tiny_configs("sd15")
  configs["unet"].update(attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                         cross_attention_dim=1024)
  configs["text_encoder"].update(hidden_size=1024, intermediate_size=4096,
                                 num_hidden_layers=23, num_attention_heads=16,
                                 hidden_act="gelu")
  return configs


def _meta_shapes(model) -> dict:
  """{key: zero-stride float32 array of the weight's shape} (no memory)."""
  return {k: np.broadcast_to(np.float32(0), tuple(v.shape))
          for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_architectures(family):
  """SD1.5 and SD2.1 at full size, shapes only: the rules, the inferred configs, the
  key counts of the released files, and diffusers' own LDM -> diffusers renaming."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  from diffusers.loaders import single_file_utils  # pylint: disable=g-import-not-at-top
  configs = tiny.tiny_configs("sd15") if family == "sd1" else _sd21_configs()
  plain = {n: {k: v for k, v in configs[n].items() if not k.startswith("_")}
           for n in ("unet", "vae")}
  with torch.device("meta"):
    unet = _meta_shapes(diffusers.UNet2DConditionModel(**plain["unet"]))
    vae = _meta_shapes(diffusers.AutoencoderKL(**plain["vae"]))
    text = clip_text.with_text_model_prefix(_meta_shapes(transformers.CLIPTextModel(
        transformers.CLIPTextConfig(**configs["text_encoder"]))))
  text = {k: v for k, v in text.items() if not k.endswith("position_ids")}
  state = {"model.diffusion_model." + k: v
           for k, v in ldm_file.unet_to_ldm(unet, configs["unet"]).items()}
  state.update({"first_stage_model." + k: v
                for k, v in ldm_file.vae_to_ldm(vae, configs["vae"]).items()})
  state.update(ldm_file.clip_to_ldm(text, configs["text_encoder"]) if family == "sd1" else
               ldm_file.openclip_to_ldm(text, configs["text_encoder"],
                                        np.random.default_rng(0)))
  # Keys every released file of the family has (openaimodel / LDM numbering).
  for key in ("model.diffusion_model.output_blocks.11.0.skip_connection.weight",
              "model.diffusion_model.output_blocks.2.1.conv.weight",
              "model.diffusion_model.output_blocks.5.2.conv.weight",
              "model.diffusion_model.input_blocks.9.0.op.weight",
              "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
              "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
              "first_stage_model.encoder.mid.attn_1.proj_out.weight"):
    assert key in state, key
  assert sum(k.startswith("model.diffusion_model.") for k in state) == 686
  assert sum(k.startswith("first_stage_model.") for k in state) == 248
  parts = ldm_layout.split_components(state, f"{family}.safetensors")
  inferred = ldm_configs.infer_configs(parts, f"{family}.safetensors")
  for name, want in (("unet", unet), ("vae", vae), ("text_encoder", text)):
    assert {k: v.shape for k, v in parts.states[name].items()} == {
        k: v.shape for k, v in want.items()}, name
    assert inferred[name] == {k: v for k, v in configs[name].items()
                              if k not in NOT_ARCHITECTURE}, name
  # diffusers' converters name the same LDM keys the same way.
  theirs = single_file_utils.convert_ldm_unet_checkpoint(state, plain["unet"])
  assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in unet.items()}
  theirs = single_file_utils.convert_ldm_vae_checkpoint(state, plain["vae"])
  assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in vae.items()}


# ----------------------------------------------------------------------------
# Errors: one line, naming the file.


def raises_one_line(error, match, fn, *args, **kwargs):
  with pytest.raises(error, match=match) as info:
    fn(*args, **kwargs)
  assert "\n" not in str(info.value)
  return str(info.value)


def test_a_diffusers_weight_file_is_not_an_ldm_file(folders):
  path = os.path.join(folders["sd1"], "unet", "diffusion_pytorch_model.safetensors")
  message = raises_one_line(CheckpointError, "not a Stable Diffusion checkpoint in the LDM",
                            split, path)
  assert path in message and "passing the folder" in message


def test_unknown_keys_are_listed(files):
  state = dict(ldm_layout.read_single_file(files["sd1"]))
  extra = ["embedding_manager.embedder.weight",
           "model.diffusion_model.input_blocks.1.0.weird.weight",
           "first_stage_model.loss.logvar", "cond_stage_model.transformer.text_model.head.weight"]
  for key in extra:
    state[key] = np.zeros((1,), np.float32)
  message = raises_one_line(CheckpointError, "fit no rule", ldm_layout.split_components,
                            state, files["sd1"])
  assert files["sd1"] in message and all(k in message for k in extra)
  state["cond_stage_model.model.token_embedding.weight"] = np.zeros((1, 64), np.float32)
  raises_one_line(CheckpointError, "both a CLIP .* and an OpenCLIP",
                  ldm_layout.split_components, state, files["sd1"])


def test_many_unknown_keys_are_cut_to_twenty(files):
  state = dict(ldm_layout.read_single_file(files["sd1"]))
  for i in range(30):
    state[f"extra.{i:02d}"] = np.zeros((1,), np.float32)
  message = raises_one_line(CheckpointError, "30 key", ldm_layout.split_components, state,
                            files["sd1"])
  assert "extra.19" in message and "extra.20" not in message and "and 10 more" in message


def test_transformer_depth_two_is_refused(files):
  state = dict(ldm_layout.read_single_file(files["sd2"]))
  key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.1.attn1.to_q.weight"
  state[key] = state[key.replace("blocks.1.attn1", "blocks.0.attn1")]
  parts = ldm_layout.split_components(state, files["sd2"])
  message = raises_one_line(ConfigError, "transformer depth 2", ldm_configs.infer_configs,
                            parts, files["sd2"])
  assert files["sd2"] in message and key in message


def test_class_embeddings_are_refused(files):
  state = dict(ldm_layout.read_single_file(files["sd1"]))
  key = "model.diffusion_model.label_emb.0.0.weight"
  state[key] = np.zeros((128, 16), np.float32)
  parts = ldm_layout.split_components(state, files["sd1"])
  message = raises_one_line(ConfigError, "class/label embedding", ldm_configs.infer_configs,
                            parts, files["sd1"])
  assert files["sd1"] in message and key in message


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_files(folders, tmp_path, suffix):
  path = ldm_file.write_ldm_file(folders["sd1"], str(tmp_path / f"full{suffix}"), "sd1")
  with open(path, "rb") as f:
    data = f.read()
  cut = str(tmp_path / f"cut{suffix}")
  with open(cut, "wb") as f:
    f.write(data[:len(data) // 2])
  message = raises_one_line(CheckpointError, "truncated", ldm_layout.read_single_file, cut)
  assert cut in message


def test_ema_without_an_ema_copy(folders, tmp_path):
  path = ldm_file.write_ldm_file(folders["sd1"], str(tmp_path / "no_ema.safetensors"), "sd1")
  message = raises_one_line(CheckpointError, "no EMA copy", split, path, ema=True)
  assert path in message


def test_text_layers_out_of_range(files):
  message = raises_one_line(CheckpointError, "text_layers must be from 1 to 3", split,
                            files["sd2"], text_layers=4)
  assert files["sd2"] in message


def test_file_names_and_missing_torch(files, tmp_path, monkeypatch):
  raises_one_line(CheckpointError, "must end in", ldm_layout.read_single_file,
                  str(tmp_path / "model.bin"))
  raises_one_line(CheckpointError, "does not exist", ldm_layout.read_single_file,
                  str(tmp_path / "absent.safetensors"))
  ckpt = tmp_path / "model.ckpt"
  ckpt.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  message = raises_one_line(CheckpointError, r"\.ckpt needs torch",
                            ldm_layout.read_single_file, str(ckpt))
  assert str(ckpt) in message and ".safetensors" in message
