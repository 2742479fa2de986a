"""The discrete noise schedule shared by every stage (docs/method.md section 1).

Constants are computed in float64 with numpy and handed to jitted code as float32
arrays, whatever dtype the models run in.
"""
import dataclasses
import math

import numpy as np

from memjax.runtime.errors import ConfigError

_SUPPORTED_SCHEDULES = ("scaled_linear", "linear")
_SUPPORTED_PREDICTIONS = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """alphas_cumprod and the parameterisation of a model's scheduler config."""
  alphas_cumprod: np.ndarray  # [T] float64
  prediction_type: str  # "epsilon" or "v_prediction"

  @property
  def num_train_timesteps(self) -> int:
    return len(self.alphas_cumprod)

  @property
  def last_timestep(self) -> int:
    """T - 1: where the one-step scores start (999 for SD; docs/method.md section 1)."""
    return self.num_train_timesteps - 1

  def sigma(self, t: int) -> float:
    """k-diffusion sigma(t) = sqrt((1 - abar[t]) / abar[t])."""
    a = self.alphas_cumprod[t]
    return float(np.sqrt((1.0 - a) / a))

  @property
  def sigmas(self) -> np.ndarray:
    """[T] float64 sigma(t) for t = 0..T-1 (increasing)."""
    a = self.alphas_cumprod
    return np.sqrt((1.0 - a) / a)

  @classmethod
  def from_config(cls, config: dict, source: str = "scheduler/scheduler_config.json"):
    """The schedule of a diffusers scheduler config (its parsed JSON object).

    Raises:
      ConfigError: naming `source` and the key of a value memjax cannot use.
    """
    if not isinstance(config, dict):
      raise ConfigError(f"{source}: must be a JSON object of scheduler keys, got "
                        f"{type(config).__name__} {config!r:.60}")
    beta_start = _beta(config, "beta_start", 0.00085, source)
    beta_end = _beta(config, "beta_end", 0.012, source)
    kind = config.get("beta_schedule", "scaled_linear")
    n = config.get("num_train_timesteps", 1000)
    prediction = config.get("prediction_type", "epsilon")
    if kind not in _SUPPORTED_SCHEDULES:
      raise ConfigError(f"{source}: beta_schedule = {kind!r} is not supported "
                        f"(supported: {', '.join(_SUPPORTED_SCHEDULES)})")
    if prediction not in _SUPPORTED_PREDICTIONS:
      raise ConfigError(f"{source}: prediction_type = {prediction!r} is not supported "
                        f"(supported: {', '.join(_SUPPORTED_PREDICTIONS)})")
    if config.get("trained_betas") is not None:
      raise ConfigError(f"{source}: trained_betas is not supported")
    _check_sampler_keys(config, source)
    # diffusers writes num_train_timesteps as a JSON integer; 1000.0 is the same.
    if isinstance(n, float) and _finite(n) and n.is_integer():
      n = int(n)
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= _MAX_TIMESTEPS:
      raise ConfigError(f"{source}: num_train_timesteps must be an integer from 2 to "
                        f"{_MAX_TIMESTEPS}, got {n!r:.60}")
    if beta_start == beta_end == 0:
      raise ConfigError(f"{source}: beta_start and beta_end are both 0 (every beta 0: the "
                        f"schedule never adds noise)")
    if kind == "scaled_linear":
      betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
    else:
      betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    # Jitted code gets the schedule as float32: abar[T - 1] must not round to 0 there.
    if not alphas_cumprod[-1] >= np.finfo(np.float32).tiny:
      raise ConfigError(f"{source}: beta_end = {beta_end!r} and num_train_timesteps = {n} "
                        f"leave alphas_cumprod[{n - 1}] = {float(alphas_cumprod[-1]):.3g}, "
                        f"which is 0 in float32 (no signal left at the last timestep)")
    return cls(alphas_cumprod=alphas_cumprod, prediction_type=prediction)


# Far beyond any released model (1000); bounds the arrays a config can ask for.
_MAX_TIMESTEPS = 1_000_000


def _finite(v) -> bool:
  try:
    return math.isfinite(float(v))
  except OverflowError:
    return False


def _beta(config: dict, key: str, default: float, source: str) -> float:
  """A beta of the config: a number in [0, 1)."""
  v = config.get(key, default)
  if (isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v)
      or not 0 <= v < 1):
    raise ConfigError(f"{source}: {key} must be a number in [0, 1), got {v!r:.60}")
  return float(v)


# Keys the samplers read (memjax.method.sampling; null means diffusers' default):
# checked here so that a wrong type fails when the model folder is read.
_FLAGS = ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr")


def _check_sampler_keys(config: dict, source: str) -> None:
  for key in _FLAGS:
    v = config.get(key)
    if v is not None and not isinstance(v, bool):
      raise ConfigError(f"{source}: {key} must be true or false, got {v!r:.60}")
  v = config.get("steps_offset")
  if v is not None and (isinstance(v, bool) or not isinstance(v, int) or
                        not 0 <= v <= _MAX_TIMESTEPS):
    raise ConfigError(f"{source}: steps_offset must be an integer from 0 to "
                      f"{_MAX_TIMESTEPS}, got {v!r:.60}")
  v = config.get("clip_sample_range")
  if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or
                        not _finite(v) or v <= 0):
    raise ConfigError(f"{source}: clip_sample_range must be a finite positive number, "
                      f"got {v!r:.60}")
  v = config.get("timestep_spacing")
  if v is not None and not isinstance(v, str):
    raise ConfigError(f"{source}: timestep_spacing must be a string, got {v!r:.60}")
