"""Run the sffn command from a checkout: ``python cli.py --help``."""

from sffn_lab.cli import main

if __name__ == "__main__":
    main()
