"""Reading and writing videos and images with PyAV (its bundled FFmpeg; no system ffmpeg needed).

Frames are uint8 RGB (T, H, W, 3) in video frames/height/width. Writers:

- `write_mp4`: H.264 (libx264), decodable by PyAV/ffmpeg, through the project's one x264 encoder
  (`data_pipelines.clip_codec.encode_h264`). Pixel-format policy: even H and W use yuv420p (plays
  everywhere: browsers, QuickTime); odd H or W use yuv444p (4:2:0 chroma needs even sizes and
  H.264 can only crop by 2 pixels there), which keeps the exact (T, H, W) on decode but the
  "High 4:4:4" profile is not supported by every player. Sizes are never padded or cropped.
- `write_gif`: one global 256-colour palette for the clip (exact when the clip has <= 256 colours,
  as ShapesWorld clips do; median cut otherwise). GIF delays are in 1/100 s, so fps is rounded.
- `write_png`: a single lossless frame.

Every writer replaces its file atomically (`data_pipelines.atomic_files`): an interrupted write
leaves the old file or none, never half of one.

Readers (`read_video`, `read_image`, `video_info`) raise `VideoReadError` (a ValueError) naming
the path and the reason for a missing, empty, unreadable or undecodable file, so ingest code can
skip and count such files.
"""

import fractions
import os
from typing import Optional

import av
import numpy as np

from data_pipelines import atomic_files
from data_pipelines import clip_codec


class VideoReadError(ValueError):
  """A video or image file could not be read; the message names the path and the reason."""


def _check_frames(frames_thwc: np.ndarray) -> np.ndarray:
  """Validates uint8 (T, H, W, 3) frames; returns a C-contiguous numpy array."""
  frames = np.asarray(frames_thwc)
  if frames.dtype != np.uint8:
    raise ValueError(
        f"frames have dtype {frames.dtype}; writers need uint8 RGB. Convert model outputs in "
        "[-1, 1] with np.clip((x + 1) * 127.5, 0, 255).round().astype(np.uint8).")
  if frames.ndim != 4 or frames.shape[-1] != 3:
    hint = " Add a frame axis with frames[None]." if frames.ndim == 3 else ""
    raise ValueError(f"frames have shape {frames.shape}; writers need (T, H, W, 3) RGB.{hint}")
  if min(frames.shape[:3]) < 1:
    raise ValueError(f"frames have shape {frames.shape}; T, H and W must all be >= 1.")
  return np.ascontiguousarray(frames)


def _check_fps(fps: float) -> fractions.Fraction:
  if not fps > 0:
    raise ValueError(f"fps is {fps}; it must be > 0.")
  # Fractions keep NTSC-style rates (24000/1001) exact in the container's time base.
  return fractions.Fraction(fps).limit_denominator(1001)


def _prepare_path(path: str) -> str:
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  return path


def _encode_gif(path: str, index_thw: np.ndarray, fps: fractions.Fraction,
                argb_p4: np.ndarray) -> None:
  """Encodes palette indices (T, H, W) with one ARGB palette (256, 4) to a GIF at `path`.

  (The one writer that does not go through `clip_codec.encode_video`: its frames are pal8
  index planes plus a palette, not RGB.)
  """
  height, width = index_thw.shape[1:3]
  with atomic_files.replacing(path) as tmp, av.open(tmp, mode="w", format="gif") as container:
    stream = container.add_stream("gif", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "pal8"
    for index_hw in index_thw:
      container.mux(stream.encode(av.VideoFrame.from_ndarray((index_hw, argb_p4), format="pal8")))
    container.mux(stream.encode())


def write_mp4(path: str, frames_thwc: np.ndarray, fps: float = 8, crf: int = 18,
              preset: str = "medium") -> None:
  """Writes uint8 RGB frames (T, H, W, 3) as an H.264 mp4 that decodes back to exactly (T, H, W).

  Args:
    path: output file; parent folders are created.
    frames_thwc: uint8 (T, H, W, 3), T >= 1 (a single frame is a valid 1-frame video).
    fps: frames per second (> 0).
    crf: x264 constant rate factor, 0 (lossless for yuv444p) to 51; 18 is visually near-lossless.
    preset: x264 speed/size trade-off ("ultrafast" ... "veryslow").
  """
  frames = _check_frames(frames_thwc)
  rate = _check_fps(fps)
  clip_codec.check_settings("mp4", crf, preset)
  with atomic_files.replacing(_prepare_path(path)) as tmp:
    clip_codec.encode_h264(tmp, frames, fps=rate, crf=crf, preset=preset,
                           # moov atom first: browsers start playing before the whole file is in.
                           container_options={"movflags": "+faststart"})


def _median_cut(colours_nc: np.ndarray, counts_n: np.ndarray, size: int) -> np.ndarray:
  """Median-cut palette (Heckbert 1982): split the box with the widest channel at its median."""
  def span(box):
    return np.ptp(colours_nc[box], axis=0)

  boxes = [np.arange(colours_nc.shape[0])]
  spans = [span(boxes[0])]
  while len(boxes) < size:
    widest = int(np.argmax([sp.max() for sp in spans]))
    if spans[widest].max() <= 0:
      break
    box, box_span = boxes.pop(widest), spans.pop(widest)
    channel = int(np.argmax(box_span))
    order = box[np.argsort(colours_nc[box, channel], kind="stable")]
    cum = np.cumsum(counts_n[order])
    cut = int(np.clip(np.searchsorted(cum, cum[-1] / 2), 1, order.size - 1))
    for part in (order[:cut], order[cut:]):
      boxes.append(part)
      spans.append(span(part))
  return np.stack([
      np.round(np.average(colours_nc[b], axis=0, weights=counts_n[b])) for b in boxes
  ]).astype(np.uint8)


def _palettize(frames_thwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Maps RGB frames to (indices uint8 (T, H, W), palette uint8 (P, 3)) with P <= 256."""
  rgb = frames_thwc.reshape(-1, 3).astype(np.int32)
  keys, inverse = np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2], return_inverse=True)
  if keys.size <= 256:
    palette = np.stack([keys >> 16, (keys >> 8) & 255, keys & 255], axis=-1).astype(np.uint8)
    return inverse.reshape(frames_thwc.shape[:3]).astype(np.uint8), palette
  # Too many colours: median cut over a 5-bit-per-channel histogram (<= 32768 bins) keeps the
  # cost independent of the clip size; each bin is represented by the mean colour it holds.
  bins = ((rgb[:, 0] >> 3) << 10) | ((rgb[:, 1] >> 3) << 5) | (rgb[:, 2] >> 3)
  counts = np.bincount(bins, minlength=1 << 15).astype(np.float64)
  occupied = np.nonzero(counts)[0]
  colours = np.stack(
      [np.bincount(bins, weights=rgb[:, c], minlength=1 << 15)[occupied] for c in range(3)],
      axis=-1) / counts[occupied, None]
  palette = _median_cut(colours, counts[occupied], 256)
  dist = np.square(colours[:, None, :] - palette[None, :, :].astype(np.float64)).sum(-1)
  lut = np.zeros(1 << 15, dtype=np.uint8)
  lut[occupied] = np.argmin(dist, axis=1)
  return lut[bins].reshape(frames_thwc.shape[:3]), palette


def write_gif(path: str, frames_thwc: np.ndarray, fps: float = 8) -> None:
  """Writes uint8 RGB frames (T, H, W, 3) as a looping GIF with one global 256-colour palette.

  Args:
    path: output file; parent folders are created.
    frames_thwc: uint8 (T, H, W, 3), T >= 1.
    fps: frames per second (> 0); GIF stores delays in 1/100 s, so e.g. 8 fps plays at ~8.3.
  """
  frames = _check_frames(frames_thwc)
  rate = _check_fps(fps)
  index_thw, palette_p3 = _palettize(frames)
  argb = np.zeros((256, 4), dtype=np.uint8)
  argb[:, 0] = 255
  argb[:palette_p3.shape[0], 1:] = palette_p3
  _encode_gif(_prepare_path(path), index_thw, rate, argb)


def write_png(path: str, image_hwc: np.ndarray) -> None:
  """Writes one uint8 RGB image (H, W, 3) as a lossless PNG (parent folders are created)."""
  image = np.asarray(image_hwc)
  if image.ndim != 3:
    raise ValueError(f"image has shape {image.shape}; write_png needs (H, W, 3).")
  frames = _check_frames(image[None])
  with atomic_files.replacing(_prepare_path(path)) as tmp:
    clip_codec.encode_video(tmp, frames, rate=1, codec="png", pix_fmt="rgb24",
                            container_format="image2")


def _open(path: str):
  """Opens `path` for reading, turning every failure into a VideoReadError with the reason."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise VideoReadError(f"cannot read {path!r}: no such file.")
  if not os.path.isfile(path):
    raise VideoReadError(f"cannot read {path!r}: not a regular file.")
  if os.path.getsize(path) == 0:
    raise VideoReadError(f"cannot read {path!r}: the file is empty (0 bytes).")
  try:
    container = av.open(path, mode="r")
  except (av.FFmpegError, OSError) as e:
    raise VideoReadError(f"cannot read {path!r}: not a decodable video/image ({e}).") from e
  if not container.streams.video:
    container.close()
    raise VideoReadError(f"cannot read {path!r}: the file has no video stream.")
  return container


def _decode(path: str, max_frames: Optional[int]) -> np.ndarray:
  if max_frames is not None and max_frames < 1:
    raise ValueError(f"max_frames is {max_frames}; use None for all frames or an int >= 1.")
  frames = []
  with _open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    try:
      for frame in container.decode(stream):
        frames.append(frame.to_ndarray(format="rgb24"))
        if max_frames is not None and len(frames) >= max_frames:
          break
    except av.FFmpegError as e:
      raise VideoReadError(
          f"cannot read {path!r}: decoding failed after {len(frames)} frames ({e}).") from e
  if not frames:
    raise VideoReadError(f"cannot read {path!r}: the video stream has no decodable frames.")
  return np.stack(frames)


def read_video(path: str, *, max_frames: Optional[int] = None) -> np.ndarray:
  """Decodes a video (any format FFmpeg reads: mp4, webm, gif, ...) to uint8 RGB.

  Args:
    path: the file.
    max_frames: decode at most this many frames from the start (None: all).

  Returns:
    uint8 (T, H, W, 3). Alpha, if any, is dropped.

  Raises:
    VideoReadError: missing, empty, corrupt or undecodable file (message names path and reason).
  """
  return _decode(path, max_frames)


def read_image(path: str) -> np.ndarray:
  """Decodes an image (png, jpg, bmp, ...) to uint8 RGB with a frame axis.

  A video file is accepted too and gives its first frame (e.g. as an image condition).

  Args:
    path: the file.

  Returns:
    uint8 (1, H, W, 3). Alpha, if any, is dropped.

  Raises:
    VideoReadError: missing, empty, corrupt or undecodable file.
  """
  return _decode(path, 1)


def video_info(path: str) -> dict:
  """Frame count, size and frame rate without decoding pixels.

  The frame count comes from the container header when it has one (mp4), else from counting
  the demuxed packets (one frame per packet for the codecs used here).

  Args:
    path: the file.

  Returns:
    {"frames": int, "height": int, "width": int, "fps": float or None when unknown}.

  Raises:
    VideoReadError: missing, empty or corrupt file.
  """
  with _open(path) as container:
    stream = container.streams.video[0]
    height, width = stream.codec_context.height, stream.codec_context.width
    rate = stream.average_rate or stream.guessed_rate
    frames = stream.frames
    if not frames:
      try:
        frames = sum(1 for p in container.demux(stream) if p.size > 0)
      except av.FFmpegError as e:
        raise VideoReadError(f"cannot read {path!r}: demuxing failed ({e}).") from e
  if frames == 0 or height == 0 or width == 0:
    raise VideoReadError(f"cannot read {path!r}: the video stream has no frames or no size.")
  return {"frames": int(frames), "height": int(height), "width": int(width),
          "fps": float(rate) if rate else None}


def _resample_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) weights resampling one axis; rows sum to 1.

  Shrinking: area average (each output pixel is the mean of the input interval it covers,
  partial pixels weighted by their overlap), which does not alias the way point sampling does.
  Enlarging: linear interpolation between pixel centres (area averaging would only repeat
  pixels, i.e. nearest neighbour).
  """
  weights = np.zeros((size_out, size_in), np.float64)
  scale = size_in / size_out
  if size_out <= size_in:
    for i in range(size_out):
      lo, hi = i * scale, (i + 1) * scale
      first, last = int(np.floor(lo)), min(int(np.ceil(hi)), size_in)
      for j in range(first, last):
        weights[i, j] = min(hi, j + 1) - max(lo, j)
  else:
    centres = np.clip((np.arange(size_out) + 0.5) * scale - 0.5, 0, size_in - 1)
    left = np.floor(centres).astype(int)
    right = np.minimum(left + 1, size_in - 1)
    frac = centres - left
    weights[np.arange(size_out), left] += 1 - frac
    weights[np.arange(size_out), right] += frac
  return weights / weights.sum(axis=1, keepdims=True)


def resize_to_cover(frames_thwc: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes uint8 frames (T, H, W, 3) to exactly (T, height, width, 3): scale to cover, crop.

  The policy for conditioning images and clips of any size: scale uniformly (aspect ratio kept)
  by the smallest factor that makes the frame cover height x width, resample (area average when
  shrinking, linear when enlarging), then crop the centre. Nothing is stretched or padded; the
  parts of the frame outside the target aspect ratio are cut off equally on both sides.

  Args:
    frames_thwc: uint8 (T, H, W, 3) frames (an image is T = 1).
    height: output height (>= 1).
    width: output width (>= 1).

  Returns:
    uint8 (T, height, width, 3).
  """
  frames = _check_frames(frames_thwc)
  if height < 1 or width < 1:
    raise ValueError(f"resize target {height}x{width} must be at least 1x1 pixels.")
  h, w = frames.shape[1:3]
  if (h, w) == (height, width):
    return frames
  scale = max(height / h, width / w)
  # Rounding may land one pixel short of the target; never below it (the crop needs it).
  scaled_h, scaled_w = max(height, round(h * scale)), max(width, round(w * scale))
  top, left = (scaled_h - height) // 2, (scaled_w - width) // 2
  rows = _resample_matrix(h, scaled_h)[top:top + height]
  cols = _resample_matrix(w, scaled_w)[left:left + width]
  out = np.einsum("yh,thwc,xw->tyxc", rows.astype(np.float32), frames.astype(np.float32),
                  cols.astype(np.float32), optimize=True)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)
