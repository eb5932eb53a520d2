"""Augmentation: the host crop (window from the JPEG header, decode-and-crop), the eval geometry
of torchvision, crop and erasing statistics, mixup/cutmix targets, and the device augmentation
the same on any mesh and in either batching. The RandAugment ops themselves: test_randaugment.py.
Small images only."""

import functools
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image
from sklearn.datasets import load_sample_image

from dynamixer_jax import preprocessing
from dynamixer_jax.augment import device, mixing, resize
from dynamixer_jax.data import pipeline, sources, transforms
from dynamixer_jax.train import configlib


def smooth_image(height=32, width=40, seed=0):
  """A smooth colour image in 20..224 (no saturated pixels, varied histogram)."""
  base = np.random.default_rng(seed).integers(0, 256, (6, 8, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC))
  return (image * 0.8 + 20).astype(np.uint8)


def _timm_rrc_areas(height, width, draws, rng):
  """timm's RandomResizedCrop.get_params, written out for the statistics."""
  areas, ratios = [], []
  for _ in range(draws):
    for _ in range(10):
      area = height * width * rng.uniform(0.08, 1.0)
      ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
      w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
      if 0 < w <= width and 0 < h <= height:
        break
    else:
      h, w = height, width
    areas.append(h * w / (height * width))
    ratios.append(w / h)
  return np.array(areas), np.array(ratios)


def test_random_resized_crop_boxes_stay_inside_with_timms_distribution():
  height, width = 60, 90
  keys = tf.random.experimental.stateless_split(tf.constant([1, 2], tf.int64), 3000)
  boxes = tf.vectorized_map(
      lambda k: tf.stack(transforms.random_resized_crop_box(k, height, width)), keys).numpy()
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  areas, ratios = h * w / (height * width), w / h
  ref_areas, ref_ratios = _timm_rrc_areas(height, width, 20_000, np.random.default_rng(0))
  for q in (0.1, 0.5, 0.9):
    assert abs(np.quantile(areas, q) - np.quantile(ref_areas, q)) < 0.04
    assert abs(np.quantile(np.log(ratios), q) - np.quantile(np.log(ref_ratios), q)) < 0.04
  assert np.quantile(np.log(ratios), 0.02) > math.log(3 / 4) - 0.1
  # Positions spread over the whole valid range.
  assert (top == 0).any() and (top + h == height).any()


def test_random_erasing_area_and_probability():
  n, size = 2000, 32
  images = jnp.full((n, size, size, 3), 7.0)
  out, mask = jax.jit(lambda k, x: mixing.random_erase(k, x, 0.25, "pixel"))(
      jax.random.PRNGKey(0), images)
  out, mask = np.asarray(out), np.asarray(mask)
  erased = mask.any(axis=(1, 2))
  assert abs(erased.mean() - 0.25) < 0.03
  fraction = mask[erased].mean(axis=(1, 2))
  assert fraction.min() > 0.015 and fraction.max() < 0.36
  assert abs(fraction.mean() - (0.02 + 1 / 3) / 2) < 0.03  # area uniform in (0.02, 1/3)
  np.testing.assert_array_equal(out[~mask], 7.0)  # Outside the box: untouched.
  noise = out[mask]
  assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02  # Per-pixel N(0, 1).
  # Boxes are axis-aligned rectangles.
  for m in mask[erased][:50]:
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    assert m.sum() == len(rows) * len(cols)


def aug_config(**overrides):
  cfg = configlib.base_config().augment
  cfg.update(overrides)
  return cfg


def labelled_batch(n, size=16):
  """Example i is the solid image of value i, label i % 10."""
  images = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None],
                            (n, size, size, 3))
  return images, jnp.arange(n) % 10


def test_cutmix_targets_sum_to_one_and_equal_the_pasted_area():
  n, chunk = 16, 8
  images, labels = labelled_batch(n)
  cfg = aug_config(mixup_alpha=0.0, chunk_size=chunk)
  mix = jax.jit(lambda k: mixing.mix_batch(k, images, labels, 10, 0.0, cfg))
  for seed in range(6):
    mixed, targets, lam = mix(jax.random.PRNGKey(seed))
    mixed, targets, lam = map(np.asarray, (mixed, targets, lam))
    np.testing.assert_allclose(targets.sum(-1), 1, atol=1e-6)
    for i in range(n):
      c, j = i // chunk, chunk * (i // chunk) + chunk - 1 - i % chunk  # Partner: flipped in the chunk.
      own = np.mean(mixed[i, ..., 0] == i)
      np.testing.assert_allclose(own, lam[c], atol=1e-6)  # lambda = the area actually kept
      np.testing.assert_allclose(targets[i, labels[i]], lam[c] + (labels[j] == labels[i]) *
                                 (1 - lam[c]), atol=1e-6)


def test_mixup_blends_with_the_flipped_chunk_and_folds_in_smoothing():
  n, chunk = 8, 4
  images, labels = labelled_batch(n)
  cfg = aug_config(cutmix_alpha=0.0, chunk_size=chunk)
  mixed, targets, lam = map(np.asarray, mixing.mix_batch(
      jax.random.PRNGKey(1), images, labels, 10, 0.1, cfg))
  for i in range(n):
    c, j = i // chunk, chunk * (i // chunk) + chunk - 1 - i % chunk
    np.testing.assert_allclose(mixed[i], lam[c] * i + (1 - lam[c]) * j, rtol=1e-5)
    off, on = 0.1 / 10, 0.9 + 0.1 / 10
    y = lambda k: np.where(np.arange(10) == labels[k], on, off)
    np.testing.assert_allclose(targets[i], lam[c] * y(i) + (1 - lam[c]) * y(j), rtol=1e-5)
  assert len(set(lam.round(6))) == n // chunk  # One lambda per chunk.


def test_switch_between_mixup_and_cutmix_and_off_means_smoothed_one_hot():
  images, labels = labelled_batch(64)
  mixed = np.asarray(mixing.mix_batch(jax.random.PRNGKey(0), images, labels, 10, 0.1,
                                      aug_config(chunk_size=1 * 2))[0])
  chunks = mixed.reshape(32, 2, -1)
  is_cut = [np.isin(np.unique(c), np.arange(64)).all() for c in chunks]
  assert 5 < sum(is_cut) < 27  # Switch probability 0.5 over 32 chunks.
  off = aug_config(mixup_alpha=0.0, cutmix_alpha=0.0)
  same, targets, _ = mixing.mix_batch(jax.random.PRNGKey(0), images, labels, 10, 0.1, off)
  np.testing.assert_array_equal(same, images)
  np.testing.assert_allclose(targets, jax.nn.one_hot(labels, 10) * 0.9 + 0.01, rtol=1e-6)


def _device_config(**augment):
  config = configlib.base_config()
  config.augment.update(dict(chunk_size=8, erase_prob=0.5, **augment))
  return config


@functools.cache
def _augment_on(num_devices: int, batching: str):
  """The crops' resize from a canvas, flip, RandAugment, mixup/cutmix and erasing of one global
  batch of photo crops."""
  photo = np.asarray(Image.fromarray(load_sample_image("china.jpg")).resize((64, 48)))
  canvases, sizes = np.zeros((16, 64, 64, 3), np.uint8), []
  for i, canvas in enumerate(canvases):
    h, w = 24 + 2 * i % 24, 20 + 2 * i  # shrunk, kept and enlarged to 32
    canvas[:h, :w] = np.roll(photo, 3 * i, axis=1)[:h, :w]
    sizes.append((h, w))
  batch = {"image": canvases, "crop_size": np.array(sizes, np.int32),
           "bicubic": np.arange(16) % 3 == 0, "label": np.arange(16) % 10}
  config = _device_config(randaugment="rand-m9-mstd0.5-inc1", randaugment_batching=batching)
  mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))
  batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  fn = jax.jit(lambda k, b: device.augment_batch(
      k, device.train_size_images(b, 32), b["label"], 10, config, mesh))
  key = jax.random.PRNGKey(3)
  # XLA's default optimisation level, what users run: the suite compiles at -O0 (conftest.py),
  # where 0.4 % of the values differ between the two meshes.
  compiled = fn.lower(key, batch).compile(compiler_options={"xla_backend_optimization_level": 3})
  return jax.device_get(compiled(key, batch))


@pytest.mark.slow  # 15-30 s of compiles from a cold cache on 2 cores
def test_device_augmentation_is_the_same_on_1_and_8_devices():
  """Bit for bit the same on one device and sharded over 8 (each device RandAugments its own
  rows with shard_map). 'map', the CPU's batching; 'vmap' gives the same batch on 8 devices
  (the next test), so it is the same on 1 too."""
  assert jax.device_count() >= 8
  one, eight = _augment_on(1, "map"), _augment_on(8, "map")
  np.testing.assert_array_equal(one[0], eight[0])  # images: bit for bit
  np.testing.assert_allclose(one[1], eight[1], rtol=1e-6)  # targets: fusion order


# 15-20 s of compiles (cold cache, 2 cores): the full suite only; the inner loop keeps
# test_randaugment.py's map-against-vmap check of RandAugment itself.
@pytest.mark.slow
def test_map_and_vmap_batching_give_the_same_batch():
  np.testing.assert_array_equal(_augment_on(8, "map")[0], _augment_on(8, "vmap")[0])


def test_flip_is_per_image_and_keyed_by_position():
  photo = np.asarray(Image.fromarray(load_sample_image("flower.jpg")).resize((40, 32)))
  images = jnp.asarray(np.stack([photo] * 64))
  keys = device.example_keys(jax.random.PRNGKey(0), 64)
  flipped = np.asarray(device.flip(keys, images))
  is_flipped = [np.array_equal(f, photo[:, ::-1]) for f in flipped]
  assert all(is_flipped[i] or np.array_equal(flipped[i], photo) for i in range(64))
  assert 16 < sum(is_flipped) < 48  # p = 0.5
  np.testing.assert_array_equal(flipped, np.asarray(device.flip(keys, images)))


def test_chunk_size_that_does_not_divide_the_batch_is_refused():
  images, labels = labelled_batch(12)
  with pytest.raises(ValueError, match="augment.chunk_size=8"):
    mixing.mix_batch(jax.random.PRNGKey(0), images, labels, 10, 0.1, aug_config(chunk_size=8))


def _data(**overrides):
  data = preprocessing.default_data_config()
  data.update(dict(name="imagenet2012", mock=True, mock_num_examples=16, image_size=32,
                   eval_resize=36, train_interpolation="random", device_resize_canvas=0))
  data.update(overrides)
  return data


def test_same_seed_epoch_and_index_give_the_same_image():
  data = _data()
  image = tf.constant(smooth_image(48, 64))
  make = lambda seed, epoch, index: transforms.preprocess_train(
      image, pipeline.example_key(seed, epoch, index), data)["image"].numpy()
  first = make(0, 1, 5)
  assert first.shape == (32, 32, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, make(0, 1, 5))
  for other in ((1, 1, 5), (0, 2, 5), (0, 1, 6)):
    assert not np.array_equal(first, make(*other))
  batches = [next(pipeline.train_batches(data, batch_size=8, seed=2)) for _ in range(2)]
  np.testing.assert_array_equal(batches[0]["image"], batches[1]["image"])


def test_eval_resize_mode_squashes_without_cropping():
  image = tf.constant(smooth_image(20, 40))
  geometry = lambda data: preprocessing.EvalPreprocessing.from_data(data)
  out = transforms.preprocess_eval(image, geometry(_data(eval_crop="resize"))).numpy()
  expected = tf.image.resize(image, [32, 32], "bicubic", antialias=True)
  np.testing.assert_array_equal(out, np.clip(np.round(expected.numpy()), 0, 255))
  center = transforms.preprocess_eval(image, geometry(_data())).numpy()
  assert center.shape == (32, 32, 3) and not np.array_equal(out, center)


def test_bad_augmentation_settings_are_refused_with_the_field_name():
  config = configlib.base_config()
  config.augment.randaugment = "rand-m9"
  with pytest.raises(ValueError, match="config.augment.randaugment='rand-m9'"):
    configlib.validate(config)
  with pytest.raises(ValueError, match="data.train_interpolation"):
    sources.dataset_info(_data(train_interpolation="lanczos"))
  with pytest.raises(ValueError, match="data.eval_crop"):
    sources.dataset_info(_data(eval_crop="middle"))
  config = configlib.base_config()
  config.augment.erase_mode = "noise"
  with pytest.raises(ValueError, match="augment.erase_mode"):
    configlib.validate(config)


@pytest.mark.slow  # 15-35 s of compiles from a cold cache on 2 cores
def test_train_step_with_the_official_augmentation_gives_finite_loss():
  from dynamixer_jax.train import optim, steps  # pylint: disable=g-import-not-at-top
  config = configlib.base_config()
  config.model = dict(name="dynamixer_s", drop_path_rate=0.0, image_size=16, patch_size=4,
                      entries=((1, 16, 2, 2, 2.0, True),))
  config.dtype, config.data.image_size, config.batch_size = "float32", 16, 8
  config.augment.chunk_size = 4
  config.num_epochs, config.schedule.warmup_epochs = 2, 1
  configlib.validate(config)
  model = steps.build_model(config, num_classes=10)
  tx, schedule = optim.create_optimizer(config, 1)
  state = steps.create_train_state(model, tx, 16, jax.random.PRNGKey(0), use_ema=False)
  step = jax.jit(steps.make_train_step(model, tx, schedule, config, 10))
  batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3)),
                                jnp.uint8), "label": jnp.arange(8) % 10}
  for _ in range(2):
    state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 2
  config.augment.chunk_size = 3
  with pytest.raises(ValueError, match="augment.chunk_size"):
    configlib.validate(config)


@pytest.mark.parametrize("bicubic", [False, True])
def test_the_devices_resize_of_a_crop_on_a_canvas_is_the_hosts_resize(bicubic):
  """augment.resize: TensorFlow's antialiased resize, computed from the traced crop size on a
  zero-padded canvas; shrinking, enlarging, non-square, and the train size itself (exactly)."""
  photo = load_sample_image("china.jpg")
  photo = np.concatenate([photo, photo[::-1]])[:512]  # 512 x 640: crops up to the canvas
  sizes = [(224, 224), (100, 150), (427, 512), (300, 61), (47, 333), (512, 400)]
  canvases = np.zeros((len(sizes), 512, 512, 3), np.uint8)
  for canvas, (h, w) in zip(canvases, sizes):
    canvas[:h, :w] = photo[:h, :w]
  out = np.asarray(jax.jit(lambda x, s, c: resize.resize_crops(x, s, c, 224))(
      canvases, np.array(sizes, np.int32), np.full(len(sizes), bicubic)))
  method = "bicubic" if bicubic else "bilinear"
  for got, (h, w) in zip(out, sizes):
    host = transforms.resize(tf.constant(photo[:h, :w]), 224, 224, method).numpy()
    differ = np.abs(got.astype(int) - host.astype(int))
    assert differ.max() <= 1 and (differ > 0).mean() < 1e-3, ((h, w), differ.max())
  np.testing.assert_array_equal(out[0], photo[:224, :224])  # a crop at the train size: unchanged


def test_canvas_batches_resized_on_the_device_equal_the_host_resized_batches(tmp_path):
  """The same crops and interpolations either way, with data.device_resize_canvas: crops that fit
  the canvas are resized on the device, larger ones on the host; within 1 level of the
  host-resized batch of the same seed, on ImageNet-sized JPEGs."""
  from dynamixer_jax import input_tools  # pylint: disable=g-import-not-at-top
  root = input_tools.jpeg_folder(str(tmp_path / "jpegs"), 16)
  data = _data(name="folder", data_dir=root, mock=False, device_resize_canvas=400)
  on_canvas = next(pipeline.train_batches(data, batch_size=16, seed=1))
  on_host = next(pipeline.train_batches(_data(name="folder", data_dir=root, mock=False),
                                        batch_size=16, seed=1))
  assert on_canvas["image"].shape == (16, 400, 400, 3)
  np.testing.assert_array_equal(on_canvas["label"], on_host["label"])
  resized_here = (on_canvas["crop_size"] == 32).all(axis=1)  # crops larger than the canvas
  assert 0 < resized_here.sum() < 16 and 0 < on_canvas["bicubic"].sum() < 16
  images = np.asarray(jax.jit(lambda b: device.train_size_images(b, 32))(on_canvas))
  differ = np.abs(images.astype(int) - on_host["image"].astype(int))
  assert differ.max() <= 1 and (differ > 0).mean() < 0.01, differ.max()
  np.testing.assert_array_equal(images[resized_here], on_host["image"][resized_here])


def test_a_bad_device_resize_canvas_is_refused_with_the_field_name():
  with pytest.raises(ValueError, match=r"data.device_resize_canvas=100 is invalid: use 0 .* >= "
                                       r"data.image_size=224"):
    sources.dataset_info(_data(image_size=224, eval_resize=248, device_resize_canvas=100))


def _jpeg(width, height, quality=90, subsampling=2, photo="china.jpg"):
  """A photo as a JPEG at ImageNet-like settings (4:2:0 chroma by default)."""
  image = Image.fromarray(load_sample_image(photo)).resize((width, height), Image.BICUBIC)
  buf = io.BytesIO()
  image.save(buf, "JPEG", quality=quality, subsampling=subsampling)
  return buf.getvalue(), np.asarray(image)


@pytest.mark.parametrize("size,subsampling", [((640, 427), 2), ((375, 500), 2), ((501, 333), 1),
                                              ((500, 375), 0)])
def test_the_crop_decoded_from_the_header_is_the_crop_of_the_decoded_image(size, subsampling):
  """The window is sampled from the header's size (no decode) with the sampler and keys of the
  decoded image, and decode-and-crop gives PIL's pixels of it exactly (4:2:0 chroma included)."""
  encoded, _ = _jpeg(*size, subsampling=subsampling)
  decoded = tf.constant(np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB")))
  crop = tf.function(lambda b, k: transforms._crop_window(b, k, True))  # pylint: disable=protected-access
  for seed in range(25):
    key = tf.constant([seed, 5], tf.int64)
    top, left, h, w = (int(v) for v in transforms.random_resized_crop_box(
        key, decoded.shape[0], decoded.shape[1]))
    np.testing.assert_array_equal(crop(tf.constant(encoded), key).numpy(),
                                  decoded.numpy()[top:top + h, left:left + w], err_msg=str(seed))


@pytest.mark.parametrize("quality,subsampling", [(90, 2), (95, 0), (75, 1)])
def test_jpegs_decode_to_pils_pixels(quality, subsampling):
  """What timm and torchvision see: PIL's decode (libjpeg's accurate DCT), pixel for pixel."""
  for photo in ("china.jpg", "flower.jpg"):
    encoded, _ = _jpeg(320, 214, quality, subsampling, photo)
    pil = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    np.testing.assert_array_equal(transforms.decode_image(tf.constant(encoded)).numpy(), pil)


def test_other_formats_are_decoded_whole_then_cropped_alike():
  _, pixels = _jpeg(120, 90)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "PNG")
  key = tf.constant([1, 2], tf.int64)
  from_png = transforms._crop_window(tf.constant(buf.getvalue()), key, True)  # pylint: disable=protected-access
  from_pixels = transforms._crop_window(tf.constant(pixels), key, False)  # pylint: disable=protected-access
  np.testing.assert_array_equal(from_png.numpy(), from_pixels.numpy())


@pytest.mark.parametrize("width,height", [(500, 375), (640, 480), (375, 500), (800, 600),
                                          (501, 333)])
def test_eval_geometry_is_torchvisions(width, height):
  """Resize(248) truncates the long side, CenterCrop(224) rounds the offset half to even."""
  prep = preprocessing.EvalPreprocessing(image_size=224, resize=248)
  short, long = min(width, height), max(width, height)
  new_long = int(248 * long / short)  # torchvision's _compute_resized_output_size
  new_w, new_h = (248, new_long) if width <= height else (new_long, 248)
  want = (new_h, new_w, int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0)))
  got = tuple(int(v) for v in transforms.eval_geometry(height, width, prep))
  assert got == want
  # With that geometry only the resampler differs from PIL's (antialiased bicubic both).
  _, pixels = _jpeg(width, height, photo="flower.jpg")
  ours = transforms.preprocess_eval(tf.constant(pixels), prep).numpy().astype(float)
  top, left = want[2], want[3]
  pil = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.BICUBIC))
  reference = pil[top:top + 224, left:left + 224].astype(float)
  assert np.abs(ours - reference).mean() < 0.5, np.abs(ours - reference).mean()


@pytest.mark.slow
def test_input_tools_throughput_and_grid_run(tmp_path):
  """The README's input_tools commands, small: the JPEG folder, the figures, the grid."""
  import subprocess, sys, os  # pylint: disable=g-import-not-at-top,multiple-imports
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  from conftest import FAST_COMPILE  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS="cpu")  # no step is timed here
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "dynamixer_jax.input_tools", *args], cwd=root, env=env,
      capture_output=True, text=True, timeout=300)
  timed = run("throughput", "--config=configs/dynamixer_s.py", "--jpegs=24", "--batch_size=8",
              "--batches=2", f"--jpeg_dir={tmp_path / 'jpegs'}")
  assert timed.returncode == 0, timed.stderr[-3000:]
  assert "images/s per host core" in timed.stdout and "host cores needed" in timed.stdout
  assert len(os.listdir(tmp_path / "jpegs" / "train" / "class_0")) == 12
  grid = run("grid", "--config=configs/dynamixer_s.py", "--photos",
             "--config.data.image_size=64", "--rows=1", f"--out={tmp_path / 'grid.png'}")
  assert grid.returncode == 0, grid.stderr[-3000:]
  assert Image.open(tmp_path / "grid.png").size[1] == 64
