"""PyTorch parity of memjax's CLIP text encoder on tiny SD1- and SD2-like configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.runtime.errors import ConfigError, InputError
from memjax.models import clip_text
from memjax.models.convert import torch_to_flax

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_SOURCE = "text_encoder/model.safetensors"
_CONFIG_SOURCE = "text_encoder/config.json"
_VOCAB = 1000
_BOS, _EOS = _VOCAB - 2, _VOCAB - 1
_LENGTH = 77
# Tiny stand-ins: SD1 (OpenAI CLIP, quick_gelu, pads with <|endoftext|> = EOS) and
# SD2 (OpenCLIP, exact gelu, a wider context scaled down, pads with "!" = id 0).
_SD1 = dict(vocab_size=_VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=_BOS, eos_token_id=_EOS, pad_token_id=_EOS)
_SD2 = dict(vocab_size=_VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
            bos_token_id=_BOS, eos_token_id=_EOS, pad_token_id=0, projection_dim=32)
_PAD = {"quick_gelu": _EOS, "gelu": 0}


def _padded_prompts(rng: np.random.Generator, pad: int) -> np.ndarray:
  """[3, 77] int32 ids laid out as the tokenizer pads them (max_length=77).

  Rows: the empty prompt (the CFG unconditional), a 10-token caption, and a
  caption truncated to the full 75 tokens between BOS and EOS.
  """
  rows = []
  for n in (0, 10, _LENGTH - 2):
    words = rng.integers(1, _BOS, size=n)
    row = np.concatenate([[_BOS], words, [_EOS]])
    rows.append(np.pad(row, (0, _LENGTH - row.size), constant_values=pad))
  return np.stack(rows).astype(np.int32)


def _torch_model(hf_kwargs: dict, seed: int):
  torch.manual_seed(seed)
  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**hf_kwargs)).eval()
  # Perturb every parameter, so that zero biases, unit norm scales or a swapped
  # q/k/v cannot hide behind the initialisation.
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  return model


def _convert(model, config: clip_text.CLIPTextConfig):
  module = clip_text.CLIPTextModel(config)
  dummy = jnp.zeros((1, _LENGTH), jnp.int32)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy)["params"]
  # transformers >= 5 drops the `text_model.` prefix that SD's files carry.
  state = clip_text.with_text_model_prefix(
      {k: v.detach().numpy() for k, v in model.state_dict().items()})
  return torch_to_flax(state, abstract, source=lambda k: _SOURCE)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("hf_kwargs", [_SD1, _SD2], ids=["sd1", "sd2"])
def test_matches_transformers(hf_kwargs):
  model = _torch_model(hf_kwargs, seed=0)
  config = clip_text.CLIPTextConfig.from_dict(model.config.to_dict(), _CONFIG_SOURCE)
  assert config.hidden_act == hf_kwargs["hidden_act"]
  params = _convert(model, config)
  ids = _padded_prompts(np.random.default_rng(0), _PAD[hf_kwargs["hidden_act"]])

  with torch.no_grad():
    want = model(input_ids=torch.from_numpy(ids).long()).last_hidden_state.numpy()
  got = jax.jit(clip_text.CLIPTextModel(config).apply)({"params": params}, ids)

  assert got.shape == (3, _LENGTH, hf_kwargs["hidden_size"]) and got.dtype == jnp.float32
  assert _rel(got, want) <= 1e-4  # acceptance tolerance, float32


def test_bfloat16_close_to_float32():
  model = _torch_model(_SD2, seed=1)
  config = clip_text.CLIPTextConfig.from_dict(model.config.to_dict(), _CONFIG_SOURCE)
  params = _convert(model, config)
  ids = _padded_prompts(np.random.default_rng(1), pad=0)
  ref = jax.jit(clip_text.CLIPTextModel(config).apply)({"params": params}, ids)
  params_bf16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
  got = jax.jit(clip_text.CLIPTextModel(config, dtype=jnp.bfloat16).apply)(
      {"params": params_bf16}, ids)
  assert got.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(got)))
  assert _rel(got, ref) <= 5e-2


def test_from_dict_reads_sd_configs():
  # text_encoder/config.json of SD1.5 and SD2.1-base as transformers 4.x wrote them.
  sd1 = {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
         "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
         "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
         "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
         "max_position_embeddings": 77, "model_type": "clip_text_model",
         "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
         "projection_dim": 768, "torch_dtype": "float32",
         "transformers_version": "4.22.0.dev0", "vocab_size": 49408}
  sd2 = dict(sd1, hidden_act="gelu", hidden_size=1024, intermediate_size=4096,
             num_attention_heads=16, num_hidden_layers=23, projection_dim=512,
             bos_token_id=49406, eos_token_id=49407, transformers_version="4.25.0.dev0")
  assert clip_text.CLIPTextConfig.from_dict(sd1, _CONFIG_SOURCE) == clip_text.CLIPTextConfig(
      vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
      num_attention_heads=12, hidden_act="quick_gelu")
  config = clip_text.CLIPTextConfig.from_dict(sd2, _CONFIG_SOURCE)
  assert (config.hidden_size, config.num_hidden_layers, config.hidden_act) == (1024, 23, "gelu")


@pytest.mark.parametrize("key,value", [
    ("hidden_act", "relu"),
    ("model_type", "bert"),
    ("layer_norm_eps", None),
    ("num_hidden_layers", 2.5),
    ("pruned_heads", {"0": [1]}),
])
def test_from_dict_rejects_unsupported(key, value):
  d = {**_SD1, "model_type": "clip_text_model", key: value}
  with pytest.raises(ConfigError) as e:
    clip_text.CLIPTextConfig.from_dict(d, "/models/x/text_encoder/config.json")
  assert "/models/x/text_encoder/config.json" in str(e.value)
  assert key in str(e.value)


def test_from_dict_ignores_unknown_keys():
  # Real folders carry keys of other transformers versions; they must still load.
  config = clip_text.CLIPTextConfig.from_dict({**_SD1, "some_future_key": 1}, _CONFIG_SOURCE)
  assert config == clip_text.CLIPTextConfig.from_dict(_SD1, _CONFIG_SOURCE)


def test_too_many_tokens_is_an_input_error():
  config = clip_text.CLIPTextConfig.from_dict(_SD1, _CONFIG_SOURCE)
  with pytest.raises(InputError, match="78 tokens"):
    jax.eval_shape(clip_text.CLIPTextModel(config).init, jax.random.PRNGKey(0),
                   jnp.zeros((1, 78), jnp.int32))


def test_prefix_helper_is_idempotent():
  state = {"embeddings.token_embedding.weight": 1, "text_model.final_layer_norm.bias": 2}
  once = clip_text.with_text_model_prefix(state)
  assert set(once) == {"text_model.embeddings.token_embedding.weight",
                       "text_model.final_layer_norm.bias"}
  assert clip_text.with_text_model_prefix(once) == once
