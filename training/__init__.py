"""Training side: export parsers, dataset builder, LoRA training, evaluation. Heavy imports stay in functions."""
