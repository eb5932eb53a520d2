"""What every command shares: one flag style, and user errors as one message without a traceback.

Flags are spelled with underscores (``--top_k``, as absl spells ``train.py``'s); the dashed
spelling (``--top-k``) is accepted too. A mistake the user can fix (a missing file, a bad value,
weights that do not fit) ends the command with its message on stderr and exit status 1;
``DYNAMIXER_TRACEBACK=1`` shows the traceback instead.
"""

import argparse
import os
import sys
from typing import Any, Callable, Optional, Sequence

# The errors our code raises for bad input: each message already names the value and the fix.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError, FloatingPointError, ImportError)


def parser(module: str, description: str, examples: Sequence[str]) -> argparse.ArgumentParser:
  """An argparse parser named by its ``python -m`` form, with examples under --help."""
  return argparse.ArgumentParser(
      prog=f"python -m dynamixer_jax.{module}", description=description,
      epilog="Examples:\n" + "\n".join(f"  {e}" for e in examples),
      formatter_class=argparse.RawDescriptionHelpFormatter)


def add(parser_: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
  """``--name`` with underscores, and its dashed alias when the two differ."""
  flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
  parser_.add_argument(*flags, **kwargs)


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
  return value


def report_user_error(prog: str, error: BaseException) -> None:
  print(f"{prog}: {error}\n(DYNAMIXER_TRACEBACK=1 shows the traceback.)", file=sys.stderr)


def run(main: Callable[[Optional[list[str]]], Any], prog: str,
        argv: Optional[list[str]] = None) -> Any:
  """``main(argv)``; a user error or Ctrl-C becomes one message and exit status 1 or 130."""
  try:
    return main(argv)
  except KeyboardInterrupt:
    print(f"\n{prog}: interrupted.", file=sys.stderr)
    sys.exit(130)
  except USER_ERRORS as e:
    if os.environ.get("DYNAMIXER_TRACEBACK"):
      raise
    report_user_error(prog, e)
    sys.exit(1)
