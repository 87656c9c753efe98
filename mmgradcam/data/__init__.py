"""Data the project makes itself (the shapes world) and readers for COCO-format files."""
