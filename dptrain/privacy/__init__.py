"""Differential privacy core: accounting, Poisson sampling and Gaussian noise."""
