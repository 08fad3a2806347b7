"""cmda data pipeline: raw DSEC / Cityscapes files -> Zarr, PNG and JSON artefacts.

Data flows one way: the readers in this package open raw files, pure kernels turn arrays into
arrays, and the writers put results on disk atomically. Nothing here imports from ``train``.
"""
