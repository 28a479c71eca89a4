"""Data sources and loaders: ShapesWorld, native-shape buckets, the Grain loader."""
