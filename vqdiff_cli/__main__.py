"""`python -m vqdiff_cli`: the same as the `vqdiff` command."""

from vqdiff_cli.cli import main

if __name__ == "__main__":
    main()
