"""``python -m dynamixer_jax.benchmark``: one measurement (``timing.py``) or, with ``--suite``,
the one-shot device check (``suite.py``)."""

from typing import Any, Optional

from dynamixer_jax import cli, hugepages


def main(argv: Optional[list[str]] = None) -> Any:
  from dynamixer_jax.benchmark import suite, timing  # pylint: disable=g-import-not-at-top  (jax)
  args = timing.build_parser().parse_args(argv)
  return suite.main(args) if args.suite else timing.run(args)


if __name__ == "__main__":
  hugepages.restart_with_huge_pages()  # before jax starts: see hugepages.py
  cli.run(main, "python -m dynamixer_jax.benchmark")
