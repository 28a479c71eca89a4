"""How a prepared clip's frames are stored in one record (H.264 mp4 bytes or zlib'd raw pixels),
and the project's one PyAV encoder (`encode_video`, `encode_h264`), which `spacetime_dit.video_io`
and the demo folder write their files with.

Both codecs turn uint8 RGB frames (T, H, W, 3) into `bytes` and back, with the exact (T, H, W):

- "mp4": an in-memory MP4 holding one libx264 stream at constant rate factor `crf` (0 best .. 51
  worst; 18 is visually near-lossless, ~35-45 dB PSNR on camera footage). Even H and W use
  yuv420p, which every player and hardware decoder takes; prepared clips are always even (H and
  W are multiples of `size_multiple`, >= 8). Odd sizes fall back to yuv444p, because 4:2:0 chroma
  needs even sizes and H.264 cannot crop an odd row off losslessly; the decoded (T, H, W) is the
  same either way. The bytes are a normal .mp4 file: write them out and any player opens them.
  About 10-50x smaller than raw, at the price of ~5 ms/frame of x264 encode at 256^2.
- "raw": a 20-byte header (4-byte magic, then version, T, H, W as little-endian uint32) and
  zlib(level 6) of the C-order uint8 pixels. Lossless and trivially fast to decode; use it for
  synthetic data, masks, or when training must see the exact source pixels.

`sniff_codec` tells the two apart from the first bytes, so a reader that meets bytes of unknown
origin (e.g. `prepared.TfdsSource`) can decode them.
"""

import fractions
import io
import itertools
import os
import struct
import zlib
from typing import BinaryIO, Sequence

import av
import numpy as np

CODECS = ("mp4", "raw")
DEFAULT_CRF = 18
DEFAULT_PRESET = "medium"
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                "veryslow", "placebo")

# "raw" header: magic, format version, then T, H, W. Little-endian so files move between hosts.
_RAW_MAGIC = b"STRW"
_RAW_VERSION = 1
_RAW_HEADER = struct.Struct("<4sIIII")  # magic, version, T, H, W -> 20 bytes
_ZLIB_LEVEL = 6  # zlib's default: ~within 5% of level 9's size at a third of its time.


class ClipDecodeError(ValueError):
  """Stored clip bytes could not be decoded; the message says which check failed."""


def check_codec(codec: str) -> str:
  """Returns `codec` if it is one of CODECS, else raises a ValueError naming the choices."""
  if codec not in CODECS:
    raise ValueError(f"codec is {codec!r}; it must be one of {CODECS} (mp4 = small, lossy H.264;"
                     " raw = lossless zlib'd pixels).")
  return codec


def check_settings(codec: str, crf: int, preset: str) -> None:
  """Validates the encoder settings up front (a bad preset would otherwise fail every clip)."""
  check_codec(codec)
  if not 0 <= crf <= 51:
    raise ValueError(f"crf is {crf}; x264 accepts 0 (best) .. 51 (worst); 18 is near-lossless.")
  if preset not in X264_PRESETS:
    raise ValueError(f"x264 preset is {preset!r}; use one of {X264_PRESETS} (slower = smaller "
                     "files at the same crf quality).")


def _check_frames(frames_thwc: np.ndarray) -> np.ndarray:
  """Validates uint8 (T, H, W, 3), T, H, W >= 1; returns it C-contiguous."""
  frames = np.asarray(frames_thwc)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"clip is {frames.dtype} {frames.shape}; encode_clip needs uint8 (T, H, W, 3)"
                     " RGB frames (add a frame axis with x[None] for an image).")
  if min(frames.shape[:3]) < 1:
    raise ValueError(f"clip has shape {frames.shape}; T, H and W must all be >= 1.")
  return np.ascontiguousarray(frames)


def _encode_raw(frames_thwc: np.ndarray) -> bytes:
  num_frames, height, width, _ = frames_thwc.shape
  header = _RAW_HEADER.pack(_RAW_MAGIC, _RAW_VERSION, num_frames, height, width)
  return header + zlib.compress(frames_thwc.tobytes(), _ZLIB_LEVEL)


def _decode_raw(data: bytes) -> np.ndarray:
  if len(data) < _RAW_HEADER.size:
    raise ClipDecodeError(f"raw clip is {len(data)} bytes, shorter than its "
                          f"{_RAW_HEADER.size}-byte header; the record is truncated.")
  magic, version, num_frames, height, width = _RAW_HEADER.unpack_from(data)
  if magic != _RAW_MAGIC or version != _RAW_VERSION:
    raise ClipDecodeError(f"raw clip header is {magic!r} v{version}; expected {_RAW_MAGIC!r} "
                          f"v{_RAW_VERSION}. These bytes were not written by encode_clip('raw').")
  try:
    pixels = zlib.decompress(data[_RAW_HEADER.size:])
  except zlib.error as e:
    raise ClipDecodeError(f"raw clip payload does not inflate ({e}); the record is corrupt.") from e
  expected = num_frames * height * width * 3
  if len(pixels) != expected:
    raise ClipDecodeError(f"raw clip payload has {len(pixels)} bytes; its header says "
                          f"({num_frames}, {height}, {width}, 3) = {expected}.")
  return np.frombuffer(pixels, np.uint8).reshape(num_frames, height, width, 3)


def h264_pix_fmt(height: int, width: int) -> str:
  """yuv420p for even H and W, else yuv444p: 4:2:0 halves the chroma planes, so it needs even
  sizes, and H.264 cannot crop one odd row off losslessly (module docstring)."""
  return "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"


def encode_video(output: str | os.PathLike | BinaryIO, frames_thwc: np.ndarray, *,
                 rate: fractions.Fraction | int, codec: str = "libx264",
                 options: dict | None = None, pix_fmt: str = "yuv420p",
                 container_format: str | None = None, container_options: dict | None = None,
                 pts_ms: Sequence[int] | None = None, rotation: int | None = None) -> None:
  """Encodes uint8 RGB frames (T, H, W, 3) with PyAV: the loop every writer here goes through.

  Args:
    output: a path (the container comes from its extension unless `container_format`) or a
      seekable binary file object (then `container_format` is required).
    frames_thwc: uint8 (T, H, W, 3), validated by the caller.
    rate: nominal frame rate (exact fractions such as 30000/1001 stay exact).
    codec: FFmpeg encoder name ("libx264", "libvpx-vp9", "mpeg4", "mjpeg", "png", ...).
    options: encoder options, e.g. {"crf": "30"}.
    pix_fmt: encoder pixel format (`h264_pix_fmt` for libx264 at any size).
    container_format, container_options: FFmpeg muxer name and options (e.g. {"movflags":
      "+faststart"}, which needs a path: the muxer re-reads the file to move the index up).
    pts_ms: presentation time of every frame in milliseconds (variable frame rate); None
      spaces them 1 / rate apart.
    rotation: display matrix rotation, counter-clockwise degrees (PyAV
      `VideoStream.set_display_rotation`): a player turns the stored frames by this much.
  """
  height, width = frames_thwc.shape[1:3]
  if isinstance(output, os.PathLike):
    output = os.fspath(output)
  with av.open(output, "w", format=container_format, options=container_options or {}) as out:
    stream = out.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    stream.options = options or {}
    if pts_ms is not None:
      stream.codec_context.time_base = stream.time_base = fractions.Fraction(1, 1000)
    if rotation is not None:
      stream.set_display_rotation(rotation)
    for i, pixels in enumerate(frames_thwc):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
      if pts_ms is not None:
        frame.pts, frame.time_base = pts_ms[i], fractions.Fraction(1, 1000)
      out.mux(stream.encode(frame))
    out.mux(stream.encode())


def encode_h264(output: str | os.PathLike | BinaryIO, frames_thwc: np.ndarray, *,
                fps: float | fractions.Fraction, crf: int = DEFAULT_CRF,
                preset: str = DEFAULT_PRESET, threads: int | None = None,
                container_options: dict | None = None) -> None:
  """Writes uint8 RGB frames (T, H, W, 3) as an H.264 (libx264) mp4 to a path or file object.

  The pixel format follows `h264_pix_fmt`, so the mp4 decodes back to exactly (T, H, W).
  Arguments are validated by the callers (`encode_clip`, `spacetime_dit.video_io.write_mp4`).

  Args:
    output: a path or a seekable binary file object (e.g. io.BytesIO).
    frames_thwc: uint8 (T, H, W, 3), T >= 1.
    fps: frame rate (> 0); kept exact up to a denominator of 1001 (NTSC rates).
    crf: x264 constant rate factor, 0 (best) .. 51.
    preset: x264 speed/size preset, "ultrafast" .. "veryslow".
    threads: x264 threads; None = x264's default (one per core).
    container_options: mp4 muxer options, e.g. {"movflags": "+faststart"} (paths only).
  """
  _, height, width, _ = frames_thwc.shape
  options = {"crf": str(crf), "preset": preset}
  if threads is not None:
    options["threads"] = str(threads)
  encode_video(output, frames_thwc, rate=fractions.Fraction(fps).limit_denominator(1001),
               options=options, pix_fmt=h264_pix_fmt(height, width), container_format="mp4",
               container_options=container_options)


def _encode_mp4(frames_thwc: np.ndarray, fps: float, crf: int, preset: str) -> bytes:
  buffer = io.BytesIO()
  # threads=1: encoding runs inside a pool of single-core worker processes already, and
  # x264's frame threads would only add latency and lookahead memory per worker.
  encode_h264(buffer, frames_thwc, fps=fps, crf=crf, preset=preset, threads=1)
  return buffer.getvalue()


def _decode_mp4(data: bytes, max_frames: int | None) -> np.ndarray:
  try:
    with av.open(io.BytesIO(data), mode="r") as container:
      if not container.streams.video:
        raise ClipDecodeError("mp4 clip has no video stream; the record is not a clip.")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      frames = [f.to_ndarray(format="rgb24")
                for f in itertools.islice(container.decode(stream), max_frames)]
  except av.FFmpegError as e:
    raise ClipDecodeError(f"mp4 clip does not decode ({e}); the record is corrupt.") from e
  if not frames:
    raise ClipDecodeError("mp4 clip decodes to 0 frames; the record is corrupt.")
  return np.stack(frames)


def encode_clip(frames_thwc: np.ndarray, codec: str = "mp4", fps: float = 8.0,
                crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET) -> bytes:
  """Encodes uint8 RGB frames for one record.

  Args:
    frames_thwc: uint8 (T, H, W, 3), T >= 1 (T = 1 is an image).
    codec: "mp4" or "raw" (module docstring).
    fps: frame rate written into the mp4's time base (> 0); ignored by "raw".
    crf: x264 constant rate factor 0..51 ("mp4" only).
    preset: x264 speed/size preset, "ultrafast" .. "veryslow" ("mp4" only; same quality).

  Returns:
    The record's bytes; `decode_clip(result, codec)` has shape (T, H, W, 3).
  """
  frames = _check_frames(frames_thwc)
  check_settings(codec, crf, preset)
  if codec == "raw":
    return _encode_raw(frames)
  if not fps > 0:
    raise ValueError(f"fps is {fps}; the mp4 time base needs fps > 0.")
  return _encode_mp4(frames, fps, int(crf), preset)


def decode_clip(data: bytes, codec: str = "auto", *, max_frames: int | None = None
                ) -> np.ndarray:
  """Decodes one record's bytes back to frames.

  Args:
    data: bytes written by `encode_clip` (or any mp4/webm/... FFmpeg reads, for codec "mp4").
    codec: "mp4", "raw" or "auto" (`sniff_codec`).
    max_frames: decode only the first this many frames (None: all).

  Returns:
    uint8 (T, H, W, 3): the stored pixels (no rotation or sample aspect ratio applied).

  Raises:
    ClipDecodeError: truncated, corrupt or foreign bytes.
  """
  if max_frames is not None and max_frames < 1:
    raise ValueError(f"max_frames is {max_frames}; use None for all frames or an int >= 1.")
  data = bytes(data)
  codec = sniff_codec(data) if codec == "auto" else check_codec(codec)
  if codec == "raw":
    return _decode_raw(data)[:max_frames]
  return _decode_mp4(data, max_frames)


def sniff_codec(data: bytes) -> str:
  """"raw" when the bytes start with the raw header's magic, else "mp4" (left to FFmpeg)."""
  return "raw" if bytes(data[:4]) == _RAW_MAGIC else "mp4"

