"""mars_dist: distributed fine-tuning of vision backbones with distance-based constraints (MARS-PGM)."""

__version__ = "0.1.0"
