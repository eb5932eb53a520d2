"""``python -m dynamixer_jax.benchmark``: one measurement (``timing.py``) or, with ``--suite``,
the one-shot device check (``suite.py``)."""

from typing import Any, Optional

from dynamixer_jax import cli
from dynamixer_jax.benchmark import suite, timing


def main(argv: Optional[list[str]] = None) -> Any:
  args = timing.build_parser().parse_args(argv)
  return suite.main(args) if args.suite else timing.run(args)


if __name__ == "__main__":
  cli.run(main, timing.PROG)
