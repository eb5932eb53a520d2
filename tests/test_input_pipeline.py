"""Input pipeline: shapes, determinism, exact resume, per-process sharding, padded eval, errors.

Sources: scikit-learn digits, a generated image folder, mock cifar10/imagenet2012, and a tiny TFDS
set prepared on disk here (the streamed path that ImageNet takes).
"""

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dynamixer_jax import preprocessing
from dynamixer_jax.data import pipeline, sources

# Distinct solid colours: every crop, flip and resize of a solid image keeps its colour, so the
# centre pixel of a batch row names the example it came from. Entries 6 and 21 are grey: the
# folder saves them as grayscale PNGs.
COLORS = [((37 * i) % 256, (91 * i + 50) % 256, (173 * i + 100) % 256) for i in range(60)]
COLORS[6], COLORS[21] = (COLORS[6][0],) * 3, (COLORS[21][0],) * 3
FOLDER_CLASSES = ("ant", "bee", "cat")

# name -> (config overrides, train batch size, a resume step one before the end of epoch 1).
SOURCES = {
    "digits": (dict(name="digits", image_size=16, eval_resize=16, train_crop="resize_pad_crop",
                    pad=2), 128, 21),
    # The random resized crops of 'folder' and 'tfds_files' travel on a canvas for the device to
    # resize (the folder's larger crops are resized on the host); mock_imagenet's are resized on
    # the host.
    "folder": (dict(name="folder", image_size=16, eval_resize=18, device_resize_canvas=20), 4, 7),
    "mock_cifar10": (dict(name="cifar10", mock=True, mock_num_examples=24, image_size=32,
                          eval_resize=32, train_crop="resize_pad_crop"), 8, 5),
    "mock_imagenet": (dict(name="imagenet2012", mock=True, mock_num_examples=16, image_size=24,
                           eval_resize=28, device_resize_canvas=0), 4, 7),
    "tfds_files": (dict(name="pipeline_test_images", eval_split="test", image_size=16,
                        eval_resize=16, shuffle_buffer=16, device_resize_canvas=20), 8, 9),
}


def make_data_config(**overrides):
  data = preprocessing.default_data_config()
  data.update(overrides)
  return data


class PipelineTestImages(tfds.core.GeneratorBasedBuilder):
  """40 train and 11 test solid-colour images of varied sizes, 3 classes, built offline."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(range(40)),
            "test": self._generate_examples(range(40, 51))}

  def _generate_examples(self, ids):
    for i in ids:
      yield i, {"image": np.full((9 + i % 5, 11 + i % 3, 3), COLORS[i], np.uint8), "label": i % 3}


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
  """train/: 6 images a class; val/: 3, 2, 2. Mixed sizes, PNG and JPEG, a grayscale, an RGBA."""
  root = tmp_path_factory.mktemp("images")
  color = iter(COLORS)
  for split, counts in (("train", (6, 6, 6)), ("val", (3, 2, 2))):
    for name, count in zip(FOLDER_CLASSES, counts):
      (root / split / name).mkdir(parents=True)
      for j in range(count):
        rgb, size = next(color), (12 + 5 * j, 20 - 2 * j)
        if name == "bee" and j == 0:
          Image.new("L", size, rgb[0]).save(root / split / name / f"{j}.png")
        elif name == "cat" and j == 0:
          Image.new("RGBA", size, rgb + (90,)).save(root / split / name / f"{j}.png")
        else:
          Image.new("RGB", size, rgb).save(root / split / name / f"{j}.{'jpg' if j % 2 else 'png'}")
  return root


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  PipelineTestImages(data_dir=str(data_dir)).download_and_prepare()
  return str(data_dir)


@pytest.fixture(params=list(SOURCES))
def source(request):
  """(data config, train batch size, resume step) for each kind of source."""
  overrides, batch_size, resume_step = SOURCES[request.param]
  if request.param == "folder":
    overrides = dict(overrides, data_dir=str(request.getfixturevalue("folder_root")))
  if request.param == "tfds_files":
    overrides = dict(overrides, data_dir=request.getfixturevalue("tfds_dir"))
  return make_data_config(**overrides), batch_size, resume_step


def train(data, steps, **kwargs):
  return list(itertools.islice(pipeline.train_batches(data, **kwargs), steps))


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:  # image, label, and a canvas's crop_size and bicubic
      np.testing.assert_array_equal(x[key], y[key])


def identify(images):
  """Index into COLORS of each solid image (the nearest colour: JPEG moves pixels a little), read
  at the top left: a crop on a canvas starts there."""
  corner = images[:, 0, 0].astype(int)
  return [int(np.abs(np.array(COLORS) - c).sum(1).argmin()) for c in corner]


def train_side(data):
  """The side of the train batch's images: the canvas or the train size."""
  return preprocessing.train_canvas(data) or data.image_size


def test_train_batches_shapes_dtypes_and_labels(source):
  data, batch_size, _ = source
  num_classes = sources.dataset_info(data).num_classes
  for batch in train(data, 3, batch_size=batch_size, seed=0):
    side = train_side(data)
    assert batch["image"].shape == (batch_size, side, side, 3)
    assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
    if side != data.image_size:  # the crops' sizes, within the canvas, for the device's resize
      assert batch["crop_size"].shape == (batch_size, 2) and batch["crop_size"].dtype == np.int32
      assert 0 < batch["crop_size"].min() and batch["crop_size"].max() <= side
      assert batch["bicubic"].shape == (batch_size,) and batch["bicubic"].dtype == bool
      for image, (h, w) in zip(batch["image"], batch["crop_size"]):  # padded with zeros
        assert not image[h:].any() and not image[:, w:].any()
    assert batch["label"].shape == (batch_size,)
    assert 0 <= batch["label"].min() and batch["label"].max() < num_classes


def test_train_is_deterministic_per_seed(source):
  data, batch_size, _ = source
  first = train(data, 2, batch_size=batch_size, seed=3)
  assert_same_batches(first, train(data, 2, batch_size=batch_size, seed=3))
  other = train(data, 2, batch_size=batch_size, seed=4)
  assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_resume_continues_the_uninterrupted_stream(source):
  data, batch_size, step = source
  full = train(data, step + 3, batch_size=batch_size, seed=1)
  assert_same_batches(full[step:], train(data, 3, batch_size=batch_size, seed=1, start_step=step))


def test_eval_is_padded_and_counts_each_example_once_across_processes(source):
  data, _, _ = source
  num_eval = sources.dataset_info(data).num_eval_examples

  def kept_rows(**kwargs):
    batches, rows = list(pipeline.eval_batches(data, batch_size=4, **kwargs)), []
    for batch in batches:
      assert batch["image"].shape == (4, data.image_size, data.image_size, 3)
      assert batch["mask"].dtype == bool and batch["label"].dtype == np.int32
      assert not batch["image"][~batch["mask"]].any()  # Padding rows are blank.
      mask = batch["mask"]
      rows += [(im.tobytes(), int(y)) for im, y in zip(batch["image"][mask], batch["label"][mask])]
    return len(batches), rows

  _, single = kept_rows()
  assert len(single) == num_eval
  per_process = [kept_rows(process_index=i, process_count=3) for i in range(3)]
  assert len({num_batches for num_batches, _ in per_process}) == 1  # All take every step.
  assert sorted(sum((rows for _, rows in per_process), [])) == sorted(single)


@pytest.mark.parametrize("source", ["folder", "tfds_files"], indirect=True)  # Solid colours.
def test_processes_read_disjoint_train_examples(source):
  data, batch_size, _ = source
  steps = sources.dataset_info(data).num_train_examples // (2 * batch_size)  # An epoch.
  seen = [sum((identify(b["image"]) for b in train(
      data, steps, batch_size=batch_size, seed=0, process_index=i, process_count=2)), [])
          for i in range(2)]
  assert len(set(seen[0])) == len(seen[0]) == len(seen[1]) == len(set(seen[1]))
  assert not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize("name", ["digits", "folder"])
def test_global_batch_does_not_depend_on_process_count(name, folder_root):
  data = make_data_config(**SOURCES[name][0], data_dir=str(folder_root))
  whole = train(data, 3, batch_size=4, seed=0)
  halves = [train(data, 3, batch_size=2, seed=0, process_index=i, process_count=2)
            for i in range(2)]
  for step, batch in enumerate(whole):
    parts = [half[step]["image"] for half in halves]
    np.testing.assert_array_equal(batch["image"], np.concatenate(parts))


def test_digits_info():
  info = sources.dataset_info(make_data_config(**SOURCES["digits"][0]))
  assert info.num_classes == 10 and info.class_names == tuple("0123456789")
  assert (info.num_train_examples, info.num_eval_examples) == (1437, 360)


def test_folder_info_and_colour_conversion(folder_root):
  data = make_data_config(**SOURCES["folder"][0], data_dir=str(folder_root))
  assert sources.dataset_info(data) == sources.DatasetInfo(3, 18, 7, FOLDER_CLASSES)
  batch = next(pipeline.eval_batches(data, batch_size=8))
  images, labels = batch["image"][:7], batch["label"][:7]
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 2, 2])
  assert identify(images) == list(range(18, 25))  # Each val image keeps its colour,
  assert (images[3] == COLORS[21]).all()  # grayscale is replicated to 3 channels,
  assert (np.abs(images[5].astype(int) - COLORS[23]) <= 1).all()  # and alpha is dropped.


def test_unknown_dataset_lists_the_options():
  with pytest.raises(ValueError, match=r"(?s)cifar11.*'digits', 'folder'.*cifar10"):
    sources.dataset_info(make_data_config(name="cifar11"))


def test_missing_imagenet_explains_the_manual_download(tmp_path):
  data = make_data_config(name="imagenet2012", data_dir=str(tmp_path))
  for call in (lambda: sources.dataset_info(data),
               lambda: pipeline.train_batches(data, batch_size=8, seed=0),
               lambda: pipeline.eval_batches(data, batch_size=8)):
    with pytest.raises(FileNotFoundError) as error:
      call()
    message = str(error.value)
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert f"{tmp_path}/downloads/manual/" in message
    assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message


def test_folder_without_val_is_rejected(tmp_path):
  (tmp_path / "train" / "a").mkdir(parents=True)
  Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "0.png")
  with pytest.raises(ValueError, match="no val/ subfolder"):
    sources.dataset_info(make_data_config(name="folder", data_dir=str(tmp_path)))


def test_empty_class_folder_is_rejected(tmp_path):
  for split in ("train", "val"):
    (tmp_path / split / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / split / "a" / "0.png")
  (tmp_path / "train" / "b").mkdir()
  with pytest.raises(ValueError, match=r"train/b has no images"):
    sources.dataset_info(make_data_config(name="folder", data_dir=str(tmp_path)))


def test_bad_settings_are_rejected():
  digits = make_data_config(**SOURCES["digits"][0])
  with pytest.raises(ValueError, match=r"config.data.eval_resize=8 is invalid: use an integer >= data.image_size=16"):
    sources.dataset_info(make_data_config(**dict(SOURCES["digits"][0], eval_resize=8)))
  with pytest.raises(ValueError, match="train_crop='center'"):
    sources.dataset_info(make_data_config(**dict(SOURCES["digits"][0], train_crop="center")))
  with pytest.raises(ValueError, match="global batch 4096 exceeds the 1437 train examples"):
    pipeline.train_batches(digits, batch_size=2048, seed=0, process_count=2)
  with pytest.raises(ValueError, match="process_index=2"):
    pipeline.eval_batches(digits, batch_size=8, process_index=2, process_count=2)
