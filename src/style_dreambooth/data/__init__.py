"""Image loading and validation, datasets, captions and the class-image cache."""
