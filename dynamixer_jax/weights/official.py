"""Official weights in and out: PyTorch DynaMixer checkpoints and MLP-Mixer ``.npz`` files.

Our DynaMixer mirrors the official module tree, so names map by one rule: PyTorch's
``network.0.1.attn.mix_h.generate.weight`` is our ``network_0_1/attn/mix_h/generate/kernel``.
Linear weights are transposed (out, in) -> (in, out), conv weights (O, I, kh, kw) -> (kh, kw, I, O)
and LayerNorm ``weight`` becomes ``scale``. The architecture is read off the tensor shapes.
"""

import argparse
import math
import os
import re
from typing import Any, Mapping, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynamixer_jax import models
from dynamixer_jax.models.dynamixer import Entry
from dynamixer_jax.weights import trees

Source = Union[str, os.PathLike, Mapping[str, Any]]
Variables = dict[str, Any]

_NORMS = ("norm", "norm1", "norm2")
_WRAPPERS = ("state_dict_ema", "state_dict", "model")


# --------------------------------------------------------------------------- names and layouts


def torch_key_to_path(key: str) -> tuple[str, ...]:
  """``network.0.1.norm1.weight`` -> ``('network_0_1', 'norm1', 'scale')``."""
  *modules, param = key.split(".")
  if modules and modules[0] == "network":
    indices = []
    while len(modules) > 1 and modules[1].isdigit():
      indices.append(modules.pop(1))
    modules[0] = "_".join(["network", *indices])
  if param == "weight":
    param = "scale" if modules[-1] in _NORMS else "kernel"
  return (*modules, param)


def path_to_torch_key(path: tuple[str, ...]) -> str:
  """The inverse of ``torch_key_to_path``."""
  *modules, param = path
  if modules[0].startswith("network_"):
    modules[0] = modules[0].replace("_", ".")
  return ".".join([*modules, "bias" if param == "bias" else "weight"])


def torch_to_flax_array(value: np.ndarray) -> np.ndarray:
  """PyTorch layout -> Flax layout (Linear (out, in) -> (in, out), Conv OIHW -> HWIO)."""
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:
    return value.T
  return value


def flax_to_torch_array(value: np.ndarray) -> np.ndarray:
  """Flax layout -> PyTorch layout; the inverse of ``torch_to_flax_array``."""
  if value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  if value.ndim == 2:
    return value.T
  return value


# --------------------------------------------------------------------------- reading files


def read_torch_checkpoint(src: Source, use_ema: bool = True) -> dict[str, np.ndarray]:
  """A flat ``{state-dict key: float32 array}`` from a ``.pth`` path or a mapping.

  Official training checkpoints pickle an ``argparse.Namespace`` beside the tensors; only that
  class is allowed through ``torch.load(weights_only=True)``, never arbitrary unpickling.
  """
  if isinstance(src, Mapping):
    checkpoint = src
    where = "the given mapping"
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("Reading a PyTorch .pth checkpoint needs torch: "
                        "pip install 'dynamixer-jax[torch]' (or pip install torch).") from e
    if not os.path.exists(src):
      raise FileNotFoundError(f"No checkpoint at {src!r}.")
    with torch.serialization.safe_globals([argparse.Namespace]):
      checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    where = repr(str(src))
  wrappers = [w for w in _WRAPPERS if isinstance(checkpoint.get(w), Mapping)]
  if not use_ema and "state_dict_ema" in wrappers:
    wrappers.remove("state_dict_ema")
  if wrappers:
    print(f"Loading '{wrappers[0]}' from {where}"
          + (" (EMA weights, as the official evaluation does)." if wrappers[0] == "state_dict_ema"
             else "."))
    checkpoint = checkpoint[wrappers[0]]
  flat = {}
  for key, value in checkpoint.items():
    key = key[len("module."):] if key.startswith("module.") else key
    if hasattr(value, "detach"):
      value = value.detach().cpu().float().numpy()
    flat[key] = np.asarray(value, dtype=np.float32)
  return flat


def _where(src: Source) -> str:
  return "(a mapping)" if isinstance(src, Mapping) else repr(os.fspath(src))


def read_npz(src: Source) -> dict[str, np.ndarray]:
  """A flat ``{'/'-joined name: array}`` from an official MLP-Mixer ``.npz`` or a mapping."""
  if isinstance(src, Mapping):
    return {k: np.asarray(v) for k, v in src.items()}
  if not os.path.exists(src):
    raise FileNotFoundError(f"No checkpoint at {src!r}.")
  with np.load(src, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------- DynaMixer


def infer_dynamixer_kwargs(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Constructor arguments of ``models.DynaMixer`` read off official state-dict shapes."""
  if "patch_embed.proj.weight" not in state or not any(k.startswith("network.") for k in state):
    sample = ", ".join(sorted(state)[:8]) or "none"
    raise ValueError("This is not an official DynaMixer state dict: expected keys such as "
                     "'patch_embed.proj.weight' and 'network.0.0.attn.mix_h.generate.weight'; "
                     f"found {len(state)} keys, e.g. {sample}.")
  groups: dict[int, int] = {}  # ModuleList index -> number of blocks
  downsamples: dict[int, int] = {}  # ModuleList index -> conv kernel size
  for key in state:
    if m := re.match(r"network\.(\d+)\.(\d+)\.norm1\.weight$", key):
      groups[int(m[1])] = max(groups.get(int(m[1]), 0), int(m[2]) + 1)
    elif m := re.match(r"network\.(\d+)\.proj\.weight$", key):
      downsamples[int(m[1])] = state[key].shape[-1]

  entries = []
  for index in sorted(groups):
    prefix = f"network.{index}.0.attn"
    width = state[f"network.{index}.0.norm1.weight"].shape[0]
    compress_out = state[f"{prefix}.mix_h.compress.weight"].shape[0]
    generate_out, generate_in = state[f"{prefix}.mix_h.generate.weight"].shape
    length = math.isqrt(generate_out)
    reduced_dim = generate_in // length
    hidden = state[f"network.{index}.0.mlp.fc1.weight"].shape[0]
    entries.append(Entry(depth=groups[index], width=width, segments=compress_out // reduced_dim,
                         reduced_dim=reduced_dim, mlp_ratio=hidden / width,
                         transition=downsamples.get(index + 1) == 2))
  patch = state["patch_embed.proj.weight"]
  first_length = math.isqrt(state[f"network.{min(groups)}.0.attn.mix_h.generate.weight"].shape[0])
  head = state.get("head.weight")
  return dict(entries=tuple(entries), num_classes=0 if head is None else head.shape[0],
              image_size=first_length * patch.shape[-1], patch_size=patch.shape[-1],
              in_channels=patch.shape[1])


def load_torch_dynamixer(src: Source, num_classes: Optional[int] = None, use_ema: bool = True,
                         seed: int = 0, **overrides: Any) -> tuple[nn.Module, Variables]:
  """An official DynaMixer checkpoint (path or state-dict mapping) as ``(model, variables)``.

  Takes the EMA weights when the checkpoint has them, unless ``use_ema=False``. With a
  ``num_classes`` other than the checkpoint's, the head is replaced by a fresh one (seeded by
  ``seed``) for fine-tuning. ``overrides`` go to the model (``dtype``, ``drop_path_rate``).
  """
  state = read_torch_checkpoint(src, use_ema=use_ema)
  kwargs = infer_dynamixer_kwargs(state)
  params = {torch_key_to_path(k): torch_to_flax_array(v) for k, v in state.items()}
  model = models.DynaMixer(**dict(kwargs, **overrides))
  return trees.assemble(model, params, f"The checkpoint {_where(src)}", num_classes, seed)


def to_torch_state_dict(variables: Variables) -> dict[str, np.ndarray]:
  """Our DynaMixer params as an official state dict (numpy; wrap with torch.from_numpy)."""
  flat = flax.traverse_util.flatten_dict(trees.unfreeze(variables)["params"])
  return {path_to_torch_key(path): np.ascontiguousarray(flax_to_torch_array(np.asarray(v)))
          for path, v in flat.items()}


# --------------------------------------------------------------------------- MLP-Mixer


def infer_mixer_kwargs(params: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Constructor arguments of ``models.MlpMixer`` read off official ``.npz`` shapes."""
  if "stem/kernel" not in params or "MixerBlock_0/token_mixing/Dense_0/kernel" not in params:
    sample = ", ".join(sorted(params)[:8]) or "none"
    raise ValueError("This is not an official MLP-Mixer checkpoint: expected keys such as "
                     "'stem/kernel' and 'MixerBlock_0/token_mixing/Dense_0/kernel'; found "
                     f"{len(params)} keys, e.g. {sample}.")
  stem = params["stem/kernel"]
  blocks = {int(m[1]) for k in params if (m := re.match(r"MixerBlock_(\d+)/", k))}
  tokens, tokens_mlp_dim = params["MixerBlock_0/token_mixing/Dense_0/kernel"].shape
  head = params.get("head/kernel")
  return dict(patch_size=stem.shape[0], num_blocks=len(blocks), hidden_dim=stem.shape[-1],
              tokens_mlp_dim=tokens_mlp_dim,
              channels_mlp_dim=params["MixerBlock_0/channel_mixing/Dense_0/kernel"].shape[1],
              num_classes=0 if head is None else head.shape[1], in_channels=stem.shape[2],
              image_size=math.isqrt(tokens) * stem.shape[0])


def load_mixer_npz(src: Source, num_classes: Optional[int] = None, seed: int = 0,
                   **overrides: Any) -> tuple[nn.Module, Variables]:
  """An official MLP-Mixer ``.npz`` (path or mapping of '/'-joined names) as ``(model, variables)``."""
  flat = read_npz(src)
  kwargs = infer_mixer_kwargs(flat)
  params = {tuple(k.split("/")): np.asarray(v, np.float32) for k, v in flat.items()}
  model = models.MlpMixer(**dict(kwargs, **overrides))
  return trees.assemble(model, params, f"The checkpoint {_where(src)}", num_classes, seed)


# --------------------------------------------------------------------------- resolution


def adapt_mixer_resolution(model: nn.Module, variables: Variables,
                           image_size: int) -> tuple[nn.Module, Variables]:
  """An MLP-Mixer for ``image_size``, its token-mixing MLPs grown as the Mixer paper proposes.

  MLP-Mixer paper, appendix C: when the token grid grows by an integer factor K per side
  (S -> K^2 S tokens), each token-mixing MLP becomes K^2 copies of the original working side by
  side: the first kernel is block-diagonal with K^2 copies of the (S, D_S) kernel (hidden width
  D_S -> K^2 D_S), the second likewise, biases tiled. Block b takes the tokens of the b-th
  spatial K x K sub-grid, so each block sees a sub-image laid out exactly as at the original
  resolution; with K = 1 the model is unchanged. Channel mixing, stem and head keep their shapes.
  """
  if not isinstance(model, models.MlpMixer):
    raise ValueError("Only an MLP-Mixer can change resolution; a DynaMixer's generate layers are "
                     f"sized for its token grid (got {type(model).__name__}).")
  old_size = model.image_size or 224
  grid, patch = old_size // model.patch_size, model.patch_size
  factor = image_size / old_size
  if image_size % patch or factor != int(factor) or factor < 1:
    raise ValueError(f"image_size={image_size} must be an integer multiple (K >= 1) of the "
                     f"model's {old_size}, and divisible by the patch size {patch}.")
  k = int(factor)
  new_grid = grid * k
  # Token t = (row, col) of the new grid -> (block, index inside the original grid).
  rows, cols = np.divmod(np.arange(new_grid * new_grid), new_grid)
  block = (rows // grid) * k + cols // grid
  local = (rows % grid) * grid + cols % grid
  hidden = model.tokens_mlp_dim
  params = jax.tree.map(np.asarray, trees.unfreeze(variables)["params"])
  for name, block_params in params.items():
    if not name.startswith("MixerBlock_"):
      continue
    d0, d1 = block_params["token_mixing"]["Dense_0"], block_params["token_mixing"]["Dense_1"]
    w0 = np.zeros((new_grid**2, k * k * hidden), d0["kernel"].dtype)
    w1 = np.zeros((k * k * hidden, new_grid**2), d1["kernel"].dtype)
    for t in range(new_grid**2):
      cols_h = slice(block[t] * hidden, (block[t] + 1) * hidden)
      w0[t, cols_h] = d0["kernel"][local[t]]
      w1[cols_h, t] = d1["kernel"][:, local[t]]
    d0["kernel"], d0["bias"] = w0, np.tile(d0["bias"], k * k)
    d1["kernel"], d1["bias"] = w1, d1["bias"][local]
  new_model = model.clone(image_size=image_size, tokens_mlp_dim=k * k * hidden)
  trees.require_fit(trees.shapes(params), trees.expected_param_shapes(new_model),
                    "The adapted weights")
  return new_model, {"params": jax.tree.map(jnp.asarray, params)}
