"""CAM methods (one small class each), Guided Grad-CAM and the other attribution methods.

The registry itself lives in the engine floor (mmgradcam/engine/registry.py); importing this
package registers every method file.
"""
from ..engine.registry import CAMMethod, PixelMethod, ReadoutMethod, available_methods, get_method, register
from . import gradcam, gradcampp, guided_gradcam, hirescam, layercam, tam, xgradcam  # noqa: F401  (registers them)

__all__ = ["CAMMethod", "PixelMethod", "ReadoutMethod", "available_methods", "get_method", "register"]
