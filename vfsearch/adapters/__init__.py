"""Layer 1: adapters, one heavy dependency each (SimpleITK, zarr, torch data, MLflow, Optuna, Ray, plots, meshes)."""
