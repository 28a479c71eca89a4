"""Streaming decode of any video or image FFmpeg reads, for ingest (PyAV 18, bundled FFmpeg 8).

`VideoReader(path)` opens a file, decodes its first frame and describes it (`VideoInfo`);
`reader.frames(fps, size=..., crop=...)` then yields upright uint8 RGB frames (H, W, 3) one at a
time: resampled to `fps` by timestamp, centre-cropped and resized. Nothing holds more than the
current and previous decoded frame, so a 10-minute 1080p file streams in constant memory.

What each step does, and why:

- **Orientation.** Phones store portrait video as landscape pixels plus a display matrix
  (`AV_PKT_DATA_DISPLAYMATRIX`; libavutil/display.h). FFmpeg 8 decoders attach it to every frame,
  and also turn an image's EXIF Orientation tag into one. PyAV 18 exposes it as frame side data
  and `VideoFrame.rotation` (= `av_display_rotation_get`, counter-clockwise degrees). Only the
  ffmpeg *command line* applies it (fftools/ffmpeg_filter.c inserts transpose/hflip/vflip
  filters); libavcodec never does, so we do: `orientation_from_display_matrix` snaps the matrix
  to one of the 8 right-angle orientations and `Orientation.apply` is a numpy transpose/flip.
- **Timestamps -> target fps.** Output frame k is meant to be shown at t0 + k / fps (t0 = first
  frame's time). It is the decoded frame whose presentation time is nearest (ties go to the
  earlier frame: the one on screen at that instant). This one rule covers constant rates,
  NTSC rates (30000/1001), odd rates (7.5) and variable-frame-rate phone video alike; frame
  indices are never used. The video ends at the last frame's time plus its duration, so a clip of
  duration D gives ceil(D * fps) frames (`resampled_length`).
- **Resize.** swscale's area-averaging filter (`SWS_AREA`): every output pixel is the mean of
  the input pixels it covers, so downscaling does not alias. Only frames the resampler picks are
  converted to RGB; the rest are decoded (the codec needs them) and dropped.
- **Images** (png, jpeg, webp, bmp, tiff, ...: FFmpeg's image demuxers) are one frame.

Failures raise `media_checks.DecodeError` with a `reason` that ingest reports as a skip reason:

- "empty_file": 0 bytes.
- "unreadable": the OS refuses to read it (missing, dangling symlink, a directory, permission
  denied, I/O error).
- "not_video": FFmpeg cannot open it and it does not start with the signature of any video or
  image container (a text or HTML file renamed .mp4); or it opens but has no video stream (audio
  only) or only cover art. The file's *content* decides, never its extension.
- "truncated": the file ends before its own header says it does
  (`media_checks.header_truncation`, checked before decoding: an ISO-BMFF (mp4/mov) box, the
  Matroska/WebM segment or a RIFF (avi) chunk extends past the end of the file; a PNG has no
  IEND chunk; a JPEG has no EOI marker), or decoding fails after at least one good frame, or
  the stream decodes to fewer frames than its header declares (by more than max(2, 2%): edit
  lists and leading B-frames make a frame or two legitimately go missing). Formats without a
  declared size or frame count (MPEG-TS, raw elementary streams, live-recorded Matroska with
  unknown sizes) cannot be told from a short file and are accepted with the frames they have.
- "corrupt": it looks like a video (a container signature matches, or FFmpeg opens it and finds
  a video stream) but not one frame decodes.
"""

import dataclasses
import fractions
import math
import struct
from typing import Iterable, Iterator, Sequence, TypeVar

import av
import numpy as np
from av.sidedata import sidedata as av_sidedata
from av.video import reformatter as av_reformatter

from data_pipelines import media_checks

Fraction = fractions.Fraction
_T = TypeVar("_T")

# A frame count this far below the header's is truncation (see module docstring).
_MISSING_FRAMES_ABS = 2
_MISSING_FRAMES_REL = 0.02


# ----------------------------------------------------------------------------------------------
# Orientation (display matrix, EXIF).


@dataclasses.dataclass(frozen=True)
class Orientation:
  """How stored pixels become upright display pixels: an optional transpose, then flips.

  `apply(stored)` = flip_rows/flip_cols applied to (stored.T if transpose else stored), on the
  (H, W) axes. The 8 combinations are the 8 right-angle orientations (4 rotations x mirror).
  """

  transpose: bool = False
  flip_rows: bool = False  # Reverse axis 0 (top <-> bottom) after the transpose.
  flip_cols: bool = False  # Reverse axis 1 (left <-> right) after the transpose.

  def apply(self, image_hwc: np.ndarray) -> np.ndarray:
    """(H, W, ...) stored -> upright (H, W, ...) or (W, H, ...); returns a view when it can."""
    out = np.swapaxes(image_hwc, 0, 1) if self.transpose else image_hwc
    if self.flip_rows:
      out = out[::-1]
    if self.flip_cols:
      out = out[:, ::-1]
    return out

  def display_size(self, height: int, width: int) -> tuple[int, int]:
    """Upright (H, W) of a stored (height, width) frame."""
    return (width, height) if self.transpose else (height, width)

  @property
  def is_identity(self) -> bool:
    """True when the stored frames are already upright."""
    return not (self.transpose or self.flip_rows or self.flip_cols)


IDENTITY = Orientation()


def orientation_from_rotation(degrees_ccw: float) -> Orientation:
  """A pure rotation by `degrees_ccw` counter-clockwise, snapped to the nearest right angle."""
  quarter_turns = int(round(degrees_ccw / 90.0)) % 4
  # np.rot90(x, k) rotates counter-clockwise: k=1 is transpose then reverse rows.
  return (IDENTITY, Orientation(True, True, False), Orientation(False, True, True),
          Orientation(True, False, True))[quarter_turns]


def orientation_from_display_matrix(matrix: Sequence[int]) -> Orientation:
  """The orientation an FFmpeg display matrix asks for, snapped to a right angle.

  Args:
    matrix: the 9 int32 of `AV_FRAME_DATA_DISPLAYMATRIX`, row-major [a b u; c d v; x y w] with
      a, b, c, d in 16.16 fixed point. libavutil/display.h: a source pixel (p, q) is displayed
      at p' = a p + c q, q' = b p + d q (x right, y down).

  Returns:
    The `Orientation` that moves every pixel there. With (a, b, c, d) snapped to a signed
    permutation: no transpose when |a| + |d| >= |b| + |c|, then p' = a p reverses columns iff
    a < 0 and q' = d q reverses rows iff d < 0; otherwise the axes swap (p' = c q, q' = b p):
    transpose, reverse rows iff b < 0, columns iff c < 0. This reproduces the ffmpeg CLI's
    autorotate filters (transpose=clock/cclock/clock_flip/cclock_flip, hflip, vflip), and PyAV's
    `set_display_rotation(deg, hflip, vflip)` (rotate `deg` counter-clockwise, then mirror)
    round-trips through it. Angles that are not right angles (virtually never written) snap to
    the nearest one instead of being rotated with black corners.
  """
  if len(matrix) != 9:
    raise ValueError(f"a display matrix has 9 entries, got {len(matrix)}: {list(matrix)}.")
  a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
  if abs(a) + abs(d) >= abs(b) + abs(c):
    return Orientation(False, d < 0, a < 0)
  return Orientation(True, b < 0, c < 0)


# EXIF Orientation tag (0x0112) values 1..8 (EXIF 2.32, CIPA DC-008, table "Orientation"):
# where row 0 / column 0 of the stored image belong on screen.
_EXIF_ORIENTATIONS = {
    1: IDENTITY,
    2: Orientation(False, False, True),  # Mirrored left-right.
    3: Orientation(False, True, True),  # Rotated 180.
    4: Orientation(False, True, False),  # Mirrored top-bottom.
    5: Orientation(True, False, False),  # Transposed (mirror + rotate 90 counter-clockwise).
    6: Orientation(True, False, True),  # Needs 90 clockwise to be upright.
    7: Orientation(True, True, True),  # Transversed (mirror + rotate 90 clockwise).
    8: Orientation(True, True, False),  # Needs 90 counter-clockwise to be upright.
}


def orientation_from_exif(value: int) -> Orientation:
  """`Orientation` for an EXIF Orientation tag value (1..8; other values mean identity)."""
  return _EXIF_ORIENTATIONS.get(int(value), IDENTITY)


def exif_orientation(data: bytes) -> int | None:
  """The EXIF Orientation tag of a JPEG (APP1 "Exif") or PNG (eXIf chunk), None if absent.

  Only needed because PyAV 18.1 cannot list the side data of a frame that carries FFmpeg 8's
  AV_FRAME_DATA_EXIF (type 31 is missing from its `sidedata.Type` enum: `frame.side_data`
  raises ValueError), which every image with EXIF has; `frame.rotation` still works but loses
  the mirror of orientations 2, 4, 5 and 7.
  """
  tiff = None
  if data[:3] == b"\xff\xd8\xff":
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
      marker = data[i + 1]
      if marker == 0xDA or marker == 0xD9:  # Start of scan / end of image: no more metadata.
        break
      if marker == 0x01 or 0xD0 <= marker <= 0xD8 or marker == 0xFF:  # Markers without length.
        i += 2 if marker != 0xFF else 1
        continue
      length = struct.unpack(">H", data[i + 2:i + 4])[0]
      if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
        tiff = data[i + 10:i + 2 + length]
        break
      i += 2 + length
  elif data[:8] == b"\x89PNG\r\n\x1a\n":
    i = 8
    while i + 8 <= len(data):
      length, kind = struct.unpack(">I4s", data[i:i + 8])
      if kind == b"eXIf":
        tiff = data[i + 8:i + 8 + length]
        break
      if kind == b"IEND":
        break
      i += 12 + length
  if not tiff or tiff[:4] not in (b"II*\x00", b"MM\x00*"):
    return None
  order = "<" if tiff[:2] == b"II" else ">"
  try:
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    (count,) = struct.unpack(order + "H", tiff[ifd:ifd + 2])
    for k in range(count):
      entry = tiff[ifd + 2 + 12 * k:ifd + 14 + 12 * k]
      tag, kind, _, value = struct.unpack(order + "HHIH", entry[:10])
      if tag == 0x0112 and kind == 3:  # Orientation, type SHORT.
        return value
  except struct.error:  # A cut or malformed EXIF block: no usable orientation.
    return None
  return None


# ----------------------------------------------------------------------------------------------
# Timestamps and resampling (pure).


def timeline(frames: Iterable[tuple[int | None, int | None, _T]], time_base: Fraction,
             nominal_interval: Fraction) -> Iterator[tuple[Fraction, Fraction, _T]]:
  """Turns (pts, duration, item) in `time_base` units into sane (time, duration, item) seconds.

  A frame with no pts, or one not after the previous frame's (broken muxers, concatenated
  files), is placed `nominal_interval` after the previous frame, so time always increases and
  every decoded frame keeps a slot. A missing or zero duration becomes `nominal_interval`.
  """
  previous = None
  for pts, duration, item in frames:
    time = None if pts is None else Fraction(pts) * time_base
    if previous is not None and (time is None or time <= previous):
      time = previous + nominal_interval
    elif time is None:
      time = Fraction(0)
    length = Fraction(duration) * time_base if duration else nominal_interval
    previous = time
    yield time, length, item


def resample_nearest(frames: Iterable[tuple[Fraction, Fraction, _T]],
                     fps: Fraction) -> Iterator[_T]:
  """Resamples a timed stream to `fps` by nearest presentation time (streaming, pure).

  Args:
    frames: (time, duration, item) with increasing times, e.g. from `timeline`.
    fps: output frames per second (> 0).

  Yields:
    For k = 0, 1, ... while t_k = t0 + k / fps < end (t0: first time; end: last time + last
    duration): the item whose time is nearest t_k, the earlier one on a tie. An item may be
    yielded several times (upsampling) or never (downsampling).
  """
  step = 1 / Fraction(fps)
  previous = None  # (time, duration, item)
  k, start = 0, None
  for time, duration, item in frames:
    if previous is None:
      start = time
    else:
      while start + k * step < time:
        target = start + k * step
        yield previous[2] if target - previous[0] <= time - target else item
        k += 1
    previous = (time, duration, item)
  if previous is not None:
    end = previous[0] + previous[1]
    while start + k * step < end or k == 0:
      yield previous[2]
      k += 1


def resampled_length(duration: Fraction, fps: Fraction) -> int:
  """Frames `resample_nearest` gives for a stream lasting `duration` s (first start to end)."""
  return max(1, math.ceil(Fraction(duration) * Fraction(fps)))


def as_fraction(rate: float | Fraction) -> Fraction:
  """A frame rate as an exact fraction (29.97 -> 2997/100; NTSC 30000/1001 stays exact)."""
  if not rate > 0:
    raise ValueError(f"frame rate {rate} must be > 0.")
  return Fraction(rate).limit_denominator(1001)


# ----------------------------------------------------------------------------------------------
# The reader.


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What a file is, from its header and first decoded frame."""

  path: str
  container: str  # FFmpeg demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "png_pipe".
  codec: str  # Decoder name, e.g. "h264", "vp9", "png".
  is_image: bool  # One still picture (an image demuxer): decoded as a 1-frame video.
  height: int  # Upright display size: orientation and sample aspect ratio applied.
  width: int
  stored_height: int  # Size of the decoded pixel arrays.
  stored_width: int
  orientation: Orientation
  sample_aspect_ratio: Fraction  # Pixel width / height (1 for square pixels).
  frame_rate: float | None  # The container's average rate; None when unknown.
  declared_frames: int  # Frame count in the header; 0 when the format stores none.


def _is_image_demuxer(name: str) -> bool:
  # FFmpeg's still-image demuxers are "image2" (by extension) and "<codec>_pipe" (by content,
  # e.g. png_pipe, jpeg_pipe, webp_pipe); no video demuxer ends in "_pipe".
  return name == "image2" or name.endswith("_pipe")


def _frame_orientation(frame: av.VideoFrame, path: str, head: bytes) -> Orientation:
  """The orientation FFmpeg attached to a decoded frame (display matrix side data)."""
  try:
    entries = list(frame.side_data)
  except ValueError:
    # PyAV 18.1 cannot list side data of types newer than its enum (FFmpeg 8's EXIF, on every
    # image with EXIF). Read the EXIF tag ourselves (keeps mirrors), else the rotation angle.
    exif = None
    if head[:3] == b"\xff\xd8\xff" or head[:4] == b"\x89PNG":
      with open(path, "rb") as f:  # EXIF sits in the first 64 KiB (a JPEG APP1 segment's cap).
        exif = exif_orientation(f.read(1 << 16))
    return orientation_from_exif(exif) if exif else orientation_from_rotation(frame.rotation)
  for entry in entries:
    if entry.type == av_sidedata.Type.DISPLAYMATRIX:
      return orientation_from_display_matrix(np.frombuffer(bytes(entry), dtype="<i4"))
  return IDENTITY


class VideoReader:
  """Streams upright, resampled, resized RGB frames out of one video or image file.

  Usage:
    with VideoReader(path) as reader:
      reader.info.height, reader.info.width      # upright size, known before the frames
      for frame_hw3 in reader.frames(8.0, size=(144, 256)): ...

  The constructor decodes the first frame (the orientation lives on frames), so opening a file
  already classifies it: `media_checks.DecodeError` with reason "empty_file", "unreadable",
  "not_video", "corrupt" or "truncated".
  """

  def __init__(self, path: str, *, threads: int = 0,
               checked: tuple[bytes, int] | None = None):
    """Opens `path`.

    Args:
      path: the video or image file.
      threads: FFmpeg's decode/scale thread count (0 = one per core).
      checked: what `media_checks.check_file(path)` returned, when the caller ran it already
        (ingest does, to report a file problem before a caption problem); None runs it here.
        Either way it runs once per file: it reads the file's head, and all of a JPEG or PNG.
    """
    self.path = path
    self._threads = threads
    self._head, self._size = media_checks.check_file(path) if checked is None else checked
    try:
      self._container = av.open(path, mode="r")
    except av.FFmpegError as e:
      signature = media_checks.container_signature(self._head)
      if signature is None:
        raise media_checks.DecodeError(
            "not_video", path,
            f"is not a video or image: FFmpeg cannot open it ({e.strerror or e}) and it starts"
            f" with {self._head[:16]!r}, the signature of no video/image container") from None
      raise media_checks.DecodeError(
          "corrupt", path,
          f"has the signature of {signature} but FFmpeg cannot parse it ({e.strerror or e})"
      ) from None
    except OSError as e:
      raise media_checks.DecodeError("unreadable", path,
                                     f"cannot be read: {e.strerror or e}") from None
    try:
      self._open_stream()
    except BaseException:
      self._container.close()
      raise

  def _open_stream(self) -> None:
    container = self._container
    streams = [s for s in container.streams.video
               if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
      kinds = sorted({s.type for s in container.streams}) or ["none"]
      cover = " (only cover art)" if container.streams.video else ""
      raise media_checks.DecodeError(
          "not_video", self.path,
          f"has no video stream{cover}: FFmpeg reads it as {container.format.name} with stream"
          f" types {kinds}")
    self._stream = stream = streams[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = self._threads
    is_image = _is_image_demuxer(container.format.name)
    rate = stream.average_rate or stream.guessed_rate
    self._time_base = stream.time_base or Fraction(1, 90_000)
    self._decoded = 0
    self._exhausted = False
    self._packets = container.decode(stream)
    self._first = self._next_frame()
    if self._first is None:
      raise media_checks.DecodeError(
          "corrupt", self.path,
          f"has a {stream.codec_context.name} video stream ({container.format.name}) but not one"
          " frame decodes")
    first = self._first
    orientation = _frame_orientation(first, self.path, self._head)
    sar = stream.sample_aspect_ratio or Fraction(1)
    if sar <= 0:
      sar = Fraction(1)
    stored_height, stored_width = first.height, first.width
    # Anamorphic video (e.g. DVD 720x480 at SAR 32:27) is shown wider than it is stored.
    height, width = orientation.display_size(stored_height, max(1, round(stored_width * sar)))
    self.info = VideoInfo(
        path=self.path, container=container.format.name, codec=stream.codec_context.name,
        is_image=is_image, height=height, width=width, stored_height=stored_height,
        stored_width=stored_width, orientation=orientation, sample_aspect_ratio=Fraction(sar),
        frame_rate=float(rate) if rate else None,
        declared_frames=0 if is_image else int(stream.frames or 0))
    self._reformatter = av_reformatter.VideoReformatter()

  def _next_frame(self) -> av.VideoFrame | None:
    """The next decoded frame, None at the end; decode errors become DecodeError."""
    if self._exhausted:
      return None
    try:
      frame = next(self._packets)
    except StopIteration:
      self._exhausted = True
      return None
    except av.FFmpegError as e:
      self._exhausted = True
      if self._decoded == 0:
        raise media_checks.DecodeError(
            "corrupt", self.path,
            f"is corrupt: decoding its first frame fails ({e.strerror or e})") from None
      raise media_checks.DecodeError(
          "truncated", self.path,
          f"is truncated or damaged: decoding fails after {self._decoded} good frames"
          f" ({e.strerror or e})") from None
    except OSError as e:
      self._exhausted = True
      raise media_checks.DecodeError(
          "unreadable", self.path,
          f"cannot be read after {self._decoded} frames: {e.strerror or e}") from None
    self._decoded += 1
    return frame

  def _all_frames(self) -> Iterator[av.VideoFrame]:
    """Every decoded frame once, the already-decoded first frame included."""
    if self._first is None:
      raise ValueError(f"{self.path}: frames() can be iterated only once per VideoReader.")
    frame, self._first = self._first, None
    while frame is not None:
      yield frame
      if self.info.is_image:
        return
      frame = self._next_frame()
    declared = self.info.declared_frames
    if declared and declared - self._decoded > max(_MISSING_FRAMES_ABS,
                                                   _MISSING_FRAMES_REL * declared):
      raise media_checks.DecodeError(
          "truncated", self.path,
          f"is truncated: its header declares {declared} frames but only {self._decoded} decode")

  def _nominal_interval(self, fps: Fraction | None) -> Fraction:
    rate = self.info.frame_rate
    if rate:
      return 1 / as_fraction(rate)
    return 1 / fps if fps else Fraction(1, 25)

  def _to_rgb(self, frame: av.VideoFrame, size: tuple[int, int],
              crop: tuple[int, int, int, int] | None) -> np.ndarray:
    """One decoded frame -> upright uint8 (H, W, 3) of `size`, after an optional crop."""
    info = self.info
    height, width = size
    common = dict(format="rgb24", interpolation="AREA", threads=self._threads,
                  src_color_range=frame.color_range)
    if crop is None:
      # One swscale call converts and resizes in stored orientation; the transpose/flips on
      # the small result are free (views).
      stored_h, stored_w = (width, height) if info.orientation.transpose else (height, width)
      rgb = self._reformatter.reformat(frame, width=stored_w, height=stored_h, **common)
      return np.ascontiguousarray(info.orientation.apply(rgb.to_ndarray()))
    # Crop boxes are in upright display pixels: convert at display size (SAR and mid-stream
    # size changes resolved), orient, crop, then area-resize the box.
    display_h, display_w = info.orientation.display_size(info.height, info.width)
    rgb = self._reformatter.reformat(frame, width=display_w, height=display_h, **common)
    top, left, box_h, box_w = crop
    upright = info.orientation.apply(rgb.to_ndarray())[top:top + box_h, left:left + box_w]
    if (box_h, box_w) == (height, width):
      return np.ascontiguousarray(upright)
    boxed = av.VideoFrame.from_ndarray(np.ascontiguousarray(upright), format="rgb24")
    return self._reformatter.reformat(boxed, width=width, height=height, format="rgb24",
                                      interpolation="AREA", threads=self._threads).to_ndarray()

  def frames(self, fps: float | None = None, *, size: tuple[int, int] | None = None,
             crop: tuple[int, int, int, int] | None = None) -> Iterator[np.ndarray]:
    """Yields the video's frames, upright, as uint8 (H, W, 3); one pass per reader.

    Args:
      fps: resample to this rate by nearest timestamp (module docstring); None yields every
        decoded frame. An image yields exactly one frame either way.
      size: output (H, W); None keeps the upright display size (`info.height`, `info.width`).
      crop: (top, left, height, width) box in upright display pixels, taken before resizing;
        None uses the whole frame.

    Raises:
      DecodeError: "truncated" (decode error after a good frame, or fewer frames than the
        header declares: raised after the last frame, once the stream has ended), "unreadable".
    """
    info = self.info
    size = (info.height, info.width) if size is None else tuple(size)
    if min(size) < 1:
      raise ValueError(f"output size {size} must be positive.")
    if crop is not None:
      top, left, box_h, box_w = crop
      if top < 0 or left < 0 or box_h < 1 or box_w < 1 or top + box_h > info.height or (
          left + box_w > info.width):
        raise ValueError(
            f"crop box {crop} (top, left, height, width) is outside the {info.height}x"
            f"{info.width} upright frame of {self.path}.")
    rate = None if fps is None else as_fraction(fps)
    decoded = self._all_frames()
    if rate is None or info.is_image:
      for frame in decoded:
        yield self._to_rgb(frame, size, crop)
      return
    timed = timeline(((f.pts, f.duration, f) for f in decoded), self._time_base,
                     self._nominal_interval(rate))
    last_frame, last_rgb = None, None
    for frame in resample_nearest(timed, rate):
      if frame is not last_frame:  # Upsampling repeats a frame: convert it once.
        last_frame, last_rgb = frame, self._to_rgb(frame, size, crop)
      yield last_rgb

  def close(self) -> None:
    """Closes the file (the context manager does it)."""
    self._container.close()

  def __enter__(self) -> "VideoReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
