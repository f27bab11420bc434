"""The one training loop, its loss, optimizers and checkpoints."""
