"""Experiment configs: every variant builds, configs are locked, typos name the close matches."""

import dataclasses

import ml_collections
import pytest

from experiments import autoencoder as autoencoder_experiment
from experiments import base as base_experiment
from experiments import common
from spacetime_dit import config_types
from spacetime_dit.training import builders


@pytest.mark.parametrize("variant", common.VARIANTS)
def test_every_variant_resolves_to_frozen_dataclasses(variant):
  ae = autoencoder_experiment.get_config(variant)
  dit = base_experiment.get_config(variant)
  ae_model = builders.autoencoder_config(ae)
  dit_model = builders.dit_config(dit, ae_model.latent_channels)
  for section, cls in (("train", config_types.TrainConfig), ("data", config_types.DataConfig),
                       ("mesh", config_types.MeshConfig), ("optimizer", config_types.OptimizerConfig)):
    for config in (ae, dit):
      resolved = config_types.dataclass_from_config(cls, config[section], path=f"config.{section}")
      with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(resolved, dataclasses.fields(resolved)[0].name, None)
  config_types.dataclass_from_config(config_types.DiffusionConfig, dit.diffusion)
  config_types.dataclass_from_config(config_types.SampleConfig, dit.sample)
  assert dit_model.latent_channels == ae_model.latent_channels


def test_pod_variants_use_the_open_state_of_the_art_compression():
  for variant in ("s", "b", "xl"):
    model = autoencoder_experiment.get_config(variant).model
    assert (model.temporal_factor, model.spatial_factor, model.latent_channels) == (4, 8, 16)


def test_configs_are_locked_and_typos_name_the_close_match():
  config = base_experiment.get_config("cpu")
  with pytest.raises(AttributeError, match='Did you mean "num_steps"'):
    config.train.num_stepz = 5


def test_dataclass_from_config_rejects_unknown_fields_with_suggestions():
  section = ml_collections.ConfigDict({"learning_rate": 1e-3, "warmup_step": 10})
  with pytest.raises(ValueError, match=r"config.optimizer.warmup_step is not a field.*'warmup_steps'"):
    config_types.dataclass_from_config(config_types.OptimizerConfig, section, path="config.optimizer")


def test_unknown_variant_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"unknown config variant 'm'.*'cpu'"):
    base_experiment.get_config("m")


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (config_types.DiffusionConfig, {"prediction": "eps"}, "'velocity' or 'x0'"),
        (config_types.TrainConfig, {"num_steps": 0}, "train.num_steps must be >= 1"),
        (config_types.OptimizerConfig, {"learning_rate": -1.0}, "learning_rate must be > 0"),
        (config_types.DataConfig, {"token_budget": 0}, "token_budget must be >= 1"),
    ],
)
def test_impossible_values_are_clear_errors(cls, kwargs, match):
  with pytest.raises(ValueError, match=match):
    cls(**kwargs)
