"""The arguments of an eval run (``mmgradcam eval``'s flags); ``identity`` is what a resume checks."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class EvalConfig:
    instances: str
    images: str
    out: str
    captions: str | None = None
    questions: str | None = None
    answers: str | None = None
    model: str = "default"
    vqa_model: str = "default"
    method: str | None = None  # None: each model's default method; "a,b" / "all": several from one pass
    layer: str | None = None
    limit: int | None = None
    batch_size: int = 16
    references: bool = False
    synonyms: str | None = None
    sanity_images: int = 0
    faithfulness_images: int = 0
    seed: int = 0
    skip_captions: bool = False
    function_words: bool = True  # also score every other caption word against all objects' union
    extra: dict = field(default_factory=dict)
    perturbation_questions: int = 0  # Chefer's perturbation test on the first N VQA questions
    device: str = "auto"  # where the models run ("auto": CUDA, else MPS, else the CPU)
    dtype: str | None = None  # the forwards' precision (None: float32; "bfloat16", "float16")
    max_targets_per_backward: int | None = None  # targets per batched backward (None: auto); same maps
    prompt: str | None = None  # a chat VLM captioner's user turn (None: the family's own)
    workers: int | None = None  # decoding processes ahead of the model (None: min(4, CPUs - 1); 0: main process)


    def identity(self) -> dict:
        """What must match for a rerun to resume (not batch-independent knobs like progress)."""
        keep = asdict(self)
        keep.pop("sanity_images")
        keep.pop("faithfulness_images")
        keep.pop("perturbation_questions")  # a study at the end, like the two above: not the run's identity
        keep.pop("device")  # where it runs does not change what is computed (the dtype does)
        keep.pop("max_targets_per_backward")  # memory only: chunked maps equal unchunked ones
        if keep["prompt"] is None:
            keep.pop("prompt")  # runs from before prompts resume
        keep.pop("workers")  # nor who decodes the images
        return keep
