"""vfsearch: distributed hyperparameter search for vertebral-fracture segmentation in CT.

Importing the package does nothing but define names: no torch, ray, mlflow, zarr or
SimpleITK is imported and no directory, logger or tracking URI is touched.
"""

__version__ = "0.1.0"
