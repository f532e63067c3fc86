"""Training and evaluation data: clip lists, the torch Dataset, batches, synthetic scenes and media encoding."""
