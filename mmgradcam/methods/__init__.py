"""CAM methods (one small class each) and the other attribution methods.

Only the CAM weightings are imported here: the composed methods (Guided Grad-CAM) import the
engine's ``explain``, which itself looks methods up in this registry.
"""
from .base import CAMMethod, available_methods, get_method, register
from . import gradcam, gradcampp, hirescam, layercam, xgradcam  # noqa: F401  (registers them)

__all__ = ["CAMMethod", "available_methods", "get_method", "register"]
