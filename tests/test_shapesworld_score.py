"""Tests for the ShapesWorld scorer (spacetime_dit.eval.shapesworld_score)."""

import io

import av
import numpy as np
import pytest
from scipy import ndimage

from data_pipelines import shapesworld as sw
from data_pipelines import shapesworld_render as render
from spacetime_dit.eval import shapesworld_score as score

KEYS = ("colour", "shape", "motion", "persistence")


@pytest.fixture(scope="module")
def examples():
  """100 clips with one or two objects, camera pans, images and videos."""
  source = sw.ShapesWorld(sw.ShapesWorldConfig(camera_pan_prob=0.5, max_objects=2))
  return [source.example(i) for i in range(100)]


@pytest.fixture(scope="module")
def single_movers():
  """Clips with one object that moves on screen, with a static camera."""
  source = sw.ShapesWorld(sw.ShapesWorldConfig(max_objects=1, lengths=(5, 9, 13)))
  found = [source.example(i) for i in range(80)]
  return [e for e in found if e.objects[0].motion != "static"][:30]


def _with_caption(caption: sw.Caption, **changes) -> str:
  objects = [sw.CaptionObject(**{**vars(o), **changes}) for o in caption.objects]
  return sw.format_caption(sw.Caption(tuple(objects), caption.camera))


def _h264_round_trip(video_thwc):
  buffer = io.BytesIO()
  with av.open(buffer, "w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=8)
    stream.width, stream.height = video_thwc.shape[2], video_thwc.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "23"}
    for frame in video_thwc:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
  buffer.seek(0)
  with av.open(buffer) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_ground_truth_videos_score_high(examples):
  kinds = {(len(e.objects), e.camera != "static", e.video.shape[0] == 1) for e in examples}
  assert {(2, True, False), (2, False, False), (1, True, False)} <= kinds
  assert any(image for _, _, image in kinds)
  result = score.score_videos([e.video for e in examples], [e.caption for e in examples])
  for key in KEYS:
    assert result[key] >= 0.95, (key, result)
  assert result["num_clips"] == 100
  assert result["num_motion_clips"] == sum(e.video.shape[0] > 1 for e in examples)


def test_long_clips_that_bounce_score_high():
  config = sw.ShapesWorldConfig(sizes=((24, 48), (48, 24)), lengths=(33, 65), camera_pan_prob=0.5)
  clips = [sw.ShapesWorld(config).example(i) for i in range(20)]
  result = score.score_videos([e.video for e in clips], [e.caption for e in clips])
  for key in KEYS:
    assert result[key] >= 0.95, (key, result)


def test_blur_and_colour_shift_keep_scores_high(examples):
  def degrade(video):
    blurred = ndimage.gaussian_filter(video.astype(np.float32), (0, 0.7, 0.7, 0))
    return np.clip(blurred + np.float32([10, -8, 6]), 0, 255).round().astype(np.uint8)
  result = score.score_videos([degrade(e.video) for e in examples[:50]],
                              [e.caption for e in examples[:50]])
  for key in KEYS:
    assert result[key] >= 0.9, (key, result)


def test_h264_round_trip_keeps_scores_high(examples):
  clips = [e for e in examples if e.video.shape[0] > 1][:15]
  result = score.score_videos([_h264_round_trip(e.video) for e in clips],
                              [e.caption for e in clips])
  for key in KEYS:
    assert result[key] >= 0.9, (key, result)


def test_wrong_colour_scores_near_zero(single_movers):
  prompts = []
  for e in single_movers:
    caption = sw.parse_caption(e.caption)
    wrong = next(c for c in sw.COLOURS if c != caption.objects[0].colour)
    prompts.append(_with_caption(caption, colour=wrong))
  result = score.score_videos([e.video for e in single_movers], prompts)
  assert result["colour"] <= 0.05 and result["persistence"] <= 0.05


def test_wrong_shape_scores_near_zero(examples):
  prompts = []
  for e in examples:
    caption = sw.parse_caption(e.caption)
    objects = [sw.CaptionObject(o.colour, sw.SHAPES[(sw.SHAPES.index(o.shape) + 1) % 3], o.size,
                                o.motion) for o in caption.objects]
    prompts.append(sw.format_caption(sw.Caption(tuple(objects), caption.camera),
                                     image=e.video.shape[0] == 1))
  result = score.score_videos([e.video for e in examples], prompts)
  assert result["shape"] <= 0.05 and result["colour"] >= 0.95


def test_wrong_direction_scores_near_zero(single_movers):
  videos = [e.video for e in single_movers]
  reversed_frames = score.score_videos([v[::-1] for v in videos],
                                       [e.caption for e in single_movers])
  assert reversed_frames["motion"] <= 0.05
  assert reversed_frames["colour"] >= 0.95 and reversed_frames["shape"] >= 0.95
  opposite = [_with_caption(sw.parse_caption(e.caption), motion=sw.OPPOSITE[e.objects[0].motion])
              for e in single_movers]
  assert score.score_videos(videos, opposite)["motion"] <= 0.05
  assert score.score_videos(videos, [e.caption for e in single_movers])["motion"] >= 0.95


@pytest.mark.parametrize("kind", ["blank", "grey", "noise"])
def test_videos_without_objects_score_near_zero(examples, kind):
  rng = np.random.default_rng(0)
  clips = examples[:40] + [sw.ShapesWorld(sw.ShapesWorldConfig(
      sizes=((128, 128),), lengths=(9,))).example(0)]
  if kind == "blank":
    videos = [np.zeros_like(e.video) for e in clips]
  elif kind == "grey":
    videos = [np.full_like(e.video, 128) for e in clips]
  else:
    videos = [rng.integers(0, 256, e.video.shape, dtype=np.uint8) for e in clips]
  result = score.score_videos(videos, [e.caption for e in clips])
  for key in KEYS:
    assert result[key] <= 0.05, (key, result)


def test_object_that_vanishes_halfway_loses_colour_and_persistence(single_movers):
  e = single_movers[0]
  frames = e.video.shape[0]
  video = e.video.copy()
  video[frames // 2:] = video[frames // 2:].min(axis=(1, 2), keepdims=True)
  result = score.score_video(video, e.caption)
  assert result["colour"] == 0.0
  assert result["persistence"] == pytest.approx((frames // 2) / frames)


def test_object_hidden_behind_another_still_persists():
  frames, height, width = 13, 32, 48
  video = render.background(frames, height, width, np.zeros((0, 4)), (0.0, 0.0), (20, 20, 28))
  t = np.arange(frames, dtype=np.float32)
  small = np.stack([6.0 + 3.0 * t, np.full(frames, 16.0)], axis=1)  # Passes x = 24 at t = 6.
  render.paint_object(video, "square", small, 8.0, sw.COLOURS["red"])
  render.paint_object(video, "circle", np.tile([[24.0, 16.0]], (frames, 1)), 16.0,
                      sw.COLOURS["blue"])
  prompt = "a small red square moving right and a large blue circle standing still"
  result = score.score_video(video, prompt)
  red = result["objects"][0]
  assert red["occluded_frames"] >= 2 and red["visible_frames"] < frames
  assert result["persistence"] == 1.0
  for key in KEYS:
    assert result[key] == 1.0, (key, result)


def test_images_have_no_motion_score(examples):
  image = next(e for e in examples if e.video.shape[0] == 1)
  result = score.score_video(image.video, image.caption)
  assert result["motion"] is None and result["objects"][0]["motion_score"] is None
  assert result["colour"] == 1.0 and result["shape"] == 1.0
  assert score.score_videos([image.video], [image.caption])["motion"] is None


def test_expected_screen_motion_under_a_pan():
  assert score.expected_screen_motion("static", "right") == "left"
  assert score.expected_screen_motion("static", "static") == "static"
  assert score.expected_screen_motion("up", "right") == "up"
  assert score.expected_screen_motion("left", "left") == "left"


def test_bad_inputs_raise_clear_errors(examples):
  video = examples[0].video
  with pytest.raises(ValueError, match="uint8"):
    score.score_video(video.astype(np.float32), examples[0].caption)
  with pytest.raises(ValueError, match="uint8"):
    score.score_video(video[0], examples[0].caption)
  with pytest.raises(ValueError, match="grammar"):
    score.score_video(video, "a purple elephant")
  with pytest.raises(ValueError, match="same"):
    score.score_videos([video], [])
  with pytest.raises(ValueError, match="square_fill"):
    score.ScoreConfig(triangle_fill=0.95)
