"""Task adapters (captioning, VQA), installed and imported as ``mmgradcam.tasks``.

The shared bases come first; then each model family's file, which registers its loader and
adapter classes on import (``common.register_loader`` / ``common.register_adapter``). The shared
modules never import a family file: this list is the only place that names them.
"""
from . import captioning, chat_vlm, common, hf, vqa  # noqa: F401  (the shared bases, before any family)
from . import blip, blip2, default, florence2, gemma3, git, idefics3, llava, llava_next, paligemma, qwen2_vl, vilt, vit_gpt2  # noqa: F401  (families register themselves)
