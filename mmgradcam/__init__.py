"""mmgradcam: Grad-CAM explanations for image-captioning and VQA models."""
from . import targets
from .engine import Explanation, counterfactual, explain, normalize_maps
from .methods import available_methods
from .methods.cam import cam
from .methods.guided_gradcam import guided_gradcam
from .methods.input_gradients import deconvolution, guided_backprop, input_gradient
from .methods.occlusion import occlusion

__version__ = "0.1.0"

__all__ = [
    "Explanation", "available_methods", "cam", "counterfactual", "deconvolution", "explain",
    "guided_backprop", "guided_gradcam", "input_gradient", "normalize_maps", "occlusion", "targets",
]
