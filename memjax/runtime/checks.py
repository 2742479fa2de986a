"""Checks of a config's values, run when the config is built (`__post_init__`), so
a bad value is refused by the command line and the library alike, before any
work, with a message that names the flag."""
import math
from typing import Optional, Sequence

from memjax.runtime.errors import InputError

_INT64 = (-2 ** 63, 2 ** 63 - 1)


def at_least(cfg, minimum, *names: str) -> None:
  """Each named field is None or >= minimum."""
  for name in names:
    value = getattr(cfg, name)
    if value is not None and not value >= minimum:
      raise InputError(f"--{name} must be >= {minimum}, got {value}")


def finite(cfg, *names: str) -> None:
  for name in names:
    value = getattr(cfg, name)
    if value is not None and not math.isfinite(value):
      raise InputError(f"--{name} must be a finite number, got {value}")


def one_of(cfg, name: str, choices: Sequence[Optional[str]]) -> None:
  value = getattr(cfg, name)
  if value not in choices:
    shown = ", ".join("none" if c is None else c for c in choices)
    raise InputError(f"--{name}={value}: use one of {shown}")


def seeds(cfg, name: str = "seeds") -> None:
  """Integer seeds in the signed 64-bit range (jax.random.PRNGKey's), no duplicates."""
  values = list(getattr(cfg, name) or ())
  for s in values:
    if isinstance(s, bool) or not isinstance(s, int) or not _INT64[0] <= s <= _INT64[1]:
      raise InputError(f"--{name}: {s!r} is not a 64-bit integer seed")
  if len(set(values)) != len(values):
    raise InputError(f"--{name} has duplicates: {values}")
