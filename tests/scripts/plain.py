"""A program that trains nothing: it prints its arguments, whether it runs as ``__main__`` with its folder
first on ``sys.path`` and whether a class it defines pickles, then exits as told (``--exit N``, ``--raise``)."""

import argparse
import os
import pickle
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--exit", type=int, default=0)
parser.add_argument("--raise", dest="boom", action="store_true")
args, rest = parser.parse_known_args()


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


print("plain program", rest, "main" if __name__ == "__main__" else __name__)
print("path0 is my folder:", sys.path[0] == os.path.dirname(os.path.abspath(__file__)),
      "| pickles:", pickle.loads(pickle.dumps(Point(3))).x == 3)
print("to stderr", file=sys.stderr)


def fail() -> None:
    raise ValueError("boom from the program")


if args.boom:
    fail()
sys.exit(args.exit)
