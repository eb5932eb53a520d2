"""The host pipeline: a dataset -> host-local numpy batches of uint8 images and int32 labels.

``train_batches`` is endless and resumable: batch ``start_step`` onwards equals what an
uninterrupted run yields from that step on, because every random choice is stateless, keyed by
(seed, epoch, example index). ``eval_batches`` is one padded pass that counts every example once
across processes. Normalisation and batch-level augmentation happen later, on the device.
"""

import dataclasses
import functools
import itertools
import math
from typing import Iterator, Optional

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dynamixer_jax import preprocessing
from dynamixer_jax.data import readable, sources, transforms

Batch = dict[str, np.ndarray]
PREFETCH_BATCHES = 2  # batches ready ahead of the training step

# The functions mapped below branch with tf.cond, never with Python control flow on tensors, so
# AutoGraph's source rewrite (0.2-0.4 s per pipeline on a 2-core EPYC) would change nothing.
_no_autograph = tf.autograph.experimental.do_not_convert


def _options() -> tf.data.Options:
  """Deterministic order (the resume guarantee rests on it); one thread per op, many ops at once.

  Fixed parallelism instead of tf.data's autotuning: its tuning thread sleeps up to a minute
  between rounds and a pipeline's teardown waits for it to wake (gdb: ``Model::OptimizeLoop``),
  which held the end of a 2-minute run 41-49 s and would hold a preempted job's exit as long.
  On 2 cores the fixed settings read as fast (digits 2,664 vs 2,637 img/s autotuned, 224 px
  JPEG crops 684 vs 640; ``input_tools throughput``).
  """
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  return options


def _parallel_map(ds: tf.data.Dataset, fn) -> tf.data.Dataset:
  """``fn`` on every element, one call in flight per host core, in order (see ``_options``)."""
  return ds.map(_no_autograph(fn), num_parallel_calls=preprocessing.host_cores(),
                deterministic=True)


def _batched(ds: tf.data.Dataset, batch_size: int, canvas: int = 0) -> Iterator[Batch]:
  """Batches of ``batch_size``; with a ``canvas``, every image is padded to (canvas, canvas)
  as the batch is assembled (``padded_batch``: about 1.4x faster than padding each image)."""
  if canvas:
    shapes = {k: [canvas, canvas, 3] if k == "image" else spec.shape
              for k, spec in ds.element_spec.items()}
    ds = ds.padded_batch(batch_size, padded_shapes=shapes, drop_remainder=True)
  else:
    ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(PREFETCH_BATCHES).with_options(_options()).as_numpy_iterator()


def example_key(seed: int, epoch, index) -> tf.Tensor:
  """The stateless seed of one example's augmentation in one epoch."""
  key = tf.constant([seed, 0], tf.int64)
  key = tf.random.experimental.stateless_fold_in(key, tf.cast(epoch, tf.int64))
  return tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int64))


def _check_batching(batch_size: int, process_index: int, process_count: int,
                    start_step: int = 0) -> None:
  if batch_size < 1 or start_step < 0 or not 0 <= process_index < process_count:
    raise ValueError(f"Need batch_size >= 1, start_step >= 0 and 0 <= process_index < "
                     f"process_count; got {batch_size=}, {start_step=}, {process_index=}, "
                     f"{process_count=}.")


# --- Training ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _EpochOrder:
  """Which examples each step takes: one permutation of the split per epoch; step s takes its
  global batch from perm[s*G:(s+1)*G] and process i its i-th slice of it, so the global batch
  does not depend on the number of processes."""
  num_examples: int
  batch_size: int  # per process
  process_index: int
  process_count: int
  seed: int

  @property
  def global_batch(self) -> int:
    return self.batch_size * self.process_count

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.global_batch

  def indices(self, epoch) -> tf.Tensor:
    """This process's example indices of ``epoch``, in the order it reads them."""
    key = tf.random.experimental.stateless_fold_in(tf.constant([self.seed, 1], tf.int64), epoch)
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(self.num_examples, dtype=tf.int64), seed=key)
    perm = tf.reshape(perm[:self.steps_per_epoch * self.global_batch],
                      [self.steps_per_epoch, self.process_count, self.batch_size])
    return tf.reshape(perm[:, self.process_index], [-1])

  def epoch_dataset(self, epoch) -> tf.data.Dataset:
    """(epoch, index) pairs of one epoch."""
    indices = self.indices(epoch)
    return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(indices), epoch), indices))

  def rows_of_step(self, step: int) -> np.ndarray:
    epoch, offset = divmod(step, self.steps_per_epoch)
    rows = self.indices(tf.constant(epoch, tf.int64)).numpy()
    return rows[offset * self.batch_size:(offset + 1) * self.batch_size]


def train_batches(data: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """Endless per-process train batches {'image': uint8 (B, S, S, 3), 'label': int32 (B,)}.

  With ``data.device_resize_canvas`` C (and random resized crops) the images are the crops
  instead, at the top left of uint8 (B, C, C, 3), with 'crop_size' int32 (B, 2) and 'bicubic'
  bool (B,), for the device to resize (``augment.resize``).

  Batch ``start_step`` onwards equals what an uninterrupted run yields from that step on.
  """
  sources.check(data)
  _check_batching(batch_size, process_index, process_count, start_step)
  examples = sources.in_memory(data, train=True)
  if examples is None:
    return _streamed_train(data, batch_size, seed, start_step, process_index, process_count)
  order = _EpochOrder(len(examples.labels), batch_size, process_index, process_count, seed)
  if order.steps_per_epoch == 0:
    raise ValueError(f"The global batch {order.global_batch} exceeds the {order.num_examples} "
                     "train examples; use a smaller batch.")
  make = functools.partial(_in_memory_train, data, examples, order)
  if examples.kind != "paths":
    return make(start_step)
  return readable.skipping_unreadable(make, order.rows_of_step, start_step, examples.images)


def _in_memory_train(data: ml_collections.ConfigDict, examples: sources.Examples,
                     order: _EpochOrder, start_step: int,
                     source: Optional[np.ndarray] = None) -> Iterator[Batch]:
  """Train batches from ``start_step`` on; ``source`` replaces unreadable files (readable.py)."""
  load = examples.loader(source)

  def example(epoch, index):
    image, label, _ = load(index)
    return {**transforms.preprocess_train(image, example_key(order.seed, epoch, index), data,
                                          encoded=examples.encoded), "label": label}

  start_epoch, skip = divmod(start_step, order.steps_per_epoch)
  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(_no_autograph(order.epoch_dataset))
  ds = ds.skip(skip * order.batch_size)
  ds = _parallel_map(ds, example)
  return _batched(ds, order.batch_size, preprocessing.train_canvas(data))


def _streamed_train(data, batch_size, seed, start_step, process_index,
                    process_count) -> Iterator[Batch]:
  """Train batches streamed from TFDS files (checked now, read lazily): one pipeline per epoch,
  its file order and shuffle seeded by (seed, epoch, process)."""
  builder = sources.tfds_builder(data)
  split = tfds.even_splits(data.train_split, n=process_count, drop_remainder=True)[process_index]
  num = sources.split_size(builder, split)
  steps_per_epoch = num // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {num} train examples of process "
                     f"{process_index}; use a smaller batch.")

  def example(epoch, index, ex):
    key = example_key(seed, epoch, process_index * num + index)  # Unique over processes too.
    return {**transforms.preprocess_train(ex["image"], key, data, encoded=True),
            "label": tf.cast(ex["label"], tf.int32)}

  def epoch_batches(epoch: int, skip: int) -> Iterator[Batch]:
    epoch_seed = int(np.random.SeedSequence([seed, epoch, process_index]).generate_state(1)[0])
    ds = builder.as_dataset(
        split=split, shuffle_files=True, decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=epoch_seed, options=_options()))
    ds = ds.shuffle(data.shuffle_buffer, seed=epoch_seed).take(steps_per_epoch * batch_size)
    ds = ds.enumerate().skip(skip * batch_size)  # Skip before decoding: resuming is cheap.
    ds = _parallel_map(ds, functools.partial(example, epoch))
    return _batched(ds, batch_size, preprocessing.train_canvas(data))

  start_epoch, skip = divmod(start_step, steps_per_epoch)
  return itertools.chain(epoch_batches(start_epoch, skip), itertools.chain.from_iterable(
      epoch_batches(epoch, 0) for epoch in itertools.count(start_epoch + 1)))


# --- Evaluation ----------------------------------------------------------------------------------


def eval_batches(data: ml_collections.ConfigDict, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """One pass over the eval split, each example counted once across processes via 'mask'.

  Every batch has ``batch_size`` rows and every process yields the same number of batches
  (padding rows, and whole padding batches, have mask False), as multi-host steps need. Images
  get the eval preprocessing of ``data`` (``preprocessing.EvalPreprocessing.from_data``).
  """
  sources.check(data)
  _check_batching(batch_size, process_index, process_count)
  prep = preprocessing.EvalPreprocessing.from_data(data)
  examples = sources.in_memory(data, train=False)
  if examples is None:
    return _streamed_eval(data, prep, batch_size, process_index, process_count)
  shards = np.array_split(np.arange(len(examples.labels), dtype=np.int64), process_count)
  shard = shards[process_index]
  num_rows = math.ceil(max(map(len, shards)) / batch_size) * batch_size

  def from_batch(batch, source=None):
    rows = shard[batch * batch_size:]
    return _padded_eval(tf.data.Dataset.from_tensor_slices(rows), examples.loader(source),
                        examples.encoded, prep, len(rows), num_rows - batch * batch_size,
                        batch_size)

  if examples.kind != "paths":
    return from_batch(0)
  rows_of = lambda batch: shard[batch * batch_size:(batch + 1) * batch_size]
  return readable.skipping_unreadable(from_batch, rows_of, 0, examples.images)


def _streamed_eval(data, prep, batch_size, process_index, process_count) -> Iterator[Batch]:
  builder = sources.tfds_builder(data)
  splits = tfds.even_splits(data.eval_split, n=process_count, drop_remainder=False)
  sizes = [sources.split_size(builder, s) for s in splits]
  ds = builder.as_dataset(split=splits[process_index], shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(options=_options()))
  read = lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32), tf.constant(True))
  num_rows = math.ceil(max(sizes) / batch_size) * batch_size
  return _padded_eval(ds, read, True, prep, sizes[process_index], num_rows, batch_size)


def _padded_eval(ds: tf.data.Dataset, read, encoded: bool,
                 prep: preprocessing.EvalPreprocessing, num_examples: int, num_rows: int,
                 batch_size: int) -> Iterator[Batch]:
  """``num_examples`` preprocessed examples, then blank masked rows up to ``num_rows``."""
  def example(item):
    image, label, is_itself = read(item)  # an unreadable file's replacement row is masked out
    return {"image": transforms.preprocess_eval(image, prep, encoded=encoded), "label": label,
            "mask": is_itself}

  size = prep.image_size
  ds = _parallel_map(ds, example)
  padding = {"image": tf.zeros([size, size, 3], tf.uint8), "label": tf.constant(0, tf.int32),
             "mask": tf.constant(False)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_rows - num_examples))
  return _batched(ds, batch_size)
