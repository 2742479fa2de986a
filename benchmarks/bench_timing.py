"""Wall-clock medians shared by the benchmark scripts."""
import time
from typing import Callable, List, Sequence

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
