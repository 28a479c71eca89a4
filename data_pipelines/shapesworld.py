"""ShapesWorld: a procedural, random-access, infinite source of captioned videos.

Example `i` is a pure function of `(config.seed, split, i)`: every random draw comes from
`np.random.default_rng([seed, split_key, i])`, never from global state, so the source is a Grain
`RandomAccessDataSource` with no storage, and any worker can render any index.

A clip is a uint8 video (T, H, W, 3) (video frames/height/width) at a native size drawn from
`config.sizes` and a length drawn from `config.lengths` (1 = an image). It shows 1..max_objects
solid, saturated shapes of distinct colours on a dark background with a faint texture. Objects
move at constant velocity and bounce off the frame's edges; when two overlap, the one drawn later
(in front) hides the other, which reappears when it comes out (object permanence). All sizes and
speeds are fractions of the frame's shorter side, so every resolution shows the same scene.
Captions follow the grammar of `shapesworld_captions` (e.g. `a large red circle moving left`,
`a blue square and a yellow triangle moving up, the camera pans right`); 1-frame clips use its
image form, without motion words.

Camera motion. Object motion words are motion in the world. A pan moves the camera at
`camera_speed` (always slower than any object, see `ShapesWorldConfig`), so on screen
`velocity = object velocity - camera velocity`, and the background texture moves opposite to the
pan. Consequence used by the scorer: the dominant on-screen direction of a moving object is its
caption direction, and a static object drifts opposite to the pan. Bounces happen in screen space
(the frame's edges are the walls).

Direction stays visible: start positions keep an object in frame without bouncing whenever the
whole path fits; otherwise it starts at the wall behind it, and all speeds in the clip (objects and
camera, by one common factor) are slowed just enough that no object bounces along its dominant
axis during the first half of the clip. Long clips therefore still bounce, in their second half.
Start positions are also chosen (among a few candidates) so that objects are apart in frame 0 and
rarely overlap for long.
"""

import dataclasses

import numpy as np

from data_pipelines import shapesworld_render as render
# The caption vocabulary and grammar are part of this module's interface.
from data_pipelines.shapesworld_captions import (  # noqa: F401
    COLOURS, DIRECTION_VECTORS, DIRECTIONS, MOTIONS, OPPOSITE, SHAPES, SIZES, Caption,
    CaptionObject, format_caption, parse_caption)

SPLITS = ("train", "holdout")

_SPLIT_KEYS = {"train": 0, "holdout": 1}
_TEXTURE_COMPONENTS = 3
_START_CANDIDATES = 12  # Start-position draws per clip (see _draw_clip).
_MAX_MEAN_OVERLAP = 0.05  # Accepted mean box overlap of a clip's objects (see _draw_clip).


def _check_fraction_triple(name, value, low, high):
  """Raises a ValueError unless `value` is 3 increasing fractions in (low, high]."""
  if len(value) != 3 or not all(low < v <= high for v in value) or list(value) != sorted(value):
    raise ValueError(
        f"{name}={value}: need 3 increasing fractions of the shorter side in ({low}, {high}]"
        f" for small/medium/large, e.g. (0.36, 0.42, 0.48).")


@dataclasses.dataclass(frozen=True)
class ShapesWorldConfig:
  """Everything that defines the ShapesWorld distribution. Defaults are the tiny CPU config."""

  # Seed of the whole source; example i is a pure function of (seed, split, i).
  seed: int = 0
  # Native (H, W) choices, drawn uniformly: square, landscape 3:5, portrait 5:3 and wide 1:2.
  sizes: tuple[tuple[int, int], ...] = ((32, 32), (24, 40), (40, 24), (24, 48))
  # Native frame counts, drawn uniformly; 1 makes an image (static objects, no pan).
  lengths: tuple[int, ...] = (1, 5, 9, 13)
  # Objects per clip, drawn uniformly from 1..max_objects; objects in a clip have distinct colours.
  max_objects: int = 2
  # (colour, shape, motion) combos that the "train" split never draws and the "holdout" split
  # always draws for its first-mentioned object (compositional generalisation).
  holdout: tuple[tuple[str, str, str], ...] = ()
  # Probability that a clip with T > 1 pans the camera (captioned "the camera pans <dir>").
  camera_pan_prob: float = 0.0
  # Virtual length reported by len(); any index in [0, num_examples) renders.
  num_examples: int = 1_000_000
  # Bounding-box side of small / medium / large objects, as fractions of the shorter frame side
  # (about 9-15 px on 24-32 px frames). Medium objects carry no size word in the caption.
  object_sizes: tuple[float, float, float] = (0.36, 0.42, 0.48)
  # Object speed range in the world, fractions of the shorter side per frame (uniform draw);
  # about 1-1.5 px/frame on 24-32 px frames.
  speed_range: tuple[float, float] = (0.035, 0.05)
  # Camera pan speed, fraction of the shorter side per frame; at most 0.6 * speed_range[0] so a
  # pan can neither cancel nor reverse an object's on-screen motion along its direction. Half the
  # slowest object speed makes the slowest on-screen motions (an object moving with the pan, a
  # static object under a pan) equally visible.
  camera_speed: float = 0.0175
  # Background base colour (dark, so any object colour stands out).
  background: tuple[int, int, int] = (20, 20, 28)
  # Peak-to-centre amplitude, in uint8 levels, of the faint grey texture that shows camera pans.
  texture_contrast: float = 6.0

  def __post_init__(self):
    if not self.sizes or any(
        len(s) != 2 or int(s[0]) != s[0] or int(s[1]) != s[1] or min(s) < 8 for s in self.sizes):
      raise ValueError(
          f"sizes={self.sizes}: need a non-empty tuple of (H, W) integer pairs, each side >= 8"
          " pixels, e.g. ((32, 32), (24, 40)).")
    if not self.lengths or any(int(t) != t or t < 1 for t in self.lengths):
      raise ValueError(
          f"lengths={self.lengths}: need a non-empty tuple of frame counts >= 1, e.g. (1, 5, 9).")
    if not 1 <= self.max_objects <= len(COLOURS):
      raise ValueError(
          f"max_objects={self.max_objects}: objects in a clip have distinct colours, so it must"
          f" be in 1..{len(COLOURS)}.")
    for combo in self.holdout:
      if (len(combo) != 3 or combo[0] not in COLOURS or combo[1] not in SHAPES
          or combo[2] not in MOTIONS):
        raise ValueError(
            f"holdout entry {combo!r}: need (colour, shape, motion) with colour in"
            f" {tuple(COLOURS)}, shape in {SHAPES}, motion in {MOTIONS}, e.g."
            " ('red', 'triangle', 'left').")
    for frames in sorted(set(self.lengths)):
      if not _allowed_combos(self.holdout, frames, exclude_colours=()):
        raise ValueError(
            f"holdout={self.holdout} holds out every combo a {frames}-frame clip can show, so the"
            " train split cannot draw one. Hold out fewer combos or drop that length.")
    if not 0.0 <= self.camera_pan_prob <= 1.0:
      raise ValueError(f"camera_pan_prob={self.camera_pan_prob}: must be in [0, 1].")
    if self.num_examples < 1:
      raise ValueError(f"num_examples={self.num_examples}: must be >= 1.")
    _check_fraction_triple("object_sizes", self.object_sizes, 0.0, 0.5)
    if len(self.speed_range) != 2 or not 0.0 < self.speed_range[0] <= self.speed_range[1]:
      raise ValueError(
          f"speed_range={self.speed_range}: need (low, high) with 0 < low <= high, in fractions"
          " of the shorter side per frame, e.g. (0.035, 0.05).")
    if not 0.0 < self.camera_speed <= 0.6 * self.speed_range[0]:
      raise ValueError(
          f"camera_speed={self.camera_speed}: must be in (0, 0.6 * speed_range[0] ="
          f" {0.6 * self.speed_range[0]:.4g}] so that a pan never cancels an object's on-screen"
          " motion. Lower camera_speed or raise speed_range.")
    if len(self.background) != 3 or not all(12 <= c <= 80 for c in self.background):
      raise ValueError(
          f"background={self.background}: need a dark RGB triple with channels in [12, 80]:"
          " dark so objects stand out, and >= 12 so the texture stays in range, e.g. (20, 20, 28).")
    if not 0.0 <= self.texture_contrast <= 12.0:
      raise ValueError(
          f"texture_contrast={self.texture_contrast}: must be in [0, 12] uint8 levels; the"
          " texture must stay faint so it is never mistaken for an object.")


@dataclasses.dataclass(frozen=True, eq=False)
class ObjectTruth:
  """Ground truth of one object in a clip."""

  colour: str  # A key of COLOURS.
  shape: str  # One of SHAPES.
  size: str  # One of SIZES.
  size_px: float  # Bounding-box side in pixels (circle diameter, square side, triangle base).
  motion: str  # Caption motion (world frame), one of MOTIONS.
  depth: int  # Drawing order: 0 is drawn first (at the back).
  centres_t2: np.ndarray  # float32 (T, 2): bounding-box centre (x, y) in pixels per frame.
  screen_velocity: tuple[float, float]  # (vx, vy) px/frame on screen before any bounce.


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
  """A rendered clip with its full ground truth.

  Pixel convention: x grows to the right, y downwards, pixel (row i, column j) covers
  [j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5).
  """

  index: int
  video: np.ndarray  # uint8 (T, H, W, 3).
  caption: str
  objects: tuple[ObjectTruth, ...]  # In caption (mention) order.
  camera: str  # "static" or the pan direction.
  camera_offsets_t2: np.ndarray  # float32 (T, 2): camera displacement (x, y) in px per frame.


@dataclasses.dataclass(frozen=True)
class _ObjectSpec:
  colour: str
  shape: str
  size: str
  motion: str
  size_px: float
  start: tuple[float, float]  # Top-left corner (x, y) of the bounding box at frame 0.
  velocity: tuple[float, float]  # Screen velocity (vx, vy) px/frame.
  depth: int


@dataclasses.dataclass(frozen=True, eq=False)
class _ClipSpec:
  """Every random draw of a clip; rendering is a deterministic function of it."""

  frames: int
  height: int
  width: int
  objects: tuple[_ObjectSpec, ...]
  camera: str
  camera_velocity: tuple[float, float]  # px/frame.
  texture: np.ndarray  # float64 (K, 4): wavenumber kx, wavenumber ky, phase, amplitude.


def _allowed_combos(holdout, frames, exclude_colours):
  """All (colour, shape, motion) a training object may take in a clip of `frames` frames."""
  motions = MOTIONS if frames > 1 else ("static",)
  held = set(tuple(h) for h in holdout)
  return [(c, s, m) for c in COLOURS if c not in exclude_colours for s in SHAPES for m in motions
          if (c, s, m) not in held]


def _draw_caption_objects(rng, config, frames, num_objects, first=None):
  """Draws (colour, shape, size, motion) for each object; distinct colours; holdout respected.

  Args:
    rng: numpy Generator.
    config: ShapesWorldConfig.
    frames: T of the clip (1 forces static objects).
    num_objects: wanted count; fewer are returned when the holdout leaves no combo of an unused
      colour (only possible with aggressive holdouts).
    first: optional (colour, shape, motion) for the first object (the holdout split's combo);
      all other objects are drawn from the training combos.

  Returns:
    tuple of CaptionObject.
  """
  objects = []
  for k in range(num_objects):
    if k == 0 and first is not None:
      combo = first
    else:
      allowed = _allowed_combos(config.holdout, frames, [o.colour for o in objects])
      if not allowed:
        break
      combo = allowed[int(rng.integers(len(allowed)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    objects.append(CaptionObject(colour=combo[0], shape=combo[1], size=size, motion=combo[2]))
  return tuple(objects)


def _draw_frames_and_first(rng, config, split):
  """Draws T and, for the holdout split, the first object's held-out combo."""
  if split == "train":
    return int(config.lengths[int(rng.integers(len(config.lengths)))]), None
  combo = tuple(config.holdout[int(rng.integers(len(config.holdout)))])
  lengths = [t for t in config.lengths if t > 1 or combo[2] == "static"]
  return int(lengths[int(rng.integers(len(lengths)))]), combo


def _draw_camera(rng, config, frames):
  """Pan direction or "static" (images never pan)."""
  if frames > 1 and rng.random() < config.camera_pan_prob:
    return DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
  return "static"


def _start_along_axis(u, velocity, room, frames, dominant):
  """Start coordinate in [0, room] that keeps the path bounce-free when it fits.

  Args:
    u: uniform draw in [0, 1).
    velocity: px/frame along this axis.
    room: free travel (frame extent minus object size) in px.
    frames: T.
    dominant: whether this is the axis of the object's main on-screen motion.

  Returns:
    float start coordinate: if the whole path fits, behind the object (at the wall it moves away
    from) plus a random share of the slack the path leaves; if not, at that wall on the dominant
    axis (the first bounce comes as late as possible) and anywhere on the other axis.
  """
  slack = room - abs(velocity) * (frames - 1)
  if velocity == 0.0 or (slack < 0 and not dominant):
    return u * room
  slack = max(0.0, slack)
  return u * slack if velocity > 0 else room - u * slack


def _clip_rng(config: ShapesWorldConfig, split: str, index: int) -> np.random.Generator:
  """The generator of clip `index`: a pure function of (seed, split, index), no global state."""
  return np.random.default_rng([config.seed, _SPLIT_KEYS[split], index])


def _draw_shape(rng, config, split):
  """The first draws of every clip: (T, H, W, first object's held-out combo or None)."""
  height, width = (int(v) for v in config.sizes[int(rng.integers(len(config.sizes)))])
  frames, first = _draw_frames_and_first(rng, config, split)
  return frames, height, width, first


def _overlap_cost(corners, sizes_px):
  """How much a clip's objects overlap: (touching in frame 0, mean worst overlap).

  Args:
    corners: list of float (T, 2) top-left corners per object.
    sizes_px: box sides per object.

  Returns:
    (bool: some pair's boxes are closer than 2 px in the first frame, float: mean over frames of
    the worst pairwise box overlap as a fraction of the smaller box).
  """
  worst = np.zeros(len(corners[0]))
  touching = False
  for i in range(len(corners)):
    for j in range(i + 1, len(corners)):
      lo = np.maximum(corners[i], corners[j])
      hi = np.minimum(corners[i] + sizes_px[i], corners[j] + sizes_px[j])
      area = np.prod(np.clip(hi - lo, 0.0, None), axis=1)
      worst = np.maximum(worst, area / min(sizes_px[i], sizes_px[j]) ** 2)
      touching |= bool(np.all(hi[0] - lo[0] > -2.0))
  return touching, float(worst.mean())


def _draw_clip(config: ShapesWorldConfig, split: str, index: int) -> _ClipSpec:
  """All random draws of clip `index`, in a fixed order, and the motion they imply."""
  rng = _clip_rng(config, split, index)
  frames, height, width, first = _draw_shape(rng, config, split)
  num_objects = int(rng.integers(1, config.max_objects + 1))
  camera = _draw_camera(rng, config, frames)
  caption_objects = _draw_caption_objects(rng, config, frames, num_objects, first)
  n = len(caption_objects)
  depths = rng.permutation(n)
  speeds = rng.uniform(*config.speed_range, size=n)
  # Each candidate spreads the objects over strata of each axis (object k in stratum order[k]),
  # which makes well-separated starts likely even in crowded frames.
  strata = np.argsort(rng.random((_START_CANDIDATES, n, 2)), axis=1)
  starts_u = (strata + rng.random((_START_CANDIDATES, n, 2))) / max(n, 1)
  texture_u = rng.random((_TEXTURE_COMPONENTS, 4))

  short = float(min(height, width))
  extent = np.array([width, height], np.float64)
  sizes_px = [config.object_sizes[SIZES.index(o.size)] * short for o in caption_objects]
  cam_v = config.camera_speed * short * np.array(DIRECTION_VECTORS[camera])
  velocities = [speed * short * np.array(DIRECTION_VECTORS[o.motion]) - cam_v
                for speed, o in zip(speeds, caption_objects)]
  # One common slow-down so no object bounces along its dominant axis in the clip's first half:
  # the caption's direction must be readable from the start of the clip.
  scale = 1.0
  for v, size_px in zip(velocities, sizes_px):
    axis = int(np.argmax(np.abs(v)))
    if frames > 1 and abs(v[axis]) > 0:
      scale = min(scale, (extent[axis] - size_px) / (abs(v[axis]) * (frames - 1) / 2))
  velocities = [v * scale for v in velocities]

  # Objects may pass behind one another, but each must first be seen whole, and a pair that
  # overlaps for much of the clip reads as one merged blob: take the first start candidate that
  # separates the objects in frame 0 and keeps the mean overlap small, else the least bad one.
  best, best_cost = None, None
  for candidate in starts_u:
    starts = [tuple(_start_along_axis(u[a], v[a], extent[a] - size_px, frames,
                                      a == np.argmax(np.abs(v))) for a in range(2))
              for u, v, size_px in zip(candidate, velocities, sizes_px)]
    cost = (False, 0.0) if n < 2 else _overlap_cost(
        [render.box_corners(p, v, z, extent, frames)
         for p, v, z in zip(starts, velocities, sizes_px)],
        sizes_px)
    if best is None or cost < best_cost:
      best, best_cost = starts, cost
    if not cost[0] and cost[1] <= _MAX_MEAN_OVERLAP:
      break
  objects = tuple(
      _ObjectSpec(colour=o.colour, shape=o.shape, size=o.size, motion=o.motion, size_px=z,
                  start=p, velocity=(float(v[0]), float(v[1])), depth=int(d))
      for o, z, p, v, d in zip(caption_objects, sizes_px, best, velocities, depths))

  # Faint plaid of sinusoids with wavelengths of 0.25-0.6 of the shorter side.
  wavelength = (0.25 + 0.35 * texture_u[:, 0]) * short
  angle = np.pi * texture_u[:, 1]
  texture = np.stack([
      2 * np.pi / wavelength * np.cos(angle),
      2 * np.pi / wavelength * np.sin(angle),
      2 * np.pi * texture_u[:, 2],
      config.texture_contrast / _TEXTURE_COMPONENTS * (0.5 + 0.5 * texture_u[:, 3]),
  ], axis=1)
  return _ClipSpec(frames=frames, height=height, width=width, objects=objects,
                   camera=camera, camera_velocity=tuple(float(c) for c in cam_v * scale),
                   texture=texture)


def _centres(spec: _ClipSpec, obj: _ObjectSpec) -> np.ndarray:
  """float32 (T, 2) bounding-box centres (x, y) of `obj`."""
  corners = render.box_corners(obj.start, obj.velocity, obj.size_px, (spec.width, spec.height),
                               spec.frames)
  return (corners + obj.size_px / 2).astype(np.float32)


def _render(spec: _ClipSpec, config: ShapesWorldConfig) -> tuple[np.ndarray, list[np.ndarray]]:
  """Returns (uint8 video (T, H, W, 3), per-object float32 (T, 2) centres in spec order)."""
  video = render.background(spec.frames, spec.height, spec.width, spec.texture,
                            spec.camera_velocity, config.background)
  centres = [_centres(spec, obj) for obj in spec.objects]
  for k in sorted(range(len(spec.objects)), key=lambda k: spec.objects[k].depth):
    obj = spec.objects[k]
    render.paint_object(video, obj.shape, centres[k], obj.size_px, COLOURS[obj.colour])
  return video, centres


class ShapesWorld:
  """Random-access ShapesWorld source (a Grain `RandomAccessDataSource`).

  Args:
    config: the distribution.
    split: "train" never draws an object with a held-out (colour, shape, motion) combo;
      "holdout" always makes the first-mentioned object a held-out combo (any other objects are
      training combos). The two splits draw from independent random streams.
  """

  def __init__(self, config: ShapesWorldConfig, *, split: str = "train"):
    if split not in SPLITS:
      raise ValueError(f"split={split!r}: must be one of {SPLITS}.")
    if split == "holdout":
      if not config.holdout:
        raise ValueError(
            "split='holdout' needs config.holdout to list (colour, shape, motion) combos, e.g."
            " (('red', 'triangle', 'left'),).")
      if any(m != "static" for _, _, m in config.holdout) and max(config.lengths) < 2:
        raise ValueError(
            f"holdout={config.holdout} has moving combos but lengths={config.lengths} has only"
            " images; add a length > 1.")
    self.config = config
    self.split = split

  def __len__(self) -> int:
    return self.config.num_examples

  def __repr__(self) -> str:
    return f"ShapesWorld(split={self.split!r}, config={self.config})"

  def _check_index(self, index) -> int:
    index = int(index)
    if not 0 <= index < self.config.num_examples:
      raise IndexError(
          f"index {index} out of range for ShapesWorld of length {self.config.num_examples};"
          " raise config.num_examples for more examples.")
    return index

  def _spec(self, index) -> _ClipSpec:
    return _draw_clip(self.config, self.split, self._check_index(index))

  def shape_of(self, index: int) -> tuple[int, int, int]:
    """(T, H, W) of example `index` without rendering it (for bucketing)."""
    frames, height, width, _ = _draw_shape(
        _clip_rng(self.config, self.split, self._check_index(index)), self.config, self.split)
    return frames, height, width

  def example(self, index: int) -> Example:
    """Renders example `index` with its full ground truth."""
    spec = self._spec(index)
    video, centres = _render(spec, self.config)
    objects = tuple(
        ObjectTruth(colour=o.colour, shape=o.shape, size=o.size, size_px=o.size_px,
                    motion=o.motion, depth=o.depth, centres_t2=c, screen_velocity=o.velocity)
        for o, c in zip(spec.objects, centres))
    caption = Caption(
        objects=tuple(CaptionObject(o.colour, o.shape, o.size, o.motion) for o in spec.objects),
        camera=spec.camera)
    offsets = (np.arange(spec.frames, dtype=np.float32)[:, None]
               * np.asarray(spec.camera_velocity, np.float32))
    return Example(index=int(index), video=video,
                   caption=format_caption(caption, image=spec.frames == 1), objects=objects,
                   camera=spec.camera, camera_offsets_t2=offsets)

  def __getitem__(self, index: int) -> dict:
    """Batchable fields: {"video": uint8 (T, H, W, 3), "caption": str, "index": np.int64}."""
    ex = self.example(index)
    return {"video": ex.video, "caption": ex.caption, "index": np.int64(ex.index)}


def sample_prompts(config: ShapesWorldConfig, num: int, *, seed: int, split: str = "train",
                   num_objects: int = 1, image: bool = False) -> list[str]:
  """Draws `num` captions from the ShapesWorld distribution (e.g. evaluation prompts).

  Args:
    config: the distribution (holdout, camera_pan_prob, max colours).
    num: how many prompts.
    seed: prompt i is a pure function of (seed, split, num_objects, image, i).
    split: "train" avoids held-out combos; "holdout" makes the first object a held-out combo.
    num_objects: objects per prompt (distinct colours), 1..len(COLOURS).
    image: image prompts (static, no motion words) instead of video prompts.

  Returns:
    list of canonical caption strings.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: must be one of {SPLITS}.")
  if not 1 <= num_objects <= len(COLOURS):
    raise ValueError(f"num_objects={num_objects}: must be in 1..{len(COLOURS)}.")
  frames = 1 if image else 2
  firsts = [tuple(h) for h in config.holdout if not image or h[2] == "static"]
  if split == "holdout" and not firsts:
    raise ValueError(
        f"split='holdout' with image={image} needs a matching held-out combo in"
        f" config.holdout={config.holdout}.")
  prompts = []
  for i in range(num):
    rng = np.random.default_rng([seed, _SPLIT_KEYS[split], num_objects, int(image), i])
    first = firsts[int(rng.integers(len(firsts)))] if split == "holdout" else None
    camera = _draw_camera(rng, config, frames)
    objects = _draw_caption_objects(rng, config, frames, num_objects, first)
    prompts.append(format_caption(Caption(objects=objects, camera=camera), image=image))
  return prompts
