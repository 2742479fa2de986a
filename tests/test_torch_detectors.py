"""Self-consistency of the PyTorch reference detectors (memjax.testing.torch_detectors)
on tiny SD1 (eps) and SD2 (v-prediction) folders: timesteps, the JVP against finite
differences, the attention capture, and each score against a plain restatement."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from memjax.testing import torch_detectors as td  # pylint: disable=g-import-not-at-top

PROMPTS = ["a cat", "a photo of a dog on the beach at sunset"]
# The tiny folders have no down_blocks[1].attentions[1]: each its own Ren layer.
REN = {"sd1": "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
       "sd2": "down_blocks.1.attentions.0.transformer_blocks.0.attn2"}


def _noise(seeds=1, size=8):
  return np.random.default_rng(3).standard_normal((seeds, 4, size, size)).astype(np.float32)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def folders(tiny_sd1, tiny_sd2):
  return {"sd1": tiny_sd1, "sd2": tiny_sd2}


def _detectors(folders, style):
  return td.TorchDetectors(folders[style], threads=1, ren_layer=REN[style])


@pytest.fixture(scope="module")
def dets(folders):
  return {s: _detectors(folders, s) for s in ("sd1", "sd2")}


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_timesteps(dets, style):
  d = dets[style]
  assert (d.t_first, d.t_low, d.timesteps[-1], len(d.timesteps)) == (981, 41, 1, 50)
  assert d.prediction_type == {"sd1": "epsilon", "sd2": "v_prediction"}[style]
  assert d.be_layers == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_jvp_matches_central_difference(folders, style):
  d = _detectors(folders, style)
  d.set_precision(torch.float64)
  ctx = d.cfg_context(PROMPTS)
  x = torch.from_numpy(_noise(2)).double()
  t, abar = d.t_first, d.alpha_bar(d.t_first)
  sig2 = 1 - abar

  def score(y):  # JEON's score of the CFG batch [y; y]
    out = d.unet_raw(torch.cat([y, y]), t, ctx)
    if style == "sd1":
      return -out / math.sqrt(sig2)
    return (math.sqrt(abar) * out - torch.cat([x, x])) / sig2
  s_u, s_c = score(x).chunk(2)
  v = s_c - s_u  # sd1: -(e_c - e_u)/sigma; sd2: sqrt(abar)(v_c - v_u)/sigma^2
  h = 1e-4 / float(v.abs().max())
  fd_u, fd_c = ((score(x + h * v) - score(x - h * v)) / (2 * h)).chunk(2)
  comb = d.jeon_vector(x, t, ctx)
  assert _rel(comb, fd_c - fd_u) < 1e-6
  assert float(comb.abs().max()) > 0


def test_capture_sums_to_one_and_keeps_output(dets):
  d = dets["sd1"]
  ctx, x = d.cfg_context(PROMPTS), torch.from_numpy(_noise(2, 16))
  names = [n for n, _ in d.unet.named_modules() if n.endswith((".attn1", ".attn2"))]
  before = {n: m.processor for n, m in d.unet.named_modules() if n in names}
  plain = torch.cat(d.unet_pair(x, d.t_first, ctx))
  with d.attention_capture(names) as store:
    captured = torch.cat(d.unet_pair(x, d.t_first, ctx))
  assert float((captured - plain).abs().max()) <= 1e-6
  assert all(m.processor is before[n] for n, m in d.unet.named_modules() if n in names)
  probs = store[REN["sd1"]][0]
  assert tuple(probs.shape) == (4, 8, 256, 77)
  assert float((probs.sum(-1) - 1).abs().max()) < 1e-5
  assert float((store["mid_block.attentions.0.transformer_blocks.0.attn1"][0].sum(-1) - 1)
               .abs().max()) < 1e-5
  with pytest.raises(ValueError, match="no attention module"):
    with d.attention_capture(["down_blocks.1.attentions.1.transformer_blocks.0.attn2"]):
      pass


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_ren_entropy(folders, dets, style):
  out = dets[style].scores(PROMPTS, _noise(1, 16), jeon=False)
  att = out["ren_attention"]
  assert att.shape == (2, 1, 77) and np.allclose(att.sum(-1), 1, atol=1e-6)
  ent = -(att * np.log(att)).sum(-1)
  np.testing.assert_allclose(out["ren_le"], ent, rtol=1e-10)
  assert np.all(out["ren_le"] < math.log(77))
  d = _detectors(folders, style)  # forced uniform: Q = 0 gives equal scores
  attn = dict(d.unet.named_modules())[REN[style]]
  with torch.no_grad():
    attn.to_q.weight.zero_()
  out = d.scores(PROMPTS, _noise(1, 16), jeon=False)
  np.testing.assert_allclose(out["ren_le"], math.log(77), rtol=1e-6)
  np.testing.assert_allclose(out["ren_attention"], 1 / 77, rtol=1e-5)


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_wen_asthana_against_plain(dets, style):
  d = dets[style]
  z = _noise(2)
  out = d.scores(PROMPTS, z, jeon=False)
  # TorchWhitebox-style: the CFG pair through the UNet, t a [2B] long tensor.
  ctx = torch.cat([d.embed([""]).expand(2, -1, -1), d.embed(PROMPTS)])
  for s in range(2):
    x = torch.from_numpy(z[s])[None].expand(4, -1, -1, -1)
    raw = {}
    for t in (981, 41):
      with torch.no_grad():
        raw[t] = d.unet(x, torch.full((4,), t, dtype=torch.long),
                        encoder_hidden_states=ctx).sample.double().numpy()
    diff = raw[981][2:] - raw[981][:2]
    wen = np.linalg.norm(diff.reshape(2, -1), axis=1)
    np.testing.assert_allclose(out["wen981"][:, s], wen, rtol=1e-5)
    u, dl = raw[41][:2], raw[41][2:] - raw[41][:2]  # cos over channels, eps per norm
    cos = (u * dl).sum(1) / (np.maximum(np.linalg.norm(u, axis=1), 1e-8)
                             * np.maximum(np.linalg.norm(dl, axis=1), 1e-8))
    np.testing.assert_allclose(out["asthana_cos"][:, s], cos.mean((1, 2)), rtol=1e-5, atol=1e-7)
  abar = d.alpha_bar(981)
  scale = 1.0 if style == "sd1" else math.sqrt(abar) / (1 - abar)
  np.testing.assert_allclose(out["asthana_norm"], scale * out["wen981"], rtol=1e-5)
  w = {"sd1": (1.0, 2.0), "sd2": (1.0, 0.1)}[style]
  assert td.ASTHANA_WEIGHTS[d.prediction_type] == w
  np.testing.assert_allclose(out["asthana"], w[0] * out["asthana_norm"] + w[1] * out["asthana_cos"],
                             rtol=1e-12)


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_wen_steps_first_is_wen981_and_jeon_runs(dets, style):
  d = dets[style]
  z = _noise(2)
  out = d.scores(PROMPTS, z)
  np.testing.assert_allclose(d.wen_steps(PROMPTS, z, 1), out["wen981"], rtol=1e-6)
  assert out["jeon"].shape == (2, 2) and np.all(out["jeon"] > 0)


def test_bright_ending(dets):
  from diffusers import StableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  d = dets["sd1"]
  z = _noise(1)
  be = d.bright_ending(PROMPTS, z)
  assert be["mask"].shape == (2, 1, 8, 8) and be["be"].shape == (2, 1)
  assert be["mask"].min() >= 0 and be["mask"].max() <= 1
  ones = d.bright_ending(PROMPTS, z, mask=np.ones((8, 8)))
  np.testing.assert_allclose(ones["be"], ones["wen_steps"].mean(-1), rtol=1e-9)
  np.testing.assert_allclose(ones["wen_steps"], be["wen_steps"], rtol=1e-6)
  assert not np.allclose(be["be"], ones["be"])
  # The trajectory is diffusers' own pipeline's (DDIM 50, w = 7.5, latents = z).
  pipe = StableDiffusionPipeline(
      vae=d.vae, text_encoder=d.text, tokenizer=d.tokenizer, unet=d.unet,
      scheduler=d.new_scheduler(), safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  size = 8 * pipe.vae_scale_factor
  ref = pipe(PROMPTS, height=size, width=size, num_inference_steps=50, guidance_scale=7.5,
             latents=torch.from_numpy(z).expand(2, -1, -1, -1), output_type="latent").images
  assert _rel(be["latents"][:, 0], ref.double().numpy()) < 1e-5
