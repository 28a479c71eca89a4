"""Fréchet Video Distance (Unterthiner et al. 2018, arXiv:1812.01717) with a pluggable network.

  python -m spacetime_dit.eval.fvd --describe_weights            # the weight-file format
  python -m spacetime_dit.eval.fvd --check_weights=i3d_k400.npz  # does a file load?
  python -m spacetime_dit.eval.fvd --write_random_weights=/tmp/random_i3d.npz  # smoke tests

FVD fits a Gaussian to the features of real clips and one to the features of generated clips
and reports the Fréchet (2-Wasserstein) distance between them (Dowson & Landau 1982):

  d^2 = |mu1 - mu2|^2 + Tr(C1) + Tr(C2) - 2 Tr((C1 C2)^(1/2)).

A feature network is any callable uint8 clips (B, T, H, W, 3) -> features (B, D)
(`FeatureNetwork`). The standard one is the Kinetics-400 I3D of `i3d.py`: 16-frame clips resized
to 224 x 224 and scaled to [-1, 1], averaged logits (D = 400).

**The standard I3D weights are not shipped with spacetime_dit and cannot be downloaded here:
the user brings the file** (`load_feature_network(path)`, format: `--describe_weights`). Scores
from any other weights, including `random_feature_network`, or from other preprocessing
(`num_frames`, `resolution`, `output`) are not comparable to published FVDs; they still rank
models against each other when every model is scored with the same network and clip counts.

FVD is biased by the sample size (the covariance of a few clips is poor): compare numbers
computed from the same number of real and generated clips. Unterthiner et al. use 256 or more.

Shape alphabet: B clips, T frames, H, W pixels, D feature width, N samples.
"""

from collections.abc import Callable
from typing import Protocol

import numpy as np
from absl import flags

from spacetime_dit import cli
from spacetime_dit.eval import i3d

FLAGS = flags.FLAGS
NOT_SHIPPED = i3d.NOT_SHIPPED
# Features are small (B x 400); the float64 statistics make the distance independent of the
# accelerator's matmul precision.
_STATS_DTYPE = np.float64


class FeatureNetwork(Protocol):
  """Maps uint8 clips (B, T, H, W, 3) to float features (B, D); preprocessing is its own job."""

  def __call__(self, videos_bthwc: np.ndarray) -> np.ndarray:
    ...


# ------------------------------------------------------------------------------------ the math


def feature_statistics(features_nd) -> tuple[np.ndarray, np.ndarray]:
  """Mean (D,) and unbiased covariance (D, D), in float64, of N >= 2 feature vectors (N, D).

  The covariance divides by N - 1, as numpy's np.cov and the reference FVD's TF-GAN do.
  """
  x = np.asarray(features_nd, dtype=_STATS_DTYPE)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(
        f"feature_statistics needs features (N, D) with N >= 2 samples, got shape {x.shape}."
        " Score at least two clips per set (Unterthiner et al. use 256 or more).")
  if not np.isfinite(x).all():
    raise ValueError("feature_statistics: the features contain NaN or inf; check the network's"
                     " weights and inputs.")
  return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
  """Symmetric square root of a PSD matrix, its round-off negative eigenvalues set to 0."""
  eigvals, eigvecs = np.linalg.eigh(cov)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
  """Tr((C1 C2)^(1/2)) for symmetric PSD C1, C2, by symmetric eigen-decompositions.

  C1 C2 is not symmetric, so its `scipy.linalg.sqrtm` is a complex Schur computation whose
  round-off leaves imaginary parts that must be dropped by hand (and fails outright on the
  singular covariances of N < D clips). Instead: C1 C2 is similar to the symmetric PSD
  M = C1^(1/2) C2 C1^(1/2) (conjugate by C1^(1/2) when C1 is invertible, by continuity
  otherwise), so Tr((C1 C2)^(1/2)) = sum_i sqrt(lambda_i(M)), with both square roots from
  `eigh` (real, stable, exact for singular matrices). TF-GAN's FID (used by the reference FVD)
  takes the same route.
  """
  sqrt1 = _psd_sqrt(cov1)
  m = sqrt1 @ cov2 @ sqrt1
  eigvals = np.linalg.eigvalsh((m + m.T) / 2.0)  # Symmetrise away round-off before eigvalsh.
  return float(np.sqrt(np.clip(eigvals, 0.0, None)).sum())


def _check_gaussian(name: str, mu, cov) -> tuple[np.ndarray, np.ndarray]:
  mu, cov = np.asarray(mu, _STATS_DTYPE), np.asarray(cov, _STATS_DTYPE)
  if mu.ndim != 1 or cov.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(
        f"frechet_distance: {name} has mean shape {mu.shape} and covariance shape {cov.shape};"
        " they must be (D,) and (D, D). Get both from feature_statistics(features_nd).")
  if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
    raise ValueError(f"frechet_distance: {name} has NaN or inf in its mean or covariance.")
  scale = max(float(np.abs(cov).max()), 1e-300)
  if np.abs(cov - cov.T).max() > 1e-6 * scale:
    raise ValueError(
        f"frechet_distance: the covariance of {name} is not symmetric (max |C - C^T| ="
        f" {np.abs(cov - cov.T).max():.3g}); pass a covariance matrix, e.g. from"
        " feature_statistics.")
  return mu, cov


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """Squared Fréchet distance between N(mu1, C1) and N(mu2, C2), the FVD/FID number.

  |mu1 - mu2|^2 + Tr(C1) + Tr(C2) - 2 Tr((C1 C2)^(1/2)) in float64, the trace term by
  `trace_sqrt_product` (eigen-decompositions; see there why not sqrtm). Means (D,), covariances
  (D, D) symmetric PSD; singular ones (fewer samples than features) are fine. Symmetric in its
  two Gaussians up to round-off. Never negative: the exact value is >= 0, so a round-off
  negative (identical inputs) is returned as 0.
  """
  mu1, cov1 = _check_gaussian("the first Gaussian", mu1, cov1)
  mu2, cov2 = _check_gaussian("the second Gaussian", mu2, cov2)
  if mu1.shape != mu2.shape:
    raise ValueError(
        f"frechet_distance: the Gaussians have widths {mu1.shape[0]} and {mu2.shape[0]}; compute"
        " both from the same feature network.")
  distance = (float(np.sum(np.square(mu1 - mu2))) + float(np.trace(cov1)) + float(np.trace(cov2))
              - 2.0 * trace_sqrt_product(cov1, cov2))
  return max(distance, 0.0)


# ------------------------------------------------------------------------- networks and FVD


def load_feature_network(path: str, *, num_frames: int = i3d.STANDARD_NUM_FRAMES,
                         resolution: int = i3d.STANDARD_RESOLUTION, output: str = "logits",
                         num_classes: int = i3d.STANDARD_NUM_CLASSES) -> i3d.I3DFeatureNetwork:
  """The I3D feature network with the user's weight file (`.npz`; see `--describe_weights`).

  The defaults are the standard FVD's (16 frames, 224 x 224, Kinetics-400 logits). The standard
  weights are not shipped and cannot be downloaded here: the user brings the file.

  Raises:
    FileNotFoundError / ValueError: the file is missing, not an .npz, or lacks or mis-shapes an
      array; the message names the path, the first offending array and how to make the file.
  """
  config = i3d.I3DConfig(num_classes, num_frames, resolution, output)
  return i3d.I3DFeatureNetwork(config, i3d.load_weights(path, num_classes), path)


def random_feature_network(seed: int = 0, *, num_frames: int = i3d.STANDARD_NUM_FRAMES,
                           resolution: int = i3d.STANDARD_RESOLUTION, output: str = "logits",
                           num_classes: int = i3d.STANDARD_NUM_CLASSES) -> i3d.I3DFeatureNetwork:
  """I3D with random weights (`i3d.init_params`), for tests and smoke runs.

  Its FVDs measure a real distance between the two feature distributions (0 for identical
  sets, growing with the shift) but are NOT comparable to published FVDs. Small `num_frames`
  and `resolution` (e.g. 4 and 16) make it fast on CPU.
  """
  config = i3d.I3DConfig(num_classes, num_frames, resolution, output)
  return i3d.I3DFeatureNetwork(config, i3d.init_params(seed, num_classes), f"random (seed {seed})")


def video_features(network: FeatureNetwork | Callable[[np.ndarray], np.ndarray], videos_bthwc,
                   *, batch_size: int = 8) -> np.ndarray:
  """Features (B, D) of uint8 clips (B, T, H, W, 3), `batch_size` clips per network call.

  The last batch is padded with copies of its last clip (their features dropped) so that every
  call has the same shape and a jitted network compiles once.
  """
  videos = np.asarray(videos_bthwc)
  if videos.ndim != 5 or videos.shape[0] < 1:
    raise ValueError(f"video_features: the clips have shape {videos.shape}; pass (B, T, H, W, 3).")
  if batch_size < 1:
    raise ValueError(f"video_features: batch_size is {batch_size}; it must be >= 1.")
  features = []
  for start in range(0, videos.shape[0], batch_size):
    batch = videos[start:start + batch_size]
    real = batch.shape[0]
    if real < batch_size and videos.shape[0] > batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    features.append(np.asarray(network(batch))[:real])
  return np.concatenate(features, axis=0)


def frechet_video_distance(network: FeatureNetwork | Callable[[np.ndarray], np.ndarray],
                           real_bthwc_uint8, fake_bthwc_uint8, *, batch_size: int = 8) -> float:
  """FVD between real and generated uint8 clips (B, T, H, W, 3), B >= 2 each.

  Features from `network` (e.g. `load_feature_network(path)`), Gaussian statistics
  (`feature_statistics`), then `frechet_distance`. Use the same number of real and generated
  clips when comparing FVDs: the estimate is biased by the sample size.
  """
  real = video_features(network, real_bthwc_uint8, batch_size=batch_size)
  fake = video_features(network, fake_bthwc_uint8, batch_size=batch_size)
  return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


# --------------------------------------------------------------------------------------- CLI


def define_flags() -> None:
  """Defines the command-line flags; only when run as a program (tests import this module)."""
  flags.DEFINE_bool("describe_weights", False, "Print the I3D weight file's arrays and shapes.")
  flags.DEFINE_string("check_weights", None, "Load this .npz weight file and report whether it fits.")
  flags.DEFINE_string("write_random_weights", None,
                      "Write random I3D weights to this .npz (smoke tests; not the standard weights).")
  flags.DEFINE_integer("seed", 0, "Seed of --write_random_weights.")
  flags.DEFINE_integer("num_classes", i3d.STANDARD_NUM_CLASSES, "I3D logits width (400: Kinetics-400).")


def main(argv):
  """The CLI: describes, checks or writes an I3D weight file."""
  del argv  # Checked by cli.run.
  if FLAGS.describe_weights:
    print(i3d.describe_weights(FLAGS.num_classes))
  elif FLAGS.check_weights:
    i3d.load_weights(FLAGS.check_weights, FLAGS.num_classes)
    print(f"{FLAGS.check_weights}: all {len(i3d.expected_shapes(FLAGS.num_classes))} I3D arrays"
          " present with the expected shapes. Only the Kinetics-400 weights of the reference FVD"
          " give FVDs comparable to published ones.")
  elif FLAGS.write_random_weights:
    i3d.save_weights(FLAGS.write_random_weights, i3d.init_params(FLAGS.seed, FLAGS.num_classes))
    print(f"wrote random I3D weights (seed {FLAGS.seed}) to {FLAGS.write_random_weights}; FVDs"
          " with them are NOT comparable to published FVDs.")
  else:
    raise ValueError("nothing to do: pass --describe_weights, --check_weights=PATH or"
                     " --write_random_weights=PATH (FVD itself runs from spacetime_dit.evaluate"
                     " --fvd_weights=PATH or frechet_video_distance in Python).")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
