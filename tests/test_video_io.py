"""Round-trip and error tests for spacetime_dit.video_io (PyAV, real H.264/GIF/PNG files)."""

import av
import numpy as np
import pytest

from spacetime_dit import video_io


def _smooth_clip(t, h, w):
  """Smooth moving colour gradients, uint8 (T, H, W, 3) (video frames/height/width)."""
  tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
  clip = np.stack([
      128 + 90 * np.sin(xx / 7.0 + tt / 3.0),
      128 + 90 * np.cos(yy / 9.0 - tt / 4.0),
      128 + 90 * np.sin((xx + yy) / 11.0),
  ], axis=-1)
  return np.clip(clip, 0, 255).astype(np.uint8)


def _psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


@pytest.mark.parametrize("shape", [(9, 24, 40), (1, 32, 32), (5, 40, 24), (3, 25, 31)])
def test_mp4_round_trip_keeps_exact_shape(tmp_path, shape):
  clip = _smooth_clip(*shape)
  path = tmp_path / "sub" / "clip.mp4"
  video_io.write_mp4(path, clip, fps=8)
  out = video_io.read_video(path)
  assert out.dtype == np.uint8 and out.shape == shape + (3,)
  info = video_io.video_info(path)
  assert (info["frames"], info["height"], info["width"]) == shape
  assert info["fps"] == pytest.approx(8.0)
  assert _psnr(out, clip) > 30.0
  assert not [p for p in path.parent.iterdir() if p.name != "clip.mp4"]  # no temp files left


def test_mp4_is_h264_with_expected_pixel_format(tmp_path):
  even, odd = tmp_path / "even.mp4", tmp_path / "odd.mp4"
  video_io.write_mp4(even, _smooth_clip(2, 16, 16))
  video_io.write_mp4(odd, _smooth_clip(2, 15, 16))
  for path, pix_fmt in ((even, "yuv420p"), (odd, "yuv444p")):
    with av.open(str(path)) as container:
      stream = container.streams.video[0]
      assert stream.codec_context.name == "h264"
      assert stream.codec_context.pix_fmt == pix_fmt


def test_mp4_psnr_on_larger_smooth_clip(tmp_path):
  clip = _smooth_clip(8, 64, 96)
  video_io.write_mp4(tmp_path / "a.mp4", clip)
  assert _psnr(video_io.read_video(tmp_path / "a.mp4"), clip) > 30.0


def test_read_video_max_frames(tmp_path):
  clip = _smooth_clip(6, 16, 16)
  video_io.write_mp4(tmp_path / "a.mp4", clip)
  assert video_io.read_video(tmp_path / "a.mp4", max_frames=2).shape == (2, 16, 16, 3)
  with pytest.raises(ValueError, match="max_frames"):
    video_io.read_video(tmp_path / "a.mp4", max_frames=0)


def test_gif_round_trip_exact_for_few_colours(tmp_path):
  clip = np.zeros((4, 18, 22, 3), np.uint8)
  for t in range(4):
    clip[t, 3:9, 2 + 3 * t:8 + 3 * t] = (230, 40, 40)
    clip[t, 10:15, 12:18] = (40, 40, 230)
  path = tmp_path / "a.gif"
  video_io.write_gif(path, clip, fps=8)
  out = video_io.read_video(path)
  np.testing.assert_array_equal(out, clip)
  info = video_io.video_info(path)
  assert (info["frames"], info["height"], info["width"]) == (4, 18, 22)
  assert info["fps"] == pytest.approx(8.0, rel=0.1)


def test_gif_with_many_colours(tmp_path):
  clip = _smooth_clip(3, 20, 30)
  assert len(np.unique(clip.reshape(-1, 3), axis=0)) > 256
  video_io.write_gif(tmp_path / "a.gif", clip, fps=4)
  out = video_io.read_video(tmp_path / "a.gif")
  assert out.shape == clip.shape
  assert _psnr(out, clip) > 25.0


def test_png_and_read_image(tmp_path):
  image = _smooth_clip(1, 13, 17)[0]
  video_io.write_png(tmp_path / "a.png", image)
  out = video_io.read_image(tmp_path / "a.png")
  assert out.shape == (1, 13, 17, 3)
  np.testing.assert_array_equal(out[0], image)
  # A video gives its first frame.
  clip = _smooth_clip(3, 16, 16)
  video_io.write_mp4(tmp_path / "a.mp4", clip)
  assert video_io.read_image(tmp_path / "a.mp4").shape == (1, 16, 16, 3)


@pytest.mark.parametrize("reader", [video_io.read_video, video_io.read_image,
                                    video_io.video_info])
def test_read_errors_name_path_and_reason(tmp_path, reader):
  missing = tmp_path / "missing.mp4"
  empty = tmp_path / "empty.mp4"
  empty.write_bytes(b"")
  garbage = tmp_path / "garbage.mp4"
  garbage.write_bytes(np.random.default_rng(0).bytes(4096))
  truncated = tmp_path / "truncated.mp4"
  video_io.write_mp4(tmp_path / "good.mp4", _smooth_clip(4, 16, 16))
  truncated.write_bytes((tmp_path / "good.mp4").read_bytes()[:200])
  cases = ((missing, "no such file"), (empty, "empty"), (garbage, "decodable"),
           (truncated, "cannot read"), (tmp_path, "not a regular file"))
  for path, reason in cases:
    with pytest.raises(video_io.VideoReadError, match=reason) as info:
      reader(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_write_validates_dtype_and_shape(tmp_path):
  for writer in (video_io.write_mp4, video_io.write_gif):
    with pytest.raises(ValueError, match="uint8"):
      writer(tmp_path / "a", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"frames\[None\]"):
      writer(tmp_path / "a", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
      writer(tmp_path / "a", np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=">= 1"):
      writer(tmp_path / "a", np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="fps"):
      writer(tmp_path / "a", np.zeros((1, 8, 8, 3), np.uint8), fps=0)
  with pytest.raises(ValueError, match="crf"):
    video_io.write_mp4(tmp_path / "a.mp4", np.zeros((1, 8, 8, 3), np.uint8), crf=60)
  with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
    video_io.write_png(tmp_path / "a.png", np.zeros((1, 8, 8, 3), np.uint8))
  assert not list(tmp_path.iterdir())
