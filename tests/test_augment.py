"""Augmentation: RandAugment ops against PIL, crop and erasing statistics, mixup/cutmix targets,
mesh independence, determinism. Small images only: the whole file runs in well under a minute."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image, ImageEnhance, ImageOps

from dynamixer_jax import preprocessing
from dynamixer_jax.augment import mixing
from dynamixer_jax.data import pipeline, sources, transforms
from dynamixer_jax.data import tf_randaugment as augment
from dynamixer_jax.train import configlib

# Identity at magnitude 0 in timm too; the rest change the image whatever the magnitude
# (PosterizeIncreasing keeps 4 bits at magnitude 0).
IDENTITY_AT_ZERO = {"Rotate", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                    "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX",
                    "ShearY", "TranslateXRel", "TranslateYRel"}
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def smooth_image(height=32, width=40, seed=0):
  """A smooth colour image in 20..224 (no saturated pixels, varied histogram)."""
  base = np.random.default_rng(seed).integers(0, 256, (6, 8, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC))
  return (image * 0.8 + 20).astype(np.uint8)


def pil_reference(name, image, magnitude, sign):
  """timm 0.4.12's op as PIL computes it, from the documented magnitude ranges."""
  pil, level, fill = Image.fromarray(image), magnitude / 10, augment.FILL
  factor = 1 + sign * level * 0.9
  affine = lambda m: pil.transform(pil.size, Image.AFFINE, m, resample=Image.BILINEAR,
                                   fillcolor=fill)
  w, h = pil.size
  out = {
      "AutoContrast": lambda: ImageOps.autocontrast(pil),
      "Equalize": lambda: ImageOps.equalize(pil),
      "Invert": lambda: ImageOps.invert(pil),
      "Rotate": lambda: pil.rotate(sign * level * 30, resample=Image.BILINEAR, fillcolor=fill),
      "PosterizeIncreasing": lambda: ImageOps.posterize(pil, 4 - int(level * 4)),
      "SolarizeIncreasing": lambda: ImageOps.solarize(pil, 256 - int(level * 256)),
      "SolarizeAdd": lambda: Image.fromarray(np.where(
          image < 128, np.minimum(image.astype(int) + int(level * 110), 255), image
      ).astype(np.uint8)),
      "ColorIncreasing": lambda: ImageEnhance.Color(pil).enhance(factor),
      "ContrastIncreasing": lambda: ImageEnhance.Contrast(pil).enhance(factor),
      "BrightnessIncreasing": lambda: ImageEnhance.Brightness(pil).enhance(factor),
      "SharpnessIncreasing": lambda: ImageEnhance.Sharpness(pil).enhance(factor),
      "ShearX": lambda: affine((1, sign * level * 0.3, 0, 0, 1, 0)),
      "ShearY": lambda: affine((1, 0, 0, sign * level * 0.3, 1, 0)),
      "TranslateXRel": lambda: affine((1, 0, sign * level * 0.45 * w, 0, 1, 0)),
      "TranslateYRel": lambda: affine((1, 0, 0, 0, 1, sign * level * 0.45 * h)),
  }[name]()
  return np.asarray(out).astype(int)


def ours(name, image, magnitude, sign):
  return augment.apply_op(name, tf.constant(image), tf.constant(float(magnitude)),
                          tf.constant(float(sign))).numpy().astype(int)


def test_policy_string_is_parsed_as_timm_does():
  assert augment.parse_policy("") is None
  policy = augment.parse_policy("rand-m9-mstd0.5-inc1")
  assert (policy.num_ops, policy.magnitude, policy.magnitude_std, policy.prob) == (2, 9, 0.5, 0.5)
  assert augment.parse_policy("rand-n3-m7-inc1").num_ops == 3
  with pytest.raises(ValueError, match="cannot read 'x9'"):
    augment.parse_policy("rand-x9-inc1")
  with pytest.raises(ValueError, match="only RandAugment"):
    augment.parse_policy("augmix-m5")
  assert len(augment.OPS) == 15


@pytest.mark.parametrize("name", augment.OPS)
def test_op_at_magnitude_zero_is_identity_where_timms_is(name):
  image = smooth_image()
  out = ours(name, image, 0, 1)
  assert np.array_equal(out, image) == (name in IDENTITY_AT_ZERO)
  np.testing.assert_array_equal(out, pil_reference(name, image, 0, 1))


@pytest.mark.parametrize("name", augment.OPS)
def test_op_at_magnitude_nine_matches_pil(name):
  image = smooth_image()
  for sign in (1, -1):
    out, ref = ours(name, image, 9, sign), pil_reference(name, image, 9, sign)
    assert not np.array_equal(out, image)
    diff = np.abs(out - ref)
    if name in GEOMETRIC:
      # Same transform; PIL cuts bilinear sampling hard at the border, tf blends with the fill.
      assert diff.mean() < 1.5 and np.mean(diff > 2) < 0.06, (diff.mean(), np.mean(diff > 2))
    else:
      assert diff.max() <= 1, diff.max()


def test_magnitude_noise_has_the_policy_std():
  policy = augment.parse_policy("rand-m9-mstd0.5-inc1")
  keys = tf.random.experimental.stateless_split(tf.constant([0, 7], tf.int64), 4000)
  mags = tf.vectorized_map(lambda k: augment.draw_magnitude(k, policy), keys).numpy()
  assert mags.min() >= 0 and mags.max() <= 10
  expected = np.clip(9 + 0.5 * np.random.default_rng(0).standard_normal(1_000_000), 0, 10)
  assert abs(mags.mean() - expected.mean()) < 0.03
  assert abs(mags.std() - expected.std()) < 0.03  # 0.5 before the clip at 10
  assert abs(np.mean(mags == 10) - np.mean(expected == 10)) < 0.01


def test_rand_augment_is_a_function_of_the_key():
  image, policy = tf.constant(smooth_image()), augment.parse_policy("rand-m9-mstd0.5-inc1")
  key = tf.constant([3, 4], tf.int64)
  first = augment.rand_augment(image, key, policy).numpy()
  np.testing.assert_array_equal(first, augment.rand_augment(image, key, policy).numpy())
  outs = [augment.rand_augment(image, tf.constant([3, k], tf.int64), policy).numpy()
          for k in range(12)]
  unchanged = sum(np.array_equal(o, smooth_image()) for o in outs)
  assert 0 < unchanged < 8  # Both ops skipped with probability 1/4.


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


def test_device_augmentation_is_the_same_on_1_and_8_devices():
  assert jax.device_count() >= 8
  images = jax.random.normal(jax.random.PRNGKey(5), (32, 16, 16, 3))
  labels = jnp.arange(32) % 10
  cfg = aug_config(chunk_size=8, erase_prob=0.5)
  fn = lambda k, x, y: mixing.augment_batch(k, x, y, 10, 0.1, cfg)
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), P("data"))
    x, y = jax.device_put(images, sharding), jax.device_put(labels, sharding)
    results.append(jax.device_get(jax.jit(fn)(jax.random.PRNGKey(3), x, y)))
  np.testing.assert_array_equal(results[0][0], results[1][0])  # images: bit for bit
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)  # targets: fusion order
  assert not np.array_equal(results[0][0], np.asarray(images))


def test_chunk_size_that_does_not_divide_the_batch_is_refused():
  images, labels = labelled_batch(12)
  with pytest.raises(ValueError, match="augment.chunk_size=8"):
    mixing.mix_batch(jax.random.PRNGKey(0), images, labels, 10, 0.1, aug_config(chunk_size=8))


def _data(**overrides):
  data = preprocessing.default_data_config()
  data.update(dict(name="imagenet2012", mock=True, mock_num_examples=16, image_size=32,
                   eval_resize=36, randaugment="rand-m9-mstd0.5-inc1",
                   train_interpolation="random"))
  data.update(overrides)
  return data


def test_same_seed_epoch_and_index_give_the_same_image():
  data = _data()
  image = tf.constant(smooth_image(48, 64))
  make = lambda seed, epoch, index: transforms.preprocess_train(
      image, pipeline.example_key(seed, epoch, index), data).numpy()
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
  with pytest.raises(ValueError, match="data.randaugment"):
    sources.dataset_info(_data(randaugment="rand-m9"))
  with pytest.raises(ValueError, match="data.train_interpolation"):
    sources.dataset_info(_data(train_interpolation="lanczos"))
  with pytest.raises(ValueError, match="data.eval_crop"):
    sources.dataset_info(_data(eval_crop="middle"))
  config = configlib.base_config()
  config.augment.erase_mode = "noise"
  with pytest.raises(ValueError, match="augment.erase_mode"):
    configlib.validate(config)


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
