"""Fine-tuning helpers: LoRA adapters, layer freezing and trainable-parameter accounting."""
