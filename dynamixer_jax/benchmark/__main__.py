"""``python -m dynamixer_jax.benchmark``: see ``timing.py``."""

from dynamixer_jax import cli
from dynamixer_jax.benchmark import timing

if __name__ == "__main__":
  cli.run(timing.main, timing.PROG)
