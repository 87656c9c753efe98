"""Evaluation: caption and answer quality, word-level scoring against COCO segmentations."""
