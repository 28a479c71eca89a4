"""Experiment configs: `get_config(variant)` per file, passed as --config=experiments/<file>.py:<variant>."""
