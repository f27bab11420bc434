"""Image generation with a trained model: schedulers, PNG metadata and grids."""
