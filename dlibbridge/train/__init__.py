"""Fine-tuning: configuration, losses, the training loop, run-directory records, distributed helpers."""
