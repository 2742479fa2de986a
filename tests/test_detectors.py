"""The one-step detectors (memjax.method.detectors) and the UNet's attention capture.

Tiny random SD1-style (eps) and SD2-style (v) models, with two transformers per
cross-attention block so that Ren's layer down_blocks_1/attentions_1 exists.
Each detector is checked against a plain restatement (numpy, or per-prompt JAX
calls with the unconditional pass recomputed for every prompt).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.method import detectors as det
from memjax.method.schedule import Schedule
from memjax.models import loading
from memjax.models import unet_blocks
from memjax.testing import tiny

_VOCAB = 1000
_B, _S = 2, 2


class _Model:
  """A tiny model's UNet (and its bindings), text encoder and schedule."""

  def __init__(self, style: str, dtype: str = "float32"):
    configs = tiny.tiny_configs(style, vocab_size=_VOCAB)
    unet = configs["unet"]
    # Two cross-attention blocks of two layers (the fewest with Ren's layer).
    unet.update(layers_per_block=2, block_out_channels=[32, 64],
                down_block_types=["CrossAttnDownBlock2D"] * 2,
                up_block_types=["CrossAttnUpBlock2D"] * 2)
    if isinstance(unet["attention_head_dim"], list):  # SD2: heads per block
      unet["attention_head_dim"] = unet["attention_head_dim"][:2]
    self.scheduler_config = configs["scheduler"]
    self.schedule = Schedule.from_config(self.scheduler_config)
    compute = jnp.float32 if dtype == "float32" else jnp.bfloat16
    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, compute), t)
    self.unet = loading.build_module("unet", unet, "<unet>", compute)
    self.text_module = loading.build_module("text_encoder", configs["text_encoder"], "<text>",
                                            compute)
    self.params = cast(tiny.random_params("unet", unet, 1))
    self.text_params = cast(tiny.random_params("text_encoder", configs["text_encoder"], 2))
    self.protocol = det.Protocol.from_scheduler(self.scheduler_config)
    self.side = unet["sample_size"]
    self.fns = det.bind_unet(self.unet)

  def text(self, params, ids):
    return self.text_module.apply({"params": params}, ids)

  def inputs(self, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, _VOCAB - 2, (_B, 77)).astype(np.int32)
    empty = np.full((1, 77), _VOCAB - 1, np.int32)
    empty[0, 0] = _VOCAB - 2
    noise = rng.standard_normal((_S, self.side, self.side, 4)).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(empty), jnp.asarray(noise)

  def run(self, names, ids, empty, noise):
    shared = jax.jit(det.make_shared_fn(self.text, self.fns[0], self.protocol, names))(
        self.text_params, self.params, empty, noise)
    detect = det.make_detectors_fn(*self.fns, self.schedule, self.protocol, names)
    ctx = jax.jit(self.text)(self.text_params, ids)
    return jax.jit(detect)(self.params, ctx, noise, shared)


@pytest.fixture(scope="module")
def sd1():
  return _Model("sd1")


@pytest.fixture(scope="module")
def sd2():
  return _Model("sd2")


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def test_protocol_timesteps_are_the_authors(sd1, sd2):
  assert det.Protocol.from_scheduler(sd1.scheduler_config) == det.Protocol(981, 41)
  # SD2's scheduler config has steps_offset = 1 too: the same pair.
  assert sd2.protocol == det.Protocol(981, 41)
  assert det.Protocol.from_scheduler(dict(sd1.scheduler_config, steps_offset=0)) == \
      det.Protocol(980, 40)


def test_names_and_columns():
  assert det.columns(["ren_le", "wen981"]) == ("wen981", "ren_le")
  assert det.columns(det.ONE_STEP) == ("wen981", "jeon", "asthana", "asthana_norm",
                                       "asthana_cos", "ren_le")
  with pytest.raises(ValueError, match="bogus"):
    det.check_names(["bogus"])


def test_capture_off_and_on(sd1):
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 16, 4)), jnp.float32)
  ctx = jax.random.normal(jax.random.key(0), (2, 77, 32))
  t = jnp.asarray([981, 41])
  # Flax's own capture of Ren's layer's attn2 output, to compare it across kernels.
  is_ren = lambda mdl, _: mdl.name == "attn2" and mdl.path[:2] == ("down_blocks_1",
                                                                   "attentions_1")
  apply = lambda m: jax.jit(lambda p: m.apply(
      {"params": p}, x, t, ctx, mutable=["intermediates"], capture_intermediates=is_ren))
  ren = lambda st: st["down_blocks_1"]["attentions_1"]["transformer_blocks_0"]["attn2"]
  out, state = apply(sd1.unet)(sd1.params)
  assert set(ren(state["intermediates"])) == {"__call__"}  # nothing sown without capture
  # Ren's layer (both modes) and a later one: Ren's layer has the same input.
  later = "up_blocks_1/attentions_2"
  capture = ((det.REN_LAYER, "query_mean"), (later, "head_mean"), (det.REN_LAYER, "head_mean"))
  out_c, state_c = apply(sd1.unet.clone(capture=capture))(sd1.params)
  assert _rel(ren(state_c["intermediates"])["__call__"][0],
              ren(state["intermediates"])["__call__"][0]) <= 1e-6
  assert _rel(out_c, out) <= 1e-5  # float32 rounding carried through the rest
  got = unet_blocks.read_capture(state_c["intermediates"], capture)
  qm, hm = got[det.REN_LAYER]["query_mean"], got[det.REN_LAYER]["head_mean"]
  assert qm.dtype == hm.dtype == jnp.float32
  assert qm.shape == (2, 8, 77) and hm.shape == (2, 64, 77)  # 8 heads, 8 x 8 queries
  assert got[later]["head_mean"].shape == (2, 256, 77)
  for a in (qm, hm, got[later]["head_mean"]):
    np.testing.assert_allclose(np.asarray(a).sum(-1), 1.0, atol=1e-5)
  # Both reductions of the same probabilities: their overall means agree.
  np.testing.assert_allclose(np.asarray(qm).mean(1), np.asarray(hm).mean(1), atol=1e-6)
  with pytest.raises(ValueError, match="down_blocks_1/attentions_7"):
    jax.eval_shape(lambda p: sd1.unet.clone(capture=(("down_blocks_1/attentions_7",
                                                        "query_mean"),)).apply(
        {"params": p}, x, t, ctx), sd1.params)
  with pytest.raises(ValueError, match="per_pixel"):
    jax.eval_shape(lambda p: sd1.unet.clone(capture=((det.REN_LAYER, "per_pixel"),)).apply(
        {"params": p}, x, t, ctx), sd1.params)


def test_captured_attention_is_softmax_of_its_logits():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 10, 16)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((2, 7, 12)), jnp.float32)
  plain = unet_blocks.Attention(heads=4, head_dim=4)
  params = plain.init(jax.random.key(1), x, ctx)["params"]
  want = plain.apply({"params": params}, x, ctx)
  got, state = unet_blocks.Attention(heads=4, head_dim=4, capture=("query_mean", "head_mean")
                                     ).apply({"params": params}, x, ctx, mutable=["intermediates"])
  assert _rel(got, want) <= 1e-6
  q = (np.asarray(x) @ np.asarray(params["to_q"]["kernel"])).reshape(2, 10, 4, 4)
  k = (np.asarray(ctx) @ np.asarray(params["to_k"]["kernel"])).reshape(2, 7, 4, 4)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(state["intermediates"]["query_mean"][0], p.mean(2), atol=1e-6)
  np.testing.assert_allclose(state["intermediates"]["head_mean"][0], p.mean(1), atol=1e-6)


def test_ren_entropy():
  uniform = jnp.full((3, 8, 77), 1.0 / 77)
  np.testing.assert_allclose(det.ren_entropy(uniform), math.log(77), rtol=1e-6)
  one_hot = jnp.zeros((1, 8, 77)).at[:, :, 0].set(1.0)
  assert float(det.ren_entropy(one_hot)[0]) == 0.0  # 0 ln 0 = 0, no NaN


def _np_cosine(a, b, eps=1e-8):
  """torch's cosine_similarity over the last axis, restated in numpy (float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  na = np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), eps)
  nb = np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), eps)
  return ((a / na) * (b / nb)).sum(-1)


def test_cosine_similarity_is_torchs():
  rng = np.random.default_rng(5)
  a = rng.standard_normal((3, 5, 5, 4)).astype(np.float32)
  b = rng.standard_normal((3, 5, 5, 4)).astype(np.float32)
  a[0, 0, 0] = 0.0  # a zero vector: 0, not NaN
  a[0, 0, 1] = [1e-9, 0, 0, 0]  # each norm clamped apart (not their product)
  b[0, 0, 1] = [1e-9, 0, 0, 0]
  got = np.asarray(det.cosine_similarity(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_allclose(got, _np_cosine(a, b), atol=1e-6)
  assert got[0, 0, 0] == 0.0 and abs(got[0, 0, 1] - 0.01) < 1e-6


def _reference(m: _Model, ids, empty, noise):
  """Every column with the unconditional pass run again for each prompt, one prompt
  and one seed at a time, in float64 numpy after the UNet; Jeon's JVP as a central
  difference of the (float32) UNet."""
  unet, _, unet_capture = m.fns
  call = jax.jit(lambda p, x, t, c: unet(p, x, jnp.full((1,), t, jnp.int32), c))
  cap = jax.jit(lambda p, x, t, c: unet_capture(p, x, jnp.full((1,), t, jnp.int32), c))
  text = jax.jit(m.text)
  assert jax.tree.leaves(m.params)[0].dtype == jnp.float32
  abar = m.schedule.alphas_cumprod[m.protocol.t_first]
  s2 = 1 - abar
  v = m.schedule.prediction_type == "v_prediction"
  f64 = lambda a: np.asarray(a, np.float64)
  u_ctx = text(m.text_params, empty)
  out = {c: np.zeros((_B, _S)) for c in det.columns(det.ONE_STEP)}
  for i in range(_B):
    c_ctx = text(m.text_params, ids[i:i + 1])
    for s in range(_S):
      x = noise[s:s + 1].astype(c_ctx.dtype)
      c1, probs = cap(m.params, x, m.protocol.t_first, c_ctx)
      d = f64(c1) - f64(call(m.params, x, m.protocol.t_first, u_ctx))
      u2 = f64(call(m.params, x, m.protocol.t_low, u_ctx))
      c2 = f64(call(m.params, x, m.protocol.t_low, c_ctx))
      h = 1e-2 / np.sqrt(np.mean(d ** 2))  # a step of RMS 0.01 along d
      step = jnp.asarray(h * d, jnp.float32)
      central = lambda ctx: (f64(call(m.params, x + step, m.protocol.t_first, ctx)) -
                             f64(call(m.params, x - step, m.protocol.t_first, ctx))) / (2 * h)
      jd = central(c_ctx) - central(u_ctx)
      a = f64(probs[det.REN_LAYER]["query_mean"])[0].mean(0)
      norm = np.linalg.norm(d)
      out["wen981"][i, s] = norm
      out["jeon"][i, s] = np.linalg.norm(jd) * (abar / s2 ** 2 if v else 1 / s2)
      out["asthana_norm"][i, s] = norm * (abar ** 0.5 / s2 if v else 1.0)
      out["asthana_cos"][i, s] = _np_cosine(u2, c2 - u2).mean()
      out["ren_le"][i, s] = -(a * np.log(a)).sum()
      out["asthana"][i, s] = out["asthana_norm"][i, s] + (0.1 if v else 2.0) * \
          out["asthana_cos"][i, s]
  return out


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_detectors_match_per_prompt_restatement(style, request):
  m = request.getfixturevalue(style)
  ids, empty, noise = m.inputs()
  got = m.run(det.ONE_STEP, ids, empty, noise)
  want = _reference(m, ids, empty, noise)
  assert set(got) == set(want)
  for c in got:
    assert got[c].shape == (_B, _S) and got[c].dtype == jnp.float32, c
    err = _rel(got[c], want[c])
    print(f"{style} {c}: {np.asarray(got[c]).ravel()} rel {err:.1e}")
    assert err <= (1e-3 if c == "jeon" else 1e-5), c  # jeon: JVP vs central difference
  if style == "sd1":  # ren_le alone: nothing shared, the same numbers
    sub = m.run(("ren_le",), ids, empty, noise)
    assert set(sub) == {"ren_le"}
    np.testing.assert_allclose(sub["ren_le"], got["ren_le"], rtol=1e-6)


def test_jeon_runs_in_float32_for_a_bfloat16_model():
  m = _Model("sd1", dtype="bfloat16")
  _, empty, noise = m.inputs()
  ctx = jnp.zeros((_B, 77, 32), jnp.bfloat16)
  d = jnp.ones((_B,) + noise.shape[1:], jnp.float32)
  jaxpr = jax.make_jaxpr(lambda p: det.jvp_difference(
      m.fns[1], p, noise[0], ctx[0], ctx, d, 981))(m.params)
  dtypes = set()

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
        dtypes.update(str(v.aval.dtype) for v in eqn.invars)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr
          if hasattr(sub, "eqns"):
            walk(sub)

  walk(jaxpr.jaxpr)
  assert dtypes == {"float32"}


def test_noise_plan():
  authors = det.noise_plan(det.ONE_STEP, "authors", n_shared=1)
  assert authors == {"wen981": ("per_prompt", 4), "jeon": ("shared", 1),
                     "asthana": ("shared", 1), "ren_le": ("per_prompt", 1)}
  assert det.plan_noise(authors, det.PER_PROMPT) == 4
  assert det.plan_noise(authors, det.SHARED) == 1
  assert det.noise_plan(["ren_le", "jeon"], "shared", 3) == {"jeon": ("shared", 3),
                                                             "ren_le": ("shared", 3)}
  assert det.noise_plan(["wen981"], "authors", 1, generations=2) == {
      "wen981": ("per_prompt", 2)}
  assert det.plan_noise(det.noise_plan(["jeon"], "authors", 1), det.PER_PROMPT) == 0
  with pytest.raises(det.ConfigError, match="jeon on shared noise needs 2 generations"):
    det.noise_plan(["jeon", "wen981"], "authors", 1, generations=2)
  with pytest.raises(det.ConfigError, match="unknown detector protocol"):
    det.noise_plan(["jeon"], "wen", 1)


def test_per_prompt_noise_is_each_prompts_own(sd1):
  """The authors' protocol: wen981 and ren_le on each prompt's own z (generations
  averaged by the caller), jeon and asthana on the first shared z; each prompt's
  values equal a run of that prompt alone with its own z as the shared noise."""
  ids, empty, noise = sd1.inputs()
  prompt_noise = jnp.asarray(np.random.default_rng(7).standard_normal(
      (_B, 3) + noise.shape[1:]), jnp.float32)
  plan = det.noise_plan(det.ONE_STEP, "authors", noise.shape[0], generations=0)
  plan.update(wen981=("per_prompt", 3), ren_le=("per_prompt", 2))
  shared = jax.jit(det.make_shared_fn(sd1.text, sd1.fns[0], sd1.protocol, det.ONE_STEP, plan))(
      sd1.text_params, sd1.params, empty, noise)
  assert "ctx_u" in shared and shared["u_first"].shape[0] == 1  # one shared generation
  detect = det.make_detectors_fn(*sd1.fns, sd1.schedule, sd1.protocol, det.ONE_STEP, plan=plan)
  ctx = jax.jit(sd1.text)(sd1.text_params, ids)
  got = jax.jit(detect)(sd1.params, ctx, noise, shared, prompt_noise)
  assert got["wen981"].shape == (_B, 3) and got["ren_le"].shape == (_B, 2)
  assert got["jeon"].shape == got["asthana_cos"].shape == (_B, 1)
  on_shared = sd1.run(det.ONE_STEP, ids, empty, noise[:1])
  for c in ("jeon", "asthana", "asthana_norm", "asthana_cos"):
    assert _rel(got[c], on_shared[c]) <= 1e-5, c
  for i in range(_B):
    alone = sd1.run(("wen981", "ren_le"), ids[i:i + 1], empty, prompt_noise[i])
    assert _rel(got["wen981"][i], alone["wen981"][0]) <= 1e-5
    assert _rel(got["ren_le"][i], alone["ren_le"][0, :2]) <= 1e-5
  with pytest.raises(ValueError, match="need prompt_noise"):
    jax.jit(detect)(sd1.params, ctx, noise, shared)


def test_per_prompt_noises_depend_on_the_prompt_id_only():
  from memjax.method import noise as noise_lib  # pylint: disable=g-import-not-at-top
  ids = np.array([0, 1, 7, 2 ** 32 + 7, 2 ** 40 + 1])
  words = noise_lib.prompt_words(ids)
  assert words.dtype == np.int32 and words.shape == (5, 2)
  back = words.view(np.uint32).astype(np.uint64)
  np.testing.assert_array_equal((back[:, 0] << np.uint64(32)) | back[:, 1], ids)
  shape = (4, 8, 8)
  z = np.asarray(noise_lib.per_prompt_noise(3, words, 2, shape))
  assert z.shape == (5, 2, 8, 8, 4)
  # The same draws in another batch (jitted, reordered) and for one prompt alone.
  again = jax.jit(lambda w: noise_lib.per_prompt_noise(3, w, 2, shape))(words[::-1])
  np.testing.assert_array_equal(np.asarray(again)[::-1], z)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), 0), 7)
  np.testing.assert_array_equal(z[2], np.asarray(
      jax.random.normal(key, (2,) + shape)).transpose(0, 2, 3, 1))
  # Every prompt (7 vs 2**32 + 7 too), generation and seed draws apart.
  flat = z.reshape(10, -1)
  assert len({tuple(r[:4]) for r in flat}) == 10
  other = np.asarray(noise_lib.per_prompt_noise(4, words[:1], 1, shape))
  assert not np.allclose(other[0, 0], z[0, 0])
