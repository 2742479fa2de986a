"""The attention kernels: memjax's blocked CPU kernel against a float64 numpy
softmax attention and against jax.nn.dot_product_attention's XLA path; the kernel
as a field of every module (no global)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.models import attention
from memjax.models import loading
from memjax.testing import tiny


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


def test_choose_kernel_default_on_cpu_is_blocked_and_can_be_forced():
  assert jax.default_backend() == "cpu"
  assert attention.choose_kernel(8, jnp.float32) == "blocked"
  assert attention.choose_kernel(64, jnp.bfloat16) == "blocked"
  assert attention.choose_kernel(8, jnp.float32, None) == "blocked"
  assert attention.choose_kernel(8, jnp.float32, "xla") == "xla"
  assert attention.choose_kernel(64, jnp.bfloat16, "blocked") == "blocked"
  # cuDNN only where its fused kernel applies (half precision, head dim <= 128).
  assert attention.choose_kernel(64, jnp.bfloat16, "cudnn") == "cudnn"
  assert attention.choose_kernel(128, jnp.float16, "cudnn") == "cudnn"
  assert attention.choose_kernel(64, jnp.float32, "cudnn") == "xla"
  assert attention.choose_kernel(256, jnp.bfloat16, "cudnn") == "xla"
  for bad in ("flash", "XLA", ""):
    with pytest.raises(ValueError, match="unknown attention kernel"):
      attention.choose_kernel(8, jnp.float32, bad)
  assert attention.check_kernel(None) is None and attention.check_kernel("xla") == "xla"
  with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
    attention.check_kernel("flash")


def test_multi_head_attention_kernels_agree():
  rng = np.random.default_rng(1)
  q = rng.standard_normal((2, 16, 64)).astype(np.float32)
  k = rng.standard_normal((2, 9, 64)).astype(np.float32)
  for causal, kv in ((False, k), (True, q)):
    forced = attention.multi_head_attention(q, kv, kv, num_heads=4, is_causal=causal,
                                            kernel="xla")
    blocked = attention.multi_head_attention(q, kv, kv, num_heads=4, is_causal=causal,
                                             kernel="blocked")
    default = attention.multi_head_attention(q, kv, kv, num_heads=4, is_causal=causal)
    assert forced.shape == blocked.shape == (2, 16, 64)
    np.testing.assert_allclose(np.asarray(forced), np.asarray(blocked), atol=2e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(default), np.asarray(blocked))
    ref = _reference(q.reshape(2, 16, 4, 16), kv.reshape(2, -1, 4, 16),
                     kv.reshape(2, -1, 4, 16), causal).reshape(2, 16, 64)
    np.testing.assert_allclose(np.asarray(blocked), ref, atol=2e-6, rtol=0)


@pytest.fixture
def kernel_calls(monkeypatch):
  """Counts, at trace time, the calls of each kernel."""
  calls = {"blocked": 0, "xla": 0}
  blocked, xla = attention.blocked_attention, jax.nn.dot_product_attention

  def spy_blocked(*args, **kwargs):
    calls["blocked"] += 1
    return blocked(*args, **kwargs)

  def spy_xla(*args, **kwargs):
    calls["xla"] += 1
    assert kwargs.get("implementation") == "xla"
    return xla(*args, **kwargs)

  monkeypatch.setattr(attention, "blocked_attention", spy_blocked)
  monkeypatch.setattr(attention.jax.nn, "dot_product_attention", spy_xla)
  return calls


@pytest.mark.parametrize("name", ["text_encoder", "vae"])
def test_the_module_field_picks_the_kernel(name, kernel_calls):
  config = tiny.tiny_configs("sd1", vocab_size=100)[name]
  params = tiny.random_params(name, config)
  rng = np.random.default_rng(0)
  if name == "text_encoder":
    x = jnp.asarray(rng.integers(0, 100, (2, 77)), jnp.int32)
    n_attention = config["num_hidden_layers"]
  else:
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    n_attention = 1  # the decoder's mid-block

  def trace(kernel):
    module = loading.build_module(name, config, f"<{name}>", attention=kernel)
    assert module.attention == kernel
    method = type(module).decode if name == "vae" else None
    fn = lambda p, x: module.apply({"params": p}, x, method=method)
    before = dict(kernel_calls)
    jaxpr = jax.make_jaxpr(fn)(params, x)
    called = {k: kernel_calls[k] - before[k] for k in kernel_calls}
    return str(jaxpr), called, np.asarray(jax.jit(fn)(params, x))

  xla_jaxpr, xla_called, xla_out = trace("xla")
  blocked_jaxpr, blocked_called, blocked_out = trace("blocked")
  default_jaxpr, default_called, default_out = trace(None)
  assert xla_called == {"xla": n_attention, "blocked": 0}
  assert blocked_called == {"xla": 0, "blocked": n_attention}
  assert default_called == blocked_called  # memjax's choice on CPU
  assert xla_jaxpr != blocked_jaxpr and default_jaxpr == blocked_jaxpr
  assert np.isfinite(xla_out).all() and np.abs(xla_out).max() > 0.1
  # Equal within 4e-6 of the output's scale (float32 rounding carried through the
  # module's other layers; the VAE decoder measured 1.08e-6 of its scale on one
  # 2-core AMD EPYC machine, under 1e-6 on another: XLA's CPU code differs by host).
  diff = np.abs(blocked_out - xla_out).max()
  assert diff <= 4e-6 * np.abs(xla_out).max(), diff
  np.testing.assert_array_equal(default_out, blocked_out)


def test_unknown_kernel_is_refused_when_building(tiny_sd1):
  config = tiny.tiny_configs("sd1")["unet"]
  assert loading.build_module("unet", config, "<unet>", attention="xla").attention == "xla"
  assert loading.build_module("unet", config, "<unet>").attention is None
  for name in ("unet", "vae", "text_encoder"):
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
      loading.build_module(name, tiny.tiny_configs("sd1")[name], f"<{name}>", attention="flash")
  with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
    loading.load_stable_diffusion(tiny_sd1, components=("text_encoder",), attention="flash")
  sd = loading.load_stable_diffusion(tiny_sd1, components=("text_encoder",), attention="xla")
  assert sd.attention == "xla" and sd.text_encoder.attention == "xla"
