"""Device RandAugment (pure JAX): every op against Pillow as timm 0.4.12 calls it, on a real photo;
PIL's warp rules (resampler, hard fill edge); the random draws; map and vmap batching bit for bit.

``pytest -s`` prints the measured differences from PIL; ``python tests/test_randaugment.py``
times the two batchings on CPU (not part of the test run).
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from sklearn.datasets import load_sample_image

from dynamixer_jax.augment import randaugment as dra

FILL = dra.fill_from_mean((0.485, 0.456, 0.406))  # timm's img_mean for ImageNet
MAGNITUDES = (0, 5, 9, 10)
# Identity at magnitude 0 in timm too; the rest change the image whatever the magnitude
# (PosterizeIncreasing keeps 4 bits at magnitude 0).
IDENTITY_AT_ZERO = {"Rotate", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                    "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX",
                    "ShearY", "TranslateXRel", "TranslateYRel"}
# Colour and lookup ops: PIL's result bit for bit (integer LUTs; the blends with PIL's float32
# factor, product and sum). The affine ops: within one level (float32 where PIL has double).
EXACT = set(dra.OPS) - set(dra.GEOMETRIC)

# One compiled program each for all the cases (index, magnitude, sign, resampler are traced).
apply_op = jax.jit(dra.apply_op)


@functools.lru_cache(maxsize=None)
def photo() -> np.ndarray:
  """scikit-learn's china.jpg (427x640), downscaled by PIL to 96x144 to keep the test fast."""
  return np.asarray(Image.fromarray(load_sample_image("china.jpg")).resize((144, 96),
                                                                           Image.BICUBIC))


def smooth_image(height=24, width=32, seed=0) -> np.ndarray:
  """A smooth colour image in 20..224 (no saturated pixels, varied histogram)."""
  base = np.random.default_rng(seed).integers(0, 256, (6, 8, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC))
  return (image * 0.8 + 20).astype(np.uint8)


def pil_reference(name, image, magnitude, sign, bicubic=False, fill=FILL) -> np.ndarray:
  """timm 0.4.12's op as Pillow computes it (timm's level_to_arg, then its PIL call)."""
  pil, level = Image.fromarray(image), magnitude / 10
  resample = Image.BICUBIC if bicubic else Image.BILINEAR
  factor = 1 + sign * level * 0.9
  affine = lambda m: pil.transform(pil.size, Image.AFFINE, m, resample=resample, fillcolor=fill)
  w, h = pil.size
  bits = 4 - int(level * 4)
  if name == "PosterizeIncreasing" and bits == 0:
    # Written out: 0 bits (magnitude 10) gave black with the Pillow of 2021 (mask ~(2**8 - 1) =
    # ~255 keeps nothing), which timm 0.4.12 ran on; Pillow >= 10 refuses bits=0.
    return np.zeros(image.shape, int)
  out = {
      "AutoContrast": lambda: ImageOps.autocontrast(pil),
      "Equalize": lambda: ImageOps.equalize(pil),
      "Invert": lambda: ImageOps.invert(pil),
      "Rotate": lambda: pil.rotate(sign * level * 30, resample=resample, fillcolor=fill),
      "PosterizeIncreasing": lambda: ImageOps.posterize(pil, bits),
      "SolarizeIncreasing": lambda: ImageOps.solarize(pil, 256 - int(level * 256)),
      "SolarizeAdd": lambda: pil.point(  # timm's solarize_add: a LUT, threshold 128
          [min(255, i + int(level * 110)) if i < 128 else i for i in range(256)] * 3),
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


def ours(name, image, magnitude, sign, bicubic=False, fill=FILL) -> np.ndarray:
  out = apply_op(dra.OPS.index(name), image, float(magnitude), float(sign), bicubic,
                 np.asarray(fill, np.uint8))
  return np.asarray(out).astype(int)


def test_policy_names_and_fill():
  assert dra.parse_policy("") is None
  policy = dra.parse_policy("rand-m9-mstd0.5-inc1")
  assert policy == dra.RandAugmentPolicy(num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5)
  assert dra.parse_policy("rand-n3-m7-inc1").num_ops == 3
  assert dra.parse_policy("rand-inc1").magnitude == 10  # timm's default magnitude
  for bad, message in (("rand-x9-inc1", "cannot read 'x9'"), ("augmix-m5", "only RandAugment"),
                       ("rand-m9", "inc1")):
    with pytest.raises(ValueError, match=message) as error:
      dra.parse_policy(bad)
    assert "config.augment.randaugment" in str(error.value)
  assert len(dra.OPS) == 15 and dra.OPS[0] == "AutoContrast" and dra.OPS[-1] == "TranslateYRel"
  assert set(dra.GEOMETRIC) == {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
  assert FILL == (124, 116, 104)


@pytest.mark.parametrize("name", dra.OPS)
def test_op_matches_pil_on_a_photo(name):
  image = photo()
  resamplers = (False, True) if name in dra.GEOMETRIC else (False,)
  for bicubic in resamplers:
    for magnitude in MAGNITUDES:
      for sign in (1, -1):
        out = ours(name, image, magnitude, sign, bicubic)
        diff = np.abs(out - pil_reference(name, image, magnitude, sign, bicubic))
        off, far = np.mean(diff > 0), np.mean(diff > 1)
        print(f"{name:21s} {'bicubic ' if bicubic else 'bilinear' if resamplers[1:] else '':8s} "
              f"m={magnitude:2d} sign={sign:+d}: max {diff.max()}, >0 {off:.3%}, >1 {far:.3%}, "
              f"mean {diff.mean():.4f}")
        if magnitude == 0 and name in IDENTITY_AT_ZERO:
          np.testing.assert_array_equal(out, image)
        if name in EXACT:
          assert diff.max() == 0
        else:
          # float32 coordinates where PIL has double: values one level off where the real value
          # is (nearly) an integer and the two truncate on either side (most at magnitudes 5
          # and 10, where translations are simple fractions of a pixel), more only where a
          # coordinate is within float32 error of the fill edge (not seen here).
          assert far <= 0.001 and off < 0.1 and diff.mean() < 0.1, (far, off, diff.mean())


@pytest.mark.parametrize("name", dra.OPS)
def test_op_at_magnitude_zero_is_identity_where_timms_is(name):
  image = smooth_image()  # 20..224: AutoContrast and Equalize do change it
  for bicubic in (False, True):
    out = ours(name, image, 0, -1, bicubic)
    assert np.array_equal(out, image) == (name in IDENTITY_AT_ZERO)
    np.testing.assert_array_equal(out, pil_reference(name, image, 0, -1, bicubic))


def test_enhance_factor_is_pils_float32_factor():
  """PIL blends with float(1 + sign * level * 0.9) computed in double; the same float32 here for
  any magnitude (a float32 1 - 0.9 would be 8 ulp off at magnitude 10 and move many pixels)."""
  rng = np.random.default_rng(0)
  mags = np.concatenate([np.arange(0, 10.01, 0.25), rng.uniform(0, 10, 5000),
                         9 + 0.5 * rng.standard_normal(5000), [1e-30, 1e-6]])
  mags = np.clip(mags, 0, 10).astype(np.float32)
  enhance = jax.jit(jax.vmap(dra._enhance, (0, None)))  # pylint: disable=protected-access
  for sign in (1.0, -1.0):
    ours_f = np.asarray(enhance(mags, sign))
    pil_f = np.array([np.float32(1 + sign * (float(m) / 10 * 0.9)) for m in mags])
    np.testing.assert_array_equal(ours_f, pil_f)


def test_autocontrast_keeps_pils_double_rounding():
  """PIL computes int(i * scale - lo * scale) in double, which misses an exact 255 (or another
  exact integer) from below for some (lo, hi): e.g. lo=0, hi=25 maps 25 to 254."""
  table = dra._AUTOCONTRAST_EXCEPTIONS  # pylint: disable=protected-access
  assert len(table) == 12094 and (np.diff(table) > 0).all()
  picks = np.random.default_rng(0).choice(table, 30, replace=False)
  ranges = [(0, 25)] + [(int(c) >> 16, (int(c) >> 8) & 255) for c in picks]
  contrast = jax.jit(dra.auto_contrast)
  for k in range(0, len(ranges), 3):  # three channels, each with its own (lo, hi), all values
    lohi = (ranges[k:k + 3] * 3)[:3]
    image = np.stack([np.resize(np.arange(lo, hi + 1), 256) for lo, hi in lohi], -1)
    image = image.reshape(16, 16, 3).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(contrast(image)),
                                  np.asarray(ImageOps.autocontrast(Image.fromarray(image))))
  ramp = np.stack([np.arange(26)] * 3, -1).reshape(2, 13, 3).astype(np.uint8)
  assert np.asarray(contrast(ramp)).max() == 254  # PIL's value; exact arithmetic says 255


def test_bilinear_and_bicubic_differ_and_each_matches_its_pil_resampler():
  image = photo()
  outs = {b: ours("Rotate", image, 9, 1, b) for b in (False, True)}
  refs = {b: pil_reference("Rotate", image, 9, 1, b) for b in (False, True)}
  assert np.mean(outs[False] != outs[True]) > 0.3
  for b in (False, True):
    right, wrong = np.abs(outs[b] - refs[b]).mean(), np.abs(outs[b] - refs[not b]).mean()
    print(f"{'bicubic' if b else 'bilinear'}: mean diff to its PIL resampler {right:.4f}, "
          f"to the other {wrong:.4f}")
    assert wrong > 20 * right and wrong > 0.5


@pytest.mark.parametrize("name,magnitude,sign", [
    ("TranslateXRel", 6, -1), ("TranslateYRel", 7, 1), ("Rotate", 9, 1), ("Rotate", 5, -1),
    ("ShearX", 9, -1), ("ShearY", 8, 1)])
def test_fill_edge_is_hard(name, magnitude, sign):
  """On a flat image every covered pixel keeps the value exactly (no blending with the fill at
  the edge, none in the bicubic kernel) and every uncovered one is exactly the fill, as in PIL."""
  image = np.full((12, 10, 3), 200, np.uint8)
  for bicubic in (False, True):
    out = ours(name, image, magnitude, sign, bicubic)
    ref = pil_reference(name, image, magnitude, sign, bicubic)
    filled = (out == FILL).all(-1)
    assert filled.any() and (~filled).any()
    np.testing.assert_array_equal(out[~filled], 200)
    np.testing.assert_array_equal(out, ref)
  if name == "TranslateXRel":  # p = -2.7: xin = x + 0.5 - 2.7 is inside from column 3 on
    assert filled[:, :3].all() and not filled[:, 3:].any()


def test_index_is_clipped_and_any_static_shape_jits():
  image = smooth_image(17, 23)
  args = (9.0, -1.0, True, np.asarray(FILL, np.uint8))
  last, first = (np.asarray(apply_op(i, image, *args)) for i in (len(dra.OPS) - 1, 0))
  np.testing.assert_array_equal(np.asarray(apply_op(99, image, *args)), last)
  np.testing.assert_array_equal(np.asarray(apply_op(-4, image, *args)), first)
  assert last.shape == image.shape and last.dtype == np.uint8
  with pytest.raises(ValueError, match="uint8"):
    dra.apply_op(0, image.astype(np.float32), *args)
  with pytest.raises(ValueError, match="interpolation"):
    dra.draw_ops(jax.random.PRNGKey(0), dra.RandAugmentPolicy(), "lanczos")
  with pytest.raises(ValueError, match="batching"):
    dra.rand_augment_batch(jax.random.split(jax.random.PRNGKey(0), 1), image[None],
                           dra.RandAugmentPolicy(), FILL, batching="pmap")


def test_rand_augment_is_a_function_of_the_key():
  image, policy = smooth_image(), dra.parse_policy("rand-m9-mstd0.5-inc1")
  fn = jax.jit(lambda k: dra.rand_augment(k, image, policy, FILL))
  keys = jax.random.split(jax.random.PRNGKey(3), 48)
  outs = [np.asarray(fn(k)) for k in keys]
  np.testing.assert_array_equal(outs[0], np.asarray(fn(keys[0])))
  applied = np.asarray(jax.vmap(lambda k: dra.draw_ops(k, policy).apply)(keys)).any(-1)
  unchanged = np.array([np.array_equal(o, image) for o in outs])
  np.testing.assert_array_equal(unchanged, ~applied)  # unchanged exactly when no op was drawn
  assert 4 <= unchanged.sum() <= 22  # both ops skipped with probability 1/4: 12 of 48 expected
  assert len({o.tobytes() for o in outs}) >= 30


def test_draws_have_timms_distribution():
  policy = dra.parse_policy("rand-m9-mstd0.5-inc1")
  n = 20_000
  draw = jax.jit(jax.vmap(lambda k: dra.draw_ops(k, policy)))
  d = jax.tree.map(np.asarray, draw(jax.random.split(jax.random.PRNGKey(0), n)))
  assert d.index.shape == (n, 2) and d.index.min() >= 0 and d.index.max() < 15
  counts = np.bincount(d.index.ravel(), minlength=15)
  expected = 2 * n / 15
  assert ((counts - expected) ** 2 / expected).sum() < 40  # chi2 with 14 dof: p ~ 3e-4
  assert abs(np.mean(d.index[:, 0] == d.index[:, 1]) - 1 / 15) < 0.01  # with replacement
  for flags in (d.apply, d.sign < 0, d.bicubic):
    assert abs(flags.mean() - 0.5) < 0.01
  assert set(np.unique(d.sign)) == {-1.0, 1.0}
  mags = d.magnitude.ravel()
  assert mags.min() >= 0 and mags.max() <= 10
  ref = np.clip(9 + 0.5 * np.random.default_rng(0).standard_normal(1_000_000), 0, 10)
  assert abs(mags.mean() - ref.mean()) < 0.01 and abs(mags.std() - ref.std()) < 0.01
  assert abs(np.mean(mags == 10) - np.mean(ref == 10)) < 0.005  # 2.3 %: std 0.5, clipped at 10
  low = np.sort(mags[mags < 9])  # the lower half is not clipped: half-normal with std 0.5
  assert abs(np.sqrt(np.mean((low - 9) ** 2)) - 0.5) < 0.01
  fixed = jax.vmap(lambda k: dra.draw_ops(k, dra.RandAugmentPolicy(), "bicubic"))(
      jax.random.split(jax.random.PRNGKey(1), 100))
  assert np.asarray(fixed.bicubic).all() and (np.asarray(fixed.magnitude) == 9).all()
  assert not np.asarray(jax.vmap(lambda k: dra.draw_ops(k, policy, "bilinear").bicubic)(
      jax.random.split(jax.random.PRNGKey(1), 100))).any()


def test_batch_map_and_vmap_are_bit_identical():
  images = np.stack([smooth_image(24, 32, seed) for seed in range(8)] +
                    [photo()[i * 24:(i + 1) * 24, :32] for i in range(4)])
  # More and likelier ops than the default, so nearly every op meets both batchings.
  policy = dra.RandAugmentPolicy(num_ops=3, magnitude=9.0, magnitude_std=0.5, prob=0.9)
  keys = jax.random.split(jax.random.PRNGKey(11), len(images))
  run = {b: jax.jit(functools.partial(dra.rand_augment_batch, policy=policy, fill=FILL,
                                      batching=b)) for b in dra.BATCHING}
  mapped, vmapped = (np.asarray(run[b](keys, images)) for b in ("map", "vmap"))
  np.testing.assert_array_equal(mapped, vmapped)
  one = jax.jit(lambda k, x: dra.rand_augment(k, x, policy, FILL))
  for k, x, y in zip(keys, images, mapped):
    np.testing.assert_array_equal(np.asarray(one(k, x)), y)
  drawn = jax.vmap(lambda k: dra.draw_ops(k, policy))(keys)
  assert len(set(np.asarray(drawn.index)[np.asarray(drawn.apply)].tolist())) >= 12
  # Every branch, dense (vmap: all ops run, one is selected) against the switch that branches,
  # at random magnitudes and signs, on different images.
  index, bicubic = np.repeat(np.arange(15), 2), np.tile([False, True], 15)
  rng = np.random.default_rng(5)
  mags = rng.uniform(0, 10, 30).astype(np.float32)
  signs = rng.choice([-1.0, 1.0], 30).astype(np.float32)
  picks = images[np.arange(30) % len(images)]
  fill = np.asarray(FILL, np.uint8)
  dense = jax.jit(jax.vmap(dra.apply_op, in_axes=(0, 0, 0, 0, 0, None)))(
      index, picks, mags, signs, bicubic, fill)
  for case, y in enumerate(np.asarray(dense)):
    args = (index[case], picks[case], mags[case], signs[case], bicubic[case], fill)
    np.testing.assert_array_equal(np.asarray(apply_op(*args)), y)


def _time_batch(repeats: int = 10) -> None:
  """CPU cost of rand_augment_batch on 8 images of 224x224, 'map' against 'vmap' (after compile)."""
  policy = dra.parse_policy("rand-m9-mstd0.5-inc1")
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3)), jnp.uint8)
  for batching in dra.BATCHING:
    fn = jax.jit(functools.partial(dra.rand_augment_batch, policy=policy, fill=FILL,
                                   batching=batching))
    start = time.perf_counter()
    fn(jax.random.split(jax.random.PRNGKey(0), 8), images).block_until_ready()
    compile_s = time.perf_counter() - start
    times = []
    for r in range(repeats):
      keys = jax.random.split(jax.random.PRNGKey(r + 1), 8)
      start = time.perf_counter()
      fn(keys, images).block_until_ready()
      times.append(1000 * (time.perf_counter() - start))
    print(f"{batching:4s}: compile + first run {compile_s:.2f} s; per batch of 8: "
          f"median {np.median(times):.1f} ms (min {min(times):.1f}, max {max(times):.1f})")


if __name__ == "__main__":
  _time_batch()
