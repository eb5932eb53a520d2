"""Bad data in an image folder: odd colour modes load as RGB, unreadable files are skipped and
counted, a file that only the decoder finds broken is replaced without breaking exact resume."""

import io
import itertools
import logging

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dynamixer_jax import preprocessing
from dynamixer_jax.data import pipeline, sources

SIZE = (16, 16)


def folder_config(root, **overrides):
  data = preprocessing.default_data_config()
  data.update(dict(name="folder", data_dir=str(root), image_size=16, eval_resize=16,
                   train_crop="resize_pad_crop", pad=0), **overrides)
  return data


def solid(root, split, label, name, rgb=(90, 140, 40)):
  """A solid RGB PNG; solid colours survive every crop and resize, so a pixel names its file."""
  (root / split / label).mkdir(parents=True, exist_ok=True)
  Image.new("RGB", SIZE, rgb).save(root / split / label / name)
  return root / split / label / name


def encoded(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt)
  return buf.getvalue()


def fails_only_in_the_decoder() -> bytes:
  """A PNG whose signature and IEND are intact but whose image data is damaged (bad CRC)."""
  data = bytearray(encoded(Image.new("RGB", SIZE, (10, 200, 30)), "PNG"))
  data[data.index(b"IDAT") + 6] ^= 0xFF
  return bytes(data)


def test_every_colour_mode_loads_as_uint8_rgb(tmp_path):
  palette = Image.new("P", SIZE, 0)
  palette.putpalette([200, 30, 70])
  cmyk = encoded(Image.new("CMYK", SIZE, (30, 100, 200, 10)), "JPEG")
  # name -> (file bytes, the RGB it must load as, tolerance)
  cases = {
      "gray.jpg": (encoded(Image.new("L", SIZE, 77), "JPEG"), (77, 77, 77), 1),
      "gray_alpha.png": (encoded(Image.new("LA", SIZE, (150, 20)), "PNG"), (150,) * 3, 0),
      "bilevel.png": (encoded(Image.new("1", SIZE, 1), "PNG"), (255, 255, 255), 0),
      "palette.png": (encoded(palette, "PNG"), (200, 30, 70), 0),
      "palette.gif": (encoded(palette, "GIF"), (200, 30, 70), 0),
      "rgba.png": (encoded(Image.new("RGBA", SIZE, (9, 99, 199, 40)), "PNG"), (9, 99, 199), 0),
      "cmyk.jpg": (cmyk, np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"))[0, 0], 3),
      "gray16.png": (encoded(Image.fromarray(np.full(SIZE, 0x8040, np.uint16)), "PNG"),
                     (128, 128, 128), 1),
      "rgb16.png": (tf.io.encode_png(np.full(SIZE + (3,), (0x1000, 0x8080, 0xF0F0),
                                             np.uint16)).numpy(), (16, 128, 240), 1),
      "rgb.bmp": (encoded(Image.new("RGB", SIZE, (5, 6, 7)), "BMP"), (5, 6, 7), 0),
  }
  for name, (data, _, _) in cases.items():
    for split in ("train", "val"):
      (tmp_path / split / "a").mkdir(parents=True, exist_ok=True)
      (tmp_path / split / "a" / name).write_bytes(data)
  data = folder_config(tmp_path)
  assert sources.dataset_info(data).num_eval_examples == len(cases)  # none skipped
  batch = next(pipeline.eval_batches(data, batch_size=len(cases)))
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (len(cases), 16, 16, 3)
  for image, (name, (_, rgb, tolerance)) in zip(batch["image"], sorted(cases.items())):
    np.testing.assert_allclose(image.astype(int), np.broadcast_to(rgb, image.shape),
                               atol=tolerance, err_msg=name)


def test_unreadable_files_are_skipped_and_counted(tmp_path, caplog):
  for split, count in (("train", 8), ("val", 2)):
    for label in ("a", "b"):
      for i in range(count):
        solid(tmp_path, split, label, f"{i}.png")
  jpeg = encoded(Image.new("RGB", SIZE, (1, 2, 3)), "JPEG")
  png = (tmp_path / "train" / "a" / "0.png").read_bytes()
  bad = {"empty.jpg": b"", "truncated.jpg": jpeg[:len(jpeg) // 2],
         "truncated.png": png[:len(png) // 2], "text.jpg": b"not an image\n" * 9,
         "tiff.png": encoded(Image.new("RGB", SIZE), "TIFF")}
  for name, data in bad.items():
    (tmp_path / "train" / "b" / name).write_bytes(data)
  (tmp_path / "val" / "a" / "empty.png").write_bytes(b"")
  # Data after the JPEG end marker fails the quick check, but decodes: it is kept.
  (tmp_path / "train" / "a" / "trailing.jpg").write_bytes(jpeg + b"\0\1trailer")
  data = folder_config(tmp_path)
  with caplog.at_level(logging.WARNING):
    info = sources.dataset_info(data)
  assert (info.num_train_examples, info.num_eval_examples) == (17, 4)
  assert f"Skipping 5 of the 22 images of {tmp_path}/train" in caplog.text
  assert all(f"train/b/{name}" in caplog.text for name in bad)
  assert f"Skipping 1 of the 5 images of {tmp_path}/val" in caplog.text
  for batch in itertools.islice(pipeline.train_batches(data, batch_size=4, seed=0), 12):
    assert batch["image"].shape == (4, 16, 16, 3)
  masks = [b["mask"] for b in pipeline.eval_batches(data, batch_size=4)]
  assert np.concatenate(masks).sum() == 4


def test_a_class_with_only_unreadable_images_is_refused(tmp_path):
  for split in ("train", "val"):
    solid(tmp_path, split, "a", "0.png")
  (tmp_path / "train" / "b").mkdir()
  (tmp_path / "train" / "b" / "0.jpg").write_bytes(b"")
  with pytest.raises(ValueError, match=r"train/b has no readable images"):
    sources.dataset_info(folder_config(tmp_path))


def test_a_file_only_the_decoder_rejects_is_replaced_and_resume_stays_exact(tmp_path, caplog):
  colours = iter([(15 * i, 255 - 15 * i, 7 * i) for i in range(16)])
  for split, count in (("train", 6), ("val", 2)):
    for label in ("a", "b"):
      for i in range(count):
        solid(tmp_path, split, label, f"{i}.png", next(colours))
  for split in ("train", "val"):
    (tmp_path / split / "a" / "1.png").write_bytes(fails_only_in_the_decoder())
  data = folder_config(tmp_path)
  info = sources.dataset_info(data)  # The startup check cannot see this damage:
  assert (info.num_train_examples, info.num_eval_examples) == (12, 4)
  with caplog.at_level(logging.WARNING):
    run = list(itertools.islice(pipeline.train_batches(data, batch_size=4, seed=0), 9))
  assert "cannot be decoded" in caplog.text and "train/a/1.png" in caplog.text
  # Each epoch meets the file; a run resumed after it met it once yields the same batches.
  resumed = itertools.islice(pipeline.train_batches(data, batch_size=4, seed=0,
                                                          start_step=4), 5)
  for want, got in zip(run[4:], resumed, strict=True):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])
  # The replacement is the next file of the folder, a/2.png, with its label.
  first_epoch = np.concatenate([b["image"][:, 0, 0] for b in run[:3]])
  a2 = np.array(Image.open(tmp_path / "train" / "a" / "2.png"))[0, 0]
  assert (first_epoch == a2).all(axis=1).sum() == 2
  with caplog.at_level(logging.WARNING):
    batches = list(pipeline.eval_batches(data, batch_size=4))
  assert "val/a/1.png" in caplog.text
  assert [b["mask"].tolist() for b in batches] == [[True, False, True, True]]
