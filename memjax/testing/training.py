"""Training of memjax's test model: a tiny Stable Diffusion that memorizes.

    python -m memjax.train --flagfile=configs/testbed.flags --workdir=DIR

Stages, each resumable (rerun the same command):
1. data: `memjax.testing.testbed` draws the mini-LAION (planted MV / TV / RV / unique /
   held-out captions) and writes images/, train.parquet, eval_prompts.parquet.
2. text encoder: a CLIP text model with random weights, frozen (the captions only
   need distinct, fixed embeddings), and a CLIP BPE tokenizer cut to the first
   `--text_num_merges` merges (a small vocabulary keeps the shipped model small).
3. vae: a diffusers AutoencoderKL trained on the distinct images (MSE + a small
   KL term; no LPIPS / GAN: these are 16 px procedural images). Its scaling factor
   is set to 1 / std of the latents, as SD's 0.18215 was.
4. unet: a UNet2DConditionModel on the cached latents (posterior means) with SD's
   scaled_linear schedule, eps or v targets, and the caption replaced by the empty
   one with probability `--cfg_dropout` (classifier-free guidance).
5. export: WORKDIR/model (diffusers layout, loads in PyTorch), and
   WORKDIR/train_summary.json with `memjax.testing.testbed_eval.evaluate`'s AUC table.

Batches come from numpy's generator seeded by (seed, stage, step), so a run stopped
at step N and resumed from its checkpoint (written under a temporary name, then
renamed) computes the same updates as an uninterrupted one.
"""
import dataclasses
import json
import os
import shutil
import time
from typing import Callable, Dict, Optional, Sequence

from absl import logging
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax.testing import testbed
from memjax.testing import testbed_eval
from memjax.testing import tiny
from memjax.data import tokenizer as tokenizer_lib
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import CheckpointError, ConfigError
from memjax.models import loading
from memjax.models import saving
from memjax.method.schedule import Schedule


@dataclasses.dataclass
class TrainConfig:
  """The whole recipe; `identity()` must match on resume."""
  workdir: str
  spec: testbed.TestbedSpec = dataclasses.field(default_factory=testbed.TestbedSpec)
  seed: int = 0
  text_num_merges: int = 1000
  text_hidden_size: int = 64
  text_layers: int = 2
  vae_channels: Sequence[int] = (32, 64)
  vae_steps: int = 800
  vae_batch_size: int = 32
  vae_learning_rate: float = 2e-3
  vae_kl_weight: float = 1e-5
  unet_channels: Sequence[int] = (32, 64)
  train_steps: int = 1500
  train_batch_size: int = 32
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  cfg_dropout: float = 0.1
  prediction_type: str = "v_prediction"
  checkpoint_every: int = 250
  stop_after: Optional[int] = None  # stop once this many steps (vae + unet) are done
  evaluate: bool = True

  def identity(self) -> Dict:
    d = dataclasses.asdict(self)
    for k in ("workdir", "checkpoint_every", "stop_after", "evaluate"):
      d.pop(k)
    d["vae_channels"], d["unet_channels"] = list(self.vae_channels), list(self.unet_channels)
    return d


def model_configs(cfg: TrainConfig, vocab_size: int) -> Dict[str, dict]:
  """Component configs (diffusers / transformers config.json dicts)."""
  configs = tiny.tiny_configs("sd1", vocab_size)
  factor = 2 ** (len(cfg.vae_channels) - 1)
  if cfg.spec.image_size % (4 * factor):
    raise ConfigError(f"image size {cfg.spec.image_size} must be a multiple of {4 * factor}")
  h = cfg.text_hidden_size
  configs["text_encoder"].update(hidden_size=h, intermediate_size=4 * h, projection_dim=h,
                                 num_hidden_layers=cfg.text_layers)
  configs["vae"].update(block_out_channels=list(cfg.vae_channels),
                        down_block_types=["DownEncoderBlock2D"] * len(cfg.vae_channels),
                        up_block_types=["UpDecoderBlock2D"] * len(cfg.vae_channels),
                        sample_size=cfg.spec.image_size)
  n = len(cfg.unet_channels)
  configs["unet"].update(
      block_out_channels=list(cfg.unet_channels), sample_size=cfg.spec.image_size // factor,
      cross_attention_dim=h, down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1))
  if cfg.prediction_type not in ("epsilon", "v_prediction"):
    raise ConfigError(f"--train_prediction_type: {cfg.prediction_type!r} (epsilon, v_prediction)")
  configs["scheduler"]["prediction_type"] = cfg.prediction_type
  return configs


# ---- checkpoints ----------------------------------------------------------------------

def _ckpt_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, "ckpt", f"{stage}.msgpack")


def save_checkpoint(workdir: str, stage: str, state: Dict) -> None:
  data = serialization.to_bytes(jax.device_get(state))
  workdir_lib.write_atomic(_ckpt_path(workdir, stage), lambda f: f.write(data))


def load_checkpoint(workdir: str, stage: str) -> Optional[Dict]:
  path = _ckpt_path(workdir, stage)
  if not os.path.exists(path):
    return None
  try:
    with open(path, "rb") as f:
      return serialization.msgpack_restore(f.read())
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path}: unreadable checkpoint ({e}); delete it to restart "
                          "this stage") from None


# ---- the training loop, shared by the VAE and the UNet ----------------------------------

def _optimizer(lr: float, warmup: int, steps: int):
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, min(warmup, steps - 1)),
                                             max(steps, 2), end_value=0.1 * lr)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))


# Jitted step functions of this process, by everything their trace depends on, so a
# resumed run in the same process (tests) compiles nothing again.
_STEP_CACHE: Dict[str, Callable] = {}


def _train_stage(cfg: TrainConfig, stage: str, params, loss_fn, draw_batch, steps: int,
                 lr: float, step_offset: int, curve: list, cache_key: str):
  """Runs `steps` optimizer steps of loss_fn(params, batch) -> scalar, resuming.

  `cache_key` must name everything loss_fn's computation depends on.

  Returns (params, done): done is False when cfg.stop_after stopped it early.
  """
  opt = _optimizer(lr, cfg.warmup_steps, steps)
  state = {"step": 0, "params": params, "opt_state": opt.init(params),
           "curve": np.zeros((0, 3))}
  saved = load_checkpoint(cfg.workdir, stage)
  if saved is not None:
    state = serialization.from_state_dict(state, saved)
    state["step"] = int(state["step"])
    logging.info("%s: resumed at step %d", stage, state["step"])

  step_fn = _STEP_CACHE.get(cache_key)
  if step_fn is None:
    @jax.jit
    def step_fn(p, o, batch):
      loss, grads = jax.value_and_grad(loss_fn)(p, batch)
      updates, o = opt.update(grads, o, p)
      return optax.apply_updates(p, updates), o, loss
    _STEP_CACHE[cache_key] = step_fn

  p, o = state["params"], state["opt_state"]
  losses, t0 = [], time.perf_counter()
  step = state["step"]
  local = list(np.asarray(state["curve"]).reshape(-1, 3))
  stop = steps if cfg.stop_after is None else min(steps, max(0, cfg.stop_after - step_offset))
  while step < stop:
    p, o, loss = step_fn(p, o, draw_batch(step))
    losses.append(loss)
    step += 1
    if step % cfg.checkpoint_every == 0 or step == stop:
      vals = np.asarray(jax.device_get(losses), np.float64)
      local.append(np.array([step, vals.mean(), time.perf_counter() - t0]))
      logging.info("%s step %d/%d loss %.5f (%.3f s/step)", stage, step, steps, vals.mean(),
                   (time.perf_counter() - t0) / len(vals))
      losses, t0 = [], time.perf_counter()
      save_checkpoint(cfg.workdir, stage, {"step": step, "params": p, "opt_state": o,
                                           "curve": np.stack(local)})
  curve.extend(dict(stage=stage, step=int(r[0]), loss=float(r[1]), seconds=float(r[2]))
               for r in local)
  return jax.device_get(p), step >= steps


def _vae_loss(vae, kl_weight):
  def loss_fn(params, batch):
    mean, logvar = vae.apply({"params": params}, batch["x"], method=type(vae).encode)
    z = mean + jnp.exp(0.5 * logvar) * batch["noise"]
    rec = vae.apply({"params": params}, z, method=type(vae).decode)
    kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.mean((rec - batch["x"]) ** 2) + kl_weight * kl
  return loss_fn


def _unet_loss(unet, schedule: Schedule, prediction_type: str):
  abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)

  def loss_fn(params, batch):
    a, x0, eps = abar[batch["t"]][:, None, None, None], batch["latents"], batch["noise"]
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
    target = eps if prediction_type == "epsilon" else jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0
    pred = unet.apply({"params": params}, x_t, batch["t"], batch["context"])
    return jnp.mean((pred - target) ** 2)
  return loss_fn


def _key(stage: str, config: dict, cfg: TrainConfig) -> str:
  return json.dumps([stage, config, cfg.identity()], sort_keys=True)


def _batched(fn, params, x: np.ndarray, size: int = 256) -> np.ndarray:
  return np.concatenate([np.asarray(fn(params, x[i:i + size])) for i in range(0, len(x), size)])


def _rng(cfg: TrainConfig, stage: int, step: int) -> np.random.Generator:
  return np.random.default_rng([cfg.seed, stage, step])


def _check_identity(cfg: TrainConfig) -> None:
  path = os.path.join(cfg.workdir, "train_config.json")
  ident = cfg.identity()
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    ident = json.loads(json.dumps(ident))  # tuples -> lists, as stored
    if old != ident:
      diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
      raise ConfigError(f"{path}: this workdir was trained with other settings ({diff}); "
                        "use another --workdir")
  else:
    os.makedirs(cfg.workdir, exist_ok=True)
    workdir_lib.write_json(path, ident)


def run(cfg: TrainConfig) -> Dict:
  """Trains (or resumes) the testbed model in cfg.workdir; returns a summary dict."""
  t_start = time.perf_counter()
  _check_identity(cfg)
  data = testbed.generate(cfg.spec)
  if not os.path.exists(os.path.join(cfg.workdir, "eval_prompts.parquet")):
    testbed.write(data, cfg.workdir)
  tok_dir = os.path.join(cfg.workdir, "tokenizer")
  vocab = tokenizer_lib.write_tokenizer_folder(tok_dir, num_merges=cfg.text_num_merges)
  tok = tokenizer_lib.CLIPTokenizer.from_folder(tok_dir)
  configs = model_configs(cfg, vocab)
  modules = {n: loading.build_module(n, configs[n], f"<{n}>") for n in loading.COMPONENTS}
  params = {n: tiny.random_params(n, configs[n], cfg.seed + i)
            for i, n in enumerate(loading.COMPONENTS)}
  schedule = Schedule.from_config(configs["scheduler"])
  images = np.stack(data["images"]).astype(np.float32) / 127.5 - 1.0  # [M, S, S, 3]
  curve: list = []

  vae = modules["vae"]
  def vae_batch(step):
    r = _rng(cfg, 1, step)
    x = images[r.integers(0, len(images), cfg.vae_batch_size)]
    f = vae.config.downsample_factor
    noise = r.standard_normal((len(x), x.shape[1] // f, x.shape[2] // f, 4), np.float32)
    return {"x": x, "noise": noise}
  params["vae"], done = _train_stage(cfg, "vae", params["vae"], _vae_loss(vae, cfg.vae_kl_weight),
                                     vae_batch, cfg.vae_steps, cfg.vae_learning_rate, 0, curve,
                                     _key("vae", configs["vae"], cfg))
  if not done:
    return {"finished": False, "curve": curve}

  # Cached inputs of the UNet: latent means of the distinct images, frozen text embeddings.
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=type(vae).encode)[0])
  means = _batched(encode, params["vae"], images)
  scaling = float(1.0 / means.std())
  configs["vae"]["scaling_factor"] = scaling
  latents = means * scaling
  text = jax.jit(lambda p, ids: modules["text_encoder"].apply({"params": p}, ids))
  captions = [r["caption"] for r in data["train"]]
  ids = tok.encode_batch(captions + [""])["input_ids"]
  context = _batched(text, params["text_encoder"], ids)
  empty, context = context[-1], context[:-1]
  image_of = np.array([r["image"] for r in data["train"]])
  examples = np.repeat(np.arange(len(captions)), [r["copies"] for r in data["train"]])

  def unet_batch(step):
    r = _rng(cfg, 2, step)
    rows = examples[r.integers(0, len(examples), cfg.train_batch_size)]
    ctx = context[rows].copy()
    ctx[r.random(len(rows)) < cfg.cfg_dropout] = empty
    lat = latents[image_of[rows]]
    return {"latents": lat, "context": ctx,
            "t": r.integers(0, schedule.num_train_timesteps, len(rows)).astype(np.int32),
            "noise": r.standard_normal(lat.shape, np.float32)}
  params["unet"], done = _train_stage(
      cfg, "unet", params["unet"], _unet_loss(modules["unet"], schedule, cfg.prediction_type),
      unet_batch, cfg.train_steps, cfg.learning_rate, cfg.vae_steps, curve,
      _key("unet", configs["unet"], cfg))
  if not done:
    return {"finished": False, "curve": curve}

  model_dir = os.path.join(cfg.workdir, "model")
  shutil.rmtree(tmp := model_dir + ".tmp", ignore_errors=True)
  scheduler = configs.pop("scheduler")
  saving.save_stable_diffusion(tmp, configs, params, scheduler)
  shutil.copytree(tok_dir, os.path.join(tmp, "tokenizer"))
  shutil.rmtree(model_dir, ignore_errors=True)
  os.replace(tmp, model_dir)
  n_unet = int(sum(np.size(a) for a in jax.tree.leaves(params["unet"])))
  summary = {"finished": True, "curve": curve, "train_s": time.perf_counter() - t_start,
             "vae_scaling_factor": scaling, "examples": int(len(examples)),
             "distinct_images": len(images), "unet_params": n_unet}
  if cfg.evaluate:
    summary["eval"] = testbed_eval.evaluate(cfg.workdir)
  workdir_lib.write_json(os.path.join(cfg.workdir, "train_summary.json"), summary)
  return summary
