"""ShapesWorld scores: does a generated video show what its prompt says?

Each object named in the prompt (see `data_pipelines.shapesworld` for the grammar) is found by its
colour, frame by frame, and checked for colour, shape, direction of motion and persistence. The
detector is deliberately simple and robust to blur and to h264's small colour shifts.

Detection, per object and frame:
  1. Colour mask: pixels whose nearest palette colour (`COLOURS`) is the object's colour and lie
     within `max_colour_distance` of it (Euclidean RGB). White is (240, 240, 240), so only bright,
     unsaturated pixels count; the dark background is far from every palette colour.
  2. Blob: the largest 4-connected component of the mask (`scipy.ndimage.label`).
  3. The object is *visible* when the blob is a solid object, not scattered pixels: area
     >= `min_area_fraction` * shorter_side**2 and <= `max_area_fraction` * H * W, it holds
     >= `min_dominance` of the colour's pixels in the frame, it fills >= `min_fill` of its
     bounding box, and the box's aspect ratio (short/long) is >= `min_aspect`. Uniform noise has
     every hue in scattered pixels, so its largest component is tiny and never dominant.
  4. An invisible object is *occluded* when its centroid, interpolated from the frames where it
     is visible (held constant before the first and after the last), lies inside another prompt
     object's blob box grown by `occlusion_margin` * shorter_side (it went behind that object:
     object permanence).
  5. A visible frame is *clean* when the blob's box is at least one pixel away from the other
     prompt objects' blob boxes (no partial occlusion distorting shape or centroid).

Scores per object (each 0 or 1, except persistence), averaged over the prompt's objects:
  colour:      1 if the object is visible in >= `present_fraction` of the frames where it is not
               occluded (and in at least one frame).
  shape:       1 if the majority vote of per-frame shapes is the prompt's shape. Voters: the clean
               frames; if none, the visible frames whose blob area is >= 95% of the largest (the
               least occluded). Per-frame shape from soft (coverage-weighted) measures in a window
               around the blob (`_soft_features`): fill = area / (width * height) (square 1,
               circle pi/4, triangle 1/2) and the mass centroid's downward offset from the
               extent's centre (about 1/6 of the height for an apex-up triangle, 0 otherwise):
               triangle if offset > `triangle_offset` or fill < `triangle_fill`, else square if
               fill >= `square_fill`, else circle.
  motion:      None when T == 1. Otherwise 1 if the measured direction equals the expected one.
               Measured: least-squares velocity of the coverage-weighted centroid (sub-pixel
               precise on soft edges) over the clean frames of the first half of the clip,
               t <= max(1, (T - 1) // 2), where ShapesWorld never bounces an object along its
               main axis; falling back to that half's visible frames, then to the clip's clean,
               then visible frames. "static" when that velocity moves the object less than
               `static_displacement` * shorter_side over max(1, (T - 1) // 2) frames, else the
               dominant axis's sign. Expected (on screen): the prompt's motion; for a static
               object under a camera pan, the direction opposite to the pan. This is exact for
               ShapesWorld: on-screen velocity = object velocity - camera velocity, and the camera
               is always slower than any object (`ShapesWorldConfig.camera_speed`).
  persistence: fraction of frames in which the object is visible or occluded (0 if never
               visible), so an object that vanishes, appears late or flickers loses score.

Limitation: two prompt objects of the same colour share one mask and are scored on the same blob.
"""

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from data_pipelines.shapesworld_captions import COLOURS, OPPOSITE, parse_caption

_PALETTE = tuple(COLOURS)
_PALETTE_RGB = np.asarray([COLOURS[c] for c in _PALETTE], np.float32)
_DARK = np.asarray((20, 20, 28), np.float32)  # Nominal background, for coverage estimates.


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
  """Detector thresholds (defaults tuned on ShapesWorld renders, blurred and h264 round trips)."""

  # Max Euclidean RGB distance from a palette colour for a pixel to take that colour. Palette
  # colours are >= 175 apart and >= 184 from the background, so masks never overlap and edge
  # pixels less than about half covered by the object drop out.
  max_colour_distance: float = 100.0
  # Min blob area as a fraction of shorter_side**2; the smallest ShapesWorld object (a small
  # triangle) covers about 0.5 * 0.36**2 = 0.065.
  min_area_fraction: float = 0.02
  # Max blob area as a fraction of H * W: a frame flooded with one colour is not an object.
  max_area_fraction: float = 0.5
  # Min share of the frame's pixels of that colour that the blob must hold.
  min_dominance: float = 0.5
  # Min blob area / bounding-box area (a triangle is 0.5, scattered pixels much less).
  min_fill: float = 0.3
  # Min bounding-box short side / long side (ShapesWorld objects are 1).
  min_aspect: float = 0.4
  # Colour matches when visible in at least this share of the frames where it is not occluded.
  present_fraction: float = 0.8
  # An object is static when its fitted velocity moves it less than this fraction of the shorter
  # side over the first half of the clip ((T - 1) // 2 frames, at least 1). ShapesWorld's
  # slowest on-screen motion covers >= 0.035 there for T >= 5.
  static_displacement: float = 0.02
  # Growth of another object's blob box, as a fraction of the shorter side, when deciding that an
  # invisible object is behind it (about half an object).
  occlusion_margin: float = 0.2
  # Shape thresholds on the soft fill ratio and centroid offset (see _soft_features; measured on
  # renders, blurred renders and h264 round trips: squares >= 0.95, circles 0.78-0.89,
  # triangles 0.52-0.77 in fill; triangles >= 0.1 and the others <= 0.015 in offset). Fill >=
  # square_fill is a square; fill < triangle_fill or offset > triangle_offset is a triangle.
  square_fill: float = 0.92
  triangle_fill: float = 0.65
  triangle_offset: float = 0.06

  def __post_init__(self):
    for name in ("max_area_fraction", "min_dominance", "min_fill", "min_aspect",
                 "present_fraction", "triangle_fill", "square_fill"):
      if not 0.0 < getattr(self, name) <= 1.0:
        raise ValueError(f"{name}={getattr(self, name)}: must be in (0, 1].")
    for name in ("max_colour_distance", "min_area_fraction", "static_displacement",
                 "occlusion_margin", "triangle_offset"):
      if getattr(self, name) <= 0.0:
        raise ValueError(f"{name}={getattr(self, name)}: must be > 0.")
    if self.triangle_fill >= self.square_fill:
      raise ValueError(
          f"triangle_fill={self.triangle_fill} must be below square_fill={self.square_fill};"
          " circles (fill 0.785) sit between them.")


@dataclasses.dataclass(frozen=True, eq=False)
class _Track:
  """Per-frame detections of one object."""

  visible: np.ndarray  # bool (T,)
  centroid: np.ndarray  # float (T, 2) blob centroid (x, y) in px; nan where invisible.
  box: np.ndarray  # int (T, 4) blob box (x0, y0, x1, y1), inclusive; -1 where invisible.
  area: np.ndarray  # int (T,) blob area in px; 0 where invisible.
  shape: list  # per-frame shape name, or None where invisible.


def _palette_distances(video_thwc: np.ndarray, max_distance: float):
  """Per-pixel RGB distances to the palette and each pixel's palette colour.

  Args:
    video_thwc: uint8 (T, H, W, 3).
    max_distance: max RGB distance to the nearest palette colour.

  Returns:
    (float32 (T, H, W, P) distances to the P palette colours, int8 (T, H, W) index of the
    nearest palette colour, or -1 where even that is farther than max_distance: background).
  """
  pixels = video_thwc.astype(np.float32)
  # |p - c|^2 = |p|^2 - 2 p.c + |c|^2: one (N, 3) @ (3, P) matmul instead of P reductions.
  dist2 = pixels @ (-2 * _PALETTE_RGB.T)
  dist2 += np.einsum("thwc,thwc->thw", pixels, pixels)[..., None]
  dist2 += np.einsum("pc,pc->p", _PALETTE_RGB, _PALETTE_RGB)
  dist = np.sqrt(np.maximum(dist2, 0.0, out=dist2), out=dist2)
  nearest = np.argmin(dist, axis=-1)
  far = np.take_along_axis(dist, nearest[..., None], axis=-1)[..., 0] > max_distance
  nearest = nearest.astype(np.int8)
  nearest[far] = -1
  return dist, nearest


def _coverage_estimate(dist_thw: np.ndarray, nearest_thw: np.ndarray, colour: str) -> np.ndarray:
  """float32 (T, H, W) estimate of how much of each pixel the object covers, in [0, 1].

  A pixel blending coverage a of colour c over background b has |pixel - c| = (1 - a) |c - b|,
  so 1 - dist / |c - b| recovers a (with b the nominal dark background); this gives centroids
  sub-pixel precision from anti-aliased or blurred edges. Pixels of other palette colours get 0.
  """
  index = _PALETTE.index(colour)
  scale = np.linalg.norm(_PALETTE_RGB[index] - _DARK)
  cover = np.clip(1.0 - dist_thw / scale, 0.0, 1.0)
  cover[(cover < 0.1) | ((nearest_thw >= 0) & (nearest_thw != index))] = 0.0
  return cover


def _soft_features(cover_hw: np.ndarray, x0: int, y0: int, config: ScoreConfig):
  """Centroid and shape of one blob from coverage estimates around it.

  Soft (coverage-weighted) measures use the anti-aliased or blurred edge pixels that a hard mask
  drops, which keeps them stable on objects only ~9 px across.

  Args:
    cover_hw: float32 (h, w) coverage estimates in a window around the blob.
    x0: window column offset in the frame.
    y0: window row offset in the frame.
    config: shape thresholds.

  Returns:
    ((x, y) centroid in frame px, shape name). Fill = soft area / (soft width * soft height),
    where the soft width sums each column's largest coverage (and height likewise): square 1,
    circle pi/4, triangle 1/2. Offset = (mass centroid row - extent centre row) / soft height:
    about 1/6 for an apex-up triangle, 0 for circles and squares.
  """
  rows = np.arange(cover_hw.shape[0])
  cols = np.arange(cover_hw.shape[1])
  mass = cover_hw.sum()
  row_mass = cover_hw.sum(axis=1)
  row_extent = cover_hw.max(axis=1)
  col_extent = cover_hw.max(axis=0)
  height, width = row_extent.sum(), col_extent.sum()
  centroid = ((cover_hw.sum(axis=0) @ cols) / mass + x0 + 0.5, (row_mass @ rows) / mass + y0 + 0.5)
  fill = mass / (width * height)
  offset = ((row_mass @ rows) / mass - (row_extent @ rows) / height) / height
  if offset > config.triangle_offset or fill < config.triangle_fill:
    return centroid, "triangle"
  return centroid, "square" if fill >= config.square_fill else "circle"


def _detect(mask_thw: np.ndarray, cover_thw: np.ndarray, config: ScoreConfig) -> _Track:
  """Largest solid blob of one colour in every frame (see module docstring, steps 2-3).

  Args:
    mask_thw: bool (T, H, W) colour mask.
    cover_thw: float32 (T, H, W) coverage estimate of that colour (see _coverage_estimate);
      centroid and shape come from it over the blob's box grown by 2 px (_soft_features).
    config: thresholds.

  Returns:
    the object's _Track.
  """
  frames, height, width = mask_thw.shape
  short = min(height, width)
  visible = np.zeros(frames, bool)
  centroid = np.full((frames, 2), np.nan)
  box = np.full((frames, 4), -1, np.int64)
  areas = np.zeros(frames, np.int64)
  shapes = [None] * frames
  for t in range(frames):
    labels, count = ndimage.label(mask_thw[t])
    if count == 0:
      continue
    sizes = np.bincount(labels.ravel())[1:]
    area = int(sizes.max())
    ys, xs = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    box_w, box_h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    fill = area / (box_w * box_h)
    solid = (config.min_area_fraction * short ** 2 <= area <= config.max_area_fraction * height
             * width and area >= config.min_dominance * sizes.sum() and fill >= config.min_fill
             and min(box_w, box_h) >= config.min_aspect * max(box_w, box_h))
    if not solid:
      continue
    visible[t] = True
    areas[t] = area
    box[t] = xs.min(), ys.min(), xs.max(), ys.max()
    y0, x0 = max(ys.min() - 2, 0), max(xs.min() - 2, 0)
    window = cover_thw[t, y0:ys.max() + 3, x0:xs.max() + 3]
    centroid[t], shapes[t] = _soft_features(window, x0, y0, config)
  return _Track(visible=visible, centroid=centroid, box=box, area=areas, shape=shapes)


def _interpolated_positions(track: _Track) -> np.ndarray:
  """float (T, 2): centroid where visible, linear interpolation (held at the ends) elsewhere."""
  frames = np.arange(len(track.visible))
  seen = frames[track.visible]
  return np.stack([np.interp(frames, seen, track.centroid[seen, a]) for a in range(2)], axis=1)


def _inside_box(point, box, margin) -> bool:
  return (box[0] - margin <= point[0] <= box[2] + 1 + margin
          and box[1] - margin <= point[1] <= box[3] + 1 + margin)


def _boxes_touch(a, b) -> bool:
  """Whether inclusive boxes a and b overlap or are less than one pixel apart."""
  return a[0] <= b[2] + 1 and b[0] <= a[2] + 1 and a[1] <= b[3] + 1 and b[1] <= a[3] + 1


def _occluded_and_clean(tracks: list, short: int, config: ScoreConfig):
  """Per object: (occluded bool (T,), clean bool (T,)); see module docstring, steps 4-5."""
  margin = config.occlusion_margin * short
  result = []
  for i, track in enumerate(tracks):
    others = [o for j, o in enumerate(tracks) if j != i]
    frames = len(track.visible)
    occluded = np.zeros(frames, bool)
    clean = track.visible.copy()
    if track.visible.any():
      position = _interpolated_positions(track)
      for t in range(frames):
        if track.visible[t]:
          clean[t] = not any(o.visible[t] and _boxes_touch(track.box[t], o.box[t]) for o in others)
        else:
          occluded[t] = any(o.visible[t] and _inside_box(position[t], o.box[t], margin)
                            for o in others)
    result.append((occluded, clean))
  return result


def _direction(velocity, threshold) -> str:
  """Direction name of a (vx, vy) velocity: static below threshold, else the dominant axis."""
  vx, vy = velocity
  if max(abs(vx), abs(vy)) < threshold:
    return "static"
  if abs(vx) >= abs(vy):
    return "right" if vx > 0 else "left"
  return "down" if vy > 0 else "up"


def expected_screen_motion(motion: str, camera: str) -> str:
  """On-screen direction that a prompt implies for an object (see module docstring, motion)."""
  return motion if motion != "static" else OPPOSITE[camera]


def _measure_velocity(track: _Track, clean: np.ndarray):
  """Least-squares (vx, vy) px/frame and RMS fit residual (px) over the clip's first half.

  Returns (None, None) when fewer than 2 usable frames exist.
  """
  frames = len(track.visible)
  early = np.arange(frames) <= max(1, (frames - 1) // 2)
  for usable in (clean & early, track.visible & early, clean, track.visible):
    if usable.sum() >= 2:
      t = np.nonzero(usable)[0].astype(np.float64)
      xy = track.centroid[usable]
      design = np.stack([t, np.ones_like(t)], axis=1)
      coef, *_ = np.linalg.lstsq(design, xy, rcond=None)
      residual = float(np.sqrt(np.mean((design @ coef - xy) ** 2)))
      return (float(coef[0, 0]), float(coef[0, 1])), residual
  return None, None


def score_video(video_thwc: np.ndarray, prompt: str, *,
                config: ScoreConfig = ScoreConfig()) -> dict:
  """Scores one generated video against its ShapesWorld prompt.

  Args:
    video_thwc: uint8 (T, H, W, 3) video frames.
    prompt: a caption in the ShapesWorld grammar.
    config: detector thresholds.

  Returns:
    dict with "colour", "shape", "persistence" (floats in [0, 1], means over the prompt's
    objects), "motion" (same, or None when T == 1), "num_frames" and "objects": one dict per
    prompt object with its expected and detected attributes, "visible_frames",
    "occluded_frames", "velocity" (px/frame or None) and "velocity_residual" (RMS px deviation
    from constant velocity in the fit window, or None).

  Raises:
    ValueError: for a video that is not uint8 (T, H, W, 3) or a prompt outside the grammar.
  """
  video_thwc = np.asarray(video_thwc)
  if video_thwc.dtype != np.uint8 or video_thwc.ndim != 4 or video_thwc.shape[-1] != 3:
    raise ValueError(
        f"video has dtype {video_thwc.dtype} and shape {video_thwc.shape}; the scorer needs"
        " uint8 (T, H, W, 3). Convert model outputs in [-1, 1] with"
        " np.clip((x + 1) * 127.5, 0, 255).round().astype(np.uint8).")
  caption = parse_caption(prompt)
  frames, height, width, _ = video_thwc.shape
  short = min(height, width)
  dist, nearest = _palette_distances(video_thwc, config.max_colour_distance)
  tracks = []
  for o in caption.objects:
    index = _PALETTE.index(o.colour)
    cover = _coverage_estimate(dist[..., index], nearest, o.colour)
    tracks.append(_detect(nearest == index, cover, config))
  results = []
  for o, track, (occluded, clean) in zip(
      caption.objects, tracks, _occluded_and_clean(tracks, short, config)):
    seen = int(track.visible.sum())
    # Without clean frames, the least occluded ones (near the largest area seen) vote.
    largest = track.visible & (track.area >= 0.95 * track.area.max())
    votes = [s for s, c in zip(track.shape, clean if clean.any() else largest) if c]
    detected_shape = collections.Counter(votes).most_common(1)[0][0] if votes else None
    velocity, residual = _measure_velocity(track, clean) if frames > 1 else (None, None)
    expected = expected_screen_motion(o.motion, caption.camera)
    threshold = config.static_displacement * short / max(1, (frames - 1) // 2)
    detected_motion = None if velocity is None else _direction(velocity, threshold)
    results.append({
        "colour": o.colour,
        "shape_expected": o.shape,
        "shape_detected": detected_shape,
        "motion_expected": expected if frames > 1 else None,
        "motion_detected": detected_motion,
        "visible_frames": seen,
        "occluded_frames": int(occluded.sum()),
        "velocity": velocity,
        "velocity_residual": residual,
        "colour_score": float(seen > 0 and seen >= config.present_fraction
                              * (frames - occluded.sum())),
        "shape_score": float(detected_shape == o.shape),
        "motion_score": None if frames == 1 else float(detected_motion == expected),
        "persistence_score": float(seen > 0) * float(np.mean(track.visible | occluded)),
    })

  def mean(key):
    return float(np.mean([r[key] for r in results]))

  return {
      "colour": mean("colour_score"),
      "shape": mean("shape_score"),
      "motion": None if frames == 1 else mean("motion_score"),
      "persistence": mean("persistence_score"),
      "num_frames": frames,
      "objects": results,
  }


def score_videos(videos: Sequence[np.ndarray], prompts: Sequence[str], *,
                 config: ScoreConfig = ScoreConfig()) -> dict:
  """Mean ShapesWorld scores over clips.

  Args:
    videos: uint8 (T, H, W, 3) videos (sizes may differ).
    prompts: one ShapesWorld caption per video.
    config: detector thresholds.

  Returns:
    dict with the means of "colour", "shape", "persistence" over all clips, "motion" over the
    clips with T > 1 (None if there are none), "num_clips" and "num_motion_clips".
  """
  if len(videos) != len(prompts) or not videos:
    raise ValueError(
        f"got {len(videos)} videos and {len(prompts)} prompts; need the same, non-zero number"
        " (one prompt per video).")
  scores = [score_video(v, p, config=config) for v, p in zip(videos, prompts)]
  motion = [s["motion"] for s in scores if s["motion"] is not None]
  return {
      "colour": float(np.mean([s["colour"] for s in scores])),
      "shape": float(np.mean([s["shape"] for s in scores])),
      "motion": float(np.mean(motion)) if motion else None,
      "persistence": float(np.mean([s["persistence"] for s in scores])),
      "num_clips": len(scores),
      "num_motion_clips": len(motion),
  }
