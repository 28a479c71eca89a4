"""TFDS builder `spacetime_videos`: a folder or manifest of captioned videos -> ArrayRecord shards.

One record per clip (`data_pipelines.ingest.iter_clips` cuts every video into clips of valid
shape):

  "video"        bytes   the clip's frames, encoded by `clip_codec.encode_clip` (codec per config)
  "caption"      str     "num_frames", "height", "width"  int32  (T, H, W) of the decoded clip
  "fps"          float32 "source_path" str   "clip_index" int32 (0, 1, ... within its video)

No TensorFlow is needed to write or read it (`tfds.features.Video`/`Image` would need TF, so the
clip travels as encoded bytes in a `Tensor(shape=(), dtype=object)`, see env-probe §1a).

Configs: a `SpacetimeVideosConfig` carries every option that changes the records (the
`IngestOptions`, codec, crf, x264 preset, validation fraction); its name holds the main values
and a hash of all of them, so different settings never share a directory.

Splits: "train" and "validation"; a file's split is a stable hash of its path relative to the
input root (so re-runs, parts and machines agree), with `validation_fraction` of files in
"validation". A split that receives no clip is left out (TFDS cannot write an empty split).

Parts: `part`/`num_parts` keep the files whose stable hash (another salt) % num_parts == part,
so N processes or machines can each build one part into its own data_dir (see prepare.py).

Decoding, resizing and encoding run in a pool of worker processes (`DecodePool`): TFDS's writer
is sequential, so the generator submits files to the pool, at most `window` at a time (memory
stays bounded by the clips of a few files, never the dataset), and yields their encoded clips as
they complete. TFDS orders records by a hash of their key, so completion order does not change
the shards. A file that fails is recorded as a skip, never raised; a worker process that dies
(an FFmpeg crash) is replaced, and the files it may have held are re-run one at a time so the
culprit alone is skipped.

`tfds build` (the CLI script) cannot run it, nor any builder, without TensorFlow: the `tfds`
script (tensorflow_datasets 4.9.10, scripts/cli/main.py) imports every subcommand, and
scripts/cli/convert_format_utils.py evaluates `tf.train.Example` at import time, so
`tfds build data_pipelines/tfds_builder.py --manual_dir=FOLDER --data_dir=OUT` dies with
`ModuleNotFoundError: No module named 'tensorflow'` before parsing a flag. The build command
itself needs no TF: `tensorflow_datasets.scripts.cli.build.Args` parsed with simple_parsing
and `.execute()`d, from a script file, builds this module's default config (checked). The
supported equivalent is the public API, also TF-free (tests/test_prepared_source.py):

  builder = SpacetimeVideos(data_dir=OUT, config=make_config(...))   # config optional
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=FOLDER))
  tfds.data_source("spacetime_videos/<config name>", data_dir=OUT, split="train")

(`python -m data_pipelines.prepare` adds parts, the report and the shape index on top.)
"""

import collections
from collections.abc import Callable, Iterable, Iterator
import concurrent.futures
import dataclasses
import functools
import hashlib
import inspect
import json
import multiprocessing
import os
import sys
import time
from typing import Any

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import clip_codec
from data_pipelines import ingest

NAME = "spacetime_videos"
SPLITS = ("train", "validation")
_PART_SALT = "part"
_SPLIT_SALT = "split"
_SPLIT_RESOLUTION = 1_000_000  # validation_fraction is honoured to 1e-6.


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(eq=False, repr=False)
class SpacetimeVideosConfig(tfds.core.BuilderConfig):
  """Everything that changes the records; `make_config` fills `name` and `description`."""

  options: ingest.IngestOptions = ingest.IngestOptions()
  codec: str = "mp4"
  crf: int = clip_codec.DEFAULT_CRF
  preset: str = clip_codec.DEFAULT_PRESET
  validation_fraction: float = 0.0

  def __repr__(self):  # TFDS logs the config; the name already encodes (a hash of) the values.
    return f"SpacetimeVideosConfig({self.name!r})"


# make_config returns these instances for their values (TFDS refuses look-alike custom configs).
_PREDEFINED: dict[str, SpacetimeVideosConfig] = {}


def config_values(config: SpacetimeVideosConfig) -> dict[str, Any]:
  """The config as a flat JSON-able dict: IngestOptions fields + codec, crf, preset, fraction."""
  return {**dataclasses.asdict(config.options), "codec": config.codec, "crf": config.crf,
          "preset": config.preset, "validation_fraction": config.validation_fraction}


def _number(value: float) -> str:
  """7.5 -> "7p5": config names must be Python identifiers (tfds.core.naming)."""
  return f"{value:g}".replace(".", "p").replace("-", "m")


def make_config(options: ingest.IngestOptions | None = None, *, codec: str = "mp4",
                crf: int = clip_codec.DEFAULT_CRF, preset: str = clip_codec.DEFAULT_PRESET,
                validation_fraction: float = 0.0) -> SpacetimeVideosConfig:
  """A config named like `mp4_fps8_t33_px65536_1a2b3c4d` (last part: hash of every value).

  Returns the class's own instance when the values equal a predefined config, because TFDS
  refuses a custom config that reuses a predefined config's name.
  """
  options = options or ingest.IngestOptions()
  clip_codec.check_settings(codec, crf, preset)
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction is {validation_fraction}; it must be in [0, 1) "
                     "(the share of files that go to the validation split; 0 = none).")
  config = SpacetimeVideosConfig(name="pending", options=options, codec=codec, crf=int(crf),
                                 preset=preset, validation_fraction=float(validation_fraction))
  values = config_values(config)
  digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]
  config.name = (f"{codec}_fps{_number(options.fps)}_t{options.max_frames}"
                 f"_px{options.max_pixels}_{digest}")
  config.description = "prepare options: " + json.dumps(values, sort_keys=True)
  return _PREDEFINED.get(config.name, config)


def config_from_values(values: dict[str, Any]) -> SpacetimeVideosConfig:
  """Inverse of `config_values` (reads dataset.json / report.json)."""
  values = dict(values)
  extra = {k: values.pop(k) for k in ("codec", "crf", "preset", "validation_fraction")
           if k in values}
  known = {f.name for f in dataclasses.fields(ingest.IngestOptions)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"stored prepare options name {unknown}, which this version's IngestOptions "
                     "does not have; the dataset was written by another version of the code.")
  return make_config(ingest.IngestOptions(**values), **extra)


DEFAULT_CONFIG = make_config()  # The one predefined config: default IngestOptions, mp4 crf 18.
_PREDEFINED[DEFAULT_CONFIG.name] = DEFAULT_CONFIG


# ----------------------------------------------------------------------------- hashing rules


def stable_hash(text: str, salt: str) -> int:
  """A 64-bit hash of `text` that is the same on every machine and Python run (unlike hash())."""
  return int.from_bytes(hashlib.sha256(f"{salt}\0{text}".encode()).digest()[:8], "big")


def source_key(path: str, root: str) -> str:
  """`path` relative to the input root (POSIX separators), so machines that mount the input at
  different places agree on parts, splits and record keys; the absolute path outside the root."""
  path, root = os.path.abspath(path), os.path.abspath(root)
  rel = os.path.relpath(path, root)
  outside = rel == os.pardir or rel.startswith(os.pardir + os.sep)
  return path if outside else rel.replace(os.sep, "/")


def part_of(key: str, num_parts: int) -> int:
  """The part (0 .. num_parts-1) that prepares the file with `source_key` `key`."""
  return stable_hash(key, _PART_SALT) % num_parts


def split_of(key: str, validation_fraction: float) -> str:
  """"validation" for a stable `validation_fraction` share of source keys, else "train"."""
  draw = stable_hash(key, _SPLIT_SALT) % _SPLIT_RESOLUTION
  return "validation" if draw < validation_fraction * _SPLIT_RESOLUTION else "train"


def input_root(input_path: str) -> str:
  """The folder source paths are made relative to: the folder itself, or a manifest's folder."""
  return input_path if os.path.isdir(input_path) else os.path.dirname(os.path.abspath(input_path))


# ----------------------------------------------------------------------------- worker side


@dataclasses.dataclass(frozen=True)
class ItemResult:
  """What one input file became: encoded records, or a skip. Built in a worker process."""

  path: str
  split: str
  examples: tuple[tuple[str, dict[str, Any]], ...] = ()  # (record key, features)
  skip: dict[str, str] | None = None  # {"path", "reason", "detail"}
  unexpected: bool = False  # the skip came from an exception other than SkipFile
  seconds: float = 0.0


def _skip(path: str, split: str, reason: str, detail: str, unexpected=False, seconds=0.0):
  return ItemResult(path, split, skip={"path": path, "reason": reason, "detail": detail},
                    unexpected=unexpected, seconds=seconds)


def _check_clip_shape(shape: tuple[int, ...], options: ingest.IngestOptions) -> str | None:
  """Why a clip from ingest breaks the shape rules, or None. Guards the records' contract."""
  if len(shape) != 4 or shape[-1] != 3:
    return f"clip has shape {shape}, not (T, H, W, 3)"
  num_frames, height, width, _ = shape
  if num_frames < 1 or (num_frames - 1) % options.frame_multiple:
    return f"T={num_frames} is not 1 + k*{options.frame_multiple}"
  if height % options.size_multiple or width % options.size_multiple or min(height, width) < 1:
    return f"H x W = {height}x{width} is not a multiple of {options.size_multiple}"
  return None


def encode_item(job: tuple[ingest.InputItem, str, str], config: SpacetimeVideosConfig
                ) -> ItemResult:
  """Runs in a worker: decode + cut + resize one file (`ingest.iter_clips`), encode its clips.

  Clips are encoded as they stream out of the decoder, so a worker holds one raw clip plus the
  file's encoded clips (10-50x smaller), not the raw video; a file that turns out truncated
  after some clips is still skipped whole (ingest's contract). Every clip is decoded back once
  (cheap next to encoding) to check the codec returns the exact (T, H, W) the index will list.

  Args:
    job: (input item, its split, its source key).
    config: the dataset config.

  Returns:
    An ItemResult; never raises for a bad file.
  """
  item, split, key = job
  start = time.perf_counter()
  examples = []
  try:
    for clip in ingest.iter_clips(item, config.options):
      examples.append((f"{key}#{clip.clip_index}", _encode_clip(clip, config)))
  except ingest.SkipFile as e:
    return _skip(item.path, split, e.reason, e.detail, seconds=time.perf_counter() - start)
  except Exception as e:  # pylint: disable=broad-except  # One bad file must not stop the job.
    return _skip(item.path, split, "corrupt", f"unexpected {type(e).__name__} while ingesting: "
                 f"{e}", unexpected=True, seconds=time.perf_counter() - start)
  return ItemResult(item.path, split, tuple(examples), seconds=time.perf_counter() - start)


def _encode_clip(clip: ingest.Clip, config: SpacetimeVideosConfig) -> dict[str, Any]:
  """One record's features; RuntimeError when the clip breaks the shape contract."""
  frames = np.asarray(clip.frames)
  problem = (_check_clip_shape(frames.shape, config.options) if frames.dtype == np.uint8
             else f"clip dtype is {frames.dtype}, not uint8")
  if problem is None:
    data = clip_codec.encode_clip(frames, config.codec, fps=clip.fps, crf=config.crf,
                                  preset=config.preset)
    decoded = clip_codec.decode_clip(data, config.codec).shape
    if decoded != frames.shape:
      problem = f"{config.codec} round trip gave {decoded}, expected {frames.shape}"
  if problem is not None:
    raise RuntimeError(f"clip {clip.clip_index}: {problem}")
  num_frames, height, width, _ = frames.shape
  return {"video": data, "caption": clip.caption, "num_frames": num_frames, "height": height,
          "width": width, "fps": np.float32(clip.fps), "source_path": clip.source_path,
          "clip_index": clip.clip_index}


def loaded_heavy_modules() -> list[str]:
  """Which of jax / tensorflow a worker process has imported (both must stay out of workers:
  JAX would grab memory and threads per worker, TF is not installed)."""
  return sorted(m for m in ("jax", "tensorflow") if m in sys.modules)


# ----------------------------------------------------------------------------- the pool


def default_num_workers() -> int:
  """The cores this process may run on (the affinity mask, not the machine's core count)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _mp_context():
  """forkserver where available: workers fork from a clean server that preloaded this module
  (fast start, no copy of the parent's threads or of a JAX runtime the caller may hold);
  spawn elsewhere. Never plain fork: the parent has threads (absl, TFDS, maybe XLA)."""
  methods = multiprocessing.get_all_start_methods()
  if "forkserver" in methods:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context
  return multiprocessing.get_context("spawn")


class DecodePool:
  """Worker processes that run `fn(item)` for many items, yielding results as they complete.

  `num_workers=0` runs everything in the calling process (debugging, tests, tiny inputs).
  Several `map_unordered` streams may share one pool (the builder peeks at each split).
  """

  def __init__(self, num_workers: int):
    if num_workers < 0:
      raise ValueError(f"num_workers is {num_workers}; use >= 1 worker processes, or 0 to "
                       "decode in this process.")
    self.num_workers = num_workers
    self._executor = None
    self._generation = 0  # Bumped when a broken executor is replaced.
    self.crashes = 0

  def _submit(self, fn, *args) -> tuple[concurrent.futures.Future, int]:
    if self._executor is None:
      self._executor = self._start()
    return self._executor.submit(fn, *args), self._generation

  def _start(self) -> concurrent.futures.ProcessPoolExecutor:
    """A new executor, probed once: if workers cannot even start, every file would look like
    a crash, so that is an error here, not a skip per file."""
    executor = concurrent.futures.ProcessPoolExecutor(self.num_workers, mp_context=_mp_context())
    try:
      heavy = executor.submit(loaded_heavy_modules).result()
    except concurrent.futures.process.BrokenProcessPool as e:
      executor.shutdown(wait=False, cancel_futures=True)
      raise RuntimeError(
          f"the {self.num_workers} decoding worker processes died at start-up ({e}). They "
          "re-import the __main__ module: run from a script file or `python -m` (not stdin or "
          "a notebook cell), guard work with `if __name__ == '__main__':`, or use num_workers=0 "
          "(--num_workers=0) to decode in this process.") from e
    if heavy:
      logging.warning("decoding workers imported %s (through the __main__ module); each one "
                      "then holds that runtime's memory. Start prepare from a module that does "
                      "not import them at top level.", heavy)
    return executor

  def _replace_broken(self, generation: int):
    """Replaces the executor if it is still the broken one (another stream may have already)."""
    if generation == self._generation and self._executor is not None:
      self._executor.shutdown(wait=True, cancel_futures=True)
      self._executor = None
      self._generation += 1
      self.crashes += 1

  def call(self, fn: Callable[[], Any]) -> Any:
    """Runs fn() once in a worker (here when num_workers=0), e.g. `loaded_heavy_modules`."""
    return fn() if self.num_workers == 0 else self._submit(fn)[0].result()

  def _run_alone(self, fn, item, on_crash):
    """Runs one suspect item with nothing else in flight from this stream; a crash convicts it."""
    while True:
      future, generation = self._submit(fn, item)
      try:
        return future.result()
      except concurrent.futures.process.BrokenProcessPool as e:
        self._replace_broken(generation)
        return on_crash(item, f"the decoding worker process died on this file ({e})")
      except concurrent.futures.CancelledError:
        continue  # Another stream replaced the executor under us: not this item's fault.

  def map_unordered(self, fn: Callable[[Any], Any], items: Iterable[Any], *, window: int,
                    on_crash: Callable[[Any, str], Any]) -> Iterator[Any]:
    """Yields fn(item) for every item, in completion order, at most `window` in flight.

    Args:
      fn: picklable function (module-level or functools.partial of one).
      items: the inputs.
      window: submitted-but-unconsumed items; bounds memory to `window` results.
      on_crash: (item, detail) -> result, for an item whose worker process died.
    """
    if self.num_workers == 0:
      yield from map(fn, items)
      return
    pending = collections.deque(items)
    in_flight: dict[concurrent.futures.Future, tuple[Any, int]] = {}
    while pending or in_flight:
      while pending and len(in_flight) < window:
        item = pending.popleft()
        future, generation = self._submit(fn, item)
        in_flight[future] = (item, generation)
      done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
      suspects = []
      for future in done:
        item, generation = in_flight.pop(future)
        try:
          result = future.result()
        except concurrent.futures.process.BrokenProcessPool:
          suspects.append((item, generation))
          continue
        except concurrent.futures.CancelledError:
          pending.appendleft(item)  # Executor replaced by another stream: just resubmit.
          continue
        yield result
      if suspects:
        # A dead worker breaks its executor and every future in it, so every item in flight
        # on it is a suspect; re-running each alone finds the one that kills its worker.
        for _, generation in suspects:
          self._replace_broken(generation)
        suspects += list(in_flight.values())
        in_flight.clear()
        for item, _ in suspects:
          yield self._run_alone(fn, item, on_crash)

  def close(self):
    """Waits for running tasks, drops queued ones and stops the worker processes."""
    if self._executor is not None:
      self._executor.shutdown(wait=True, cancel_futures=True)
      self._executor = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ----------------------------------------------------------------------------- the builder


class SpacetimeVideos(tfds.core.GeneratorBasedBuilder):
  """Captioned videos -> clips of valid shape, one record each (module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: encoded clip bytes (mp4 or raw), caption, (T, H, W), fps, "
               "source path and clip index; train/validation split by a hash of the path.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the videos (and images) in a folder, each with a caption in a sidecar <stem>.txt, "
      "and pass that folder as manual_dir (or `input_path=` to the constructor, which also "
      "takes a .csv/.jsonl manifest). python -m data_pipelines.prepare does this for you.")
  BUILDER_CONFIGS = [DEFAULT_CONFIG]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """The file defining this builder (TFDS looks for checksums.tsv and metadata beside it)."""
    # TFDS's own lookup goes through `importlib_resources`, a backport that is not installed
    # here (ModuleNotFoundError for any builder that lives in a package); the file is enough.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, input_path: str | None = None, part: int = 0, num_parts: int = 1,
               discovered: tuple[list[Any], list[dict[str, str]]] | None = None,
               pool: DecodePool | None = None,
               on_result: Callable[[ItemResult], None] | None = None, file_format: str = "array_record", **kwargs):
    """Args beyond TFDS's (data_dir, config, version):

    input_path: folder or manifest; default: the download config's manual_dir.
    part, num_parts: build only the files with part_of(key, num_parts) == part.
    discovered: `ingest.discover(input_path)`'s result when the caller has it already (saves
      one scan of the input per part).
    pool: decoding processes; default: DecodePool(default_num_workers()), closed after
      preparing.
    on_result: called in this process with every ItemResult (progress bars).
    """
    if not 0 <= part < num_parts:
      raise ValueError(f"part={part} with num_parts={num_parts}; parts are 0..num_parts-1.")
    self._input_path, self._discovered = input_path, discovered
    self._part, self._num_parts = part, num_parts
    self._pool, self._on_result = pool, on_result
    self.clip_shapes: dict[str, collections.Counter] = {  # split -> {"TxHxW": clips}
        s: collections.Counter() for s in SPLITS}
    self.skips: list[dict[str, str]] = []
    self.accepted: list[str] = []
    self.written_keys: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    self.files_seen = 0
    self.unexpected_errors = 0
    self.worker_seconds = 0.0
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Captioned video clips of valid shape (T = 1 + k*frame_multiple, H and W "
                    "multiples of size_multiple), encoded per record.",
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(), dtype=np.object_),
            "caption": tfds.features.Text(),
            "num_frames": np.int32, "height": np.int32, "width": np.int32,
            "fps": np.float32,
            "source_path": tfds.features.Text(),
            "clip_index": np.int32,
        }),
    )

  @property
  def config(self) -> SpacetimeVideosConfig:
    """The builder config (typed): the IngestOptions fields plus codec, crf, preset, split."""
    return self.builder_config

  def _split_generators(self, dl_manager):
    input_path = self._input_path or os.fspath(dl_manager.manual_dir)
    items, pre_skips = self._discovered or ingest.discover(input_path)
    root = input_root(input_path)
    jobs = {s: [] for s in SPLITS}
    for item in items:
      key = source_key(item.path, root)
      if part_of(key, self._num_parts) == self._part:
        jobs[split_of(key, self.config.validation_fraction)].append((item, key))
    for skip in pre_skips:
      if part_of(source_key(skip["path"], root), self._num_parts) == self._part:
        self.files_seen += 1
        self.skips.append(dict(skip))
    self.files_seen += sum(len(j) for j in jobs.values())
    pool = self._pool or DecodePool(default_num_workers())
    generators = {}
    for split in SPLITS:
      examples = self._generate_examples(pool, split, jobs[split])
      first = next(examples, None)  # TFDS cannot write an empty split: leave it out.
      if first is not None:
        generators[split] = _chain_first(first, examples, on_end=None)
    if self._pool is None:  # Our own pool: close it once the last split is written.
      if generators:
        last = list(generators)[-1]
        generators[last] = _chain_first(None, generators[last], on_end=pool.close)
      else:
        pool.close()
    return generators

  def _generate_examples(self, pool: DecodePool, split: str, jobs: list[tuple[Any, str]]
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, example) of every clip of `jobs`' files; records skips and counts on the way."""
    work = functools.partial(encode_item, config=self.config)
    on_crash = lambda job, detail: _skip(job[0].path, job[1], "corrupt", detail)
    results = pool.map_unordered(work, ((item, split, key) for item, key in jobs),
                                 window=max(2, 2 * pool.num_workers), on_crash=on_crash)
    for result in results:
      self._record(result)
      yield from result.examples

  def _record(self, result: ItemResult):
    self.worker_seconds += result.seconds
    if result.skip is not None:
      self.skips.append(result.skip)
      self.unexpected_errors += int(result.unexpected)
    else:
      self.accepted.append(result.path)
      for _, example in result.examples:
        shape = f"{example['num_frames']}x{example['height']}x{example['width']}"
        self.clip_shapes[result.split][shape] += 1
        self.written_keys[result.split].append((example["source_path"], example["clip_index"]))
    if self._on_result is not None:
      self._on_result(result)

  # TFDS prints (bold, to stdout) a download size and a "downloaded and prepared" line; there is
  # no download here and prepare.py prints its own summary, so they go to the log instead.
  def _log_download_bytes(self) -> None:
    logging.debug("preparing %s into %s", self.builder_config.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.debug("prepared %s into %s", self.builder_config.name, self.data_dir)


def _chain_first(first, rest: Iterator, on_end: Callable[[], None] | None) -> Iterator:
  """Yields `first` (unless None), then `rest`; then calls on_end."""
  try:
    if first is not None:
      yield first
    yield from rest
  finally:
    if on_end is not None:
      on_end()
