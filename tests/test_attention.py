"""The attention kernels: memjax's blocked CPU kernel against a float64 numpy
softmax attention and against jax.nn.dot_product_attention's XLA path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.models import attention


def _reference(q, k, v, causal):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    s = np.where(np.triu(np.ones(s.shape[-2:], bool), 1), -np.inf, s)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


# (batch, query tokens, key tokens, heads, head dim, causal, tile bytes): tiles that
# split heads and query rows, groups of 2 heads x 3 chunks of 17 rows (51 tokens, a
# 1088-byte tile over 8 keys), a prime sequence (one chunk), one tile for all.
CASES = [
    (2, 51, 8, 2, 4, False, 1088),
    (2, 51, 51, 2, 4, True, 51 * 4 * 17 * 2),
    (2, 64, 64, 4, 8, False, 4096),
    (2, 64, 64, 4, 8, True, 4096),
    (3, 77, 77, 2, 16, True, 2048),
    (2, 48, 77, 3, 8, False, 1024),
    (1, 37, 37, 2, 4, True, 512),
    (2, 32, 32, 2, 8, True, 1 << 20),
]


@pytest.mark.parametrize("b,lq,lk,h,d,causal,tile", CASES)
def test_blocked_matches_float64_softmax(b, lq, lk, h, d, causal, tile):
  rng = np.random.default_rng(lq + lk + h)
  q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for n in (lq, lk, lk))
  out = jax.jit(lambda q, k, v: attention.blocked_attention(q, k, v, causal, tile))(q, k, v)
  assert out.shape == (b, lq, h, d) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, causal), atol=2e-6, rtol=0)
  xla = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(xla), atol=2e-6, rtol=0)


def test_tiles_really_split_the_work():
  """The tile arithmetic: a 4 KiB tile over 64 keys is 16 rows, in groups of 1."""
  assert attention._largest_divisor(64, 4096 // (4 * 64)) == 16
  assert attention._largest_divisor(37, 8) == 1  # prime: blocked_attention takes one chunk
  assert attention._largest_divisor(12, 5) == 4
  assert attention._largest_divisor(7, 0) == 1


def test_bfloat16_inputs_are_computed_in_float32():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 40, 2, 8)), jnp.bfloat16) for _ in range(3))
  out = attention.blocked_attention(q, k, v, tile_bytes=1024)
  assert out.dtype == jnp.float32
  ref = _reference(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)), False)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6, rtol=0)


def test_default_kernel_on_cpu_is_blocked_and_can_be_forced():
  assert jax.default_backend() == "cpu"
  try:
    attention.set_attention_implementation(None)
    assert attention._choose(8, jnp.float32) == "blocked"
    assert attention._choose(64, jnp.bfloat16) == "blocked"
    attention.set_attention_implementation("xla")
    assert attention._choose(8, jnp.float32) == "xla"
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 16, 64)).astype(np.float32)
    forced = attention.multi_head_attention(q, q, q, num_heads=4)
    attention.set_attention_implementation(None)
    blocked = attention.multi_head_attention(q, q, q, num_heads=4)
    np.testing.assert_allclose(np.asarray(forced), np.asarray(blocked), atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown attention"):
      attention.set_attention_implementation("flash")
  finally:
    attention.set_attention_implementation(None)
