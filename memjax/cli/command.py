"""Start-up shared by every `python -m memjax.<command>`: flags -> config -> run.

`main(define, build, run, summary)` defines the command's flags (typed and
defaulted by its config dataclass, `cli.options`) and the start-up flags, parses
them (absl, flagfiles included), calls `jax.distributed.initialize()` when
asked, builds the config, runs it and prints the summary line on process 0.
Every error a user can cause (a missing file, a malformed table, a bad flag
value: `MemjaxError`; a full disk, a read-only or non-folder workdir: `OSError`)
is printed as one line with exit status 2, never a traceback; Ctrl-C ends with
one line and status 130, leaving the workdir resumable.
"""
import errno
import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from memjax.cli import options as options_lib
from memjax.runtime import distributed
from memjax.runtime.errors import MemjaxError

# Start-up flags of every command that runs on devices: (name, kind, default, help).
STARTUP = (
    ("distributed", "bool", None, "Call jax.distributed.initialize() before anything else. "
     "Default: when MEMJAX_DISTRIBUTED=1 or JAX_COORDINATOR_ADDRESS is set."),
    ("coordinator_address", "str", None, "host:port of process 0 (not needed on TPU pods "
     "or SLURM)."),
    ("num_processes", "int", None, "Number of processes."),
    ("process_id", "int", None, "This process's index."),
)


def define_startup(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  for name, kind, default, help_text in STARTUP:
    options_lib.define_flag(name, kind, default, help_text, flag_values=flag_values)


def startup(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """jax.distributed start-up from the start-up flags (when asked)."""
  f = flag_values
  distributed.maybe_initialize(distributed.distributed_requested(f["distributed"].value),
                               f["coordinator_address"].value, f["num_processes"].value,
                               f["process_id"].value)


# Errors of the user's disk and folders (full, read-only, not a folder, no
# permission): one line, like any other error the user can fix.
_USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG)


def _fail(message: str, status: int) -> None:
  logging.flush()
  print(message, file=sys.stderr)
  sys.exit(status)


def run_main(main_fn: Callable) -> None:
  """app.run(main_fn), turning MemjaxError into one line on stderr and exit 2."""
  def wrapped(argv):
    if len(argv) > 1:
      print(f"error: unexpected arguments {argv[1:]} (flags are --name=value)", file=sys.stderr)
      sys.exit(2)
    try:
      return main_fn()
    except MemjaxError as e:
      _fail(f"error: {e}", 2)
    except KeyboardInterrupt:
      _fail("interrupted: every finished shard is kept; rerun the same command to resume", 130)
    except OSError as e:
      if e.errno not in _USER_ERRNOS:
        raise
      where = f": {e.filename}" if e.filename else ""
      _fail(f"error: cannot write or read{where}: {e.strerror} (errno {e.errno})", 2)

  def parse(argv):  # a flag absl cannot parse is the user's error too: one line
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f"error: {e} (see --help)", file=sys.stderr)
      sys.exit(2)

  app.run(wrapped, flags_parser=parse)


def main(define: Callable, build: Callable, run: Callable,
         summary: Optional[Callable] = None, devices: bool = True) -> None:
  """The whole command: define(FLAGS); parse; config = build(FLAGS); run(config);
  summary(result) printed on process 0."""
  define(flags.FLAGS)
  if devices:
    define_startup()

  def main_fn():
    if devices:
      startup()
    result = run(build(flags.FLAGS))
    if result is not None and summary is not None and distributed.is_main():
      print(summary(result))

  run_main(main_fn)


def simple(cls, opts: Sequence[options_lib.Opt]):
  """(define, build) of a command whose flags are exactly `opts` of `cls`."""
  return (lambda fv: options_lib.define(cls, opts, fv),
          lambda fv: options_lib.build(cls, opts, fv))
