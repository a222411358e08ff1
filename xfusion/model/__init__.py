"""The X-Fusion model: block variants over a frozen (or not) Llama, image I/O, losses, REPA."""

from xfusion.model.sequence import MultimodalBatch, Sample, SpecialIds
from xfusion.model.xfusion import LossOutput, XFusionModel

__all__ = ["LossOutput", "MultimodalBatch", "Sample", "SpecialIds", "XFusionModel"]
