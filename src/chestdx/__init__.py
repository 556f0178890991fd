"""chestdx: attention-guided diagnosis of chest X-ray and CT images."""

__version__ = "0.1.0"
