"""Errors a user can act on. Entry points print them as one line and exit with code 2."""

from __future__ import annotations


class CompressError(Exception):
    """An error caused by user input (a recipe, a file, a value), not by a bug.

    The message must name what is wrong and what is allowed; entry points print it
    without a traceback.
    """


class RecipeError(CompressError):
    """A recipe that cannot be loaded or validated: `file: key.path: problem`."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")
