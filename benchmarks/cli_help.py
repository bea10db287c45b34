"""The benchmarks' argparse help: the module docstring as written, and each option's default."""
from __future__ import annotations

import argparse


class DocstringHelp(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written; each option's default shown (not a switch's False, an empty one)."""

    def _get_help_string(self, action):
        shown = action.default is not None and action.default is not False and action.default != ""
        if not shown or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
