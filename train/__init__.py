"""Training side: models, data loading, losses and the DACS self-training loop."""
