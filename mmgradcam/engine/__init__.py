"""The model-agnostic gradient engine: hooks, gradients, layouts, state preservation."""
from .explain import counterfactual, explain, forward_and_gradients
from .explanation import Explanation, normalize_maps, upsample_maps
from .layers import find_modules, resolve_layer
from .layouts import Layout, infer_token_grid
from .state import preserved_state

__all__ = [
    "Explanation", "Layout", "counterfactual", "explain", "find_modules", "forward_and_gradients",
    "infer_token_grid", "normalize_maps", "preserved_state", "resolve_layer", "upsample_maps",
]
