"""deftx: composable sparse fine-tuning (LT-SFT and DeFT-X) for zero-shot cross-lingual transfer.

The core of the package (masks, denoising, SFT artifacts, the phase runner) imports no Ray.
"""

__version__ = "0.1.0"
