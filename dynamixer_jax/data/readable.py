"""Image folders with bad files: found at startup when cheap, replaced mid-run when not.

At startup every file gets a cheap check (``looks_complete``: the signature at the start, the end
marker at the end) and only files that fail it are fully decoded; unreadable ones are left out
with one warning. A file that passes but still fails to decode during the run is replaced by the
next readable file of the listing (``skipping_unreadable``), so a bad file never stops training
and a resumed run, which meets the same files, yields the same batches.
"""

import concurrent.futures
import functools
import itertools
import os
import time
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf
from absl import logging

from dynamixer_jax.data import transforms

# The check reads two small pieces of each file: threads overlap the reads of a cold disk.
_CHECK_THREADS = 16


def looks_complete(path: str) -> bool:
  """A known image signature at the start and that format's end marker at the end.

  Reads at most 1 KB at each end, so every file of an ImageNet-size folder can be checked at
  startup, where a full decode would cost over an hour of CPU time: ~80,000 files/s from a warm
  page cache on a 2-core machine (1.28M files in ~16 s); from a cold disk the reads dominate and
  the threads overlap them (not measured). Truncation, the commonest damage, and non-images are
  caught; damage inside the image data is left to the decoder (``skipping_unreadable``).
  """
  try:
    with open(path, "rb") as f:
      head = f.read(16)
      size = f.seek(0, os.SEEK_END)
      f.seek(max(0, size - 1024))
      tail = f.read()
  except OSError:
    return False
  if head.startswith(b"\xff\xd8\xff"):  # JPEG: the EOI marker, maybe followed by zero padding
    return tail.rstrip(b"\0").endswith(b"\xff\xd9")
  if head.startswith(b"\x89PNG\r\n\x1a\n"):  # PNG: the IEND chunk
    return tail.endswith(b"IEND\xaeB`\x82")
  if head[:6] in (b"GIF87a", b"GIF89a"):  # GIF: the trailer byte
    return tail.endswith(b";")
  if head.startswith(b"BM"):  # BMP and WebP: the file size their header declares
    return int.from_bytes(head[2:6], "little") <= size
  if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
    return int.from_bytes(head[4:8], "little") + 8 <= size
  return False


def decodes(path: str) -> bool:
  """The authority: TensorFlow's full decode, as the pipeline runs it."""
  try:
    transforms.decode_image(tf.io.read_file(path))
    return True
  except tf.errors.OpError:
    return False


@functools.lru_cache(maxsize=4)
def readable(paths: tuple[str, ...], where: str) -> np.ndarray:
  """Which files can be read: ``looks_complete``, or, where that says no (data after the end
  marker, a format it does not know), a full decode. Unreadable files are counted in a warning
  that names the first ten.

  Cached per listing: the dataset info, the train and the eval pipelines share one pass.
  """
  start = time.time()
  check = lambda chunk: [looks_complete(p) or decodes(p) for p in chunk]
  chunks = [paths[i:i + 1024] for i in range(0, len(paths), 1024)]
  with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
    ok = np.fromiter(itertools.chain.from_iterable(pool.map(check, chunks)), bool, len(paths))
  logging.info("Checked the %d images of %s in %.1f s.", len(paths), where, time.time() - start)
  bad = [p for p, good in zip(paths, ok) if not good]
  if bad:
    logging.warning("Skipping %d of the %d images of %s: they cannot be read (empty, truncated, "
                    "or not a JPEG/PNG/GIF/BMP/WebP image): %s%s", len(bad), len(paths), where,
                    ", ".join(bad[:10]), ", ..." if len(bad) > 10 else "")
  ok.setflags(write=False)
  return ok


class Replacements:
  """Files of a folder split found unreadable during the run; each is read as the next readable
  file of the listing instead.

  The replacement depends only on which files are unreadable, so a resumed run, which meets the
  same files, yields the same batches.
  """

  def __init__(self, paths: np.ndarray):
    self.paths = paths
    self.bad = np.zeros(len(self.paths), bool)
    self.source = np.arange(len(self.paths), dtype=np.int64)

  def mark_unreadable(self, rows: np.ndarray) -> list[str]:
    """Decode the files read for ``rows``; mark those that fail and return their paths."""
    found = sorted({int(j) for j in self.source[rows] if not decodes(self.paths[j])})
    if found:
      self.bad[found] = True
      good = np.flatnonzero(~self.bad)
      if not good.size:
        raise ValueError("No image of the split can be read; check the folder.")
      self.source = good[np.searchsorted(good, np.arange(len(self.bad))) % good.size]
    return [str(self.paths[j]) for j in found]


def skipping_unreadable(make: Callable[[int, np.ndarray], Iterator],
                         rows_of: Callable[[int], np.ndarray], start: int,
                         paths: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
  """The batches of ``make(batch index, source)`` from ``start`` on. When one fails to load, the
  unreadable files among its rows (``rows_of``) are marked and logged, and the pipeline is built
  again from that batch with replacements for them."""
  replacements, position = Replacements(paths), start
  while True:
    try:
      for batch in make(position, replacements.source):
        yield batch
        position += 1
      return
    except tf.errors.OpError:
      found = replacements.mark_unreadable(rows_of(position))
      if not found:
        raise
      logging.warning("Batch %d: %d image(s) passed the startup check but cannot be decoded: %s. "
                      "Reading the next readable file of the folder in place of each (%d so far).",
                      position, len(found), ", ".join(found), int(replacements.bad.sum()))


