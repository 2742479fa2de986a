"""CLIP text transformer, the Stable Diffusion text encoder, in Flax.

A port of transformers' `CLIPTextModel` as Stable Diffusion uses it: token and
position embeddings, pre-LN residual blocks with causal self-attention, a final
layer norm, and `last_hidden_state` [B, L, hidden] as the UNet context
(docs/method.md section 2). SD1 uses OpenAI's CLIP ViT-L/14 text tower
(`quick_gelu`, 768 wide, 12 layers); SD2 an OpenCLIP ViT-H/14 tower (`gelu`,
1024 wide, 23 of its 24 layers, the diffusers folder already stores the right
depth). No attention padding mask: SD passes none, so padding tokens attend to
each other causally exactly as in the reference. The pooled (EOS) output and
the projection are not used by SD and are not built.

Parameter paths follow the state-dict keys of the checkpoints SD folders ship
(`text_model.encoder.layers.0.self_attn.q_proj.weight` <->
`text_model/encoder/layers_0/self_attn/q_proj/kernel`), see
`memjax.models.convert`.
"""
import dataclasses
import math
from typing import Any, Dict, Mapping, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.runtime.errors import ConfigError, InputError
from memjax.models.attention import multi_head_attention


def _finite(v) -> bool:
  """A JSON number that is a finite float (NaN, Infinity and 1e400-sized ints are not)."""
  try:
    return math.isfinite(float(v))
  except OverflowError:
    return False


_MODEL_TYPE = "clip_text_model"
_PREFIX = "text_model."
_ACTIVATIONS = ("quick_gelu", "gelu")
_MAX_INT = 2 ** 31 - 1  # the largest size taken from a config (an array dimension)

# Keys that only describe the checkpoint, the tokenizer, training or generation;
# none changes `last_hidden_state` of CLIPTextModel. The generation and task keys
# are PretrainedConfig attributes that transformers 4.x wrote into every config.
_IGNORED_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "_commit_hash",
    "_attn_implementation", "_attn_implementation_autoset", "architectures",
    "transformers_version", "torch_dtype", "dtype", "use_bfloat16",
    "projection_dim", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "initializer_range",
    "initializer_factor", "attention_dropout", "dropout", "gradient_checkpointing",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder",
    "tie_word_embeddings", "id2label", "label2id", "num_labels", "problem_type",
    "finetuning_task", "task_specific_params", "tokenizer_class", "prefix",
    "tf_legacy_loss", "use_cache", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of a transformers `CLIPTextConfig` that shape the computation.

  Defaults are transformers' own, used when config.json omits a key (as
  transformers does).
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], source: str) -> "CLIPTextConfig":
    """Builds the config from a text_encoder/config.json dict.

    Args:
      d: the parsed JSON.
      source: the file it came from, named in every error.

    Raises:
      ConfigError: for a value or key that memjax cannot reproduce exactly.
    """
    if not isinstance(d, Mapping):
      raise ConfigError(f"{source}: must be a JSON object of config keys, got "
                        f"{type(d).__name__} {d!r:.60}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    model_type = d.get("model_type", _MODEL_TYPE)
    if model_type != _MODEL_TYPE:
      raise ConfigError(f"{source}: key 'model_type' is {model_type!r}; memjax's text "
                        f"encoder is a CLIP text transformer ('{_MODEL_TYPE}')")
    # Pruned heads would change the per-layer head count the weights imply.
    if d.get("pruned_heads"):
      raise ConfigError(f"{source}: key 'pruned_heads' is not empty; memjax does not "
                        "support pruned CLIP text encoders")
    unknown = sorted(k for k in d if k not in fields and k not in _IGNORED_KEYS
                     and k not in ("model_type", "pruned_heads"))
    if unknown:
      # Keys from other transformers versions appear in real folders; refusing
      # them would block real weights, so they are reported, not fatal.
      logging.warning("%s: ignoring unknown key(s) %s", source,
                      ", ".join(repr(k) for k in unknown))
    values: Dict[str, Any] = {}
    for name, field in fields.items():
      if name not in d:
        continue
      value = d[name]
      if field.type is int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_INT:
          raise ConfigError(f"{source}: key '{name}' must be an integer from 1 to "
                            f"{_MAX_INT}, got {value!r}")
      elif field.type is float:
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or
            not _finite(value) or value <= 0):
          raise ConfigError(f"{source}: key '{name}' must be a finite positive number, "
                            f"got {value!r}")
        value = float(value)
      values[name] = value
    config = cls(**values)
    if config.hidden_act not in _ACTIVATIONS:
      raise ConfigError(
          f"{source}: key 'hidden_act' is {config.hidden_act!r}; memjax supports "
          f"{' and '.join(repr(a) for a in _ACTIVATIONS)} (SD1 and SD2 text encoders)")
    if config.hidden_size % config.num_attention_heads:
      raise ConfigError(
          f"{source}: key 'hidden_size' ({config.hidden_size}) is not a multiple of "
          f"'num_attention_heads' ({config.num_attention_heads})")
    return config


def with_text_model_prefix(state: Mapping[str, Any]) -> Dict[str, Any]:
  """Puts a CLIPTextModel state dict in the layout memjax's params mirror.

  Every published SD text encoder was saved by transformers 4.x, whose keys start
  with `text_model.`; transformers >= 5 saves (and loads) the same weights without
  that prefix. Keys already prefixed are kept as they are.
  """
  return {k if k.startswith(_PREFIX) else _PREFIX + k: v for k, v in state.items()}


def _activation(name: str, x: jax.Array) -> jax.Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)  # OpenAI CLIP's approximation (SD1)
  return jax.nn.gelu(x, approximate=False)  # exact erf GELU (SD2, transformers "gelu")


def _layer_norm(config: CLIPTextConfig, dtype: Any, name: str, x: jax.Array) -> jax.Array:
  # A bare nn.LayerNorm keeps the params at `<name>/scale`, `<name>/bias` as the
  # conversion rule requires; the float32 upcast happens around it.
  y = nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32,
                   use_fast_variance=False, name=name)(x.astype(jnp.float32))
  return y.astype(dtype)


class CLIPAttention(nn.Module):
  """Causal multi-head self-attention, [B, L, C] -> [B, L, C]."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config.hidden_size
    q = nn.Dense(c, dtype=self.dtype, name="q_proj")(x)
    k = nn.Dense(c, dtype=self.dtype, name="k_proj")(x)
    v = nn.Dense(c, dtype=self.dtype, name="v_proj")(x)
    out = multi_head_attention(q, k, v, self.config.num_attention_heads, is_causal=True,
                               kernel=self.attention)
    return nn.Dense(c, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
  """fc1 -> activation -> fc2, [B, L, C] -> [B, L, C]."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
    h = _activation(self.config.hidden_act, h)
    return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN residual block as transformers' `CLIPEncoderLayer`, [B, L, C]."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _layer_norm(self.config, self.dtype, "layer_norm1", x)
    x = x + CLIPAttention(self.config, self.dtype, self.attention, name="self_attn")(h)
    h = _layer_norm(self.config, self.dtype, "layer_norm2", x)
    return x + CLIPMLP(self.config, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
  """`num_hidden_layers` encoder layers, [B, L, C] -> [B, L, C]."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, self.dtype, self.attention, name=f"layers_{i}")(x)
    return x


class CLIPTextEmbeddings(nn.Module):
  """Token plus position embeddings, int [B, L] -> [B, L, C]."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                      name="token_embedding")(input_ids)
    # Position ids 0..L-1, as transformers' default `position_ids` buffer.
    positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                         name="position_embedding")(jnp.arange(input_ids.shape[1]))
    return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
  """Embeddings, encoder and final layer norm; int [B, L] -> [B, L, C]."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention: Optional[str] = None

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    x = CLIPTextEmbeddings(self.config, self.dtype, name="embeddings")(input_ids)
    x = CLIPEncoder(self.config, self.dtype, self.attention, name="encoder")(x)
    return _layer_norm(self.config, self.dtype, "final_layer_norm", x)


class CLIPTextModel(nn.Module):
  """The SD text encoder: token ids [B, L] -> last_hidden_state [B, L, hidden].

  Attributes:
    config: the architecture, from text_encoder/config.json.
    dtype: computation dtype; layer norms and the attention softmax run in
      float32 whatever it is, the output is in `dtype`.
  """
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention: Optional[str] = None  # the kernel (`attention.multi_head_attention`)

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    """Encodes token ids.

    Args:
      input_ids: int32 [B, L], L <= max_position_embeddings (77 for SD).

    Returns:
      last_hidden_state [B, L, hidden_size] in `dtype`.

    Raises:
      InputError: if L exceeds max_position_embeddings (checked at trace time).
    """
    if input_ids.ndim != 2:
      raise InputError(f"CLIP text encoder: token ids must be [batch, length], "
                       f"got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > self.config.max_position_embeddings:
      raise InputError(
          f"CLIP text encoder: {input_ids.shape[1]} tokens per prompt, but the model "
          f"has only {self.config.max_position_embeddings} positions; truncate the "
          "tokenization to that length")
    return CLIPTextTransformer(self.config, self.dtype, self.attention, name="text_model")(input_ids)
