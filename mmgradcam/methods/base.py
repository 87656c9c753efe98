"""The method registry's names, kept importable here; they live in the engine floor
(mmgradcam/engine/registry.py) so that the engine looks methods up without importing methods/."""
from ..engine.registry import (CAMMethod, MethodSpec, PixelMethod, available_methods, get_method,  # noqa: F401
                               is_several, method_names, register)

__all__ = ["CAMMethod", "MethodSpec", "PixelMethod", "available_methods", "get_method", "is_several",
           "method_names", "register"]
