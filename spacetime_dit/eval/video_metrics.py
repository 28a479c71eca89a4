"""Full-reference video quality: PSNR, SSIM and temporal flicker of a reconstruction.

Videos are (T, H, W, 3) arrays, uint8 or float, both in the same units with values in
[0, data_range] (255 for uint8). `x` is the reference (the input video), `y` the reconstruction.
Every metric is computed in float64 with numpy/scipy, so the numbers do not depend on the
accelerator or on JAX's default precision.

- `psnr`: 10 log10(data_range^2 / MSE), the MSE taken over the whole video (every frame, pixel
  and channel at once), so one clip gives one number; +inf when the videos are identical.
- `ssim`: the structural similarity index of Wang, Bovik, Sheikh & Simoncelli (IEEE TIP 2004,
  eq. 13) exactly as their reference MATLAB `ssim_index.m`: an 11x11 Gaussian window with
  sigma 1.5 (normalised to sum 1), K1 = 0.01, K2 = 0.03, C_i = (K_i * data_range)^2, weighted
  (biased) local means, variances and covariance, evaluated only where the window fits inside
  the frame ("valid"), averaged over the map. By default it is computed on each frame's luma
  (ITU-R BT.601: Y = 0.299 R + 0.587 G + 0.114 B, on the same [0, data_range] scale, no
  studio-range offset), as Wang et al. evaluated grey-scale images; `channels="rgb"` averages
  the three channels' SSIMs instead. Unlike the MATLAB demo it never downsamples the frames
  first. The clip's SSIM is the mean over frames.
- `temporal_flicker`: mean |(y[t+1] - y[t]) - (x[t+1] - x[t])| over t, pixels and channels, in
  [0, 255] units whatever the data range: the error of the frame-to-frame change. A
  reconstruction whose error is the same in every frame (a static colour shift, blur of a
  still scene) has zero flicker; one whose error changes between frames flickers. Undefined
  (NaN) for a one-frame clip.
"""

import math
from collections.abc import Iterable, Mapping

import numpy as np
from scipy import ndimage

SSIM_WINDOW = 11  # Gaussian window side (Wang et al. 2004, §III-C).
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_CHANNELS = ("luma", "rgb")
# ITU-R BT.601 luma weights of R, G, B.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
METRICS = ("psnr", "ssim", "temporal_flicker")


def _pair(x_thwc, y_thwc, data_range: float) -> tuple[np.ndarray, np.ndarray]:
  """Validates a (reference, reconstruction) pair; returns float64 copies."""
  x, y = np.asarray(x_thwc), np.asarray(y_thwc)
  if x.shape != y.shape:
    raise ValueError(
        f"the videos have different shapes {x.shape} and {y.shape}; compare a video with its"
        " own reconstruction (same frames, size and channels).")
  if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape) < 1:
    hint = " Add a frame axis to images: x[None]." if x.ndim == 3 else ""
    raise ValueError(f"the videos have shape {x.shape}; the metrics need (T, H, W, 3) RGB.{hint}")
  if not data_range > 0:
    raise ValueError(f"data_range is {data_range}; it must be > 0 (255 for uint8 videos).")
  return x.astype(np.float64), y.astype(np.float64)


def psnr(x_thwc, y_thwc, data_range: float = 255.0) -> float:
  """Peak signal-to-noise ratio of a whole clip, in dB.

  Args:
    x_thwc: reference video (T, H, W, 3), uint8 or float in [0, data_range].
    y_thwc: reconstruction, same shape and units.
    data_range: the largest possible value (255 for uint8, 1 or 2 for normalised floats).

  Returns:
    10 log10(data_range^2 / mean((x - y)^2)); +inf when x == y.
  """
  x, y = _pair(x_thwc, y_thwc, data_range)
  mse = float(np.mean(np.square(x - y)))
  if mse == 0.0:
    return math.inf
  return 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """The separable 1-D factor (size,) of SSIM's Gaussian window; it sums to 1."""
  offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
  window = np.exp(-np.square(offsets) / (2.0 * sigma**2))
  return window / window.sum()


def _filter_valid(image_hw: np.ndarray, window: np.ndarray) -> np.ndarray:
  """Weighted local means: the 2-D Gaussian correlation kept only where it fits ('valid')."""
  out = ndimage.correlate1d(image_hw, window, axis=0, mode="constant")
  out = ndimage.correlate1d(out, window, axis=1, mode="constant")
  r = window.size // 2
  height, width = image_hw.shape
  # The window is symmetric, so correlation = convolution; cropping r pixels per side drops
  # every position whose window touches the (zero) padding.
  return out[r:height - r, r:width - r]


def _ssim_plane(x_hw: np.ndarray, y_hw: np.ndarray, window: np.ndarray, data_range: float) -> float:
  """Mean SSIM over one grey-scale plane (Wang et al. 2004, eq. 13)."""
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2
  mu_x, mu_y = _filter_valid(x_hw, window), _filter_valid(y_hw, window)
  var_x = _filter_valid(x_hw * x_hw, window) - mu_x * mu_x
  var_y = _filter_valid(y_hw * y_hw, window) - mu_y * mu_y
  cov_xy = _filter_valid(x_hw * y_hw, window) - mu_x * mu_y
  numerator = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
  denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
  return float(np.mean(numerator / denominator))


def ssim(x_thwc, y_thwc, data_range: float = 255.0, *, channels: str = "luma") -> float:
  """Structural similarity of a clip: the mean of its frames' SSIM (see the module docstring).

  Args:
    x_thwc: reference video (T, H, W, 3), uint8 or float in [0, data_range]; H, W >= 11.
    y_thwc: reconstruction, same shape and units.
    data_range: the largest possible value (255 for uint8).
    channels: "luma" (SSIM of the BT.601 luma plane, the default) or "rgb" (the mean of the
      SSIMs of R, G and B).

  Returns:
    SSIM in [-1, 1]; 1.0 when x == y.
  """
  x, y = _pair(x_thwc, y_thwc, data_range)
  if channels not in SSIM_CHANNELS:
    raise ValueError(f"channels={channels!r} is not one of {SSIM_CHANNELS}.")
  height, width = x.shape[1:3]
  if min(height, width) < SSIM_WINDOW:
    raise ValueError(
        f"frames are {height}x{width}; SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} Gaussian window needs"
        f" H and W >= {SSIM_WINDOW}. Evaluate on larger frames.")
  window = gaussian_window()
  scores = []
  # Frame by frame keeps memory at a few planes, whatever the clip length.
  for x_hwc, y_hwc in zip(x, y):
    if channels == "luma":
      scores.append(_ssim_plane(x_hwc @ _LUMA_WEIGHTS, y_hwc @ _LUMA_WEIGHTS, window, data_range))
    else:
      scores.append(np.mean([
          _ssim_plane(x_hwc[..., c], y_hwc[..., c], window, data_range) for c in range(3)]))
  return float(np.mean(scores))


def temporal_flicker(x_thwc, y_thwc, data_range: float = 255.0) -> float:
  """Mean absolute error of the frame-to-frame change, in [0, 255] units.

  Args:
    x_thwc: reference video (T, H, W, 3), uint8 or float in [0, data_range].
    y_thwc: reconstruction, same shape and units.
    data_range: the largest possible value; the result is rescaled to a range of 255.

  Returns:
    mean over t, pixels and channels of |(y[t+1] - y[t]) - (x[t+1] - x[t])| * 255 / data_range;
    0 when the error y - x is the same in every frame; NaN when T == 1 (no frame change).
  """
  x, y = _pair(x_thwc, y_thwc, data_range)
  if x.shape[0] < 2:
    return math.nan
  # (y[t+1] - y[t]) - (x[t+1] - x[t]) is the temporal difference of the error e = y - x.
  error_thwc = y - x
  return float(np.mean(np.abs(np.diff(error_thwc, axis=0))) * 255.0 / data_range)


def compare(x_thwc, y_thwc, data_range: float = 255.0, *, ssim_channels: str = "luma") -> dict[str, float]:
  """All three metrics of one clip: {"psnr", "ssim", "temporal_flicker"}."""
  return {
      "psnr": psnr(x_thwc, y_thwc, data_range),
      "ssim": ssim(x_thwc, y_thwc, data_range, channels=ssim_channels),
      "temporal_flicker": temporal_flicker(x_thwc, y_thwc, data_range),
  }


def mean_metrics(rows: Iterable[Mapping[str, float]], keys: Iterable[str] = METRICS) -> dict[str, float | None]:
  """The mean over clips of each metric, skipping NaN and missing values.

  The PSNR mean is the mean of per-clip PSNRs in dB (the usual convention of video autoencoder
  papers), not the PSNR of the pooled MSE. A single +inf PSNR (an exact clip) makes it +inf.

  Args:
    rows: one mapping per clip, e.g. the results of `compare`.
    keys: the metrics to average.

  Returns:
    {key: mean, or None when no clip has a value for it}.
  """
  rows = list(rows)
  summary = {}
  for key in keys:
    values = [float(r[key]) for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    summary[key] = float(np.mean(values)) if values else None
  return summary
