"""The synthetic data generator: procedural street scenes (``scene``), their rendering (``render``),
ESIM-style event simulation (``esim``) and the DSEC night + Cityscapes sample writer (``sample``).

Kept apart from the real-data pipeline so the modules that read DSEC, Cityscapes, Dark Zurich or ACDC
never depend on it; only ``cmda sample`` and the tests do.
"""
