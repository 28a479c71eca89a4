"""Logical axis names, logical-to-mesh rules, mesh construction, multi-process start-up."""
