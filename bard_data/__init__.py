"""bard_data: build budget-aware reasoning distillation (BARD) datasets and train on them."""
__version__ = "0.1.0"
