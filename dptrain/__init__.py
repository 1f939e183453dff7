"""dptrain: differentially private pretraining of VaultGemma-style language models."""

__version__ = "0.1.0"
