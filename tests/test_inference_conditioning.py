"""Sampling modes of `inference.Generator` on a tiny random model: shapes, exact given frames,
two-scale guidance, seeds, samplers, draft-then-refine, the resize policy and input errors."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import autoencoder as autoencoder_experiment
from experiments import base as base_experiment
from spacetime_dit import config_types
from spacetime_dit import inference
from spacetime_dit import video_io
from spacetime_dit.diffusion import samplers
from spacetime_dit.training import builders
from spacetime_dit.training import steps as steps_lib

# Tiny models: temporal factor 2, spatial factor 4, patch (1, 2, 2): frames 1 + 2k, sizes % 8.
FRAMES, HEIGHT, WIDTH = 7, 16, 24  # Latent (4, 4, 6).
KW = dict(frames=FRAMES, height=HEIGHT, width=WIDTH, steps=2, progress=False)


def _tiny_generator() -> inference.Generator:
  """Random tiny autoencoder + DiT; the DiT's zero-initialised layers are perturbed so that
  its output depends on every input (a freshly initialised adaLN-Zero DiT outputs 0)."""
  ae_config = autoencoder_experiment.get_config("tiny")
  dit_config = base_experiment.get_config("tiny")
  autoencoder, ae_init = builders.build_autoencoder(ae_config)
  # "rbg" keys and numpy noise: XLA:CPU compiles every threefry draw shape for seconds.
  ae_params = nn.meta.unbox(jax.jit(ae_init)(jax.random.key(0, impl="rbg")))
  channels = autoencoder.config.latent_channels
  dit, dit_init, tokenizer = builders.build_dit(dit_config, channels)
  params = nn.meta.unbox(jax.jit(dit_init)(jax.random.key(1, impl="rbg")))
  rng = np.random.default_rng(2)
  params = jax.tree.map(
      lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), params)
  diffusion = config_types.dataclass_from_config(
      config_types.DiffusionConfig, dit_config.diffusion, path="config.diffusion")
  mean = np.linspace(-0.2, 0.2, channels).astype(np.float32)
  std = np.linspace(0.5, 1.5, channels).astype(np.float32)
  return inference.Generator(dit, params, autoencoder, ae_params, mean, std, tokenizer, diffusion)


@pytest.fixture(scope="module")
def gen():
  return _tiny_generator()


def _clip(frames, height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def _capture_latents(generator, monkeypatch):
  """Records the final latent of every sampling run (what is handed to the decoder)."""
  latents = []
  decode = generator._decode

  def recording(params, latent):
    latents.append(np.asarray(latent))
    return decode(params, latent)

  monkeypatch.setattr(generator, "_decode", recording)
  return latents


def _encoded(generator, clip_thwc):
  """The generator's own (jitted) encoding of a clip: given frames must equal it bit for bit.

  It is also checked against an encoding computed here without the generator (float tolerance:
  outside jit XLA fuses the normalisation differently).
  """
  clip = jnp.asarray(clip_thwc)[None]
  exact = np.asarray(generator._encode_clips(clip))[0]
  mean = steps_lib.encode_video(generator.autoencoder, generator.autoencoder_params, clip)
  independent = np.asarray((mean - generator.latent_mean) / generator.latent_std)[0]
  np.testing.assert_allclose(exact, independent, atol=1e-5)
  return exact


# ------------------------------------------------------------------------ guidance passes


def test_guidance_passes_follow_instructpix2pix_weights():
  # v = (1 - s_c) v(0c,0t) + (s_c - s_t) v(c,0t) + s_t v(c,t).
  assert inference.guidance_passes(4.0, 2.0, True) == (
      (True, True, 4.0), (True, False, -2.0), (False, False, -1.0))
  assert inference.guidance_passes(4.0, 1.0, True) == ((True, True, 4.0), (True, False, -3.0))
  assert inference.guidance_passes(3.0, 3.0, True) == ((True, True, 3.0), (False, False, -2.0))
  assert inference.guidance_passes(1.0, 1.0, True) == ((True, True, 1.0),)
  # Nothing given: 0c == c, plain CFG.
  assert inference.guidance_passes(4.0, 2.0, False) == ((True, True, 4.0), (True, False, -3.0))
  assert inference.guidance_passes(1.0, 5.0, False) == ((True, True, 1.0),)
  for scales in ((4.0, 2.0), (0.0, 0.0), (1.0, 3.0)):
    assert sum(w for *_, w in inference.guidance_passes(*scales, True)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="cond_guidance is nan"):
    inference.guidance_passes(1.0, float("nan"), True)


class _CountingDiT:
  """Stands in for the DiT module: records the batch of every traced call."""

  def __init__(self, dit):
    self.dit, self.config, self.batches = dit, dit.config, []

  def apply(self, variables, x, *args, **kwargs):
    self.batches.append(x.shape[0])
    return self.dit.apply(variables, x, *args, **kwargs)


@pytest.mark.parametrize("cond_guidance, passes", [(1.0, 2), (2.5, 3)])
def test_cond_guidance_one_costs_no_extra_pass(gen, cond_guidance, passes):
  fresh = inference.Generator(
      _CountingDiT(gen.dit), gen.dit_params, gen.autoencoder, gen.autoencoder_params,
      gen.latent_mean, gen.latent_std, gen.tokenizer, gen.diffusion)
  fresh.generate(["a red circle"], mode="i2v", cond=_clip(1, 16, 24), guidance=3.0,
                 cond_guidance=cond_guidance, **KW)
  assert fresh.dit.batches == [passes]  # One batched DiT call per step, traced once.


def test_guided_velocity_is_zero_on_given_frames_and_matches_the_formula(gen):
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 6, 4))
  t = jnp.full((1,), 0.7)
  text, mask = (jnp.asarray(a) for a in gen.tokenizer(["a blue square"]))
  given_t = jnp.asarray([True, False, False, True])
  given_latent = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  cond_noise = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  x = jnp.where(given_t[None, :, None, None, None], given_latent, x)
  args = (gen.dit_params, x, t, text, mask, given_t, given_latent, cond_noise)
  v = gen._velocity(*args, passes=inference.guidance_passes(3.0, 2.0, True))
  single = {p: gen._velocity(*args, passes=((p[0], p[1], 1.0),))
            for p in ((True, True), (True, False), (False, False))}
  expected = single[(False, False)] + 2.0 * (single[(True, False)] - single[(False, False)]) + 3.0 * (
      single[(True, True)] - single[(True, False)])
  np.testing.assert_allclose(v, expected, rtol=1e-4, atol=1e-4)
  assert np.all(np.asarray(v)[:, [0, 3]] == 0.0)
  assert np.abs(np.asarray(v)[:, 1:3]).min() >= 0 and np.abs(np.asarray(v)[:, 1:3]).max() > 0


# ------------------------------------------------------------------------ modes


@pytest.mark.parametrize(
    "mode, cond",
    [
        ("t2v", None),
        ("i2v", _clip(1, 37, 53)),  # Odd-sized image: resized to cover, centre-cropped.
        ("i2v", _clip(3, 16, 24)[0]),  # (H, W, 3) image.
        ("extend", _clip(4, 20, 20)),  # 4 frames: its last 3 (= 1 + 2) are used.
        ("extend_backward", _clip(2, 9, 31)),
        ("interpolate", [_clip(1, 16, 24), _clip(3, 40, 8)]),
        ("loop", _clip(1, 16, 24)),
        ("loop", None),
        ("edit", _clip(9, 17, 23)),  # Longer than the output: its first 7 frames are used.
    ],
)
def test_every_mode_gives_the_exact_output_shape(gen, mode, cond):
  out = gen.generate(["a red circle", "a green square"], mode=mode, cond=cond, **KW)
  assert out.shape == (2, FRAMES, HEIGHT, WIDTH, 3) and out.dtype == np.uint8


def test_given_latent_frames_are_exactly_the_encoded_condition(gen, monkeypatch):
  latents = _capture_latents(gen, monkeypatch)
  lead, trail = _clip(4, 16, 24, seed=1), _clip(3, 16, 24, seed=2)
  gen.generate(["a red circle"], mode="interpolate", cond=[lead, trail], guidance=2.0,
               cond_guidance=1.5, **KW)
  latent = latents[-1][0]  # (4, 4, 6, C): latents 0, 1 from `lead`, latent 3 from `trail`.
  # Leading: the last 3 = 1 + 2*1 frames of the 4-frame clip.
  np.testing.assert_array_equal(latent[:2], _encoded(gen, lead[1:]))
  # Trailing: the 3-frame clip is already 1 + 2*1 frames; drop latent 0, keep the last one.
  np.testing.assert_array_equal(latent[3:], _encoded(gen, trail)[1:])
  assert np.abs(latent[2]).max() > 0 and np.all(np.isfinite(latent[2]))  # Generated.


def test_extend_uses_the_clips_last_frames_and_i2v_its_first(gen, monkeypatch):
  latents = _capture_latents(gen, monkeypatch)
  clip = _clip(4, 16, 24, seed=3)
  gen.generate(["a red circle"], mode="extend", cond=clip, **KW)
  np.testing.assert_array_equal(latents[-1][0, :2], _encoded(gen, clip[1:]))
  gen.generate(["a red circle"], mode="i2v", cond=clip, **KW)
  np.testing.assert_array_equal(latents[-1][0, :1], _encoded(gen, clip[:1]))


def test_loop_gives_the_first_and_last_latent_frames_from_one_frame(gen, monkeypatch):
  latents = _capture_latents(gen, monkeypatch)
  image = _clip(1, 16, 24, seed=4)
  gen.generate(["a red circle"], mode="loop", cond=image, **KW)
  np.testing.assert_array_equal(latents[-1][0, 0], _encoded(gen, image)[0])
  np.testing.assert_array_equal(latents[-1][0, -1], _encoded(gen, np.repeat(image, 3, axis=0))[1])
  # Without a condition a t2v sample's first frame is the loop frame, per sample.
  latents.clear()
  out = gen.generate(["a red circle"], mode="loop", seeds=[5, 6], **KW)
  draft, looped = latents
  first_frames = np.asarray(gen._decode(gen.autoencoder_params, jnp.asarray(draft)))[:, :1]
  for i in range(2):  # (Encoded as a batch of 2 there: equal to float tolerance.)
    np.testing.assert_allclose(looped[i, 0], _encoded(gen, first_frames[i])[0], atol=1e-5)
  assert np.abs(looped[0, 0] - looped[1, 0]).max() > 0
  assert out.shape == (2, FRAMES, HEIGHT, WIDTH, 3)


def test_resized_condition_is_what_is_encoded(gen, monkeypatch):
  latents = _capture_latents(gen, monkeypatch)
  image = _clip(1, 45, 30, seed=5)
  gen.generate(["x"], mode="i2v", cond=image, **KW)
  resized = video_io.resize_to_cover(image, HEIGHT, WIDTH)
  np.testing.assert_array_equal(latents[-1][0, 0], _encoded(gen, resized)[0])


# ------------------------------------------------------------------------ seeds, samplers


def test_a_sample_is_the_same_alone_and_in_a_batch_of_seeds(gen, monkeypatch):
  latents = _capture_latents(gen, monkeypatch)
  batch = gen.generate(["a red circle", "a blue square"], seeds=[3, 7, 11], guidance=2.0, **KW)
  assert batch.shape == (6, FRAMES, HEIGHT, WIDTH, 3)
  alone = gen.generate(["a blue square"], seeds=[7], guidance=2.0, **KW)
  # Sample (prompt 1, seed 7) is row 4 (prompt-major). Same noise; XLA may tile batched
  # matmuls differently, so the latent agrees to float tolerance, not bit for bit.
  np.testing.assert_allclose(latents[1][0], latents[0][4], atol=1e-4)
  assert np.abs(alone[0].astype(int) - batch[4].astype(int)).max() <= 1
  assert np.abs(batch[3].astype(int) - batch[4].astype(int)).max() > 0  # Seeds differ.
  # Without seeds prompt i uses seed + i.
  by_seed = gen.generate(["a blue square", "a blue square"], seed=6, guidance=2.0, **KW)
  assert np.abs(by_seed[1].astype(int) - batch[4].astype(int)).max() <= 1


def test_euler_and_heun_evaluate_the_velocity_as_often_as_they_should(gen, monkeypatch):
  calls = []
  velocity = gen._velocity
  monkeypatch.setattr(gen, "_velocity", lambda *a, **k: (calls.append(1), velocity(*a, **k))[1])
  euler = gen.generate(["a red circle"], sampler="euler", **{**KW, "steps": 3})
  assert len(calls) == 3
  calls.clear()
  heun = gen.generate(["a red circle"], sampler="heun", **{**KW, "steps": 3})
  assert len(calls) == 5  # 2 per step, the last step (to t = 0) stays Euler.
  assert euler.shape == heun.shape and np.abs(euler.astype(int) - heun.astype(int)).max() > 0


def test_edit_starts_at_strength_and_keeps_more_of_the_clip_when_weaker(gen, monkeypatch):
  seen = []
  euler = samplers.euler_sample
  monkeypatch.setattr(samplers, "euler_sample", lambda f, x, ts, **k: (seen.append(np.asarray(ts)), euler(f, x, ts, **k))[1])
  clip = _clip(FRAMES, HEIGHT, WIDTH, seed=6)
  gen.generate(["x"], mode="edit", cond=clip, strength=0.3, sampler="euler", **KW)
  assert seen[-1][0] == np.float32(0.3) and seen[-1][-1] == 0.0 and len(seen[-1]) == 3
  assert samplers.sampling_timesteps(4, 2.0, start=0.5)[0] == np.float32(0.5)
  np.testing.assert_allclose(samplers.sampling_timesteps(4, 1.0, start=0.5), [0.5, 0.375, 0.25, 0.125, 0.0])


def test_draft_then_refine_samples_small_then_edits_at_full_size(gen, monkeypatch):
  latents = _capture_latents(gen, monkeypatch)
  out = gen.generate(["a red circle"], mode="i2v", cond=_clip(1, 16, 24), draft_scale=0.5,
                     refine_strength=0.4, **{**KW, "height": 32, "width": 48})
  assert out.shape == (1, FRAMES, 32, 48, 3)
  assert [l.shape[2:4] for l in latents] == [(4, 6), (8, 12)]  # draft 16x24, then full size.
  assert gen.draft_size(32, 48, 0.5) == (16, 24) and gen.draft_size(16, 16, 0.1) == (8, 8)


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="zoom"), r"unknown sampling mode 'zoom'; valid: t2v, i2v"),
        (dict(mode="t2v", cond=_clip(1, 8, 8)), r"mode 't2v' takes 0 condition\(s\)"),
        (dict(mode="i2v"), r"mode 'i2v' takes 1 condition\(s\) .*got 0"),
        (dict(mode="interpolate", cond=_clip(3, 8, 8)), r"mode 'interpolate' takes 2 .*got 1"),
        (dict(mode="i2v", cond=np.zeros((8, 8, 3), np.float32)), r"dtype float32; conditions are uint8"),
        (dict(mode="i2v", cond=np.zeros((8, 8), np.uint8)), r"shape \(8, 8\); conditions are an image"),
        (dict(mode="extend", cond=_clip(7, 8, 8)), r"takes 4 latent frame\(s\) and a 7-frame output has 4; .*--frames >= 9"),
        (dict(mode="interpolate", cond=[_clip(5, 8, 8), _clip(3, 8, 8)]), r"takes 4 latent frame\(s\) and a 7-frame output has 4"),
        (dict(mode="i2v", cond=_clip(1, 8, 8), frames=1), r"takes 1 latent frame\(s\) and a 1-frame output has 1; .*--frames >= 3"),
        (dict(mode="loop", frames=3), r"takes 2 latent frame\(s\) and a 3-frame output has 2; .*--frames >= 5"),
        (dict(mode="edit", cond=_clip(5, 8, 8)), r"the clip has 5 frames but the output has 7"),
        (dict(mode="edit", cond=_clip(7, 8, 8), strength=0.0), r"edit strength is 0.0; it must lie in \(0, 1\]"),
        (dict(mode="edit", cond=_clip(7, 8, 8), strength=1.5), r"edit strength is 1.5"),
        (dict(mode="i2v", cond=_clip(1, 8, 8), strength=0.5), r"strength is for mode 'edit'"),
        (dict(sampler="rk4"), r"unknown sampler 'rk4'; valid: euler, heun"),
        (dict(draft_scale=1.0), r"draft_scale is 1.0; it must lie in \(0, 1\)"),
        (dict(draft_scale=0.5, refine_strength=0.0), r"refine_strength is 0.0"),
        (dict(seeds=[]), r"seeds is \[\]; it must be a non-empty list"),
        (dict(steps=0), r"steps is 0"),
        (dict(height=20), r"multiples of 8 and 8"),
    ],
)
def test_bad_input_is_a_clear_error(gen, kwargs, message):
  with pytest.raises(ValueError, match=message):
    gen.generate(["a red circle"], **{**KW, **kwargs})


def test_edit_strength_one_is_allowed(gen):
  out = gen.generate(["x"], mode="edit", cond=_clip(FRAMES, 8, 8), strength=1.0, **KW)
  assert out.shape == (1, FRAMES, HEIGHT, WIDTH, 3)


def test_a_prompt_string_instead_of_a_list_is_a_clear_error(gen):
  with pytest.raises(ValueError, match=r"pass a list of prompts"):
    gen.generate("a red circle", **KW)


# ------------------------------------------------------------------------ resize policy


def test_resize_to_cover_scales_to_cover_and_crops_the_centre():
  # A wide image with a red left band, green middle and blue right band: covering a square
  # crops the sides equally, so the middle stays in the middle.
  image = np.zeros((1, 10, 30, 3), np.uint8)
  image[:, :, :10, 0] = 255
  image[:, :, 10:20, 1] = 255
  image[:, :, 20:, 2] = 255
  out = video_io.resize_to_cover(image, 10, 10)
  assert out.shape == (1, 10, 10, 3) and np.all(out[..., 1] == 255) and np.all(out[..., [0, 2]] == 0)
  # 2x shrink is an exact 2x2 area average.
  ramp = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1).repeat(3, -1) * 10
  np.testing.assert_array_equal(video_io.resize_to_cover(ramp, 2, 2)[0, ..., 0], [[25, 45], [105, 125]])
  for size in ((7, 13), (64, 40), (1, 1), (31, 97)):
    resized = video_io.resize_to_cover(_clip(2, 37, 53), *size)
    assert resized.shape == (2, *size, 3) and resized.dtype == np.uint8
  flat = np.full((3, 5, 9, 3), 77, np.uint8)
  assert np.all(video_io.resize_to_cover(flat, 24, 16) == 77)
  with pytest.raises(ValueError, match="at least 1x1"):
    video_io.resize_to_cover(flat, 0, 4)


def test_write_samples_refuses_several_seeds_per_prompt(tmp_path):
  # One file per prompt: several seeds would pair prompts with the wrong videos. It is refused
  # before anything is generated (the generator is never called).
  with pytest.raises(ValueError, match="write_samples names one file per prompt"):
    inference.write_samples(object(), str(tmp_path), ["a red circle"], seeds=[0, 1])
  assert not os.listdir(tmp_path)
