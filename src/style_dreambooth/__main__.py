"""`python -m style_dreambooth` and `accelerate launch -m style_dreambooth`."""

from .cli import main

main()
