"""memjax.sampling: DDIM and Heun against PyTorch references; one trace per loop.

The references run the model with PyTorch diffusers/transformers on the same
folder and the same noise: DDIM through `StableDiffusionPipeline` with
`DDIMScheduler`; Heun through a k-diffusion `sample_heun` written here from the
algorithm (CompVisDenoiser / CompVisVDenoiser, quantize=False, sigmas from
diffusers' `LMSDiscreteScheduler` as the reference's pipeline takes them).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.method import sampling
from memjax.method.schedule import Schedule
from memjax.models import loading
from memjax.runtime import distributed
from memjax.runtime.errors import ConfigError
from memjax.stages import generate

PROMPTS = ["a red cat on a table", "a blue car"]
STEPS = 6
TOL = 1e-3  # acceptance: max abs difference on [0, 1] images


def _noise(seed=3, n=2):
  return np.random.default_rng(seed).standard_normal((n, 4, 16, 16)).astype(np.float32)


class _Bound:
  """A jitted sampler for one model and plan, with trace counters."""

  def __init__(self, model, sampler, steps, w=7.5):
    self.sd = loading.load_stable_diffusion(model)
    assert self.sd.scheduler_config == loading.read_scheduler_config(model)
    self.plan = sampling.make_plan(sampler, self.sd.schedule, self.sd.scheduler_config, steps)
    self.traces = self.unet_traces = 0
    unet_out = self.sd.unet_out

    self.unet_batches = []

    def counted_unet(p, x, t, ctx):
      self.unet_traces += 1  # Python runs only while tracing
      self.unet_batches.append(x.shape[0])
      return unet_out(p, x, t, ctx)

    inner = sampling.sample_fn_for_model(self.sd, self.plan, w, unet=counted_unet)

    def counted(*args):
      self.traces += 1
      return inner(*args)

    self.fn = jax.jit(counted)
    self.params = {k: self.sd.params[k] for k in ("text_encoder", "unet", "vae")}
    self.empty = jnp.asarray(self.sd.tokenizer.encode_batch([""])["input_ids"][0])

  def __call__(self, prompts, z_nchw):
    ids = jnp.asarray(self.sd.tokenizer.encode_batch(prompts)["input_ids"])
    out = self.fn(self.params, ids, self.empty, jnp.asarray(z_nchw.transpose(0, 2, 3, 1)))
    return np.asarray(out["images"])  # [B, S, H, W, 3]


@pytest.fixture(scope="module")
def heun_sd1(tiny_sd1):
  return _Bound(tiny_sd1, "heun", STEPS)


def _torch_components(model):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import StableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  return torch, StableDiffusionPipeline.from_pretrained(model, safety_checker=None)


def _torch_ddim(model, prompts, z, steps, w=7.5):
  """[B, S, H, W, 3]: diffusers' pipeline with DDIMScheduler, eta = 0."""
  torch, pipe = _torch_components(model)
  from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
  pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  out = []
  for zs in z:  # latents = z * init_noise_sigma (= 1 for DDIM)
    lat = torch.from_numpy(np.broadcast_to(zs, (len(prompts),) + zs.shape).copy())
    out.append(pipe(prompts, num_inference_steps=steps, guidance_scale=w, eta=0.0,
                    latents=lat * pipe.scheduler.init_noise_sigma, output_type="np").images)
  return np.stack(out, 1)


def _torch_heun(model, prompts, z, steps, w=7.5):
  """[B, S, H, W, 3]: k-diffusion sample_heun over LMS sigmas, in PyTorch."""
  torch, pipe = _torch_components(model)
  from diffusers import LMSDiscreteScheduler  # pylint: disable=g-import-not-at-top
  lms = LMSDiscreteScheduler.from_config(pipe.scheduler.config)
  lms.set_timesteps(steps)
  sigmas = lms.sigmas.double()  # [steps + 1], last 0
  abar = lms.alphas_cumprod.double()
  log_sigmas = (((1 - abar) / abar) ** 0.5).log()
  v_pred = lms.config.prediction_type == "v_prediction"

  def sigma_to_t(sigma):  # k-diffusion DiscreteSchedule.sigma_to_t, quantize=False
    dists = sigma.log() - log_sigmas[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    frac = ((lo - sigma.log()) / (lo - hi)).clamp(0, 1)
    return (1 - frac) * low + frac * (low + 1)

  with torch.no_grad():
    ids = pipe.tokenizer(list(prompts) + [""] * len(prompts), padding="max_length",
                         max_length=77, truncation=True, return_tensors="pt").input_ids
    emb = pipe.text_encoder(ids)[0]
    cond, uncond = emb[:len(prompts)], emb[len(prompts):]

    def denoise(x, sigma):  # CFG over CompVis(V)Denoiser outputs
      c_in = 1 / (sigma ** 2 + 1) ** 0.5
      t = sigma_to_t(sigma.reshape(1)).float().expand(2 * len(x))
      m = pipe.unet((torch.cat([x, x]) * c_in).float(), t,
                    encoder_hidden_states=torch.cat([uncond, cond])).sample.double()
      if v_pred:
        d = m * (-sigma / (sigma ** 2 + 1) ** 0.5) + torch.cat([x, x]) / (sigma ** 2 + 1)
      else:
        d = torch.cat([x, x]) - sigma * m
      d_u, d_c = d.chunk(2)
      return d_u + w * (d_c - d_u)

    images = []
    for zs in z:
      x = torch.from_numpy(np.broadcast_to(zs, (len(prompts),) + zs.shape).copy()).double()
      x = x * sigmas[0]
      for i in range(len(sigmas) - 1):  # sample_heun, s_churn = 0
        den = denoise(x, sigmas[i])
        d = (x - den) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
          x = x + d * dt
        else:
          x2 = x + d * dt
          d2 = (x2 - denoise(x2, sigmas[i + 1])) / sigmas[i + 1]
          x = x + (d + d2) / 2 * dt
      img = pipe.vae.decode((x / pipe.vae.config.scaling_factor).float()).sample
      images.append((img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
  return np.stack(images, 1)


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_ddim_matches_diffusers_pipeline(style, tiny_sd1, tiny_sd2):
  model = {"sd1": tiny_sd1, "sd2": tiny_sd2}[style]
  z = _noise()
  got = _Bound(model, "ddim", STEPS)(PROMPTS, z)
  ref = _torch_ddim(model, PROMPTS, z, STEPS)
  diff = float(np.abs(got - ref).max())
  print(f"{style} DDIM {STEPS} steps: max abs diff {diff:.2e} (image std {ref.std():.3f})")
  assert got.shape == (2, 2, 32, 32, 3)
  assert diff <= TOL


def test_without_guidance_only_the_conditional_prediction_is_evaluated(tiny_sd1):
  """w = 1: one UNet batch of B * S rows a step (not 2 B * S), equal to diffusers'
  pipeline at guidance_scale=1, which skips CFG too."""
  z = _noise()
  bound = _Bound(tiny_sd1, "ddim", STEPS, w=1.0)
  got = bound(PROMPTS, z)
  assert bound.unet_batches == [len(PROMPTS) * len(z)]
  ref = _torch_ddim(tiny_sd1, PROMPTS, z, STEPS, w=1.0)
  diff = float(np.abs(got - ref).max())
  print(f"sd1 DDIM {STEPS} steps at w = 1: max abs diff {diff:.2e}")
  assert diff <= TOL
  assert float(np.abs(got - _Bound(tiny_sd1, "ddim", STEPS)(PROMPTS, z)).max()) > 10 * TOL


def test_heun_matches_kdiffusion_reference_eps(heun_sd1, tiny_sd1):
  z = _noise()
  got = heun_sd1(PROMPTS, z)
  ref = _torch_heun(tiny_sd1, PROMPTS, z, STEPS)
  diff = float(np.abs(got - ref).max())
  print(f"sd1 Heun {STEPS} steps: max abs diff {diff:.2e} (image std {ref.std():.3f})")
  assert diff <= TOL


def test_heun_matches_kdiffusion_reference_v_prediction(tiny_sd2):
  z = _noise(5, 1)
  got = _Bound(tiny_sd2, "heun", 3)(PROMPTS[:1], z)
  ref = _torch_heun(tiny_sd2, PROMPTS[:1], z, 3)
  diff = float(np.abs(got - ref).max())
  print(f"sd2 Heun 3 steps: max abs diff {diff:.2e} (image std {ref.std():.3f})")
  assert diff <= TOL


def test_loop_compiles_once_and_traces_unet_once(heun_sd1):
  before = heun_sd1.traces
  for i, prompts in enumerate([["x"] * 2, ["a dog", "a tree"], ["a house", ""]]):
    heun_sd1(prompts, _noise(i))
  assert heun_sd1.traces - before <= 1  # 0 if an earlier test compiled this shape
  assert heun_sd1.traces == 1
  assert heun_sd1.unet_traces == 1  # one UNet trace for 2 * STEPS - 1 evaluations
  assert heun_sd1.plan.evaluations == 2 * STEPS - 1


def test_generate_step_is_the_sampler_bound_once(heun_sd1):
  """generate.make_step: the same images as the plain jitted sampler (uint8 rounded),
  one compile for several batches, padded or not, on several devices."""
  sd, z = heun_sd1.sd, _noise(4)
  step = generate.make_step(sd, heun_sd1.plan, z.transpose(0, 2, 3, 1), 7.5, 2,
                            distributed.local_mesh(2))
  prompts = ["a red cat on a table", "a blue car", "a tree", ""]
  ids = np.asarray(sd.tokenizer.encode_batch(prompts)["input_ids"], np.int32)
  pixels, finite = step.all(ids)
  pixels3, _ = step.all(ids[:3])  # a padded last batch
  assert step.compiles == 1 and step.batch_size == 2
  assert pixels.shape == (4, 2, 32, 32, 3) and pixels.dtype == np.uint8 and finite.all()
  np.testing.assert_array_equal(pixels3, pixels[:3])
  want = np.round(heun_sd1(prompts[:2], z) * 255)
  assert np.abs(pixels[:2].astype(np.float64) - want).max() <= 1


def test_plans_follow_diffusers_and_kdiffusion():
  from diffusers import DDIMScheduler, LMSDiscreteScheduler  # pylint: disable=g-import-not-at-top
  cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1,
         "clip_sample": False, "prediction_type": "epsilon"}
  sched = Schedule.from_config(cfg)
  for spacing in ("leading", "trailing", "linspace"):
    for n in (1, 7, 32, 50):
      ref = DDIMScheduler.from_config(dict(cfg, timestep_spacing=spacing))
      ref.set_timesteps(n)
      np.testing.assert_array_equal(sampling.ddim_timesteps(dict(cfg, timestep_spacing=spacing), n),
                                    ref.timesteps.numpy())
  lms = LMSDiscreteScheduler.from_config(cfg)
  lms.set_timesteps(32)
  # torch computes abar in float32: 1e-5 relative at the smallest sigmas.
  np.testing.assert_allclose(sampling.heun_sigmas(sched, 32), lms.sigmas.numpy(), rtol=3e-5)
  assert sampling.heun_sigmas(sched, 32)[0] == pytest.approx(14.614642, rel=1e-6)
  # k-diffusion get_sigmas: log-sigma interpolation, exact at integer t.
  log = sampling.heun_sigmas(sched, 1000, "log")
  np.testing.assert_allclose(log[:-1], sched.sigmas[::-1], rtol=1e-6)
  t = sampling.sigma_to_t(sched, sampling.heun_sigmas(sched, 10, "log")[:-1])
  np.testing.assert_allclose(t, np.linspace(999, 0, 10), atol=1e-3)
  np.testing.assert_array_equal(sampling.sigma_to_t(sched, sched.sigmas[[5, 500]] * 1.001, True),
                                [5, 500])
  # One Heun step is the one-step Euler sample of docs/method.md section 2.
  one = sampling.plan_heun(sched, 1, "log")
  assert sampling.heun_sigmas(sched, 1)[0] == pytest.approx(sched.sigma(0))  # LMS, n = 1
  assert one.evaluations == 1 and one.table["t"][0] == pytest.approx(999, abs=1e-3)
  assert one.table["dt"][0] == pytest.approx(-14.614642, rel=1e-6)


def test_bad_settings_raise_config_error():
  sched = Schedule.from_config({})
  with pytest.raises(ConfigError, match="steps"):
    sampling.plan_heun(sched, 0)
  with pytest.raises(ConfigError, match="timestep_spacing"):
    sampling.plan_ddim(sched, {"timestep_spacing": "odd"}, 10)
  with pytest.raises(ConfigError, match="thresholding"):
    sampling.plan_ddim(sched, {"thresholding": True}, 10)
  with pytest.raises(ConfigError, match="sampler"):
    sampling.make_plan("euler_a", sched, {}, 10)


@pytest.mark.slow
@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_32_step_parity(style, tiny_sd1, tiny_sd2):
  """The reference's regeneration length (32 steps), both samplers."""
  model = {"sd1": tiny_sd1, "sd2": tiny_sd2}[style]
  z = _noise(7, 1)
  for sampler, reference in (("ddim", _torch_ddim), ("heun", _torch_heun)):
    got = _Bound(model, sampler, 32)(PROMPTS, z)
    diff = float(np.abs(got - reference(model, PROMPTS, z, 32)).max())
    print(f"{style} {sampler} 32 steps: max abs diff {diff:.2e}")
    assert diff <= TOL
