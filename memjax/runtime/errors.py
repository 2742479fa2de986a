"""User-facing errors.

Every error a user can cause (a missing file, a malformed row, a model folder that
does not match its config) is raised as a `MemjaxError` with a message that names
the file and the key or row. Entry points print the message and exit with status 2
instead of showing a traceback.
"""


class MemjaxError(Exception):
  """An error caused by the user's input; its message is the whole report."""


class ConfigError(MemjaxError):
  """A model config (config.json) that memjax cannot build a module from."""


class CheckpointError(MemjaxError):
  """Weights that do not match the module the config describes."""


class InputError(MemjaxError):
  """A prompt table, image folder or flag value that cannot be used."""
