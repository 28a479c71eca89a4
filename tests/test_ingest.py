"""ingest: discovery, the size and length policies, every skip reason, the demo folder."""

import json
import os

import numpy as np
import pytest

from data_pipelines import clip_codec
from data_pipelines import demo_folder
from data_pipelines import ingest
from data_pipelines import real_clips
from spacetime_dit import video_io

DEFAULT = ingest.IngestOptions()


@pytest.fixture(scope="module")
def carphone():
  """uint8 (40, 144, 176, 3): 1.3 s of real camera footage."""
  return video_io.read_video(real_clips.clip_path("carphone"), max_frames=40)


def _video(path, frames, rate=25, caption="a man in a car"):
  """Writes an mp4 (h264) plus its sidecar caption; returns the path."""
  path = str(path)
  clip_codec.encode_video(path, frames, rate=rate, options={"crf": "30", "preset": "ultrafast"})
  if caption is not None:
    with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as f:
      f.write(caption)
  return path


def _skip_reason(item, options=DEFAULT):
  with pytest.raises(ingest.SkipFile) as caught:
    ingest.process(item, options)
  error = caught.value
  # Every skip names the file, the rule and the fix.
  assert error.path == item.path and item.path in str(error) and "fix:" in error.detail
  return error.reason


# ------------------------------------------------------------------------------ pure policies


def test_valid_length_is_the_largest_one_plus_k_multiple():
  assert [ingest.valid_length(n, 4) for n in range(-1, 11)] == [0, 0, 1, 1, 1, 1, 5, 5, 5, 5,
                                                                  9, 9]
  assert ingest.valid_length(33, 4) == 33 and ingest.valid_length(34, 2) == 33


@pytest.mark.parametrize("frames,lengths", [
    (0, []), (1, [1]), (4, [1]), (5, [5]), (33, [33]), (36, [33]),  # Tail of 3 -> 1: dropped.
    (38, [33, 5]), (80, [33, 33, 13]), (100, [33, 33, 33])])
def test_split_lengths_cuts_consecutive_clips_and_keeps_real_video_tails(frames, lengths):
  assert ingest.split_lengths(frames, DEFAULT) == lengths


def test_split_lengths_honours_min_frames_and_max_clips():
  options = ingest.IngestOptions(min_frames=9, max_clips_per_video=2)
  assert ingest.split_lengths(8, options) == []
  assert ingest.split_lengths(9, options) == [9]
  assert ingest.split_lengths(40, options) == [33]  # Tail 7 -> 5 < min_frames.
  assert ingest.split_lengths(200, options) == [33, 33]


@pytest.mark.parametrize("size,expected", [
    ((144, 176), (144, 176, None)),  # Already valid: untouched.
    ((720, 1280), (192, 336, None)),  # Area cap 256^2: s = 0.267 -> 192 x 341 -> 336 (1.6%).
    ((1920, 1080), (336, 192, None)),  # Portrait the same way.
    ((169, 301), (160, 288, None)),  # Odd size: rounded down (1.1% aspect error), no upscale.
    ((33, 33), (32, 32, None)),
    ((136, 320), (128, 320, (4, 0, 128, 320))),  # 2.5 vs 2.35 = 6.3% > 5%: crop 8 rows.
    ((40, 100), (32, 96, (3, 0, 33, 100))),  # 3.0 vs 2.5: keep full width, crop rows.
    ((100, 40), (96, 32, (0, 3, 100, 33))),  # And columns for the portrait twin.
])
def test_target_size_closed_form_cases(size, expected):
  assert ingest.target_size(*size, DEFAULT) == expected


def test_target_size_invariants_over_many_sizes():
  rng = np.random.default_rng(0)
  for height, width in rng.integers(32, 2500, size=(300, 2)):
    out_h, out_w, crop = ingest.target_size(int(height), int(width), DEFAULT)
    assert out_h % 16 == 0 and out_w % 16 == 0 and out_h * out_w <= 256 * 256
    assert out_h <= height and out_w <= width  # Never upscaled.
    if crop is None:
      assert abs((out_w / out_h) / (width / height) - 1) <= DEFAULT.aspect_tolerance
    else:
      top, left, box_h, box_w = crop
      assert 0 <= top and top + box_h <= height and 0 <= left and left + box_w <= width
      assert box_h == height or box_w == width  # Crops one axis only, centred.
      assert abs(top - (height - box_h - top)) <= 1 and abs(left - (width - box_w - left)) <= 1
      assert abs((box_w / box_h) / (out_w / out_h) - 1) < 0.05  # Exact aspect up to rounding.


def test_target_size_too_small_and_tiny_multiples():
  with pytest.raises(ingest.SkipFile) as caught:
    ingest.target_size(16, 16, DEFAULT)
  assert caught.value.reason == "too_small" and "min_size=32" in caught.value.detail
  # A side below one multiple grows to it: the only upscale the policy allows.
  assert ingest.target_size(12, 40, ingest.IngestOptions(min_size=8))[:2] == (16, 32)


def test_options_are_validated_with_the_rule_and_value():
  with pytest.raises(ValueError, match="min_frames=40"):
    ingest.IngestOptions(min_frames=40)
  with pytest.raises(ValueError, match="caption_policy"):
    ingest.IngestOptions(caption_policy="maybe")
  with pytest.raises(ValueError, match="max_pixels"):
    ingest.IngestOptions(max_pixels=100)
  assert ingest.IngestOptions(max_frames=34).clip_frames == 33


# ------------------------------------------------------------------------------ clips


def test_a_video_becomes_clips_of_valid_shape(tmp_path, carphone):
  path = _video(tmp_path / "a.mp4", carphone, rate=10)  # 4 s -> 32 frames at 8 fps.
  options = ingest.IngestOptions(max_frames=9)
  clips = ingest.process(ingest.InputItem(path, "a man in a car", None), options)
  assert [c.frames.shape for c in clips] == [(9, 144, 176, 3)] * 3 + [(5, 144, 176, 3)]
  assert [c.clip_index for c in clips] == [0, 1, 2, 3]
  assert all(c.caption == "a man in a car" and c.source_path == path and c.fps == 8.0
             for c in clips)
  assert len(clips) == len(ingest.split_lengths(32, options))
  # Real footage survives: consecutive clips continue the motion, frames are not blank.
  assert clips[0].frames.std() > 20
  limited = ingest.IngestOptions(max_frames=9, max_clips_per_video=2)
  assert len(ingest.process(ingest.InputItem(path, "x", None), limited)) == 2


def test_iter_clips_streams(tmp_path, carphone):
  path = _video(tmp_path / "a.mp4", carphone, rate=10)
  stream = ingest.iter_clips(ingest.InputItem(path, "x", None), ingest.IngestOptions(max_frames=5))
  first = next(stream)
  assert first.frames.shape == (5, 144, 176, 3)
  stream.close()  # Stopping early closes the decoder.


def test_images_are_one_frame_clips_unless_min_frames_asks_for_video(tmp_path, carphone):
  path = str(tmp_path / "still.png")
  video_io.write_png(path, carphone[0])
  item = ingest.InputItem(path, "a still", None)
  (clip,) = ingest.process(item, DEFAULT)
  assert clip.frames.shape == (1, 144, 176, 3)
  assert _skip_reason(item, ingest.IngestOptions(min_frames=5)) == "too_small"


def test_each_file_is_checked_once(tmp_path, carphone, monkeypatch):
  # check_file reads a whole JPEG/PNG (end marker); ingest and the reader must not both run it.
  path = str(tmp_path / "still.png")
  video_io.write_png(path, carphone[0])
  calls = []
  check_file = ingest.media_checks.check_file
  monkeypatch.setattr(ingest.media_checks, "check_file",
                      lambda p: calls.append(p) or check_file(p))
  ingest.process(ingest.InputItem(path, "a still", None), DEFAULT)
  assert calls == [path]


def test_caption_policy_filename_uses_the_stem(tmp_path, carphone):
  path = _video(tmp_path / "red_car-driving.mp4", carphone[:10], caption=None)
  item = ingest.InputItem(path, None, None)
  assert _skip_reason(item) == "missing_caption"
  (clip,) = ingest.process(item, ingest.IngestOptions(caption_policy="filename"))
  assert clip.caption == "red car driving"


# ------------------------------------------------------------------------------ skip reasons


def test_skip_empty_file(tmp_path):
  (tmp_path / "a.mp4").write_bytes(b"")
  assert _skip_reason(ingest.InputItem(str(tmp_path / "a.mp4"), "x", None)) == "empty_file"


def test_skip_truncated(tmp_path, carphone):
  data = open(_video(tmp_path / "a.mp4", carphone), "rb").read()
  (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])
  assert _skip_reason(ingest.InputItem(str(tmp_path / "cut.mp4"), "x", None)) == "truncated"


def test_skip_corrupt(tmp_path, carphone):
  data = open(_video(tmp_path / "a.mp4", carphone), "rb").read()
  start = data.index(b"mdat") + 4
  noise = np.random.default_rng(0).integers(0, 256, len(data) - start, np.uint8).tobytes()
  (tmp_path / "bad.mp4").write_bytes(data[:start] + noise)
  assert _skip_reason(ingest.InputItem(str(tmp_path / "bad.mp4"), "x", None)) == "corrupt"


def test_skip_not_video(tmp_path):
  (tmp_path / "a.mp4").write_text("not a video\n" * 5)
  assert _skip_reason(ingest.InputItem(str(tmp_path / "a.mp4"), "x", None)) == "not_video"


def test_skip_unreadable(tmp_path, carphone):
  (tmp_path / "link.mp4").symlink_to(tmp_path / "gone.mp4")
  assert _skip_reason(ingest.InputItem(str(tmp_path / "link.mp4"), "x", None)) == "unreadable"
  if os.geteuid() != 0:  # Root reads through mode bits; the symlink case covers root.
    path = _video(tmp_path / "locked.mp4", carphone[:5])
    os.chmod(path, 0)
    assert _skip_reason(ingest.InputItem(path, "x", None)) == "unreadable"


def test_skip_too_small_in_space_and_time(tmp_path, carphone):
  tiny = _video(tmp_path / "tiny.mp4", real_clips.resize_area(carphone[:10], 16, 16))
  assert _skip_reason(ingest.InputItem(tiny, "x", None)) == "too_small"
  short = _video(tmp_path / "short.mp4", carphone[:10])  # 0.4 s -> 4 frames at 8 fps.
  assert _skip_reason(ingest.InputItem(short, "x", None),
                      ingest.IngestOptions(min_frames=5)) == "too_small"


def test_skip_missing_caption(tmp_path, carphone):
  path = _video(tmp_path / "a.mp4", carphone[:5], caption=None)
  assert _skip_reason(ingest.InputItem(path, None, None)) == "missing_caption"


def test_skip_reasons_are_checked():
  with pytest.raises(ValueError, match="unknown skip reason"):
    ingest.SkipFile("bad_luck", "x")


# ------------------------------------------------------------------------------ discovery


def test_discover_folder_recursive_with_sidecars(tmp_path, carphone):
  _video(tmp_path / "a.mp4", carphone[:5], caption="  first\n clip ")
  os.makedirs(tmp_path / "sub" / ".hidden")
  _video(tmp_path / "sub" / "b.mp4", carphone[:5], caption=None)
  (tmp_path / "sub" / ".hidden" / "c.mp4").write_bytes(b"ignored")
  (tmp_path / ".DS_Store").write_bytes(b"ignored")
  (tmp_path / "orphan.txt").write_text("a caption without a video")
  items, skips = ingest.discover(str(tmp_path))
  assert items == [ingest.InputItem(str(tmp_path / "a.mp4"), "first clip", None),
                   ingest.InputItem(str(tmp_path / "sub" / "b.mp4"), None, None)]
  assert skips == []


def test_discover_csv_manifest_resolves_relative_paths(tmp_path, carphone):
  os.makedirs(tmp_path / "data" / "clips")
  _video(tmp_path / "data" / "clips" / "a.mp4", carphone[:5], caption=None)
  absolute = _video(tmp_path / "b.mp4", carphone[:5], caption=None)
  manifest = tmp_path / "data" / "manifest.csv"
  manifest.write_text('path,caption,extra\nclips/a.mp4,"a man, talking",1\n'
                      f"{absolute},,2\nclips/missing.mp4,gone,3\nclips/./a.mp4,again,4\n")
  items, skips = ingest.discover(str(manifest))
  assert items == [ingest.InputItem(str(tmp_path / "data" / "clips" / "a.mp4"), "a man, talking", 2),
                   ingest.InputItem(absolute, None, 3)]
  assert [(s["path"], s["reason"]) for s in skips] == [
      (str(tmp_path / "data" / "clips" / "missing.mp4"), "unreadable"),
      (str(tmp_path / "data" / "clips" / "a.mp4"), "duplicate")]
  assert "line 4" in skips[0]["detail"] and "line 2" in skips[1]["detail"]
  assert _skip_reason(items[1]) == "missing_caption"  # Empty caption field.


def test_discover_jsonl_manifest(tmp_path, carphone):
  _video(tmp_path / "a.mp4", carphone[:5], caption=None)
  lines = [json.dumps({"path": "a.mp4", "caption": "a man"}), "", "{not json",
           json.dumps({"caption": "no path"}), json.dumps({"path": "nope.mp4"})]
  (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
  items, skips = ingest.discover(str(tmp_path / "m.jsonl"))
  assert items == [ingest.InputItem(str(tmp_path / "a.mp4"), "a man", 1)]
  assert [(s["path"], s["reason"]) for s in skips] == [
      (f"{tmp_path / 'm.jsonl'}:3", "unreadable"), (f"{tmp_path / 'm.jsonl'}:4", "unreadable"),
      (str(tmp_path / "nope.mp4"), "unreadable")]


def test_discover_errors_and_single_file(tmp_path, carphone):
  with pytest.raises(ValueError, match="does not exist"):
    ingest.discover(str(tmp_path / "nothing"))
  (tmp_path / "m.csv").write_text("file,text\na.mp4,x\n")
  with pytest.raises(ValueError, match="'path' column"):
    ingest.discover(str(tmp_path / "m.csv"))
  path = _video(tmp_path / "one.mp4", carphone[:5], caption="only me")
  assert ingest.discover(path) == ([ingest.InputItem(path, "only me", None)], [])


# ------------------------------------------------------------------------------ demo folder


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("demo"))
  return path, demo_folder.make_demo_folder(path)


def test_demo_folder_ingests_to_exactly_the_expected_clips_and_skips(demo):
  path, expected = demo
  items, skips = ingest.discover(path)
  skipped = {s["path"]: s["reason"] for s in skips}
  accepted, shapes = [], {}
  for item in items:
    try:
      clips = ingest.process(item, DEFAULT)
    except ingest.SkipFile as e:
      skipped[item.path] = e.reason
      continue
    accepted.append(item.path)
    shapes[os.path.relpath(item.path, path)] = [c.frames.shape[:3] for c in clips]
  assert sorted(accepted) == sorted(expected["expected_accepted"])
  assert skipped == expected["expected_skips"]
  assert set(skipped.values()) == {"empty_file", "truncated", "corrupt", "not_video",
                                   "unreadable", "too_small", "missing_caption"}
  assert sum(len(s) for s in shapes.values()) == expected["expected_clips"]
  for clip_shapes in shapes.values():
    for frames, height, width in clip_shapes:
      assert (frames - 1) % 4 == 0 and height % 16 == 0 and width % 16 == 0
      assert height * width <= 256 * 256
  assert shapes["bikes_long.mp4"] == [(33, 128, 320)] * 2 + [(13, 128, 320)]  # 10 s, cropped.
  assert shapes["rotated.mp4"] == [(5, 144, 176)]  # Stored sideways, upright by its matrix.
  assert shapes["portrait/bunny_portrait.avi"] == [(13, 256, 144)]
  assert shapes["still.png"] == [(1, 144, 256)] and shapes["photo.jpg"] == [(1, 144, 176)]
  total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
              for f in files if not os.path.islink(os.path.join(root, f)))
  assert total < 5_000_000
