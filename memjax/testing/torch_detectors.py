"""Published memorization detectors computed with PyTorch diffusers (the reference).

An independent restatement, the authors' way, of the one-step detectors that sit
beside Webster's DCS (Wen's ||e_c - e_u||, Jeon's sharpness, Asthana's anisotropy,
Ren's cross-attention entropy) and, separately below, of the multi-step ones (Wen
over the first n DDIM steps, Chen's Bright Ending). The model is loaded by
`TorchWhitebox` (diffusers' own `StableDiffusionPipeline`); the sampler is
diffusers' `DDIMScheduler.from_config(<the model's scheduler config>)` with 50
steps, so the first step is t = timesteps[0] (981 for SD's configs) and the
low-noise one t = timesteps[-3] (41). The UNet input at the first step is the
start noise z itself (DDIM's init_noise_sigma = 1, scale_model_input = identity);
CFG batches are [uncond; cond] with the empty prompt as uncond. Every score is
per prompt and per seed: [B, S] float64, S = number of start noises.
"""
import contextlib
from typing import Dict, Optional, Sequence

import numpy as np

from memjax.testing.torch_reference import TorchWhitebox

# Ren's "LE" layer: the 2nd transformer of the 2nd down block (32 x 32 on SD1).
REN_LAYER = "down_blocks.1.attentions.1.transformer_blocks.0.attn2"
# Asthana's detect_eval.py weights (norm, cosine) per prediction type.
ASTHANA_WEIGHTS = {"epsilon": (1.0, 2.0), "v_prediction": (1.0, 0.1)}
NUM_STEPS = 50


class AttentionCapture:
  """A diffusers attention processor that records the post-softmax probabilities
  softmax(Q K^T * scale), recomputed in float32 by diffusers' own
  `Attention.get_attention_scores` (as REN's processor and BE's forward do), and
  leaves the layer's output to the processor it wraps (output unchanged).

  Each call appends [batch, heads, queries, keys] float32 to store[name].
  """

  def __init__(self, inner, name: str, store: dict):
    self.inner, self.name, self.store = inner, name, store

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
               temb=None, **kwargs):
    self.store.setdefault(self.name, []).append(
        self.probabilities(attn, hidden_states, encoder_hidden_states, attention_mask, temb))
    return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                      attention_mask=attention_mask, temb=temb, **kwargs)

  @staticmethod
  def probabilities(attn, hidden_states, encoder_hidden_states, attention_mask, temb):
    import torch  # pylint: disable=g-import-not-at-top
    with torch.no_grad():
      if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
      if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
      context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
      batch = context.shape[0]
      if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
      if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
      if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
      query = attn.head_to_batch_dim(attn.to_q(hidden_states).float())
      key = attn.head_to_batch_dim(attn.to_k(context).float())
      mask = None if attention_mask is None else attention_mask.float()
      probs = attn.get_attention_scores(query, key, mask).float()
    return probs.view(batch, attn.heads, probs.shape[1], probs.shape[2])


class TorchDetectors(TorchWhitebox):
  """The detectors on one model, computed with PyTorch diffusers.

  Args (beyond `TorchWhitebox`'s):
    ren_layer: module path of the attn2 whose entropy is Ren's LE score.
    be_layers: module paths of the attn2 layers averaged into Bright Ending's mask
      (None: every attn2 under down_blocks.0, i.e. SD1's d0.a0 and d0.a1).
    batch_size: prompts per UNet batch (the CFG batch is twice that).
  """

  def __init__(self, model_dir: str, dtype: str = "float32", threads: int = 0, options=None,
               ren_layer: str = REN_LAYER, be_layers: Optional[Sequence[str]] = None,
               batch_size: int = 8):
    super().__init__(model_dir, dtype, threads, options)
    from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
    from memjax.models import model_files  # pylint: disable=g-import-not-at-top
    options = options or model_files.ModelOptions()
    # The pipeline's scheduler config: the folder's, or the config folder that
    # from_single_file read it from.
    source = options.model_config if model_files.is_single_file(model_dir) else model_dir
    self.scheduler_config = DDIMScheduler.load_config(source, subfolder="scheduler")
    self.scheduler = self.new_scheduler()
    self.timesteps = [int(t) for t in self.scheduler.timesteps]
    self.t_first, self.t_low = self.timesteps[0], self.timesteps[-3]
    self.ren_layer = ren_layer
    self.be_layers = list(be_layers) if be_layers is not None else [
        n for n, _ in self.unet.named_modules()
        if n.startswith("down_blocks.0.") and n.endswith(".attn2")]
    self.batch_size = batch_size

  # ---------------------------------------------------------------- plumbing

  def new_scheduler(self, steps: Optional[int] = None):
    """diffusers' DDIMScheduler.from_config(pipe.scheduler.config), `steps` steps
    (None: NUM_STEPS, 50)."""
    from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
    sched = DDIMScheduler.from_config(self.scheduler_config)
    sched.set_timesteps(steps or NUM_STEPS)
    return sched

  def alpha_bar(self, t: int) -> float:
    return float(self.scheduler.alphas_cumprod[int(t)])

  def set_precision(self, torch_dtype):
    """Casts the UNet and text encoder (e.g. torch.float64 for derivative tests)."""
    self.unet.to(torch_dtype)
    self.text.to(torch_dtype)
    self.dtype = torch_dtype

  def cfg_context(self, prompts: Sequence[str]):
    """[uncond x B; cond x B] text embeddings, the pipeline's CFG order."""
    cond = self.embed(prompts)
    uncond = self.embed([""]).expand(len(prompts), -1, -1)
    return self.torch.cat([uncond, cond]).to(self.dtype)

  def unet_raw(self, x, t: int, ctx):
    """The UNet's raw `.sample` (eps or v) at timestep t, no gradient."""
    torch = self.torch
    with torch.no_grad():
      out = self.unet(x.to(self.dtype), torch.tensor(int(t)), encoder_hidden_states=ctx).sample
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

  def unet_pair(self, x, t: int, ctx):
    """(raw_u, raw_c) of the CFG batch [x; x] with ctx = [uncond; cond]."""
    return self.unet_raw(self.torch.cat([x, x]), t, ctx).chunk(2)

  @contextlib.contextmanager
  def attention_capture(self, names: Sequence[str]):
    """Installs `AttentionCapture` on the named attention modules; yields the store
    {name: [probs per call]} and restores the original processors on exit."""
    modules = dict(self.unet.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
      raise ValueError(f"no attention module {missing} in this UNet (has "
                       f"{[n for n in modules if n.endswith('attn2')]})")
    store, saved = {}, {}
    try:
      for n in names:
        saved[n] = modules[n].processor
        modules[n].set_processor(AttentionCapture(saved[n], n, store))
      yield store
    finally:
      for n, proc in saved.items():
        modules[n].set_processor(proc)

  def _chunks(self, prompts, noise_nchw):
    """(prompt chunk, its CFG context, seed index, x = z expanded to the chunk)."""
    torch = self.torch
    noise = np.asarray(noise_nchw, np.float32)
    for lo in range(0, len(prompts), self.batch_size):
      chunk = list(prompts[lo:lo + self.batch_size])
      ctx = self.cfg_context(chunk)
      for s, z in enumerate(noise):
        x = torch.from_numpy(z)[None].expand(len(chunk), -1, -1, -1).contiguous()
        yield lo, chunk, ctx, s, x.to(self.dtype)

  @staticmethod
  def _norm(x):
    return x.double().flatten(1).norm(dim=1)

  # ------------------------------------------------------- one-step detectors

  def jeon_vector(self, x, t: int, ctx):
    """JEON pipe.py "DETECTION CODE": comb = H_c v - H_u v by torch.func.jvp
    (math SDPA: the flash kernels have no forward AD, JEON disables them too).

    eps: v = -(e_c - e_u)/sigma, score(x) = -UNet([x;x])/sigma, sigma^2 = 1 - abar.
    v-prediction: score(x) = (sqrt(abar) UNet([x;x]) - x_in)/sigma^2 with x_in the
    closure constant [x;x], v = score_c - score_u.
    """
    torch = self.torch
    from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=g-import-not-at-top
    abar = self.alpha_bar(t)
    sig2 = 1.0 - abar
    tt = torch.tensor(int(t))
    x_in = torch.cat([x, x])
    raw = torch.cat(self.unet_pair(x, t, ctx))
    if self.prediction_type == "v_prediction":
      s_u, s_c = ((abar ** 0.5 * raw - x_in) / sig2).chunk(2)
      direction = s_c - s_u

      def score(y):
        v = self.unet(torch.cat([y, y]), tt, encoder_hidden_states=ctx).sample
        return (abar ** 0.5 * v - x_in) / sig2
    else:
      e_u, e_c = raw.chunk(2)
      direction = -(e_c - e_u) / sig2 ** 0.5

      def score(y):
        return -self.unet(torch.cat([y, y]), tt, encoder_hidden_states=ctx).sample / sig2 ** 0.5
    with sdpa_kernel(SDPBackend.MATH):
      _, tangent = torch.func.jvp(score, (x,), (direction.to(x.dtype),))
    h_u, h_c = tangent.chunk(2)
    return (h_c - h_u).detach()

  def scores(self, prompts: Sequence[str], noise_nchw: np.ndarray,
             jeon: bool = True) -> Dict[str, np.ndarray]:
    """The one-step detectors per prompt and seed.

    Args:
      noise_nchw: [S, C, H, W] start noise z, one per seed, shared by every prompt.
      jeon: also compute Jeon's JVP score (the expensive one).
    Returns:
      dict of [B, S] float64: wen981, asthana_norm, asthana_cos, asthana, ren_le
      (and jeon). Also ren_attention: [B, S, keys] the head- and query-averaged
      probabilities Ren's entropy is taken of.
    """
    torch = self.torch
    nb, ns = len(prompts), len(noise_nchw)
    out = {k: np.zeros((nb, ns)) for k in
           ("wen981", "asthana_norm", "asthana_cos", "asthana", "ren_le")
           + (("jeon",) if jeon else ())}
    out["ren_attention"] = None
    w_norm, w_cos = ASTHANA_WEIGHTS[self.prediction_type]
    abar = self.alpha_bar(self.t_first)
    for lo, chunk, ctx, s, x in self._chunks(prompts, noise_nchw):
      sl = slice(lo, lo + len(chunk))
      # (z, t_first) CFG pair; Ren's layer captured on it (REN keeps the cond half).
      with self.attention_capture([self.ren_layer]) as store:
        r_u, r_c = self.unet_pair(x, self.t_first, ctx)
      out["wen981"][sl, s] = self._norm(r_c - r_u).numpy()
      probs = store[self.ren_layer][0][len(chunk):].double().mean(dim=(1, 2))  # [b, keys]
      if out["ren_attention"] is None:
        out["ren_attention"] = np.zeros((nb, ns, probs.shape[-1]))
      out["ren_attention"][sl, s] = probs.numpy()
      out["ren_le"][sl, s] = (-torch.special.xlogy(probs, probs).sum(-1)).numpy()
      # Asthana: norm at (z, t_first), channel cosine at (z, t_low) on raw outputs.
      if self.prediction_type == "v_prediction":
        x2 = torch.cat([x, x])
        s_u, s_c = ((abar ** 0.5 * torch.cat([r_u, r_c]) - x2) / (1 - abar)).chunk(2)
        norm = self._norm(s_c - s_u)
      else:
        norm = self._norm(r_c - r_u)
      l_u, l_c = self.unet_pair(x, self.t_low, ctx)
      cos = torch.nn.functional.cosine_similarity(l_u, l_c - l_u, dim=1).double().mean(dim=(1, 2))
      out["asthana_norm"][sl, s] = norm.numpy()
      out["asthana_cos"][sl, s] = cos.numpy()
      out["asthana"][sl, s] = (w_norm * norm + w_cos * cos).numpy()
      if jeon:
        out["jeon"][sl, s] = self._norm(self.jeon_vector(x, self.t_first, ctx)).numpy()
    return out

  # ------------------------------------------------------ multi-step detectors

  def trajectory(self, prompts: Sequence[str], noise_nchw: np.ndarray, n_steps: int = NUM_STEPS,
                 guidance_scale: float = 7.5, be: bool = False, mask: Optional[np.ndarray] = None,
                 keep_diffs: bool = False, total_steps: Optional[int] = None
                 ) -> Dict[str, np.ndarray]:
    """The first n_steps of the total_steps-step DDIM CFG trajectory from x_T = z.

    Args:
      total_steps: the DDIM's number of steps (None: NUM_STEPS, the authors' 50).
      be: Bright Ending too (needs n_steps = total_steps): the mask is the EOS-token
        cross-attention at the last step (t = timesteps[-1]) of self.be_layers,
        conditional half, heads then layers averaged; every step's (e_c - e_u) is
        kept until then and masked.
      mask: [B, S, H, W] to use as BE's mask instead of the captured one.
    Returns:
      wen_steps: [B, S, n_steps] per-step ||e_c - e_u|| of the raw outputs;
      latents: [B, S, C, H, W] x after the n_steps DDIM steps;
      with be: be_steps [B, S, n_steps] per-step ||m * (e_c - e_u)|| / mean(m), and
        mask [B, S, H, W]; with keep_diffs: diffs [B, S, n_steps, C, H, W] float32.
    """
    torch = self.torch
    total = total_steps or NUM_STEPS
    if be and n_steps != total:
      raise ValueError(f"the Bright Ending mask is taken at the last of the {total} steps")
    nb, ns = len(prompts), len(noise_nchw)
    shape = tuple(np.shape(noise_nchw)[1:])
    out = {"wen_steps": np.zeros((nb, ns, n_steps)), "latents": np.zeros((nb, ns) + shape)}
    if be:
      out["be_steps"], out["mask"] = np.zeros((nb, ns, n_steps)), np.zeros((nb, ns) + shape[1:])
    if keep_diffs:
      out["diffs"] = np.zeros((nb, ns, n_steps) + shape, np.float32)
    for lo, chunk, ctx, s, x in self._chunks(prompts, noise_nchw):
      sl, b = slice(lo, lo + len(chunk)), len(chunk)
      sched = self.new_scheduler(total)
      latents, diffs = x * sched.init_noise_sigma, []
      for i, t in enumerate(sched.timesteps[:n_steps]):
        x_in = sched.scale_model_input(torch.cat([latents, latents]), t)
        capture = be and mask is None and i == total - 1
        with (self.attention_capture(self.be_layers) if capture
              else contextlib.nullcontext({})) as store:
          r_u, r_c = self.unet_raw(x_in, int(t), ctx).chunk(2)
        diff = r_c - r_u
        out["wen_steps"][sl, s, i] = self._norm(diff).numpy()
        if be or keep_diffs:
          diffs.append(diff.double())
        if capture:
          out["mask"][sl, s] = self._be_mask(chunk, store, b, shape[1:])
        latents = sched.step(r_u + guidance_scale * diff, t, latents).prev_sample
      out["latents"][sl, s] = latents.double().numpy()
      if keep_diffs:
        out["diffs"][sl, s] = torch.stack(diffs, 1).float().numpy()
      if be:
        if mask is not None:
          out["mask"][sl, s] = np.broadcast_to(np.asarray(mask, np.float64),
                                               (nb, ns) + shape[1:])[sl, s]
        out["be_steps"][sl, s] = self.masked_norms(torch.stack(diffs, 1),
                                                   torch.from_numpy(out["mask"][sl, s]))
    return out

  def _be_mask(self, chunk, store, b, hw):
    """BE's mask: cond half, heads averaged, layers averaged, EOS token."""
    maps = [store[n][0][b:].double().mean(dim=1) for n in self.be_layers]  # [b, q, keys]
    att = sum(maps) / len(maps)
    if att.shape[1] != hw[0] * hw[1]:
      raise ValueError(f"Bright Ending layers must run at the latent resolution {hw}; "
                       f"got {att.shape[1]} queries")
    att = att.reshape(b, hw[0], hw[1], att.shape[-1])
    # token_len = min(len(tokenizer.encode(prompt)), 77) includes BOS and EOS.
    idx = [min(len(self.tokenizer.encode(p)), 77) - 1 for p in chunk]
    return np.stack([att[j, :, :, k].numpy() for j, k in enumerate(idx)])

  @staticmethod
  def masked_norms(diffs, mask):
    """BE's ||m * (e_c - e_u)||_2 / mean(m) per step.

    Args:
      diffs: [b, steps, C, H, W] float64 tensor; mask: [b, H, W] float64 tensor
        (broadcast over the channels).
    Returns:
      [b, steps] float64 numpy.
    """
    masked = diffs * mask[:, None, None]
    norms = masked.flatten(2).norm(dim=2)
    return (norms / mask.mean(dim=(1, 2))[:, None]).numpy()

  def wen_steps(self, prompts: Sequence[str], noise_nchw: np.ndarray, n_steps: int,
                guidance_scale: float = 7.5) -> np.ndarray:
    """Wen over the first n steps: mean over steps of ||e_c - e_u||. [B, S]."""
    return self.trajectory(prompts, noise_nchw, n_steps, guidance_scale)["wen_steps"].mean(-1)

  def bright_ending(self, prompts: Sequence[str], noise_nchw: np.ndarray,
                    guidance_scale: float = 7.5,
                    mask: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Chen's Bright Ending in one pass (the same numbers as BE's two passes).

    Args:
      mask: [B, S, H, W] (or broadcastable) to use instead of the captured one.
    Returns:
      be: [B, S] mean over the 50 steps of the masked norm; be_steps: [B, S, 50];
      wen_steps: [B, S, 50] the unmasked norms; mask: [B, S, H, W] the mask used.
    """
    traj = self.trajectory(prompts, noise_nchw, NUM_STEPS, guidance_scale, be=True, mask=mask)
    return dict(traj, be=traj["be_steps"].mean(-1))
