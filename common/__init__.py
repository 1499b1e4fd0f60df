"""Shared pieces of the five scripts: I/O, synthetic data, metrics, losses, config and runtime.

Only what at least two scripts use lives here; models and samplers stay in their scripts.
"""


class UserError(Exception):
    """A problem the user can fix (bad input file, bad config, missing weights).

    The message is one line naming the file and the problem; `runtime.cli_main` prints it without a traceback.
    """
