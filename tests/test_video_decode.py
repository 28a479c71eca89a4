"""video_decode / media_checks: orientation, timestamp resampling, resizing, failure reasons."""

import fractions
import struct

import av
import numpy as np
import pytest

from data_pipelines import clip_codec
from data_pipelines import media_checks
from data_pipelines import real_clips
from data_pipelines import video_decode
from spacetime_dit import video_io

Fraction = fractions.Fraction
LOSSLESS = {"qp": "0", "preset": "ultrafast"}  # x264 lossless: pixel values survive the trip.


def _index_video(path, num_frames, rate, *, options=None, **kwargs):
  """Frame i is uniform grey 8 * i (i < 32), so a decoded frame tells its source index."""
  frames = np.repeat((8 * np.arange(num_frames, dtype=np.uint8))[:, None, None, None], 3, -1)
  frames = np.ascontiguousarray(np.broadcast_to(frames, (num_frames, 32, 48, 3)))
  clip_codec.encode_video(str(path), frames, rate=rate, options=options or LOSSLESS, **kwargs)
  return str(path)


def _indices(frames):
  return [int(round(float(f.mean()) / 8)) for f in frames]


def _read(path, fps=None, **kwargs):
  with video_decode.VideoReader(str(path)) as reader:
    return reader.info, list(reader.frames(fps, **kwargs))


def _blocks(height, width, seed=0):
  """A uint8 (H, W, 3) image of random 8x8 blocks: any transpose/flip changes it visibly."""
  rng = np.random.default_rng(seed)
  cells = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
  return np.ascontiguousarray(cells.repeat(8, 0).repeat(8, 1))


@pytest.fixture(scope="module")
def carphone():
  return video_io.read_video(real_clips.clip_path("carphone"), max_frames=40)


# ------------------------------------------------------------------------------ orientation


def _rotation_matrix(degrees_ccw):
  """FFmpeg's av_display_rotation_set(-degrees) (what PyAV writes), 16.16 fixed point."""
  theta = np.deg2rad(degrees_ccw)
  a, b, c, d = np.cos(theta), -np.sin(theta), np.sin(theta), np.cos(theta)
  return [round(v * 65536) for v in (a, b, 0, c, d, 0)] + [0, 0, 1 << 30]


@pytest.mark.parametrize("quarter_turns", [0, 1, 2, 3])
def test_display_matrix_rotation_is_np_rot90_counter_clockwise(quarter_turns):
  image = _blocks(16, 24)
  orientation = video_decode.orientation_from_display_matrix(_rotation_matrix(90 * quarter_turns))
  np.testing.assert_array_equal(orientation.apply(image), np.rot90(image, quarter_turns))
  assert orientation == video_decode.orientation_from_rotation(90 * quarter_turns)


def test_display_matrix_off_right_angles_snaps_to_the_nearest():
  assert video_decode.orientation_from_display_matrix(_rotation_matrix(80)) == (
      video_decode.orientation_from_rotation(90))
  with pytest.raises(ValueError, match="9 entries"):
    video_decode.orientation_from_display_matrix([1, 0, 0, 1])


@pytest.mark.parametrize("degrees,hflip", [(0, True), (90, False), (90, True), (180, False),
                                           (270, False), (270, True)])
def test_rotation_metadata_written_to_a_file_is_applied(tmp_path, degrees, hflip):
  stored = np.stack([_blocks(32, 48, seed=i) for i in range(3)])
  path = str(tmp_path / "rotated.mp4")
  with av.open(path, "w") as out:
    stream = out.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv444p"
    stream.options = LOSSLESS
    stream.set_display_rotation(degrees, hflip=hflip)  # Rotate ccw, then mirror (PyAV docs).
    for frame in stored:
      out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    out.mux(stream.encode())
  info, frames = _read(path)
  expected = np.rot90(stored, degrees // 90, axes=(1, 2))
  expected = expected[:, :, ::-1] if hflip else expected
  assert (info.height, info.width) == expected.shape[1:3]
  assert np.abs(np.stack(frames).astype(int) - expected).max() <= 3


def test_exif_orientations_match_pillow_exif_transpose(tmp_path):
  image_module = pytest.importorskip("PIL.Image")
  image_ops = pytest.importorskip("PIL.ImageOps")
  stored = _blocks(24, 40)
  for value in range(1, 9):
    picture = image_module.fromarray(stored)
    exif = picture.getexif()
    exif[0x0112] = value
    path = str(tmp_path / f"exif{value}.png")
    picture.save(path, exif=exif.tobytes())
    with open(path, "rb") as f:
      assert video_decode.exif_orientation(f.read()) == value
    upright = np.asarray(image_ops.exif_transpose(image_module.open(path)).convert("RGB"))
    np.testing.assert_array_equal(video_decode.orientation_from_exif(value).apply(stored), upright)
    # FFmpeg 8 turns the tag into a display matrix that PyAV 18.1 cannot list: the reader's
    # fallback must still give the upright picture, mirrors included.
    _, frames = _read(path)
    np.testing.assert_array_equal(frames[0], upright, err_msg=f"EXIF orientation {value}")


def test_exif_orientation_is_none_without_exif(tmp_path):
  path = str(tmp_path / "plain.png")
  video_io.write_png(path, _blocks(16, 16))
  with open(path, "rb") as f:
    assert video_decode.exif_orientation(f.read()) is None
  assert video_decode.exif_orientation(b"not an image") is None


# ------------------------------------------------------------------------------ timestamps


def test_timeline_fills_missing_and_backwards_timestamps_with_the_nominal_interval():
  raw = [(0, 1, "a"), (None, 0, "b"), (2, 1, "c"), (2, 1, "d"), (1, None, "e")]
  timed = list(video_decode.timeline(raw, Fraction(1, 10), Fraction(1, 20)))
  assert [t for t, _, _ in timed] == [0, Fraction(1, 20), Fraction(2, 10), Fraction(5, 20),
                                      Fraction(6, 20)]
  assert [d for _, d, _ in timed] == [Fraction(1, 10), Fraction(1, 20), Fraction(1, 10),
                                      Fraction(1, 10), Fraction(1, 20)]


def _constant(num_frames, rate):
  step = 1 / Fraction(rate)
  return [(i * step, step, i) for i in range(num_frames)]


def test_resample_30_to_8_fps_picks_the_nearest_frame_and_the_earlier_on_a_tie():
  picked = list(video_decode.resample_nearest(_constant(60, 30), Fraction(8)))
  # Output k is at k/8 s = source index 3.75 k; 7.5 and 22.5 are ties -> 7 and 22.
  assert picked == [0, 4, 7, 11, 15, 19, 22, 26, 30, 34, 37, 41, 45, 49, 52, 56]
  assert len(picked) == video_decode.resampled_length(Fraction(2), Fraction(8))


def test_resample_upsamples_by_repeating_frames():
  picked = list(video_decode.resample_nearest(_constant(6, Fraction(15, 2)), Fraction(8)))
  assert picked == [0, 1, 2, 3, 4, 5, 5]  # 0.8 s at 8 fps = ceil(6.4) frames.


def test_resample_variable_frame_rate_matches_brute_force_nearest():
  rng = np.random.default_rng(0)
  times = np.cumsum(np.r_[0, rng.choice([10, 33, 40, 120, 250], size=39)])  # ms, from 0.
  timed = [(Fraction(int(t), 1000), Fraction(33, 1000), i) for i, t in enumerate(times)]
  picked = list(video_decode.resample_nearest(timed, Fraction(8)))
  end = Fraction(int(times[-1]) + 33, 1000)
  assert len(picked) == video_decode.resampled_length(end, Fraction(8))
  for k, index in enumerate(picked):
    distance = np.abs(times - k * 125.0)
    assert index == int(np.flatnonzero(distance == distance.min())[0])


def test_resample_single_frame_and_empty_stream():
  assert list(video_decode.resample_nearest([(Fraction(5), Fraction(0), "x")], 8)) == ["x"]
  assert not list(video_decode.resample_nearest([], 8))


def test_30_fps_file_at_8_fps_gives_the_right_source_frames(tmp_path):
  info, frames = _read(_index_video(tmp_path / "a.mp4", 30, 30), fps=8)
  assert info.frame_rate == 30 and info.declared_frames == 30
  assert _indices(frames) == [0, 4, 7, 11, 15, 19, 22, 26]


@pytest.mark.parametrize("suffix", ["mp4", "mkv", "avi"])
def test_odd_rate_7_5_fps_is_upsampled_in_any_container(tmp_path, suffix):
  mpeg4 = {"codec": "mpeg4", "options": {"qscale:v": "1"}} if suffix == "avi" else {}
  _, frames = _read(_index_video(tmp_path / f"slow.{suffix}", 6, Fraction(15, 2), **mpeg4), fps=8)
  assert _indices(frames) == [0, 1, 2, 3, 4, 5, 5]


def test_ntsc_rate_file_gives_duration_times_fps_frames(tmp_path):
  ntsc = Fraction(30000, 1001)
  _, frames = _read(_index_video(tmp_path / "ntsc.mp4", 31, ntsc), fps=8)
  expected = video_decode.resampled_length(Fraction(31) / ntsc, Fraction(8))
  assert len(frames) == expected == 9
  times = np.arange(31) / float(ntsc)
  assert _indices(frames) == [int(np.argmin(np.abs(times - k / 8))) for k in range(9)]


def test_variable_frame_rate_file_picks_by_timestamp(tmp_path):
  pts = [0, 40, 80, 200, 210, 220, 500, 533, 566, 1000]
  path = _index_video(tmp_path / "vfr.mkv", len(pts), 30, container_format="matroska",
                      pts_ms=pts)
  _, frames = _read(path, fps=8)
  end = Fraction(1000 + 33, 1000)  # Matroska gives the last frame the 1/30 s nominal duration.
  assert len(frames) == video_decode.resampled_length(end, Fraction(8)) == 9
  nearest = [int(np.argmin(np.abs(np.array(pts) - 125 * k))) for k in range(9)]
  assert _indices(frames) == nearest == [0, 2, 5, 6, 6, 8, 8, 9, 9]


# ------------------------------------------------------------------------------ images, resize


def test_images_are_one_frame_whatever_the_fps(tmp_path):
  png, jpg = str(tmp_path / "a.png"), str(tmp_path / "b.jpg")
  video_io.write_png(png, _blocks(40, 64))
  clip_codec.encode_video(jpg, _blocks(40, 64)[None], rate=1, codec="mjpeg",
                           container_format="image2", pix_fmt="yuvj420p")
  for path in (png, jpg):
    info, frames = _read(path, fps=8)
    assert info.is_image and (info.height, info.width) == (40, 64) and len(frames) == 1
  _, frames = _read(png, fps=8, size=(20, 32))
  assert frames[0].shape == (20, 32, 3)


def test_downscale_is_area_averaged_not_aliased(tmp_path):
  checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)  # 1-pixel checkerboard.
  path = str(tmp_path / "checker.png")
  video_io.write_png(path, np.repeat(checker[..., None], 3, -1))
  _, frames = _read(path, size=(32, 32))
  # Every 2x2 block holds two 0s and two 255s: its area average is ~127 (nearest-neighbour
  # sampling would give all 0 or all 255).
  assert np.abs(frames[0].astype(int) - 127.5).max() <= 2


def test_crop_box_is_taken_in_upright_pixels_before_resizing(tmp_path):
  image = _blocks(32, 64)
  path = str(tmp_path / "wide.png")
  video_io.write_png(path, image)
  _, frames = _read(path, size=(32, 32), crop=(0, 16, 32, 32))
  np.testing.assert_array_equal(frames[0], image[:, 16:48])
  _, frames = _read(path, size=(16, 16), crop=(0, 16, 32, 32))
  assert frames[0].shape == (16, 16, 3)
  with pytest.raises(ValueError, match="outside"):
    _read(path, crop=(0, 40, 32, 32))


def test_frames_can_be_iterated_once(tmp_path):
  with video_decode.VideoReader(_index_video(tmp_path / "a.mp4", 5, 10)) as reader:
    assert len(list(reader.frames())) == 5
    with pytest.raises(ValueError, match="once"):
      list(reader.frames())


# ------------------------------------------------------------------------------ failures


def _reason(path):
  with pytest.raises(media_checks.DecodeError) as caught:
    _read(path)
  return caught.value.reason


@pytest.mark.parametrize("suffix,options", [
    ("mp4", {}),  # moov (the index) after the data: a cut file cannot even be opened.
    ("mp4", {"movflags": "+faststart"}),  # moov first: opens, data ends early.
    ("mkv", {}), ("webm", {}), ("avi", {}), ("png", {}), ("jpg", {})])
def test_files_cut_short_are_truncated_by_their_header(tmp_path, carphone, suffix, options):
  path = str(tmp_path / f"whole.{suffix}")
  if suffix == "png":
    video_io.write_png(path, carphone[0])
  elif suffix == "jpg":
    clip_codec.encode_video(path, carphone[:1], rate=1, codec="mjpeg", container_format="image2",
                             pix_fmt="yuvj420p")
  else:
    codec = {"webm": "libvpx-vp9", "avi": "mpeg4"}.get(suffix, "libx264")
    clip_codec.encode_video(path, carphone[:20], rate=25, codec=codec, container_options=options)
  with open(path, "rb") as f:
    data = f.read()
  head = data[:media_checks.HEAD_BYTES]
  assert media_checks.header_truncation(path, head, len(data)) is None
  assert len(_read(path)[1]) >= 1
  cut = str(tmp_path / f"cut.{suffix}")
  with open(cut, "wb") as f:
    f.write(data[:len(data) * 6 // 10])
  assert media_checks.header_truncation(cut, head, len(data) * 6 // 10)
  assert _reason(cut) == "truncated"


def test_decode_error_after_good_frames_is_truncated_before_any_is_corrupt(tmp_path, carphone):
  path = str(tmp_path / "whole.mp4")
  clip_codec.encode_video(path, carphone, rate=25, container_options={"movflags": "+faststart"})
  with open(path, "rb") as f:
    data = f.read()
  start = data.index(b"mdat") + 4
  rng = np.random.default_rng(0)
  for fraction, reason in ((0.7, "truncated"), (0.0, "corrupt")):
    cut = start + int((len(data) - start) * fraction)
    damaged = str(tmp_path / f"damaged{fraction}.mp4")
    with open(damaged, "wb") as f:  # Same size: the header checks pass, decoding fails.
      f.write(data[:cut] + rng.integers(0, 256, len(data) - cut, dtype=np.uint8).tobytes())
    assert _reason(damaged) == reason


def test_fewer_frames_than_the_header_declares_is_truncated(tmp_path, carphone):
  path = str(tmp_path / "whole.avi")
  clip_codec.encode_video(path, carphone, rate=25, codec="mpeg4")
  with open(path, "rb") as f:
    data = bytearray(f.read()[:12000])
  data[4:8] = struct.pack("<I", len(data) - 8)  # Hide the cut from the RIFF size check.
  cut = str(tmp_path / "cut.avi")
  with open(cut, "wb") as f:
    f.write(bytes(data))
  assert _reason(cut) == "truncated"


def test_not_video_versus_corrupt_is_decided_by_content(tmp_path, carphone):
  text = tmp_path / "notes.mp4"
  text.write_text("a caption, not a video\n" * 10)
  assert _reason(text) == "not_video"
  assert media_checks.container_signature(text.read_bytes()) is None
  greeting = tmp_path / "greeting.mp4"  # Starts with 0x47 ("G"), the MPEG-TS sync byte.
  greeting.write_text("Good morning! The videos are elsewhere.\n" * 10)
  assert _reason(greeting) == "not_video"
  video = str(tmp_path / "v.mp4")
  clip_codec.encode_video(video, carphone[:5], rate=25)
  with open(video, "rb") as f:
    head = f.read(32)
  assert media_checks.container_signature(head).startswith("ISO-BMFF")
  garbage = tmp_path / "garbage.mp4"  # An mp4 signature followed by noise.
  garbage.write_bytes(head + np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
  assert _reason(garbage) == "corrupt"


def test_empty_and_unreadable_files(tmp_path):
  (tmp_path / "empty.mp4").write_bytes(b"")
  assert _reason(tmp_path / "empty.mp4") == "empty_file"
  (tmp_path / "link.mp4").symlink_to(tmp_path / "missing.mp4")
  assert _reason(tmp_path / "link.mp4") == "unreadable"
  (tmp_path / "folder.mp4").mkdir()
  assert _reason(tmp_path / "folder.mp4") == "unreadable"


def test_permission_denied_is_unreadable(tmp_path, monkeypatch):
  path = _index_video(tmp_path / "a.mp4", 3, 10)

  def denied(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  # chmod 000 does not stop root, who runs these tests in CI containers; fake the refusal.
  monkeypatch.setattr(media_checks, "open", denied, raising=False)
  assert _reason(path) == "unreadable"
