"""timm's RandAugment (``rand-m9-mstd0.5-inc1``) in pure JAX on uint8 images, matching PIL.

Why on the device: the augmentation runs inside the jitted step, so the input pipeline only
decodes and crops, and every image is a function of its own PRNG key (the caller derives one key
per example from seed, step and the example's global position, so results do not depend on the
device mesh).

Why PIL's arithmetic: the official models were trained with timm 0.4.12, which calls PIL. Each op
here follows PIL's C/Python code (Pillow's ``Geometry.c``, ``Filter.c``, ``Blend.c``,
``ImageOps``, ``ImageEnhance``): the ten colour and lookup ops give PIL's result bit for bit
(integer LUTs, PIL's float32 blend with its float32 factor), and the affine warp reproduces PIL's
sampling rules (pixel centres, hard fill edge, clamped taps, PIL's cubic with a = -1, values
truncated, not rounded) in float32 where PIL uses double: within one level.

Two ways to batch (``rand_augment_batch``): ``jax.lax.map`` runs only the chosen op per image
(``lax.switch`` really branches inside a loop: cheap on CPU), ``jax.vmap`` runs every op and
selects (dense: for GPU/TPU). Both give the same bits, because no result depends on how XLA
fuses the arithmetic (see ``_halves``).
"""

import dataclasses
import math
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

MAX_LEVEL = 10.0
TRANSLATE_PCT = 0.45  # timm's translate_pct default: the shift at magnitude 10, of the size
# timm _RAND_INCREASING_TRANSFORMS, in its order (the op index of ``apply_op``).
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
# The affine ops: they take the resampler and the fill colour.
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# timm's train_interpolation choices for the affine ops ('random': _RANDOM_INTERPOLATION).
INTERPOLATIONS = ("random", "bilinear", "bicubic")
BATCHING = ("map", "vmap")

Fill = Union[Sequence[int], jax.Array, np.ndarray]


@dataclasses.dataclass(frozen=True)
class RandAugmentPolicy:
  """A parsed ``rand-...`` string: ``num_ops`` ops per image at ``magnitude`` +- ``magnitude_std``,
  each applied with probability ``prob`` (timm's defaults)."""
  num_ops: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.0
  prob: float = 0.5


def parse_policy(text: str) -> Optional[RandAugmentPolicy]:
  """timm's ``rand-m9-mstd0.5-inc1`` syntax; '' means no RandAugment."""
  if not text:
    return None
  field = "config.augment.randaugment"
  parts = text.split("-")
  if parts[0] != "rand":
    raise ValueError(f"{field}={text!r}: only RandAugment policies ('rand-m9-mstd0.5-"
                     "inc1') are supported, or '' for none.")
  fields, increasing = {}, False
  for part in parts[1:]:
    key = next((k for k in ("mstd", "inc", "m", "n") if part.startswith(k)), None)
    try:
      value = float(part[len(key):]) if key else None
    except ValueError:
      value = None
    if value is None:
      raise ValueError(f"{field}={text!r}: cannot read {part!r}; known parts are "
                       "m<magnitude>, n<ops>, mstd<std>, inc<0|1> (e.g. 'rand-m9-mstd0.5-inc1').")
    if key == "inc":
      increasing = bool(value)
    else:
      fields[key] = value
  if not increasing:
    raise ValueError(f"{field}={text!r}: only the increasing op set (inc1) is "
                     "implemented; add '-inc1'.")
  # timm's default magnitude when 'm' is missing is _MAX_LEVEL.
  return RandAugmentPolicy(num_ops=int(fields.get("n", 2)), magnitude=fields.get("m", MAX_LEVEL),
                           magnitude_std=fields.get("mstd", 0.0))


def fill_from_mean(mean: Sequence[float]) -> tuple[int, int, int]:
  """timm's fill colour for the affine ops: ``img_mean`` = the normalisation mean in 0..255."""
  return tuple(min(255, round(255 * x)) for x in mean)


# --- Products that give the same bits whether or not the compiler fuses them into an FMA ----------
#
# XLA contracts a multiply and a following add into one fused multiply-add (one rounding instead
# of two) or not, depending on how it fuses the ops around them (inside a lax.switch branch, under
# vmap, on CPU or GPU), and it reassociates products with constants (x / 10 -> x * 0.1,
# (x * a) * b -> x * (a * b)) where it sees them. Either changes the last bit of a sum and, after
# PIL's truncation, sometimes a pixel, so 'map' and 'vmap' batching would disagree (measured: a
# few pixels per image). An exact product gives the same sum fused or not, and products of exact
# factors stay exact in any order, so every product here that is then added is built from exact
# partial products of 12-bit halves (12 by 12 bits fit in float32's 24), and the op arguments are
# single such products or integer arithmetic.


def _halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``x = hi + lo`` exactly, each with at most 12 significant bits, by integer operations only
  (a float ``x - hi`` could itself be fused with the multiply that made ``x``). For |x| < 2^-103
  the low part is dropped (lo = 0): far below anything that matters here."""
  bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)
  hi = jax.lax.bitcast_convert_type(bits & ~0xFFF, jnp.float32)
  negative = bits >> 31  # 0 or -1
  low = ((bits & 0xFFF) ^ negative) - negative  # the low 12 mantissa bits, with x's sign
  unit = jax.lax.bitcast_convert_type(jnp.maximum(((bits >> 23) & 0xFF) - 23, 0) << 23,
                                      jnp.float32)  # 2^(exponent - 150), 0 for tiny x
  return hi, low.astype(jnp.float32) * unit


def _mul_small(a: tuple[jax.Array, jax.Array], k: jax.Array) -> jax.Array:
  """``a * k`` rounded once (what IEEE multiplication gives), for ``a`` as ``_halves`` and ``k``
  with at most 12 significant bits (integers below 4096, pixel centres x + 0.5 below 2048)."""
  return a[0] * k + a[1] * k


def _mul(a: tuple[jax.Array, jax.Array], b: jax.Array) -> jax.Array:
  """``a * b`` (within 2 ulp) for ``a`` as ``_halves`` and any float32 ``b``."""
  b_hi, b_lo = _halves(b)
  return ((a[1] * b_lo + a[1] * b_hi) + a[0] * b_lo) + a[0] * b_hi


# --- Colour and lookup ops (uint8 in, uint8 out, as PIL computes them) -------------------------


def _grey(image: jax.Array) -> jax.Array:
  """PIL's RGB -> 'L': (19595 R + 38470 G + 7471 B + 2^15) >> 16, as (H, W) int32."""
  rgb = image.astype(jnp.int32)
  return (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768) >> 16


def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL's Image.blend (float32 in C): degenerate + factor * (image - degenerate), clipped and
  truncated. The product is rounded once and then added, as PIL's C does (no FMA): bit for bit."""
  d, x = degenerate.astype(jnp.float32), image.astype(jnp.float32)
  blended = d + _mul_small(_halves(jnp.asarray(factor, jnp.float32)), x - d)
  return jnp.floor(jnp.clip(blended, 0.0, 255.0)).astype(jnp.uint8)


def _apply_luts(image: jax.Array, luts: jax.Array) -> jax.Array:
  """``luts`` (3, 256) int32, one per channel, clipped to 0..255 as PIL's ``point`` does."""
  luts = jnp.clip(luts, 0, 255).astype(jnp.uint8)
  return luts[jnp.arange(3), image.astype(jnp.int32)]


def _autocontrast_exceptions() -> np.ndarray:
  """Sorted codes ``lo << 16 | hi << 8 | i`` of the autocontrast LUT entries where PIL's double
  arithmetic, ``int(i * scale - lo * scale)`` with ``scale = 255.0 / (hi - lo)``, lands just below
  the exact integer 255 (i - lo) / (hi - lo) and so gives one less (about 0.4 % of all entries,
  e.g. lo=0, hi=25, i=25 -> 254). Only exact integers can be missed this way: any other exact
  value is at least 1/255 away from the next integer, far more than a double's error."""
  codes = []
  for d in range(1, 256):
    step = d // math.gcd(d, 255)  # i - lo = k * step are the entries with an integer result
    k = np.arange(0, d + 1, step)
    lo = np.arange(0, 256 - d)[:, None]
    scale = 255.0 / d
    i = lo + k[None, :]
    pil = np.trunc(i * scale + (-lo * scale))  # the same two double roundings as Python's
    exact = (255 * k[None, :]) // d
    lo, i = np.broadcast_arrays(lo, i)
    wrong = pil != exact
    codes.append((lo[wrong] << 16) | ((lo[wrong] + d) << 8) | i[wrong])
  return np.sort(np.concatenate(codes)).astype(np.int32)


_AUTOCONTRAST_EXCEPTIONS = _autocontrast_exceptions()


def auto_contrast(image: jax.Array) -> jax.Array:
  """Stretch each channel to 0..255 (PIL ImageOps.autocontrast, cutoff 0), bit-exact with PIL."""
  x = image.reshape(-1, 3).astype(jnp.int32)
  lo, hi = x.min(axis=0)[:, None], x.max(axis=0)[:, None]
  i = jnp.arange(256, dtype=jnp.int32)[None, :]
  span = jnp.maximum(hi - lo, 1)
  lut = (255 * (i - lo)) // span  # floor of the exact value; below lo it is clipped to 0
  table = jnp.asarray(_AUTOCONTRAST_EXCEPTIONS)
  code = (lo << 16) | (hi << 8) | i
  pos = jnp.clip(jnp.searchsorted(table, code), 0, table.shape[0] - 1)
  lut = lut - (table[pos] == code).astype(jnp.int32)
  return _apply_luts(image, jnp.where(hi > lo, lut, i))


def equalize(image: jax.Array) -> jax.Array:
  """Histogram equalisation per channel (PIL ImageOps.equalize), integer arithmetic as PIL's."""
  x = image.reshape(-1, 3).astype(jnp.int32)
  hist = jnp.bincount((x + 256 * jnp.arange(3)).reshape(-1), length=3 * 256).reshape(3, 256)
  last = jnp.take_along_axis(hist, x.max(axis=0)[:, None], axis=1)  # last non-empty bin
  step = (x.shape[0] - last) // 255
  below = jnp.cumsum(hist, axis=1) - hist  # pixels in the bins before each value
  lut = (step // 2 + below) // jnp.maximum(step, 1)
  return _apply_luts(image, jnp.where(step > 0, lut, jnp.arange(256)[None, :]))


def invert(image: jax.Array) -> jax.Array:
  return 255 - image


def posterize(image: jax.Array, bits: jax.Array) -> jax.Array:
  """Keep the top ``bits`` bits. 0 bits gives black: what ImageOps.posterize did in 2021, when
  timm 0.4.12 asked for it at magnitude 10 (Pillow >= 10 refuses bits=0)."""
  mask = (255 << (8 - jnp.asarray(bits, jnp.int32))) & 255
  return (image.astype(jnp.int32) & mask).astype(jnp.uint8)


def solarize(image: jax.Array, threshold: jax.Array) -> jax.Array:
  """Invert the values >= threshold (threshold 256: no change)."""
  return jnp.where(image.astype(jnp.int32) < threshold, image, 255 - image)


def solarize_add(image: jax.Array, add: jax.Array, threshold: int = 128) -> jax.Array:
  """timm's solarize_add: add ``add`` to the values below 128, saturating at 255."""
  x = image.astype(jnp.int32)
  return jnp.where(x < threshold, jnp.minimum(x + add, 255), x).astype(jnp.uint8)


def color(image: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance.Color: blend with the grey image."""
  return _blend(jnp.broadcast_to(_grey(image)[..., None], image.shape), image, factor)


def contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance.Contrast: blend with the mean grey level, int(mean + 0.5) in integers (exact)."""
  grey = _grey(image)
  total, n = jnp.sum(grey), grey.size  # int32: exact up to 8 million pixels
  mean = total // n + (2 * (total % n) >= n).astype(jnp.int32)
  return _blend(jnp.broadcast_to(mean, image.shape), image, factor)


def brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance.Brightness: blend with black."""
  return _blend(jnp.zeros_like(image), image, factor)


def sharpness(image: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (3x3, centre 5, sum 13).

  PIL sums in float32 with a +0.5 bias and truncates, i.e. rounds s / 13; s / 13 is never within
  1/26 of a half, so the integer (s + 6) // 13 is exact. Border pixels keep their value (PIL
  copies the first and last rows and columns).
  """
  x = image.astype(jnp.int32)
  h, w = image.shape[:2]
  if h < 3 or w < 3:
    return _blend(image, image, factor)
  s = 4 * x[1:-1, 1:-1]
  for i in range(3):
    for j in range(3):
      s = s + x[i:h - 2 + i, j:w - 2 + j]
  smooth = x.at[1:-1, 1:-1].set((s + 6) // 13)
  return _blend(smooth, image, factor)


# --- Affine warp: PIL's Image.transform(AFFINE, (a, b, c, d, e, f), BILINEAR/BICUBIC) -----------


def _powers(d: jax.Array):
  """d, d^2, d^3 as ``_halves``: the interpolation weights' ingredients, shared by all taps."""
  d1 = _halves(d)
  d2 = _halves(_mul(d1, d))
  return d1, d2, _halves(_mul(d2, d))


def _interpolate(v1, v2, v3, v4, powers, bicubic, integer_taps):
  """PIL's 1-d interpolation between taps v2 (at 0) and v3 (at 1), in PIL's terms.

  BICUBIC (Geometry.c, the cubic with a = -1): p1 = v2, p2 = v3 - v1, p3 = 2 (v1 - v2) + v3 - v4,
  p4 = -v1 + v2 - v3 + v4, v = p1 + d p2 + d^2 p3 + d^3 p4 (PIL nests it, Horner, in double).
  BILINEAR: p2 = v3 - v2, p3 = p4 = 0, i.e. PIL's v2 + (v3 - v2) d. Differences of taps, not
  weights times taps: equal taps give exactly that value, as in PIL (flat areas stay exact).
  ``integer_taps``: the p are integers below 4096, so each product is rounded once.
  """
  p2 = jnp.where(bicubic, v3 - v1, v3 - v2)
  p3 = jnp.where(bicubic, 2 * (v1 - v2) + v3 - v4, 0.0)
  p4 = jnp.where(bicubic, -v1 + v2 - v3 + v4, 0.0)
  mul = _mul_small if integer_taps else _mul
  d1, d2, d3 = powers
  return v2 + (mul(d1, p2) + (mul(d2, p3) + mul(d3, p4)))


def affine_warp(image: jax.Array, matrix: jax.Array, bicubic: jax.Array, fill: Fill) -> jax.Array:
  """PIL's ``Image.transform(size, AFFINE, matrix, resample, fillcolor=fill)`` on one image.

  Pillow's generic transform (Geometry.c), per output pixel (x, y): xin = a (x + .5) + b (y + .5)
  + c, yin = d (x + .5) + e (y + .5) + f; outside [0, W) x [0, H) the pixel keeps the fill colour
  (a hard edge: no blending with the fill); else xin -= .5, yin -= .5, x0 = floor(xin), dx = xin
  - x0, and the taps x0 - 1 .. x0 + 2 (bilinear uses x0, x0 + 1) are read with coordinates
  clamped to the image (PIL clips the first row and reuses the previous row past the last, which
  is the same). Rows are interpolated along x, then the row results along y; the value is clamped
  to 0..255 and truncated (PIL's ``(UINT8)v``, not rounded). PIL works in double, this in float32:
  values agree to one level except where a coordinate is within float32 error of the edge.
  """
  h, w = image.shape[:2]
  m = jnp.asarray(matrix, jnp.float32)
  xc = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5
  yc = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5
  # Pixel centres x + 0.5 have at most 12 significant bits up to 2048 pixels: one rounding, as
  # PIL's (double) product has; beyond that, the general exact-halves product.
  mul = _mul_small if max(h, w) <= 2048 else _mul
  term = lambda i, c: mul(_halves(m[i]), c)
  xin = (term(0, xc) + term(1, yc)) + m[2]  # PIL's order of operations
  yin = (term(3, xc) + term(4, yc)) + m[5]
  inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
  xin = jnp.where(inside, xin - 0.5, 0.0)  # outside: any valid tap, the fill replaces it
  yin = jnp.where(inside, yin - 0.5, 0.0)
  x0, y0 = jnp.floor(xin), jnp.floor(yin)
  dx, dy = _powers((xin - x0)[..., None]), _powers((yin - y0)[..., None])
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  cols = [jnp.clip(x0 + k, 0, w - 1) for k in (-1, 0, 1, 2)]
  flat = image.reshape(h * w, 3)
  bicubic = jnp.asarray(bicubic, bool)
  rows = []
  for k in (-1, 0, 1, 2):
    row = jnp.clip(y0 + k, 0, h - 1) * w
    taps = [jnp.take(flat, row + c, axis=0, mode="clip").astype(jnp.float32) for c in cols]
    rows.append(_interpolate(*taps, dx, bicubic, integer_taps=True))
  value = _interpolate(*rows, dy, bicubic, integer_taps=False)
  value = jnp.floor(jnp.clip(value, 0.0, 255.0)).astype(jnp.uint8)
  return jnp.where(inside[..., None], value, _fill_array(fill))


def _fill_array(fill: Fill) -> jax.Array:
  fill = jnp.asarray(fill)
  if fill.shape != (3,):
    raise ValueError(f"fill must be an RGB triple, got shape {fill.shape}.")
  return fill.astype(jnp.uint8)


def _cos_sin(angle: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin by their Taylor series (to within float32 rounding for |angle| <= pi/4; the
  rotations here stay within 30 degrees), from exact products like the rest, so that the matrix
  does not depend on how XLA compiles its own cos and sin."""
  a = _halves(angle)
  t = _halves(_mul(a, angle))  # angle^2

  def poly(coefs):  # Horner in angle^2, highest power first
    acc = jnp.float32(coefs[0])
    for c in coefs[1:]:
      acc = c + _mul(t, acc)
    return acc

  cos = poly([-1 / 3628800, 1 / 40320, -1 / 720, 1 / 24, -1 / 2, 1.0])
  sin_rest = poly([1 / 362880, -1 / 5040, 1 / 120, -1 / 6])  # (sin(a) - a) / a^3
  return cos, angle + _mul(a, _mul(t, sin_rest))


def _rotate_matrix(angle: jax.Array, height: int, width: int) -> jax.Array:
  """The matrix of PIL's ``Image.rotate(degrees)`` for ``angle = -radians(degrees)``, |angle| <=
  pi/4: (cos, sin, c, -sin, cos, f), counter-clockwise about (w/2, h/2), c and f computed as PIL
  does, matrix applied to (-w/2, -h/2) plus the centre."""
  cos, sin = _cos_sin(jnp.asarray(angle, jnp.float32))
  cx, cy = width / 2, height / 2
  mul = _mul_small if max(height, width) <= 4095 else _mul  # w / 2: at most 12 bits up to 4095
  c, s = _halves(cos), _halves(sin)
  return jnp.stack([cos, sin, (mul(c, -cx) + mul(s, -cy)) + cx,
                    -sin, cos, (mul(s, cx) + mul(c, -cy)) + cy])


# --- The op table ------------------------------------------------------------------------------

_IDENTITY_MATRIX = np.array([1, 0, 0, 0, 1, 0], np.float32)
_NOT_APPLIED = len(OPS)  # the extra branch: the image unchanged (an op that was not drawn)


def _colour(fn):
  """A branch for a non-affine op: ``fn(image, magnitude, sign)``; no warp follows."""
  return lambda image, m, sign: (fn(image, m, sign), jnp.asarray(_IDENTITY_MATRIX))


def _affine(fn):
  """A branch for an affine op: ``fn(magnitude, sign, height, width)`` gives PIL's matrix; the one
  warp after the switch applies it (so that under vmap one warp runs, not five)."""
  return lambda image, m, sign: (image, fn(m, sign, *image.shape[:2]))


# timm 0.4.12's arguments from the magnitude m (level = m / 10). XLA rewrites float expressions
# with constants (m / 10 -> m * 0.1, (m * a) * b -> m * (a * b)), differently in different
# contexts, so each argument is one product m * constant (made of exact halves, see _halves) or
# an exact integer computation, never a chain.


def _times(m, constant: float):
  """m * constant (within 2 ulp), the same bits in any context."""
  return _mul(_halves(m), jnp.float32(constant))


def _floor_times(m, p: int, q: int):
  """floor(m * p / q) for float32 m >= 0 and small integers p <= 128, q, exactly, in integers.

  This is also what timm's int(m / 10 * k) gives in double for each float32 m used here: the
  double can only differ where m k / 10 is an integer, and there m is a binary fraction (k = 4,
  256: m / 10 is then exact) or, for k = 110, an integer 0..10 (checked: the double is exact).
  """
  bits = jax.lax.bitcast_convert_type(jnp.asarray(m, jnp.float32), jnp.int32)
  exponent = (bits >> 23) & 0xFF
  mantissa = (bits & 0x7FFFFF) | jnp.where(exponent > 0, 1 << 23, 0)  # m = mantissa 2^(e-150)
  shift = jnp.clip(150 - jnp.maximum(exponent, 1), 0, 31)  # m <= 10: the shift is at least 20
  return jax.lax.shift_right_logical(mantissa * p, shift) // q


def _enhance(m, sign):
  """timm's enhance factor 1 + sign * (m / 10) * 0.9, rounded once to float32 as PIL's C float
  gets it (a float32 product and difference would lose up to 8 ulp to the cancellation in 1 - 0.9
  at m = 10, enough to move many pixels). In integers, for m = M 2^(e - 150) <= 10:
  2^28 factor = 2^28 + sign x, x = 9 M 2^(e - 122) / 100; the float32 of 2 floor(2^28 factor) +
  sticky bit, times 2^-29, is the correctly rounded factor."""
  bits = jax.lax.bitcast_convert_type(jnp.asarray(m, jnp.float32), jnp.int32)
  exponent = (bits >> 23) & 0xFF
  n = 9 * ((bits & 0x7FFFFF) | jnp.where(exponent > 0, 1 << 23, 0))  # < 2^28
  up, down = jnp.clip(exponent - 122, 0, 8), jnp.clip(122 - exponent, 0, 30)
  rest = (n % 100) << up  # j = exponent - 122 >= 0: x = (n // 100) 2^j + rest / 100
  whole_up, inexact_up = ((n // 100) << up) + rest // 100, rest % 100 != 0
  shifted = n >> down  # j < 0: x = n / (100 2^-j)
  whole_down = shifted // 100
  inexact_down = ((n & ((1 << down) - 1)) != 0) | (shifted % 100 != 0)
  whole = jnp.where(exponent >= 122, whole_up, whole_down)
  inexact = jnp.where(exponent >= 122, inexact_up, inexact_down).astype(jnp.int32)
  floor = jnp.where(sign < 0, (1 << 28) - whole - inexact, (1 << 28) + whole)
  return (2 * floor + inexact).astype(jnp.float32) * jnp.float32(2.0 ** -29)


_BRANCHES = (
    _colour(lambda x, m, sign: auto_contrast(x)),
    _colour(lambda x, m, sign: equalize(x)),
    _colour(lambda x, m, sign: invert(x)),
    _affine(lambda m, sign, h, w: _rotate_matrix(sign * _times(m, -math.pi / 60), h, w)),
    _colour(lambda x, m, sign: posterize(x, 4 - _floor_times(m, 2, 5))),  # 4 - int(level * 4)
    _colour(lambda x, m, sign: solarize(x, 256 - _floor_times(m, 128, 5))),  # 256 - int(l 256)
    _colour(lambda x, m, sign: solarize_add(x, _floor_times(m, 11, 1))),  # int(level * 110)
    _colour(lambda x, m, sign: color(x, _enhance(m, sign))),
    _colour(lambda x, m, sign: contrast(x, _enhance(m, sign))),
    _colour(lambda x, m, sign: brightness(x, _enhance(m, sign))),
    _colour(lambda x, m, sign: sharpness(x, _enhance(m, sign))),
    _affine(lambda m, sign, h, w: jnp.stack([1.0, sign * _times(m, 0.03), 0, 0, 1, 0])),
    _affine(lambda m, sign, h, w: jnp.stack([1.0, 0, 0, sign * _times(m, 0.03), 1, 0])),
    _affine(lambda m, sign, h, w: jnp.stack(  # pixels = level * 0.45 * width
        [1.0, 0, sign * _times(m, TRANSLATE_PCT / MAX_LEVEL * w), 0, 1, 0])),
    _affine(lambda m, sign, h, w: jnp.stack(
        [1.0, 0, 0, 0, 1, sign * _times(m, TRANSLATE_PCT / MAX_LEVEL * h)])),
    lambda image, m, sign: (image, jnp.asarray(_IDENTITY_MATRIX)),  # _NOT_APPLIED
)
_IS_AFFINE = np.array([name in GEOMETRIC for name in OPS] + [False])
assert len(_BRANCHES) == len(OPS) + 1


def _check_image(image: jax.Array) -> None:
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != jnp.uint8:
    raise ValueError(f"RandAugment takes one uint8 (H, W, 3) image, got {image.dtype} "
                     f"{image.shape}.")


def _run_branch(branch, image, magnitude, sign, bicubic, fill) -> jax.Array:
  """``lax.switch`` over one branch per op (plus 'not applied'), then the warp if it is affine."""
  branch = jnp.clip(jnp.asarray(branch, jnp.int32), 0, _NOT_APPLIED)
  magnitude = jnp.clip(jnp.asarray(magnitude, jnp.float32), 0.0, MAX_LEVEL)
  sign = jnp.asarray(sign, jnp.float32)
  out, matrix = jax.lax.switch(branch, _BRANCHES, image, magnitude, sign)
  fill = _fill_array(fill)
  return jax.lax.cond(jnp.asarray(_IS_AFFINE)[branch],
                      lambda: affine_warp(out, matrix, bicubic, fill), lambda: out)


def apply_op(index, image: jax.Array, magnitude, sign, bicubic, fill: Fill) -> jax.Array:
  """Op ``OPS[index]`` (int or traced int32, clipped to the table) on one uint8 (H, W, 3) image.

  ``magnitude`` in [0, 10]; ``sign`` +1 or -1 for the signed ops (timm's random negation);
  ``bicubic`` (affine ops only): True = PIL BICUBIC, False = PIL BILINEAR; ``fill``: the RGB of
  the area an affine op uncovers. Returns uint8 of the same shape.
  """
  image = jnp.asarray(image)
  _check_image(image)
  index = jnp.clip(jnp.asarray(index, jnp.int32), 0, len(OPS) - 1)
  return _run_branch(index, image, magnitude, sign, bicubic, fill)


class OpDraws(NamedTuple):
  """The random choices for one image, one entry per op slot (shape (num_ops,) each)."""
  index: jax.Array  # int32 in [0, 15): the op, uniform with replacement
  apply: jax.Array  # bool: applied (probability policy.prob)
  magnitude: jax.Array  # float32 in [0, 10]: clip(N(magnitude, magnitude_std), 0, 10)
  sign: jax.Array  # float32 +-1: -1 with probability 0.5 (used by the signed ops)
  bicubic: jax.Array  # bool: the resampler of the affine ops


def draw_ops(key: jax.Array, policy: RandAugmentPolicy,
             interpolation: str = "random") -> OpDraws:
  """All random draws of ``rand_augment`` for one image, as timm makes them per op application.

  Key scheme: field f of slot i is element i of one draw of shape (num_ops,) from
  ``jax.random.fold_in(key, f)``, f = 0 op index (randint), 1 apply (uniform <= prob: timm skips
  when random() > prob), 2 magnitude noise (normal), 3 sign (uniform > 0.5 negates, as timm's
  _randomly_negate), 4 resampler (bernoulli 0.5, for 'random'). Every field is drawn for every
  slot whether used or not, so each draw depends only on (key, field, slot).
  """
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"RandAugment interpolation={interpolation!r} is not one of "
                     f"{INTERPOLATIONS}.")
  n = policy.num_ops
  field = lambda f: jax.random.fold_in(key, f)
  index = jax.random.randint(field(0), (n,), 0, len(OPS), dtype=jnp.int32)
  apply = jax.random.uniform(field(1), (n,)) <= policy.prob
  magnitude = jnp.full((n,), policy.magnitude, jnp.float32)
  if policy.magnitude_std > 0:  # timm 0.4.12 draws gauss() only when the std is positive
    noise = _mul(_halves(jax.random.normal(field(2), (n,))), policy.magnitude_std)
    magnitude = magnitude + noise
  magnitude = jnp.clip(magnitude, 0.0, MAX_LEVEL)
  sign = jnp.where(jax.random.uniform(field(3), (n,)) > 0.5, -1.0, 1.0).astype(jnp.float32)
  if interpolation == "random":
    bicubic = jax.random.bernoulli(field(4), 0.5, (n,))
  else:
    bicubic = jnp.full((n,), interpolation == "bicubic")
  return OpDraws(index, apply, magnitude, sign, bicubic)


def _apply_draws(draws: OpDraws, image: jax.Array, fill: jax.Array) -> jax.Array:
  """The drawn ops in slot order, each through the one op table (a scan over the slots: the
  table is compiled once, whatever num_ops is); a slot not applied takes the identity branch."""
  branches = jnp.where(draws.apply, draws.index, _NOT_APPLIED)

  def slot(x, d):
    branch, magnitude, sign, bicubic = d
    return _run_branch(branch, x, magnitude, sign, bicubic, fill), None

  out, _ = jax.lax.scan(slot, image, (branches, draws.magnitude, draws.sign, draws.bicubic))
  return out


def rand_augment(key: jax.Array, image: jax.Array, policy: RandAugmentPolicy, fill: Fill,
                 interpolation: str = "random") -> jax.Array:
  """timm's RandAugment on one uint8 (H, W, 3) image: ``policy.num_ops`` ops drawn uniformly
  with replacement, each applied with probability ``policy.prob`` (the draws: ``draw_ops``).
  ``interpolation``: the affine ops' resampler, 'random' (bilinear or bicubic per application,
  timm's _RANDOM_INTERPOLATION), 'bilinear' or 'bicubic'."""
  image = jnp.asarray(image)
  _check_image(image)
  return _apply_draws(draw_ops(key, policy, interpolation), image, _fill_array(fill))


def rand_augment_batch(keys: jax.Array, images: jax.Array, policy: RandAugmentPolicy, fill: Fill,
                       interpolation: str = "random", batching: str = "map") -> jax.Array:
  """``rand_augment`` on each of ``images`` (N, H, W, 3) uint8 with its own key (``keys``: N).

  ``batching='map'``: ``lax.map``, one image at a time, so only the drawn op runs (CPU);
  ``'vmap'``: every op runs on the whole batch and the drawn one is selected (GPU/TPU). The same
  bits either way: the draws are made once for the batch, the same way for both, and the ops'
  arithmetic does not depend on how XLA fuses it.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != jnp.uint8:
    raise ValueError(f"rand_augment_batch takes uint8 (N, H, W, 3) images, got {images.dtype} "
                     f"{images.shape}.")
  if batching not in BATCHING:
    raise ValueError(f"RandAugment batching={batching!r} is not one of {BATCHING}.")
  draws = jax.vmap(lambda k: draw_ops(k, policy, interpolation))(keys)
  fill = _fill_array(fill)
  if batching == "map":
    return jax.lax.map(lambda dx: _apply_draws(dx[0], dx[1], fill), (draws, images))
  return jax.vmap(lambda d, x: _apply_draws(d, x, fill))(draws, images)
