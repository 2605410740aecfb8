"""Bottleneck adapters (Houlsby, Pfeiffer, He et al.'s parallel, LLM-Adapters' series and parallel):
config.py (LLM-Adapters' fields, placements, presets), layer.py, model.py (LLM-Adapters' files),
adapterhub.py (AdapterHub's files)."""

from .config import AdapterConfig
from .layer import AdapterLayer
from .model import AdapterModel

__all__ = ["AdapterConfig", "AdapterLayer", "AdapterModel"]
