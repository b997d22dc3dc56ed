"""`python -m dsv4 ...`: the same as the `dsv4` command."""

from dsv4.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
