"""TensorBoard event files of a resumed run: the steps after the checkpoint are logged once.

A run that stops (or is killed) after its last checkpoint has already written the scalars of the
steps it will redo. Before the resumed run writes anything, ``purge_after`` rewrites the event
files of the workdir without the events past the restored step (as TensorBoard's purge_step
would), so every curve has one point per step.
"""

import glob
import os

import tensorflow as tf
from absl import logging
from tensorboard.compat.proto import event_pb2


def purge_after(workdir: str, step: int) -> int:
  """Drop the events of steps > ``step`` from the event files in ``workdir``; how many."""
  dropped = 0
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    kept = [r for r in records if not _after(r, step)]
    if len(kept) == len(records):
      continue
    tmp = f"{path}.purging"
    with tf.io.TFRecordWriter(tmp) as writer:
      for record in kept:
        writer.write(record)
    os.replace(tmp, path)
    dropped += len(records) - len(kept)
  if dropped:
    logging.info("TensorBoard: dropped %d logged values of the steps after %d (they are redone).",
                 dropped, step)
  return dropped


def _after(record: bytes, step: int) -> bool:
  event = event_pb2.Event.FromString(record)
  return event.HasField("summary") and event.step > step
