"""accord-face: zero-shot face personalization encoders for Stable Diffusion with the ACCORD losses."""

__version__ = "0.1.0"
