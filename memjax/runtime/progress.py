"""Progress lines for long scans: done/total, rates, ETA, every interval."""
import collections
import time
from typing import Callable, Optional

from absl import logging


def format_duration(seconds: float) -> str:
  """Seconds as h:mm:ss ("?" when unknown)."""
  if seconds is None or seconds != seconds or seconds == float("inf"):
    return "?"
  seconds = int(round(max(seconds, 0.0)))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Counts finished items and logs progress at most every `interval_s`.

  The recent rate (over the last `window_s`) drives the ETA, since the first
  batches of a run include compilation and are slower than the rest.
  `initial` items (already done by an earlier, resumed run) count towards
  done/total but not towards the rates.
  """

  def __init__(self, total: int, what: str = "prompts",
               interval_s: float = 10.0,
               log: Optional[Callable[[str], None]] = None,
               clock: Callable[[], float] = time.monotonic, initial: int = 0,
               window_s: float = 60.0):
    self.total, self.what, self.interval_s = total, what, interval_s
    self._log = log or logging.info
    self._clock = clock
    self._window_s = window_s
    self._t0 = self._last_log = clock()
    self.initial = self.done = initial
    self._recent = collections.deque([(self._t0, initial)])  # (time, done)

  def _rates(self, now):
    elapsed = now - self._t0
    overall = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
    t, done = self._recent[0]
    recent = (self.done - done) / (now - t) if now > t else overall
    return overall, recent

  def update(self, n: int = 1) -> None:
    """Adds n finished items; logs if interval_s passed since the last line."""
    self.done += n
    now = self._clock()
    self._recent.append((now, self.done))
    while len(self._recent) > 1 and now - self._recent[1][0] >= self._window_s:
      self._recent.popleft()  # keep the last sample at or before the window.
    if now - self._last_log >= self.interval_s:
      self.log_now(now)

  def log_now(self, now: Optional[float] = None) -> None:
    """Logs one progress line now."""
    now = self._clock() if now is None else now
    self._last_log = now
    overall, recent = self._rates(now)
    left = self.total - self.done
    eta = left / recent if recent > 0 else (0.0 if left <= 0 else None)
    share = 100.0 * self.done / self.total if self.total else 100.0
    self._log(f"{self.what} {self.done:,}/{self.total:,} ({share:.1f}%) | "
              f"{overall:,.1f}/s overall, {recent:,.1f}/s recent | "
              f"elapsed {format_duration(now - self._t0)} | "
              f"ETA {format_duration(eta)}")

  def summary(self) -> dict:
    """done, total, elapsed_s and rate (items/s over this run)."""
    now = self._clock()
    elapsed = now - self._t0
    rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
    return {"what": self.what, "done": self.done, "total": self.total,
            "resumed": self.initial, "elapsed_s": elapsed, "rate": rate}
