"""Every script's command line beyond its flags: how flags are read, checked and inherited.

A script declares its flags with argparse (its own job, at its top); this module holds what
sits behind them, so that no script opens with tables: booleans in every spelling, which flags
were given, presets, the checks that refuse a flag that cannot work, and what a resumed or
fine-tuned run takes from its checkpoint.
"""

import argparse

# -----------------------------------------------------------------------------
# Reading flags: booleans, and which flags were given


def str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")


def flags_given(parser: argparse.ArgumentParser, argv=None) -> set:
    """The names of the flags given on the command line (not those left at their defaults):
    the same argv parsed again with every default suppressed. The parser's defaults are gone
    afterwards, so parse with it before calling this."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


# -----------------------------------------------------------------------------
# train.py's settings: presets, checks, shape rules, what a resume inherits


# -----------------------------------------------------------------------------
# sample.py's settings: which flag takes effect in which mode
