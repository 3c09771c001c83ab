"""`python -m bonsai`: the `bonsai` command (the same entry point as the installed script)."""

from bonsai.cli import main

if __name__ == "__main__":
    main()
