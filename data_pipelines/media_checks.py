"""Cheap checks of a media file before FFmpeg touches it: readable, non-empty, not cut short.

`check_file(path)` stats the file, reads its first bytes and, for the containers that declare
their own size, compares that to the file's size. `container_signature(head)` names the video or
image container a file's first bytes belong to; `video_decode.VideoReader` uses it to tell a
"corrupt" video (the signature is there, FFmpeg still cannot parse it) from something that is
"not_video" at all (a text or HTML file renamed .mp4). Failures raise `DecodeError`, whose
`reason` ingest reports as the skip reason (rules in `video_decode`'s docstring).
"""

import os
import struct

REASONS = ("empty_file", "unreadable", "not_video", "corrupt", "truncated")

# Bytes read to recognise a container: MPEG-TS needs its second 188-byte packet's sync byte.
HEAD_BYTES = 512
# A PNG's IEND chunk must lie in its last this many bytes (trailing metadata is allowed).
IMAGE_TAIL_BYTES = 1 << 16


class DecodeError(ValueError):
  """A file that cannot give frames; `reason` is one of `REASONS`, `detail` says why."""

  def __init__(self, reason: str, path: str, detail: str):
    if reason not in REASONS:
      raise ValueError(f"unknown decode failure reason {reason!r}; expected one of {REASONS}.")
    super().__init__(f"{path}: {detail}")
    self.reason = reason
    self.path = path
    self.detail = detail


def _looks_like_iso_bmff(head: bytes) -> bool:
  return len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"skip",
                                          b"wide", b"pnot", b"styp")


# Signatures of video and image containers FFmpeg reads (magic numbers from each format's
# specification). A file FFmpeg cannot open that starts with one of these is "corrupt"; one
# that starts with none of them is "not_video".
_SIGNATURES = (
    ("ISO-BMFF (mp4/mov/3gp)", _looks_like_iso_bmff),
    ("Matroska/WebM", lambda h: h.startswith(b"\x1a\x45\xdf\xa3")),
    ("RIFF (avi/webp)", lambda h: h.startswith(b"RIFF")),
    ("Ogg", lambda h: h.startswith(b"OggS")),
    ("FLV", lambda h: h.startswith(b"FLV\x01")),
    ("ASF/WMV", lambda h: h.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11")),
    ("MPEG-PS/ES", lambda h: h[:3] == b"\x00\x00\x01" and len(h) > 3 and h[3] >= 0xB0),
    # One 0x47 could be a text file starting with "G": require two packets' sync bytes.
    ("MPEG-TS", lambda h: len(h) > 188 and h[0] == h[188] == 0x47),
    ("H.264/HEVC Annex B", lambda h: h.startswith(b"\x00\x00\x00\x01")),
    ("MXF", lambda h: h.startswith(b"\x06\x0e\x2b\x34")),
    ("IVF", lambda h: h.startswith(b"DKIF")),
    ("Y4M", lambda h: h.startswith(b"YUV4MPEG2")),
    ("RealMedia", lambda h: h.startswith(b".RMF")),
    ("PNG", lambda h: h.startswith(b"\x89PNG\r\n\x1a\n")),
    ("JPEG", lambda h: h.startswith(b"\xff\xd8\xff")),
    ("GIF", lambda h: h[:6] in (b"GIF87a", b"GIF89a")),
    ("BMP", lambda h: h.startswith(b"BM") and h[6:10] == b"\x00" * 4),  # Reserved bytes zero.
    ("TIFF", lambda h: h[:4] in (b"II*\x00", b"MM\x00*")),
)


def container_signature(head: bytes) -> str | None:
  """The container whose magic number `head` (the file's first bytes) starts with, or None."""
  for name, matches in _SIGNATURES:
    if matches(head):
      return name
  return None


def _ebml_vint(data: bytes, i: int, keep_marker: bool) -> tuple[int, int, bool]:
  """Reads a Matroska variable-size integer at i: (value, next offset, is the all-ones value)."""
  first = data[i]
  length = 1
  while length <= 8 and not first & (0x80 >> (length - 1)):
    length += 1
  if length > 8 or i + length > len(data):
    raise ValueError("bad EBML integer")
  value = first if keep_marker else first & (0xFF >> length)
  for byte in data[i + 1:i + length]:
    value = (value << 8) | byte
  all_ones = value == (1 << (7 * length)) - 1 and not keep_marker
  return value, i + length, all_ones


def header_truncation(path: str, head: bytes, size: int) -> str | None:
  """Why the file is shorter than its own header says, or None (reads a few bytes per box).

  Args:
    path: the file (seeked into for ISO-BMFF box headers and image tails).
    head: its first bytes (HEAD_BYTES of them when the file has that many).
    size: its size in bytes.

  Returns:
    A sentence naming the structure that runs past the end, or None when nothing does or the
    format declares no size. An ISO-BMFF box of size 0 legitimately runs to the end of the file.
    A box walk that meets a type that is not 4 printable ASCII bytes stops (garbage is for
    FFmpeg to reject as corrupt, not truncation).
  """
  if _looks_like_iso_bmff(head):
    with open(path, "rb") as f:
      offset = 0
      for _ in range(100_000):
        if offset >= size:
          return None
        f.seek(offset)
        header = f.read(16)
        if len(header) < 8:
          return f"its last ISO-BMFF box header at byte {offset} is cut ({len(header)} of 8 bytes)"
        box_size, kind = struct.unpack(">I4s", header[:8])
        if not all(0x20 <= ch <= 0x7E for ch in kind):
          return None
        if box_size == 1:
          if len(header) < 16:
            return f"its last ISO-BMFF box header at byte {offset} is cut"
          box_size = struct.unpack(">Q", header[8:16])[0]
        elif box_size == 0:
          return None
        if box_size < 8:
          return None
        if offset + box_size > size:
          return (f"its '{kind.decode()}' box at byte {offset} declares {box_size} bytes but only"
                  f" {size - offset} remain")
        offset += box_size
    return None
  if head.startswith(b"\x1a\x45\xdf\xa3"):
    try:
      _, i, _ = _ebml_vint(head, 0, keep_marker=True)
      header_size, i, _ = _ebml_vint(head, i, keep_marker=False)
      with open(path, "rb") as f:
        f.seek(i + header_size)
        segment = f.read(12)
      element, j, _ = _ebml_vint(segment, 0, keep_marker=True)
      segment_size, j, unknown = _ebml_vint(segment, j, keep_marker=False)
    except (ValueError, IndexError):
      return None
    if element != 0x18538067 or unknown:
      return None
    start = i + header_size + j
    if start + segment_size > size:
      return (f"its Matroska segment declares {segment_size} bytes from byte {start} but only"
              f" {size - start} remain")
    return None
  if head.startswith(b"RIFF") and len(head) >= 12:
    (riff_size,) = struct.unpack("<I", head[4:8])
    if 8 + riff_size > size:
      return (f"its RIFF {head[8:12].decode('latin-1').strip()} chunk declares {riff_size + 8}"
              f" bytes but the file has {size}")
    return None
  if head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff"):
    png = head.startswith(b"\x89PNG")
    with open(path, "rb") as f:
      if png:
        f.seek(max(0, size - IMAGE_TAIL_BYTES))
        found = b"IEND" in f.read()
      else:
        # EOI (FF D9) cannot occur inside entropy-coded data (0xFF is stuffed as FF 00), so a
        # JPEG without it anywhere was cut before its end. Searching the whole file (not just
        # the tail) accepts data appended after EOI, e.g. the video of a "motion photo".
        found = b"\xff\xd9" in f.read()
    if not found:
      return f"the {'PNG has no IEND chunk' if png else 'JPEG has no end-of-image marker'}"
  return None


def check_file(path: str) -> tuple[bytes, int]:
  """Cheap checks before FFmpeg: exists, readable, non-empty, not cut short per its header.

  Returns:
    (first bytes, size in bytes).

  Raises:
    DecodeError: "unreadable", "empty_file" or "truncated".
  """
  try:
    if os.path.isdir(path):
      raise DecodeError("unreadable", path, "is a directory, not a file")
    size = os.stat(path).st_size
    with open(path, "rb") as f:
      head = f.read(HEAD_BYTES)
  except DecodeError:
    raise
  except FileNotFoundError:
    kind = "a symlink to a missing target" if os.path.islink(path) else "missing (no such file)"
    raise DecodeError("unreadable", path, f"is {kind}") from None
  except OSError as e:
    raise DecodeError("unreadable", path, f"cannot be read: {e.strerror or e}") from None
  if size == 0:
    raise DecodeError("empty_file", path, "is empty (0 bytes)")
  try:
    why = header_truncation(path, head, size)
  except OSError as e:
    raise DecodeError("unreadable", path, f"cannot be read: {e.strerror or e}") from None
  if why:
    raise DecodeError("truncated", path, f"is truncated: {why}")
  return head, size
