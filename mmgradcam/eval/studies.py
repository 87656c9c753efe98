"""The extra studies of a run (``--sanity-images``, ``--faithfulness-images``,
``--perturbation-questions``): model randomization and deletion / insertion (faithfulness.py) on
the run's first images, and Chefer's perturbation test on its first VQA questions, every method
from each explain call. They run once, at the end, on rank 0."""
from __future__ import annotations

from collections.abc import Sequence


def run_studies(captioner, images: Sequence, methods: list[str], layer: str | None, seed: int,
                sanity_images: int, faithfulness_images: int) -> dict:
    """{"sanity": ..., "faithfulness": ...} for the studies asked for (none: an empty dict)."""
    from .faithfulness import faithfulness_study, randomization_study

    out: dict = {}
    if sanity_images:
        out["sanity"] = randomization_study(captioner, list(images[:sanity_images]), method=methods, layer=layer)
    if faithfulness_images:
        out["faithfulness"] = faithfulness_study(captioner, list(images[:faithfulness_images]), method=methods,
                                                 layer=layer, seed=seed)
    return out


def run_perturbation(vqa, items: Sequence, methods: list[str], layer: str | None, seed: int) -> dict:
    """{"perturbation": ...} on (image, question) items (none: an empty dict)."""
    from .faithfulness import perturbation_study

    if not items:
        return {}
    return {"perturbation": perturbation_study(vqa, list(items), method=methods, layer=layer, seed=seed)}
