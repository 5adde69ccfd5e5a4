"""Models, datasets, training and the checkpoint store."""
