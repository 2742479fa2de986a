"""The one stage engine: a jitted batch step bound to its parameters, and the
resumable shard loop that every batched stage (scan, blackbox, generate) runs.

`BoundStep` is what the stages, the cross-check, the testbed evaluation and the
benchmarks call: a pure function `fn(bound, batch)` jitted once with explicit
shardings over a one-axis mesh; `bound` (parameters, noise, constants) is placed
on the devices once, replicated; every batch has exactly `batch_size` rows (the
last one padded with `pad_row`, the padding dropped from the outputs), so the
step compiles once, which `compiles` counts.

`StageRun` is the skeleton of a stage's `run()`: the run-config check (process 0
first, then a barrier), the shard ranges of this process, the loop that reads
the next shard in a background thread while the current one is computed, writes
each shard atomically and logs progress, the completeness check, the manifest.
"""
import collections
import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from memjax.runtime import distributed
from memjax.runtime import progress as progress_lib
from memjax.runtime import shards
from memjax.runtime import workdir as workdir_lib
from memjax.runtime.errors import InputError


def replicate(tree, mesh):
  """Places a pytree on every device of the mesh (a no-op for placed arrays)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


class BoundStep:
  """fn(bound, batch) -> pytree of [batch_size, ...] arrays, jitted once.

  Args:
    fn: pure; `bound` is the pytree given here, `batch` [batch_size, ...].
    bound: parameters and constants (numpy or device arrays), replicated once.
    batch_size: rows per call, rounded up to a multiple of the device count.
    mesh: one "data" axis; batches and outputs are sharded over it.
    pad_row: [...] the row that pads the last batch (e.g. the empty prompt).
  """

  def __init__(self, fn: Callable, bound, batch_size: int, mesh, pad_row: np.ndarray):
    if batch_size < 1:
      raise InputError(f"--batch_size must be >= 1, got {batch_size}")
    n_dev = mesh.devices.size
    self.mesh = mesh
    self.batch_size = -(-batch_size // n_dev) * n_dev
    self.pad_row = np.asarray(pad_row)
    self.bound = replicate(bound, mesh)
    self.batch_sharding = NamedSharding(mesh, P(distributed.AXIS))
    self.compiles = 0

    def counted(bound_, batch):
      self.compiles += 1  # Python runs at trace time only
      return fn(bound_, batch)

    self._fn = jax.jit(counted, out_shardings=self.batch_sharding)

  def __call__(self, batch: np.ndarray):
    """One full batch [batch_size, ...] -> device outputs (dispatched, not awaited)."""
    batch = jax.device_put(np.ascontiguousarray(batch), self.batch_sharding)
    return self._fn(self.bound, batch)

  def lower(self):
    """The step lowered for one batch: `.compile()` times the compile, and its
    `cost_analysis()` gives XLA's FLOP count (benchmarks)."""
    batch = jax.ShapeDtypeStruct((self.batch_size,) + self.pad_row.shape, self.pad_row.dtype,
                                 sharding=self.batch_sharding)
    return self._fn.lower(self.bound, batch)

  def map(self, rows: np.ndarray, max_in_flight: Optional[int] = 2
          ) -> Iterator[Tuple[int, Any]]:
    """Runs rows [N, ...] in padded batches; yields (start, host outputs of the
    rows start..start + real) in order.

    At most `max_in_flight` batches are dispatched and not yet collected (None:
    every batch is dispatched before the first is collected).
    """
    b, pending = self.batch_size, collections.deque()

    def collect():
      start, real, out = pending.popleft()
      return start, jax.tree.map(lambda x: np.asarray(x)[:real], jax.device_get(out))

    for start in range(0, len(rows), b):
      chunk = rows[start:start + b]
      real = len(chunk)
      if real < b:  # the last batch: padded, the padding dropped in collect
        pad = np.broadcast_to(self.pad_row, (b - real,) + self.pad_row.shape)
        chunk = np.concatenate([chunk, pad.astype(chunk.dtype)])
      pending.append((start, real, self(chunk)))
      if max_in_flight is not None and len(pending) >= max_in_flight:
        yield collect()
    while pending:
      yield collect()

  def all(self, rows: np.ndarray, max_in_flight: Optional[int] = None):
    """`map` gathered: the outputs of every row, concatenated (None for no rows)."""
    outs = [out for _, out in self.map(rows, max_in_flight)]
    if not outs:
      return None
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


@dataclasses.dataclass
class LoopStats:
  """What one run of a shard loop did."""
  rows: int = 0
  seconds: float = 0.0
  first_shard_s: Optional[float] = None


class StageRun:
  """One run of a resumable stage in one workdir.

  Args:
    workdir: the workdir (the stage writes only in WORKDIR/<stage>/).
    stage: the stage's name (`workdir.STAGES`).
    identity: what a resume must match (JSON-able).
    overwrite: delete the stage's outputs when the recorded identity differs.
    started: `time.perf_counter()` when the stage's run began (default: now), for
      the manifest's total_s.
  """

  def __init__(self, workdir: str, stage: str, identity: Dict, overwrite: bool,
               started: Optional[float] = None):
    self.workdir, self.stage, self.identity = workdir, stage, identity
    self.dir = workdir_lib.stage_dir(workdir, stage)
    self.t_start = time.perf_counter() if started is None else started
    self.pid, self.nproc = jax.process_index(), jax.process_count()
    if self.pid == 0:
      workdir_lib.check_run_config(workdir, stage, identity, overwrite)
    distributed.barrier(f"memjax_{stage}_config")
    if self.pid != 0:
      workdir_lib.check_run_config(workdir, stage, identity, overwrite=False)
    self.writer = shards.ShardWriter(self.dir, self.pid)
    self.ranges: List[shards.Range] = []

  def todo(self, n_rows: int, shard_size: int) -> List[shards.Range]:
    """This process's shards of rows [0, n_rows) not written yet."""
    self.ranges = shards.shard_ranges(n_rows, shard_size)
    mine = shards.shard_ranges(n_rows, shard_size, self.pid, self.nproc)
    return self.writer.pending(mine)

  def loop(self, todo: List[shards.Range], read: Callable[[int, int], Any],
           work: Callable[[int, int, Any], Any], what: str = "prompts",
           interval_s: float = 30.0) -> LoopStats:
    """For each range: item = read(start, stop) in a background thread (one
    shard ahead), table = work(start, stop, item), written as the shard."""
    stats = LoopStats()
    progress = progress_lib.Progress(sum(b - a for a, b in todo), what, interval_s)
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def prefetch():
      try:
        for start, end in todo:
          if stop.is_set():
            return
          q.put((start, end, read(start, end)))
      except BaseException as e:  # pylint: disable=broad-except  # re-raised below
        q.put(e)
        return
      q.put(None)

    thread = threading.Thread(target=prefetch, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
      while True:
        item = q.get()
        if item is None:
          break
        if isinstance(item, BaseException):
          raise item
        start, end, data = item
        t_shard = time.perf_counter()
        table = work(start, end, data)
        self.writer.write(table, start, end)
        if stats.first_shard_s is None:
          stats.first_shard_s = time.perf_counter() - t_shard
        stats.rows += end - start
        progress.update(end - start)
    finally:
      stop.set()
      while thread.is_alive():  # unblock a prefetcher waiting on a full queue
        try:
          q.get_nowait()
        except queue.Empty:
          thread.join(0.05)
    stats.seconds = time.perf_counter() - t0
    return stats

  def complete(self) -> bool:
    """Waits for every process; on process 0 checks that every shard exists.

    Returns True on process 0 (which then writes the global outputs).
    """
    distributed.barrier(f"memjax_{self.stage}_done")
    if self.pid != 0:
      return False
    missing = self.writer.pending(self.ranges)
    if missing:
      raise InputError(f"{self.stage} incomplete: {len(missing)} shards missing, e.g. "
                       f"{missing[0]}; rerun the same command to finish them")
    return True

  def write_manifest(self, config, *, counts: Dict, timings: Dict, rate: Optional[float],
                     rate_unit: str, outputs: Dict, runtime: Dict,
                     details: Optional[Dict] = None, did_work: bool = True
                     ) -> workdir_lib.Manifest:
    """The stage's manifest (timings get `total_s`)."""
    timings = dict(timings, total_s=time.perf_counter() - self.t_start)
    manifest = workdir_lib.Manifest(
        stage=self.stage, config=dataclasses.asdict(config), identity=self.identity,
        counts=counts, timings=timings, rate=rate, rate_unit=rate_unit, outputs=outputs,
        runtime=runtime, details=details or {})
    return workdir_lib.write_manifest(self.workdir, manifest, did_work)


def status_counts(directory: str) -> Dict:
  """rows, statuses, `scored` (status ok*) and `skipped` (the others) of a stage's shards."""
  counts = shards.count_statuses(directory)
  return {"rows": sum(counts.values()), "status": counts,
          "scored": sum(v for k, v in counts.items() if k.startswith("ok")),
          "skipped": {k: v for k, v in counts.items() if not k.startswith("ok")}}


def rate(items: int, seconds: float) -> Optional[float]:
  """items / seconds, None when nothing was done."""
  return items / seconds if items and seconds else None
