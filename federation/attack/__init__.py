"""The privacy audit: gradient-inversion attacks (Inverting Gradients, DLG, multi-step update inversion),
loss-threshold membership inference, reconstruction metrics, and the ε sweep behind `fedpath attack`."""
