"""`style-dreambooth ui`: a local web app over the library (needs the `ui` extra: pip install -e ".[ui]").

The pages are thin: datasets, training, evaluation, sweeps and generation all run the same library
code and commands as the CLI, and training runs as a separate `style-dreambooth train` process whose
run folder is the only state.
"""
