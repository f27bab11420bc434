"""Per-checkpoint metrics, checkpoint choice and the overfitting alarm."""
