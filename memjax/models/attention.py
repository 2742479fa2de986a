"""Multi-head attention shared by the UNet, the VAE and the CLIP text encoder.

All attention goes through `jax.nn.dot_product_attention`, which lowers to cuDNN's
fused kernel on GPUs and never materialises a float32 [L, L] score matrix per head
there (ALGORITHMS.md section 6: sequence 4096 at 64 x 64 latents). Its XLA path
computes the logits and the softmax in float32 whatever the input dtype, which is
what diffusers' `upcast_attention=True` (SD2) and `upcast_softmax` ask for.
"""
from typing import Optional

import jax
import jax.numpy as jnp

# None lets JAX choose (cuDNN where it can on GPU, XLA elsewhere). Set through
# `set_attention_implementation` by entry points and benchmarks, read at trace time.
_IMPLEMENTATION: Optional[str] = None


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
                                     implementation=_IMPLEMENTATION)
  return out.reshape(b, lq, c).astype(q.dtype)
