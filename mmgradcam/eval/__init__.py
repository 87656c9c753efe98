"""Evaluation: caption and answer quality, word-level scoring against COCO segmentations.

The eval run is split by concern (docs/ARCHITECTURE.md): pipeline.py (the loop), config.py,
shards.py (shard files, resume, merge), scoring.py, metrics.py (the metric table), summary.py,
vqa_annotations.py, thumbnails.py, studies.py, distributed.py. Eval never imports the report."""
