"""Fine-tuning: data, loss, optimizer, train step, checkpoints, export (issue 12)."""
