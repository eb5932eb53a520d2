"""Commands restart once with glibc asking for transparent huge pages, exactly when that helps
(dynamixer_jax/hugepages.py: XLA:CPU's per-step temporary buffers page-fault in 4 KiB pages)."""

import os
import subprocess
import sys

import pytest

from dynamixer_jax import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX, GLIBC = "linux", (2, 36)


@pytest.mark.parametrize("env, platform, mode, glibc, helps, says", [
    ({}, LINUX, "madvise", GLIBC, True, "restart with GLIBC_TUNABLES=glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, LINUX, "madvise", GLIBC, False, "on ("),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, LINUX, "madvise", GLIBC, False, "off ("),
    ({"DYNAMIXER_HUGE_PAGES": "0"}, LINUX, "madvise", GLIBC, False, "DYNAMIXER_HUGE_PAGES=0"),
    ({}, "darwin", "madvise", None, False, "not Linux with glibc"),
    ({}, LINUX, "madvise", None, False, "not Linux with glibc"),
    ({}, LINUX, "madvise", (2, 31), False, "glibc 2.31 has no glibc.malloc.hugetlb"),
    ({}, LINUX, "always", GLIBC, False, "on (the kernel's transparent huge pages are 'always')"),
    ({}, LINUX, "never", GLIBC, False, "off (the kernel's transparent huge pages are 'never')"),
    ({}, LINUX, None, GLIBC, False, "are 'unknown'"),
])
def test_status_restarts_only_where_the_tunable_is_missing_and_would_take_effect(
    env, platform, mode, glibc, helps, says):
  got_helps, line = hugepages.status(env, platform, mode, glibc)
  assert got_helps is helps
  assert says in line


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert hugepages.thp_mode(str(path)) == "always"
  assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def test_a_command_restarts_itself_with_the_tunable_and_keeps_the_users_own():
  """A child process that calls restart_with_huge_pages prints what its restarted self sees."""
  code = ("import os, sys; from dynamixer_jax import hugepages; "
          "hugepages.restart_with_huge_pages(); "
          "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DYNAMIXER_HUGE_PAGES")}
  env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=8"  # a setting of the user's own
  helps, _ = hugepages.status({}, sys.platform, hugepages.thp_mode(), hugepages.glibc_version())
  proc = subprocess.Popen([sys.executable, "-c", code, "--an", "argument"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  pid, tunables, argv = out.split(" ", 2)
  assert int(pid) == proc.pid  # exec, not a child: signals and timeouts reach the same process
  assert argv.strip() == "['--an', 'argument']"
  if helps:
    assert tunables == "glibc.malloc.arena_max=8:glibc.malloc.hugetlb=1"
  else:  # this machine cannot use it: the command runs on unchanged
    assert tunables == "glibc.malloc.arena_max=8"

  env["DYNAMIXER_HUGE_PAGES"] = "0"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120, check=True).stdout
  assert out.split(" ")[1] == "glibc.malloc.arena_max=8"


@pytest.mark.parametrize("path", ["train.py", "dynamixer_jax/benchmark/__main__.py",
                                  "dynamixer_jax/evaluate.py", "dynamixer_jax/predict.py",
                                  "dynamixer_jax/doctor.py", "dynamixer_jax/input_tools.py"])
def test_every_command_that_runs_a_model_restarts_before_anything_else(path):
  with open(os.path.join(ROOT, path)) as f:
    main_block = f.read().rpartition('if __name__ == "__main__":')[2]
  assert main_block.splitlines()[1].strip().startswith("hugepages.restart_with_huge_pages()")
