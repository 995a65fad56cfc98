"""Learned chunk boundaries: the boundary predictor, its conversion, labels and training."""
