"""A program that trains nothing: it prints its arguments, then exits as told (``--exit N``, ``--raise``)."""

import argparse
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--exit", type=int, default=0)
parser.add_argument("--raise", dest="boom", action="store_true")
args, rest = parser.parse_known_args()
print("plain program", rest, "main" if __name__ == "__main__" else __name__)
print("to stderr", file=sys.stderr)


def fail() -> None:
    raise ValueError("boom from the program")


if args.boom:
    fail()
sys.exit(args.exit)
