"""CAM methods (one small class each), Guided Grad-CAM and the other attribution methods.

The registry itself lives in the engine floor (mmgradcam/engine/registry.py); importing this
package registers every method file.
"""
from ..engine.registry import (AttentionMethod, CAMMethod, PixelMethod, ReadoutMethod, available_methods,
                               get_method, register)
from . import (attention_gradcam, gradcam, gradcampp, guided_gradcam, hirescam, layercam,  # noqa: F401
               relevance, tam, xgradcam)  # (registers them)

__all__ = ["AttentionMethod", "CAMMethod", "PixelMethod", "ReadoutMethod", "available_methods", "get_method",
           "register"]
