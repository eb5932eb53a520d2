"""One run per workdir: a second ``train.py`` in a workdir that is in use stops at once.

Process 0 holds ``<workdir>/run.lock`` for the whole run. Where the file system supports it
(local disks, most network file systems) it is an OS lock (``flock``), which the kernel releases
when the process dies, even by SIGKILL: a dead run never blocks a restart. Where it does not, the
file is a lease: host, pid, start time and a heartbeat that a background thread renews; a lease
whose heartbeat is older than ``stale_after_s`` (or whose process is gone, on the same host) is
taken over. Either way the file names the holder, for the message the second run prints.
"""

import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any, Optional

from absl import logging

FILENAME = "run.lock"
MODE_ENV = "DYNAMIXER_WORKDIR_LOCK"  # 'auto' (default), 'flock' or 'lease' (tests force 'lease')
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirInUse(RuntimeError):
  """Another run holds this workdir."""


def _holder_text(holder: dict[str, Any], path: str) -> str:
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
  return (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}, running since "
          f"{since} ({path})")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """Context manager: holds the workdir on process 0 (a no-op on the other processes)."""

  def __init__(self, workdir: str, process_index: int = 0, heartbeat_s: float = 10.0,
               stale_after_s: float = 60.0, mode: Optional[str] = None):
    self.path = os.path.join(os.path.abspath(workdir), FILENAME)
    self.process_index = process_index
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self.mode = mode or os.environ.get(MODE_ENV, "auto")
    self._fd: Optional[int] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self.held_as: Optional[str] = None  # 'flock' or 'lease' once held

  def _record(self) -> dict[str, Any]:
    return dict(host=socket.gethostname(), pid=os.getpid(), started=time.time(),
                heartbeat=time.time())

  def __enter__(self) -> "WorkdirLock":
    if self.process_index != 0:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    if self.mode in ("auto", "flock") and self._try_flock():
      return self
    self._take_lease()
    return self

  def __exit__(self, *exc) -> None:
    if self.held_as == "flock":
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
    elif self.held_as == "lease":
      self._stop.set()
      self._thread.join(timeout=5)
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
    self.held_as = None

  # ---------------------------------------------------------------------- the OS lock

  def _try_flock(self) -> bool:
    """True if held; raises WorkdirInUse if another process holds it; False if unsupported."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._read(fd)
      os.close(fd)
      raise WorkdirInUse(self._in_use_message(holder, "it holds the workdir's lock; if that run "
                                              "is alive, wait for it or stop it")) from None
    except OSError as e:
      os.close(fd)
      if e.errno in _NO_FLOCK and self.mode == "auto":
        logging.info("%s: no OS lock on this file system (%s); using a lease file.",
                     self.path, e)
        return False
      raise
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(dict(self._record(), kind="flock")).encode())
    os.fsync(fd)
    self._fd, self.held_as = fd, "flock"
    return True

  # ---------------------------------------------------------------------- the lease

  def _take_lease(self) -> None:
    holder = self._read_path()
    if holder is not None and not self._stale(holder):
      raise WorkdirInUse(self._in_use_message(
          holder, f"its lease was renewed {time.time() - holder.get('heartbeat', 0):.0f} s ago; "
          f"a lease older than {self.stale_after_s:.0f} s is taken over"))
    if holder is not None:
      logging.warning("Taking over the stale lease of %s.", _holder_text(holder, self.path))
      os.remove(self.path)
    try:  # O_EXCL: of two runs starting together, one creates the lease, the other is refused
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      raise WorkdirInUse(self._in_use_message(self._read_path() or {}, "it started at the same "
                                              "time as this one")) from None
    record = dict(self._record(), kind="lease")
    with os.fdopen(fd, "w") as f:
      json.dump(record, f)
    self.held_as = "lease"
    self._thread = threading.Thread(target=self._renew, args=(record,), daemon=True,
                                    name="workdir-lease")
    self._thread.start()

  def _renew(self, record: dict[str, Any]) -> None:
    while not self._stop.wait(self.heartbeat_s):
      record["heartbeat"] = time.time()
      tmp = f"{self.path}.{os.getpid()}.tmp"
      with open(tmp, "w") as f:
        json.dump(record, f)
      os.replace(tmp, self.path)

  def _stale(self, holder: dict[str, Any]) -> bool:
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
      return True  # its process is gone
    return time.time() - holder.get("heartbeat", 0) > self.stale_after_s

  # ---------------------------------------------------------------------- reading

  @staticmethod
  def _read(fd: int) -> dict[str, Any]:
    try:
      os.lseek(fd, 0, os.SEEK_SET)
      return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
      return {}

  def _read_path(self) -> Optional[dict[str, Any]]:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable: treated as stale (heartbeat 0)

  def _in_use_message(self, holder: dict[str, Any], why: str) -> str:
    workdir = os.path.dirname(self.path)
    return (f"The workdir {workdir} is in use by another run: {_holder_text(holder, self.path)}; "
            f"{why}. Use another --workdir for a second run. If that run is dead and this "
            f"persists, delete {self.path}.")
