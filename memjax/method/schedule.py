"""The discrete noise schedule shared by every stage (docs/method.md section 1).

Constants are computed in float64 with numpy and handed to jitted code as float32
arrays, whatever dtype the models run in.
"""
import dataclasses

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
    beta_start = float(config.get("beta_start", 0.00085))
    beta_end = float(config.get("beta_end", 0.012))
    kind = config.get("beta_schedule", "scaled_linear")
    n = int(config.get("num_train_timesteps", 1000))
    prediction = config.get("prediction_type", "epsilon")
    if kind not in _SUPPORTED_SCHEDULES:
      raise ConfigError(f"{source}: beta_schedule = {kind!r} is not supported "
                        f"(supported: {', '.join(_SUPPORTED_SCHEDULES)})")
    if prediction not in _SUPPORTED_PREDICTIONS:
      raise ConfigError(f"{source}: prediction_type = {prediction!r} is not supported "
                        f"(supported: {', '.join(_SUPPORTED_PREDICTIONS)})")
    if config.get("trained_betas") is not None:
      raise ConfigError(f"{source}: trained_betas is not supported")
    if kind == "scaled_linear":
      betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
    else:
      betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    return cls(alphas_cumprod=np.cumprod(1.0 - betas), prediction_type=prediction)
