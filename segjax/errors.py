"""The errors segjax reports to users, and the one line that names a failure's cause.

Entry points (`segjax.cli.run`) print `describe(error)` on one line before the traceback and
exit non-zero; see `segjax/cli.py` for the exit codes.
"""

from __future__ import annotations

import re


class ConfigError(ValueError):
  """A config value that cannot work: the message names the key. Reported without a
  traceback."""


class DataError(RuntimeError):
  """The input pipeline failed on an example: the message names the file where it is known."""


class Terminated(BaseException):
  """SIGTERM stopped the process (a preempted VM, `kill`). A BaseException, as
  KeyboardInterrupt, so that no `except Exception` swallows it."""


# A Python exception raised inside a tf.numpy_function, as TensorFlow quotes it.
_PY_FUNC_ERROR = re.compile(r"(?:^|\s)(\w+(?:Error|Exception)): (.+?)(?:\nTraceback|$)", re.S)
# TensorFlow's decoration around an op's own message.
_TF_PREFIX = re.compile(r"^\{\{function_node [^}]*\}\}\s*")
_TF_NODE = re.compile(r"\s*\[\[\{\{node [^}]*\}\}\]\].*$", re.S)
_TF_MAP_CONTEXT = re.compile(r"Error in user-defined function passed to .*?: ", re.S)


def tf_error_message(message: str) -> str:
  """The informative part of a TensorFlow op error's message: the message of a Python error
  raised in a `tf.numpy_function`, otherwise the op's own message without TF's framing."""
  if match := _PY_FUNC_ERROR.search(message):
    return match.group(2).strip()
  message = _TF_NODE.sub("", _TF_PREFIX.sub("", message))
  message = _TF_MAP_CONTEXT.sub("", message)
  return message.replace("Iterator::", "").strip().split("\n")[0]


def describe(error: BaseException) -> str:
  """One line naming the cause of `error`, for the line printed before the traceback."""
  if isinstance(error, Terminated):
    return f"terminated: {error}"
  if isinstance(error, KeyboardInterrupt):
    return "interrupted (Ctrl-C)"
  message = str(error).strip().split("\n")[0] or repr(error)
  if isinstance(error, DataError):
    return message
  if isinstance(error, ConfigError):
    return f"config: {message}"
  return f"{type(error).__name__}: {message}"
