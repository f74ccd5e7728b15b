"""dist-vdr: distributed training of multimodal embedding models for Visual Document Retrieval.

The package imports without a GPU, deepspeed or submitit; heavy libraries are imported where used.
"""

__version__ = "0.1.0"
