"""``python -m pgstream``: the same command line as ``pgstream``."""

from pgstream.cli import entry

if __name__ == "__main__":
    entry()
