"""Host memory in transparent huge pages for the commands that run XLA:CPU.

XLA:CPU allocates each compiled program's temporary buffer with ``malloc`` at every execution
(2.1 GiB for the DynaMixer-S train step at batch 8), and glibc serves a block that large with a
fresh ``mmap`` and returns it with ``munmap``: every step page-faults all of it in again, 4 KiB
at a time. On the 2-core CI machine that was 578k page faults and 2.2 s of kernel time per
2.7 s step (``strace`` shows one 2.28 GB ``mmap``/``munmap`` pair per step). glibc's tunable
``glibc.malloc.hugetlb=1`` (glibc 2.35 or newer) asks the kernel for transparent huge pages on
such blocks: 1.4-1.8k faults and 1.2-1.3 s per step. glibc reads its tunables only when a
process starts, so a command restarts itself once with the tunable set; its children inherit it.

Only on Linux with glibc and transparent huge pages in ``madvise`` mode (with ``always`` the
kernel does it already; with ``never`` nothing can). ``DYNAMIXER_HUGE_PAGES=0`` leaves the
process as it is. A notebook cannot restart its kernel: set ``GLIBC_TUNABLES`` before starting
it.
"""

import os
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
OPT_OUT = "DYNAMIXER_HUGE_PAGES"


def thp_mode(path: str = THP_MODE_FILE) -> Optional[str]:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> Optional[tuple[int, int]]:
  """(major, minor) of the C library when it is glibc, else None."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, ValueError, OSError, TypeError):
    return None


def status(env: Mapping[str, str], platform: str, mode: Optional[str],
           glibc: Optional[tuple[int, int]]) -> tuple[bool, str]:
  """(whether restarting with the tunable would help, a line that says why) for these facts."""
  tunables = env.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb=" in tunables:  # the user's own choice stands
    on = "glibc.malloc.hugetlb=0" not in tunables
    return False, f"{'on' if on else 'off'} (GLIBC_TUNABLES={tunables})"
  if env.get(OPT_OUT) == "0":
    return False, f"off ({OPT_OUT}=0)"
  if not platform.startswith("linux") or glibc is None:
    return False, "off (not Linux with glibc)"
  if glibc < (2, 35):
    return False, f"off (glibc {glibc[0]}.{glibc[1]} has no glibc.malloc.hugetlb; 2.35+ does)"
  if mode == "always":
    return False, "on (the kernel's transparent huge pages are 'always')"
  if mode != "madvise":
    return False, f"off (the kernel's transparent huge pages are '{mode or 'unknown'}')"
  return True, f"off: commands restart with GLIBC_TUNABLES={TUNABLE}"


def restart_with_huge_pages() -> None:
  """Replace this process with the same command and ``GLIBC_TUNABLES`` asking for huge pages,
  when ``status`` says that helps; otherwise return. Call it first thing in ``__main__``."""
  helps, _ = status(os.environ, sys.platform, thp_mode(), glibc_version())
  if not helps or not sys.executable or not getattr(sys, "orig_argv", None):
    return
  tunables = os.environ.get("GLIBC_TUNABLES")
  env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
  except OSError:
    return  # keep running as we are: slower on the CPU, nothing else changes
