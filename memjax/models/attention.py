"""Multi-head attention shared by the UNet, the VAE and the CLIP text encoder.

All attention goes through `jax.nn.dot_product_attention`. On GPUs, for half
precision and head dims up to 128 (cuDNN's fused kernel's limits), memjax asks for
cuDNN's fused flash attention, which never materialises a float32 [L, L] score
matrix per head (ALGORITHMS.md section 6: sequence 4096 at 64 x 64 latents);
JAX's own default (None) picks XLA there. Everything else (CPU, float32, the VAE's
single 512-wide head) takes the XLA path, which computes logits and softmax in
float32 whatever the input dtype: what diffusers' `upcast_attention=True` (SD2)
and `upcast_softmax` ask for.
"""
from typing import Optional

import jax
import jax.numpy as jnp

# None: memjax's choice (`_choose`). Set through `set_attention_implementation`
# by entry points and benchmarks; read at trace time.
_IMPLEMENTATION: Optional[str] = None
_CUDNN_MAX_HEAD_DIM = 128


def set_attention_implementation(name: Optional[str]) -> None:
  """Selects the kernel for every later trace: None, "xla" or "cudnn"."""
  if name not in (None, "xla", "cudnn"):
    raise ValueError(f"unknown attention implementation {name!r}")
  global _IMPLEMENTATION
  _IMPLEMENTATION = name


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
                         is_causal: bool = False) -> jax.Array:
  """Scaled dot-product attention over heads packed in the last axis.

  Args:
    q: [B, Lq, H * D] queries.
    k: [B, Lk, H * D] keys.
    v: [B, Lk, H * D] values.
    num_heads: H.
    is_causal: mask keys after each query (CLIP's text transformer).

  Returns:
    [B, Lq, H * D], in q's dtype. The scale is 1 / sqrt(D) as in PyTorch.
  """
  b, lq, c = q.shape
  lk = k.shape[1]
  d = c // num_heads
  q = q.reshape(b, lq, num_heads, d)
  k = k.reshape(b, lk, num_heads, d)
  v = v.reshape(b, lk, num_heads, d)
  out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                     implementation=_choose(d, q.dtype))
  return out.reshape(b, lq, c).astype(q.dtype)


def _choose(head_dim: int, dtype) -> Optional[str]:
  """The kernel for one call: the forced one, else cuDNN where it applies."""
  fits_cudnn = head_dim <= _CUDNN_MAX_HEAD_DIM and dtype in (jnp.bfloat16, jnp.float16)
  if _IMPLEMENTATION == "cudnn":
    return "cudnn" if fits_cudnn else "xla"
  if _IMPLEMENTATION is None and fits_cudnn and jax.default_backend() == "gpu":
    return "cudnn"
  return "xla" if _IMPLEMENTATION is None else _IMPLEMENTATION
