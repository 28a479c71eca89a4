"""I3D (Inflated Inception-V1) in Flax linen: the feature network of the standard FVD.

I3D is Carreira & Zisserman, "Quo Vadis, Action Recognition? A New Model and the Kinetics
Dataset" (CVPR 2017, arXiv:1705.07750): Inception-V1 (Szegedy et al. 2015) with every 2-D
convolution and pooling inflated to 3-D. The Fréchet Video Distance of Unterthiner et al.
(arXiv:1812.01717) embeds each clip with the RGB I3D trained on Kinetics-400 and takes its
averaged logits (B, 400): their reference code feeds 16-frame 224 x 224 clips scaled to [-1, 1]
to the TF-Hub module `deepmind/i3d-kinetics-400/1` and reads `RGB/inception_i3d/Mean:0`.

**The standard I3D weights are not shipped with spacetime_dit and cannot be downloaded here:
the user brings the file** (`load_weights`). FVDs computed with any other weights (random ones,
another checkpoint, a port trained elsewhere) are not comparable to published FVDs.

The layer layout, names and the test-time computation follow DeepMind's Sonnet implementation
(github.com/deepmind/kinetics-i3d, `i3d.py`), so a TensorFlow checkpoint converts by renaming:
  Unit3D      conv (no bias) -> batch norm (Sonnet defaults: offset beta, no scale, eps 1e-3,
              moving statistics at test time) -> ReLU; "SAME" padding as in TensorFlow.
  stem        Conv3d_1a_7x7 (64, stride 2) -> MaxPool3d_2a_3x3 (1x3x3, stride 1x2x2) ->
              Conv3d_2b_1x1 (64) -> Conv3d_2c_3x3 (192) -> MaxPool3d_3a_3x3 (1x3x3, 1x2x2)
  Mixed_3b, 3c -> MaxPool3d_4a_3x3 (3x3x3, stride 2) -> Mixed_4b..4f -> MaxPool3d_5a_2x2
              (2x2x2, stride 2) -> Mixed_5b, 5c: Inception blocks of four branches (1x1; 1x1 then
              3x3x3; 1x1 then 3x3x3; 3x3x3 max-pool then 1x1), concatenated on channels.
  Logits      average pool 2x7x7 ("VALID", stride 1) -> 1x1x1 conv with bias -> mean over time.
At 16 x 224 x 224 the Mixed_5c map is 2 x 7 x 7, so the pool leaves one position. Smaller inputs
(the tests run 8 x 32 x 32) shrink the pooling window to the map, and larger ones average the
logits of every pooled position; both are extensions, the standard FVD only uses 16 x 224 x 224.

Weight file: an `.npz` of float arrays named like the TensorFlow variables without the
`RGB/inception_i3d/` prefix and `:0` suffix (`Conv3d_1a_7x7/conv_3d/w`, `Mixed_3b/Branch_1/
Conv3d_0b_3x3/batch_norm/moving_mean`, `Logits/Conv3d_0c_1x1/conv_3d/b`, ...); kernels in
TensorFlow's (D, H, W, in, out) layout. `describe_weights()` (CLI: `python -m
spacetime_dit.eval.fvd --describe_weights`) lists every name and shape.

Shape alphabet: B clips, T frames, H, W pixels, C channels, D feature width.
"""

import dataclasses
import functools
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from data_pipelines import atomic_files

STANDARD_NUM_FRAMES = 16  # Unterthiner et al. 2018 compute FVD on 16-frame clips.
STANDARD_RESOLUTION = 224  # I3D's Kinetics input size (Carreira & Zisserman 2017, §3).
STANDARD_NUM_CLASSES = 400  # Kinetics-400.
POOL_WIDTH = 1024  # Mixed_5c channels: the width of the "pool" features.
OUTPUTS = ("logits", "pool")
BATCH_NORM_EPS = 1e-3  # Sonnet's BatchNorm default, which the Kinetics I3D was trained with.
_PRECISION = jax.lax.Precision.HIGHEST  # Same features on every accelerator (no bf16 passes).

NOT_SHIPPED = (
    "The standard I3D weights (Kinetics-400, as used by the reference FVD of Unterthiner et al."
    " 2018) are not shipped with spacetime_dit and cannot be downloaded here: bring the file"
    " yourself")
HOW_TO_MAKE = (
    "Make it from a TensorFlow I3D (e.g. the variables of the TF-Hub module"
    " deepmind/i3d-kinetics-400/1 that the reference FVD uses): one float array per variable,"
    " named without the 'RGB/inception_i3d/' prefix and ':0' suffix, saved with numpy.savez."
    " `python -m spacetime_dit.eval.fvd --describe_weights` lists every expected name and shape")

# Inception blocks: (name, (branch 0 1x1, branch 1 1x1, branch 1 3x3, branch 2 1x1, branch 2 3x3,
# branch 3 1x1)) widths of GoogLeNet (Szegedy et al. 2015, Table 1), whose 5x5 branch is a 3x3x3
# conv in I3D as in DeepMind's code.
_MIXED = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)
# DeepMind's checkpoint names Mixed_5b's branch-2 3x3x3 conv `Conv3d_0a_3x3` (every other block:
# `Conv3d_0b_3x3`); kept so that converted files load without special cases.
_BRANCH_2_3X3_NAME = {"Mixed_5b": "Conv3d_0a_3x3"}


@dataclasses.dataclass(frozen=True)
class I3DConfig:
  """What the feature network computes. The defaults are the standard FVD's.

  Attributes:
    num_classes: logits width; 400 for the Kinetics-400 I3D of the standard FVD.
    num_frames: T the clips are cut to (their first T frames); 16 for the standard FVD.
    resolution: H = W the frames are resized to; 224 for the standard FVD.
    output: "logits" (B, num_classes), the time-averaged logits of the reference FVD, or
      "pool" (B, 1024), Mixed_5c averaged over time and space (not the standard FVD).
  """

  num_classes: int = STANDARD_NUM_CLASSES
  num_frames: int = STANDARD_NUM_FRAMES
  resolution: int = STANDARD_RESOLUTION
  output: str = "logits"

  def __post_init__(self):
    for name in ("num_classes", "num_frames", "resolution"):
      if getattr(self, name) < 1:
        raise ValueError(f"I3DConfig.{name} is {getattr(self, name)}; it must be >= 1.")
    if self.output not in OUTPUTS:
      raise ValueError(f"I3DConfig.output is {self.output!r}; choose one of {OUTPUTS}.")

  @property
  def is_standard(self) -> bool:
    """True when the preprocessing and output are those of the reference FVD."""
    return (self.num_classes, self.num_frames, self.resolution, self.output) == (
        STANDARD_NUM_CLASSES, STANDARD_NUM_FRAMES, STANDARD_RESOLUTION, "logits")

  @property
  def feature_dim(self) -> int:
    return self.num_classes if self.output == "logits" else POOL_WIDTH


# ------------------------------------------------------------------------------------- network


class _Conv3d(nn.Module):
  """3-D convolution with TensorFlow "SAME" padding; params `w` (D, H, W, C_in, C_out), `b`."""

  features: int
  kernel: tuple[int, int, int]
  stride: tuple[int, int, int] = (1, 1, 1)
  use_bias: bool = False

  @nn.compact
  def __call__(self, x_bthwc):
    w = self.param("w", nn.initializers.lecun_normal(), (*self.kernel, x_bthwc.shape[-1], self.features))
    y = jax.lax.conv_general_dilated(
        x_bthwc, w, self.stride, "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        precision=_PRECISION)
    if self.use_bias:
      y = y + self.param("b", nn.initializers.zeros, (self.features,))
    return y


class _FrozenBatchNorm(nn.Module):
  """Test-time batch norm with the moving statistics and an offset, no scale (Sonnet default)."""

  @nn.compact
  def __call__(self, x_bthwc):
    c = x_bthwc.shape[-1]
    beta = self.param("beta", nn.initializers.zeros, (c,))
    mean = self.param("moving_mean", nn.initializers.zeros, (c,))
    var = self.param("moving_variance", nn.initializers.ones, (c,))
    return (x_bthwc - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS) + beta


class Unit3D(nn.Module):
  """Conv -> frozen batch norm -> ReLU (Sonnet I3D's `Unit3D`), or conv + bias for the logits."""

  features: int
  kernel: tuple[int, int, int] = (1, 1, 1)
  stride: tuple[int, int, int] = (1, 1, 1)
  logits: bool = False  # True: conv with bias, no norm, no ReLU.

  @nn.compact
  def __call__(self, x_bthwc):
    x = _Conv3d(self.features, self.kernel, self.stride, use_bias=self.logits, name="conv_3d")(
        x_bthwc)
    if self.logits:
      return x
    return nn.relu(_FrozenBatchNorm(name="batch_norm")(x))


def _max_pool(x_bthwc, window, stride):
  # flax pads "SAME" with -inf like TensorFlow's max_pool3d (more padding after than before).
  return nn.max_pool(x_bthwc, window, strides=stride, padding="SAME")


class _Branch(nn.Module):
  """One Inception branch: an optional 3x3x3 max-pool, then Unit3Ds (name, width, kernel side)."""

  units: tuple[tuple[str, int, int], ...]
  pool_first: bool = False

  @nn.compact
  def __call__(self, x_bthwc):
    if self.pool_first:
      x_bthwc = _max_pool(x_bthwc, (3, 3, 3), (1, 1, 1))
    for name, features, side in self.units:
      x_bthwc = Unit3D(features, (side, side, side), name=name)(x_bthwc)
    return x_bthwc


class _Mixed(nn.Module):
  """An inflated Inception block: four branches concatenated on channels."""

  widths: tuple[int, int, int, int, int, int]
  branch_2_3x3_name: str = "Conv3d_0b_3x3"

  @nn.compact
  def __call__(self, x_bthwc):
    w = self.widths
    branches = (
        _Branch((("Conv3d_0a_1x1", w[0], 1),), name="Branch_0"),
        _Branch((("Conv3d_0a_1x1", w[1], 1), ("Conv3d_0b_3x3", w[2], 3)), name="Branch_1"),
        _Branch((("Conv3d_0a_1x1", w[3], 1), (self.branch_2_3x3_name, w[4], 3)), name="Branch_2"),
        _Branch((("Conv3d_0b_1x1", w[5], 1),), pool_first=True, name="Branch_3"),
    )
    return jnp.concatenate([branch(x_bthwc) for branch in branches], axis=-1)


class _Logits(nn.Module):
  """Average pool (2, 7, 7) "VALID", 1x1x1 conv to the classes, mean over the pooled positions."""

  num_classes: int

  @nn.compact
  def __call__(self, x_bthwc):
    # The window shrinks to the map for inputs smaller than the standard 16 x 224 x 224 (where
    # the map is exactly 2 x 7 x 7); see the module docstring.
    window = tuple(min(k, n) for k, n in zip((2, 7, 7), x_bthwc.shape[1:4]))
    x = nn.avg_pool(x_bthwc, window, strides=(1, 1, 1), padding="VALID")
    # Dropout sits here in training; it is the identity at test time.
    logits = Unit3D(self.num_classes, logits=True, name="Conv3d_0c_1x1")(x)
    # Sonnet squeezes the (1 x 1) space and averages over time; the mean over both is the same
    # at the standard size and defined at every size.
    return logits.mean(axis=(1, 2, 3))


class InceptionI3d(nn.Module):
  """RGB I3D. Input: float32 (B, T, H, W, 3) in [-1, 1]. Output: {"logits", "pool"} (B, D)."""

  num_classes: int = STANDARD_NUM_CLASSES

  @nn.compact
  def __call__(self, x_bthwc):
    x = Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x_bthwc)
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
    x = Unit3D(64, name="Conv3d_2b_1x1")(x)
    x = Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
    for name, widths in _MIXED:
      if name == "Mixed_4b":
        x = _max_pool(x, (3, 3, 3), (2, 2, 2))  # MaxPool3d_4a_3x3
      elif name == "Mixed_5b":
        x = _max_pool(x, (2, 2, 2), (2, 2, 2))  # MaxPool3d_5a_2x2
      x = _Mixed(widths, _BRANCH_2_3X3_NAME.get(name, "Conv3d_0b_3x3"), name=name)(x)
    return {"logits": _Logits(self.num_classes, name="Logits")(x), "pool": x.mean(axis=(1, 2, 3))}


# ------------------------------------------------------------------------------- preprocessing


def legacy_bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) matrix of TF1 `resize_bilinear` (align_corners=False) along one axis.

  The reference FVD resizes with `tf.image.resize_bilinear`, whose default samples source
  coordinate i * size_in / size_out for output pixel i (no half-pixel offset, no antialiasing)
  and clamps the upper neighbour at the edge; row i holds the two interpolation weights.
  """
  src = np.arange(size_out, dtype=np.float64) * (size_in / size_out)
  lower = np.floor(src).astype(np.int64)
  upper = np.minimum(lower + 1, size_in - 1)
  frac = src - lower
  matrix = np.zeros((size_out, size_in), np.float64)
  np.add.at(matrix, (np.arange(size_out), lower), 1.0 - frac)
  np.add.at(matrix, (np.arange(size_out), upper), frac)
  return matrix.astype(np.float32)


def preprocess(videos_bthwc: jnp.ndarray, resolution: int) -> jnp.ndarray:
  """uint8 clips (B, T, H, W, 3) -> float32 (B, T, resolution, resolution, 3) in [-1, 1].

  The reference FVD's preprocessing: each frame resized to resolution x resolution with TF1's
  legacy bilinear rule (aspect ratio not kept, no crop; `legacy_bilinear_matrix`), then
  2 x / 255 - 1. Equal to it up to float32 rounding.
  """
  _, _, h, w, _ = videos_bthwc.shape
  rows = legacy_bilinear_matrix(h, resolution)
  cols = legacy_bilinear_matrix(w, resolution)
  x = videos_bthwc.astype(jnp.float32)
  x = jnp.einsum("oh,bthwc->btowc", rows, x, precision=_PRECISION)
  x = jnp.einsum("pw,btowc->btopc", cols, x, precision=_PRECISION)
  return 2.0 * x / 255.0 - 1.0


def select_frames(videos_bthwc: np.ndarray, num_frames: int) -> np.ndarray:
  """The first `num_frames` frames of uint8 (B, T, H, W, 3) clips, checked.

  The standard FVD scores 16-frame clips; longer clips are cut to their first frames (a
  deterministic rule: the same frames for real and generated clips that start at frame 0).
  """
  videos = np.asarray(videos_bthwc)
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(
        f"FVD feature network: the clips have shape {videos.shape}; it needs uint8 RGB clips"
        " (B, T, H, W, 3). Stack single clips with np.stack(clips).")
  if videos.dtype != np.uint8:
    raise ValueError(
        f"FVD feature network: the clips have dtype {videos.dtype}; it needs uint8 in [0, 255]."
        " Convert float clips in [0, 1] with np.round(x * 255).astype(np.uint8).")
  if videos.shape[1] < num_frames:
    raise ValueError(
        f"FVD feature network: the clips have {videos.shape[1]} frames but the network takes"
        f" {num_frames} (the standard FVD uses {STANDARD_NUM_FRAMES}-frame clips). Generate or"
        f" load clips of >= {num_frames} frames, or build the network with num_frames="
        f"{videos.shape[1]} (an FVD that is then not comparable to published ones).")
  return videos[:, :num_frames]


# --------------------------------------------------------------------------------- the weights


@functools.lru_cache(maxsize=4)
def expected_shapes(num_classes: int = STANDARD_NUM_CLASSES) -> dict[str, tuple[int, ...]]:
  """Every array of the weight file, name -> shape, input to output (12.7M numbers)."""
  model = InceptionI3d(num_classes)
  # The params do not depend on the input size; the smallest clip keeps tracing cheap.
  shapes = jax.eval_shape(
      model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1, 8, 8, 3), jnp.float32))
  flat = traverse_util.flatten_dict(shapes["params"], sep="/")
  # Names sort in network order (Conv3d_1a < ... < Mixed_5c) except the Logits, moved last.
  names = sorted(flat, key=lambda name: (name.startswith("Logits/"), name))
  return {name: tuple(flat[name].shape) for name in names}


def init_params(seed: int, num_classes: int = STANDARD_NUM_CLASSES) -> dict[str, Any]:
  """Random I3D params, for tests and smoke runs: He-normal kernels, identity batch norms.

  He init (fan-in, ReLU gain; He et al. 2015) keeps activations near unit scale through the
  ~20 ReLU layers, so random features still vary with the input. Drawn with numpy (float32
  arrays), ~10x faster than running Flax's init op by op on CPU.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in expected_shapes(num_classes).items():
    leaf = name.rsplit("/", 1)[1]
    if leaf == "w":
      value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    else:
      value = np.ones(shape) if leaf == "moving_variance" else np.zeros(shape)
    flat[name] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat, sep="/")


def describe_weights(num_classes: int = STANDARD_NUM_CLASSES) -> str:
  """The weight-file format as text: one `name shape` line per array, then the total."""
  shapes = expected_shapes(num_classes)
  lines = [f"{name} {shape}" for name, shape in shapes.items()]
  total = sum(int(np.prod(s)) for s in shapes.values())
  return "\n".join([
      f"I3D weight file: an .npz with these {len(shapes)} float arrays ({total:,} numbers);",
      "kernels (D, H, W, C_in, C_out); batch-norm arrays (C,) (Sonnet's (1, 1, 1, 1, C) is"
      " accepted).",
      f"{NOT_SHIPPED}.",
      *lines,
  ])


def save_weights(path: str, params: Mapping[str, Any]) -> None:
  """Writes I3D params as the `.npz` weight file that `load_weights` reads, atomically.

  Written through a file object, so `path` is used as given (np.savez would append ".npz").
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  with atomic_files.replacing(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def _read_npz(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"FVD weight file {path} does not exist. {NOT_SHIPPED}. {HOW_TO_MAKE}.")
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {name: npz[name] for name in npz.files}
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ValueError(
        f"FVD weight file {path} is not a numpy .npz of arrays ({type(e).__name__}: {e})."
        f" {HOW_TO_MAKE}.") from e


def _fit_shape(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
  """`array` as `shape`, allowing extra leading 1s (Sonnet's (1, 1, 1, 1, C) statistics)."""
  if array.shape == shape:
    return array
  extra = array.ndim - len(shape)
  if extra > 0 and array.shape[extra:] == shape and all(n == 1 for n in array.shape[:extra]):
    return array.reshape(shape)
  return None


def load_weights(path: str, num_classes: int = STANDARD_NUM_CLASSES) -> dict[str, Any]:
  """I3D params from the user's `.npz` weight file, checked against `expected_shapes`.

  Raises:
    FileNotFoundError: no file at `path` (the standard weights are not shipped: bring them).
    ValueError: not an .npz; an expected array missing, of the wrong shape, not float or not
      finite; or an array the network does not have. The message names the path and the first
      offending array.
  """
  arrays = _read_npz(path)
  expected = expected_shapes(num_classes)
  flat = {}
  for name, shape in expected.items():
    if name not in arrays:
      found = ", ".join(sorted(arrays)[:3]) or "nothing"
      raise ValueError(
          f"FVD weight file {path} has no array {name!r} (expected shape {shape}); it holds"
          f" {len(arrays)} arrays, starting {found}. {HOW_TO_MAKE}.")
    array = arrays[name]
    fitted = _fit_shape(array, shape)
    if fitted is None:
      hint = (f" The logits have {array.shape[-1]} classes: pass num_classes={array.shape[-1]}."
              if name.startswith("Logits/") and array.shape[:-1] == shape[:-1] else "")
      raise ValueError(
          f"FVD weight file {path}: array {name!r} has shape {array.shape}, expected {shape}.{hint}"
          f" {HOW_TO_MAKE}.")
    if not np.issubdtype(fitted.dtype, np.floating) or not np.isfinite(fitted).all():
      raise ValueError(
          f"FVD weight file {path}: array {name!r} is {fitted.dtype} with non-finite or"
          f" non-float values; every array must be finite floats. {HOW_TO_MAKE}.")
    flat[name] = fitted.astype(np.float32)
  extra = [name for name in arrays if name not in expected]
  if extra:
    raise ValueError(
        f"FVD weight file {path} has {len(extra)} arrays the I3D does not have, first {extra[0]!r}"
        f" (a prefix such as 'RGB/inception_i3d/' left on the names?). {HOW_TO_MAKE}.")
  return traverse_util.unflatten_dict(flat, sep="/")


# ------------------------------------------------------------------------- the feature network


@functools.partial(jax.jit, static_argnames=("config",))
def _features(params, videos_bthwc, *, config: I3DConfig):
  x = preprocess(videos_bthwc, config.resolution)
  return InceptionI3d(config.num_classes).apply({"params": params}, x)[config.output]


@dataclasses.dataclass(frozen=True, eq=False)
class I3DFeatureNetwork:
  """An `fvd.FeatureNetwork`: uint8 clips (B, T, H, W, 3) -> float32 features (B, D).

  Attributes:
    config: preprocessing and output (I3DConfig; its defaults are the standard FVD's).
    params: the I3D params (`load_weights` / `init_params`).
    source: where the weights came from, for reports ("random (seed 0)" or the file path).
  """

  config: I3DConfig
  params: Any
  source: str

  def __post_init__(self):
    # On the device once, not copied from the host at every call.
    object.__setattr__(self, "params", jax.device_put(self.params))

  @property
  def feature_dim(self) -> int:
    return self.config.feature_dim

  @property
  def description(self) -> str:
    c = self.config
    what = (f"I3D {c.output} ({c.feature_dim}) of {c.num_frames}-frame {c.resolution}x"
            f"{c.resolution} clips, weights: {self.source}")
    if self.source.startswith("random") or not c.is_standard:
      what += "; not comparable to published FVDs"
    return what

  def __call__(self, videos_bthwc: np.ndarray) -> np.ndarray:
    """Features (B, D) of uint8 clips (B, T >= num_frames, H, W, 3); see `select_frames`."""
    videos = select_frames(videos_bthwc, self.config.num_frames)
    return np.asarray(_features(self.params, jnp.asarray(videos), config=self.config))
