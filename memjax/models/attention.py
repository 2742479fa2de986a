"""Multi-head attention shared by the UNet, the VAE and the CLIP text encoder.

Three kernels, one choice per call (`choose_kernel`), passed down from the model
configuration as a field of every module that attends (never a global):

- "blocked" (the default on CPU): memjax's own formulation for XLA's CPU backend.
  Heads are moved to the batch axis and the scores are computed one tile of
  (heads x query rows) at a time, sized to stay in cache (`_CPU_TILE_BYTES`), with
  the softmax normalisation applied to the [rows, D] output instead of the
  [rows, Lk] probabilities. `jax.nn.dot_product_attention`'s XLA path
  materialises [B, H, Lq, Lk] scores for the whole batch: at 32 x 32 latents
  (1024 tokens, 8 heads of 8, batch 8, 2 cores) it took 401 ms, this kernel 36 ms
  and PyTorch's fused CPU kernel 65 ms (benchmarks/attention_bench.py).
- "xla" / "cudnn": `jax.nn.dot_product_attention`. On GPUs, for half precision
  and head dims up to 128 (cuDNN's fused kernel's limits), memjax asks for
  cuDNN's fused flash attention, which never materialises a float32 [L, L] score
  matrix per head (sequence 4096 at 64 x 64 latents);
  JAX's own default (None) picks XLA there. Everything else on GPUs (float32, the
  VAE's single 512-wide head) takes the XLA path.

The blocked and XLA kernels compute logits and softmax in float32 whatever the
input dtype: what diffusers' `upcast_attention=True` (SD2) and `upcast_softmax`
ask for.
"""
from typing import Optional

import jax
import jax.numpy as jnp

_CUDNN_MAX_HEAD_DIM = 128
# "blocked" kernel: float32 bytes of one tile of scores, and the fewest query rows
# per tile. On the 2-core benchmark machine (1 MiB L2 per core, 32 MiB L3), 4 MiB
# tiles were the fastest of 0.25 / 1 / 4 / 8 / 16 MiB for the medium UNet's
# 1024-token attention, alone and in the whole score step (benchmarks/RESULTS.md).
_CPU_TILE_BYTES = 4 << 20
_MIN_ROWS = 16


KERNELS = ("xla", "cudnn", "blocked")


def check_kernel(kernel: Optional[str]) -> Optional[str]:
  """kernel if it is None (memjax's choice) or one of KERNELS; else ValueError."""
  if kernel not in (None,) + KERNELS:
    raise ValueError(f"unknown attention kernel {kernel!r} (use one of {', '.join(KERNELS)})")
  return kernel


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
                         is_causal: bool = False, kernel: Optional[str] = None) -> jax.Array:
  """Scaled dot-product attention over heads packed in the last axis.

  Args:
    q: [B, Lq, H * D] queries.
    k: [B, Lk, H * D] keys.
    v: [B, Lk, H * D] values.
    num_heads: H.
    is_causal: mask keys after each query (CLIP's text transformer).
    kernel: None (memjax's choice, `choose_kernel`), "xla", "cudnn" or "blocked";
      a field of the module that calls this, so it is part of the trace.

  Returns:
    [B, Lq, H * D], in q's dtype. The scale is 1 / sqrt(D) as in PyTorch.
  """
  b, lq, c = q.shape
  lk = k.shape[1]
  d = c // num_heads
  q = q.reshape(b, lq, num_heads, d)
  k = k.reshape(b, lk, num_heads, d)
  v = v.reshape(b, lk, num_heads, d)
  kernel = choose_kernel(d, q.dtype, kernel)
  if kernel == "blocked":
    out = blocked_attention(q, k, v, is_causal)
  else:
    out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation=kernel)
  return out.reshape(b, lq, c).astype(q.dtype)


def _largest_divisor(n: int, limit: int) -> int:
  """The largest divisor of n that is <= max(limit, 1)."""
  return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool = False,
                      tile_bytes: Optional[int] = None) -> jax.Array:
  """Softmax(q k^T / sqrt(D)) v one cache-sized tile of scores at a time.

  Args:
    q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
    is_causal: mask keys after each query.
    tile_bytes: float32 bytes of one [heads, rows, Lk] score tile (default
      `_CPU_TILE_BYTES`).

  Returns:
    [B, Lq, H, D] float32. Logits, softmax and the weighted sum are float32
    whatever the input dtype, as on the XLA path.
  """
  tile_bytes = tile_bytes or _CPU_TILE_BYTES
  b, lq, h, d = q.shape
  lk = k.shape[1]
  f32 = jnp.float32
  qh = (q.astype(f32) * d ** -0.5).transpose(0, 2, 1, 3).reshape(b * h, lq, d)
  kh = k.astype(f32).transpose(0, 2, 3, 1).reshape(b * h, d, lk)
  vh = v.astype(f32).transpose(0, 2, 1, 3).reshape(b * h, lk, d)
  row_bytes = 4 * lk
  rows = _largest_divisor(lq, tile_bytes // row_bytes)
  if rows < min(lq, _MIN_ROWS):  # e.g. a prime Lq: one chunk rather than tiny ones
    rows = lq
  group = _largest_divisor(b * h, tile_bytes // (row_bytes * rows))
  n_groups, n_chunks = b * h // group, lq // rows
  positions = jnp.arange(lq, dtype=jnp.int32).reshape(n_chunks, rows)

  def tile(qt, kt, vt, pos):  # [g, r, d], [g, d, lk], [g, lk, d], [r]
    s = jnp.matmul(qt, kt)
    if is_causal:
      s = jnp.where(jnp.arange(lk)[None, None, :] > pos[None, :, None], -jnp.inf, s)
    e = jnp.exp(s - s.max(-1, keepdims=True))
    return jnp.matmul(e, vt) / e.sum(-1, keepdims=True)

  if n_groups == 1 and n_chunks == 1:
    out = tile(qh, kh, vh, positions[0])
  else:
    qg = qh.reshape(n_groups, group, n_chunks, rows, d).transpose(0, 2, 1, 3, 4)
    kg = kh.reshape(n_groups, group, d, lk)
    vg = vh.reshape(n_groups, group, lk, d)

    def one_group(args):
      qc, kt, vt = args  # [n_chunks, g, r, d]
      return jax.lax.map(lambda a: tile(a[0], kt, vt, a[1]), (qc, positions))

    out = jax.lax.map(one_group, (qg, kg, vg))  # [n_groups, n_chunks, g, r, d]
    out = out.transpose(0, 2, 1, 3, 4)
  return out.reshape(b, h, lq, d).transpose(0, 2, 1, 3)


def choose_kernel(head_dim: int, dtype, requested: Optional[str] = None) -> str:
  """The kernel of one call: the requested one (cuDNN only where it applies),
  else cuDNN for half precision on GPU, blocked on CPU, XLA otherwise."""
  check_kernel(requested)
  fits_cudnn = head_dim <= _CUDNN_MAX_HEAD_DIM and dtype in (jnp.bfloat16, jnp.float16)
  if requested == "cudnn":
    return "cudnn" if fits_cudnn else "xla"
  if requested is not None:
    return requested
  if fits_cudnn and jax.default_backend() == "gpu":
    return "cudnn"
  return "blocked" if jax.default_backend() == "cpu" else "xla"
