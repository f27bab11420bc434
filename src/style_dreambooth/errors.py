"""Errors a user can cause. The CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input: a path, a file, a config value or a missing model.

    The message is one sentence that names the culprit and says what to do.
    """

    exit_code = 2
