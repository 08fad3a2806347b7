"""The synthetic data generator: procedural street scenes (``scene``), their rendering (``render``),
ESIM-style event simulation (``esim``), the DSEC night + Cityscapes sample writer (``sample``) and the
Dark Zurich / ACDC night trees (``night_targets``).

Kept apart from the real-data pipeline so the modules that read DSEC, Cityscapes, Dark Zurich or ACDC
never depend on it; only ``cmda sample`` and the tests do.
"""
