"""Task adapters (captioning, VQA), installed and imported as ``mmgradcam.tasks``."""
