"""Style-DreamBooth: learn an artist's style from a few images and paint new subjects in it."""

__version__ = "0.1.0"
