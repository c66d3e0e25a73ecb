"""Layer 1: adapters, one heavy dependency each.

SimpleITK (volumes), zarr (store), torch data (dataset), MLflow (tracking/), Optuna (search
space), Ray (ray_*), matplotlib (plots), scikit-image (meshes). They import core only (and
each other); heavy packages load late through `lazy.importer`.
"""
