"""fasttrain: fast trainer for class-imbalanced image classification (Yang & Xu, NeurIPS 2020)."""
__version__ = "0.1.0"
