"""Reading prepared datasets: PreparedSource, TfdsSource, Grain, and the TFDS-native build route."""

import json
import os
import pickle
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import clip_codec
from data_pipelines import ingest
from data_pipelines import loader
from data_pipelines import prepare
from data_pipelines import prepared
from data_pipelines import real_clips
from data_pipelines import tfds_builder
from spacetime_dit import video_io

OPTIONS = ingest.IngestOptions(fps=8.0, max_frames=9, frame_multiple=4, size_multiple=16,
                               max_pixels=64 * 64, min_size=32)


def _make_folder(folder) -> dict[str, str]:
  """Five captioned real clips of three sizes; returns {path: caption}."""
  car = video_io.read_video(real_clips.clip_path("carphone"), max_frames=30)
  bikes = video_io.read_video(real_clips.clip_path("bikes"), max_frames=30)
  clips = {"car_a.mp4": car[:20], "car_b.mp4": car[5:30], "bikes.mp4": bikes[:24, :, 100:400],
           "crop/tall.mp4": car[:12, :, 30:100], "crop/bikes_b.mp4": bikes[3:20, 50:250, :]}
  captions = {}
  for name, frames in clips.items():
    path = os.path.join(folder, name)
    video_io.write_mp4(path, frames, fps=12)
    captions[path] = f"caption of {name}"
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
      f.write(captions[path])
  return captions


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """(prepared dir, {path: caption}) with two parts and both splits."""
  root = tmp_path_factory.mktemp("prepared")
  captions = _make_folder(str(root / "in"))
  prepare.prepare(str(root / "in"), str(root / "out"), options=OPTIONS, num_parts=2,
                  validation_fraction=0.3, num_workers=0, progress=False)
  return str(root / "out"), captions


def test_prepared_source_reads_every_clip_with_its_shape_and_caption(dataset):
  directory, captions = dataset
  meta = json.load(open(os.path.join(directory, "dataset.json")))
  seen = set()
  for split in ("train", "validation"):
    source = prepared.open_prepared(directory, split)
    assert len(source) == meta["splits"][split] > 0
    assert source.shapes() == [source.shape_of(i) for i in range(len(source))]
    for i in range(len(source)):
      example = source[i]
      assert example["video"].dtype == np.uint8
      assert example["video"].shape == (*source.shape_of(i), 3)
      assert example["caption"] == captions[example["source_path"]]
      assert example["index"] == i and example["index"].dtype == np.int64
      seen.add(example["source_path"])
    assert source.metadata["format"] == prepared.FORMAT
  assert seen == set(captions)
  assert "tensorflow" not in sys.modules


def test_index_access_rules(dataset):
  source = prepared.open_prepared(dataset[0])
  assert source.shape_of(-1) == source.shape_of(len(source) - 1)
  np.testing.assert_array_equal(source[-1]["video"], source[len(source) - 1]["video"])
  with pytest.raises(IndexError, match="out of range"):
    source[len(source)]
  with pytest.raises(ValueError, match="split 'test' is not in"):
    prepared.open_prepared(dataset[0], "test")
  assert prepared.is_prepared_dir(dataset[0])
  assert not prepared.is_prepared_dir(os.path.dirname(dataset[0]))
  with pytest.raises(FileNotFoundError, match="not a finished prepared dataset"):
    prepared.open_prepared(os.path.dirname(dataset[0]))


def test_pickles_for_grain_workers(dataset):
  source = prepared.open_prepared(dataset[0])
  first = source[0]  # Opens the TFDS data sources...
  clone = pickle.loads(pickle.dumps(source))  # ...which are dropped on pickling and reopened.
  np.testing.assert_array_equal(clone[0]["video"], first["video"])


def test_grain_map_dataset_and_loader_shapes(dataset):
  import grain  # pylint: disable=g-import-not-at-top  # Grain imports JAX: only here.
  source = prepared.open_prepared(dataset[0])
  ds = grain.MapDataset.source(source).map(lambda ex: (ex["video"].shape, ex["caption"]))
  assert [ds[i][0] for i in range(len(source))] == [(*s, 3) for s in source.shapes()]
  assert loader.shapes_of(source, range(len(source))) == source.shapes()


def test_index_disagreeing_with_shards_raises(dataset, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  copy = str(tmp_path / "copy")
  shutil.copytree(dataset[0], copy)
  index_path = os.path.join(copy, "part-00000-of-00002", "index.json")
  index = json.load(open(index_path))
  index["train"][0] = [index["train"][0][0] + 4, *index["train"][0][1:]]
  json.dump(index, open(index_path, "w"))
  with pytest.raises(ValueError, match="index.json says"):
    prepared.open_prepared(copy)[0]


def test_tfds_source_over_the_builders_own_output(dataset):
  directory, captions = dataset
  meta = json.load(open(os.path.join(directory, "dataset.json")))
  part_dir = os.path.join(directory, meta["parts"][0])
  source = prepared.TfdsSource(f"{tfds_builder.NAME}/{meta['config']}", data_dir=part_dir,
                               split="train")
  index = json.load(open(os.path.join(part_dir, "index.json")))["train"]
  assert len(source) == len(index)
  for i in range(len(source)):
    example = source[i]
    assert example["video"].shape == (*index[i], 3) == (*source.shape_of(i), 3)
    assert example["caption"] == captions[example["source_path"]]
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[0]["video"], source[0]["video"])


class ForeignArrayVideos(tfds.core.GeneratorBasedBuilder):
  """Someone else's TFDS dataset: uint8 array videos under other feature names."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # Defined in a test module; skip TFDS's package metadata lookup.

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "frames": tfds.features.Tensor(shape=(None, 16, 24, 3), dtype=np.uint8),
        "text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(3):
      yield i, {"frames": np.full((1 + 4 * i, 16, 24, 3), i, np.uint8), "text": f"clip {i}"}


def test_tfds_source_over_a_foreign_dataset_with_array_videos(tmp_path):
  ForeignArrayVideos(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  with pytest.raises(ValueError, match="video_key="):
    prepared.TfdsSource("foreign_array_videos", data_dir=str(tmp_path))
  source = prepared.TfdsSource("foreign_array_videos", data_dir=str(tmp_path), video_key="frames",
                               caption_key="text")
  shapes = sorted(source.shape_of(i) for i in range(len(source)))
  assert shapes == [(1, 16, 24), (5, 16, 24), (9, 16, 24)]
  example = source[0]
  assert example["video"].dtype == np.uint8 and example["caption"].startswith("clip ")


def test_video_feature_forms():
  frames = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
  as_video = prepared._as_video  # pylint: disable=protected-access
  np.testing.assert_array_equal(as_video(list(frames)), frames)  # TF's Video: list of frames.
  np.testing.assert_array_equal(as_video(clip_codec.encode_clip(frames, "raw")), frames)
  assert as_video(frames[0]).shape == (1, 16, 16, 3)  # An image.
  assert as_video(clip_codec.encode_clip(frames, "mp4")).shape == frames.shape
  with pytest.raises(ValueError, match="uint8"):
    as_video(frames.astype(np.float32))


def test_tfds_native_build_route_without_tensorflow(tmp_path):
  """The programmatic equivalent of `tfds build` (whose CLI needs TF) with manual_dir."""
  folder = str(tmp_path / "in")
  captions = _make_folder(folder)
  config = tfds_builder.make_config(OPTIONS, codec="raw")
  builder = tfds_builder.SpacetimeVideos(data_dir=str(tmp_path / "data"), config=config,
                                         pool=tfds_builder.DecodePool(0))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=folder))
  assert not builder.skips and sorted(builder.accepted) == sorted(captions)
  records = tfds.data_source(f"{tfds_builder.NAME}/{config.name}", data_dir=str(tmp_path / "data"),
                             split="train")
  assert len(records) == sum(builder.clip_shapes["train"].values())
  record = records[0]
  video = clip_codec.decode_clip(record["video"], "raw")
  assert video.shape == (record["num_frames"], record["height"], record["width"], 3)
  assert record["caption"].decode() == captions[record["source_path"].decode()]
  assert "tensorflow" not in sys.modules


def test_default_config_is_the_predefined_one():
  assert tfds_builder.make_config() is tfds_builder.DEFAULT_CONFIG
  assert tfds_builder.make_config(OPTIONS).name != tfds_builder.DEFAULT_CONFIG.name
  values = tfds_builder.config_values(tfds_builder.make_config(OPTIONS, crf=20))
  assert tfds_builder.config_from_values(values).name == tfds_builder.make_config(
      OPTIONS, crf=20).name
