"""Wall-clock medians and compile timing shared by the benchmark scripts."""
import time
from typing import Callable, List, Sequence, Tuple

import numpy as np


def median_seconds(fns: Sequence[Callable], repeats: int, warmup: bool = True) -> List[float]:
  """Median seconds of a call of each of `fns` over `repeats` calls.

  The fns are timed in turn within each repeat, so a change in the machine's load
  falls on all of them alike. With `warmup`, each is called once first
  (compilation, caches) and that call is not timed.
  """
  if warmup:
    for fn in fns:
      fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, ts in zip(fns, times):
      t0 = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t0)
  return [float(np.median(ts)) for ts in times]


def median_time(fn: Callable, repeats: int, warmup: bool = True) -> float:
  """Median seconds of `repeats` calls of fn (after one untimed call with `warmup`)."""
  return median_seconds([fn], repeats, warmup)[0]


def xla_flops(lowered_or_compiled) -> float:
  """XLA's FLOP count of a `jax.stages.Lowered` or `Compiled` (nan where the
  backend reports none)."""
  try:
    cost = lowered_or_compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return float("nan")


def compile_step(step) -> Tuple[object, float, float]:
  """Compiles a stage's `engine.BoundStep` for one batch: (compiled, seconds,
  XLA FLOPs of one call). The step's own calls then reuse this compilation."""
  t0 = time.perf_counter()
  compiled = step.lower().compile()
  seconds = time.perf_counter() - t0
  return compiled, seconds, xla_flops(compiled)


def run_step(step, batch: np.ndarray):
  """One call of a BoundStep on a full batch, waited for (what the timers time)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.block_until_ready(step(batch))
