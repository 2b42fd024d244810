"""``python -m pgstream``: the same command line as ``pgstream``."""

from pgstream.cli import main

if __name__ == "__main__":
    main(prog_name="pgstream")
