"""Evaluation: the ShapesWorld scorer."""
