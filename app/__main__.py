"""`python -m app`: the INT8 Studio desktop app."""

import sys


def main() -> int:
    print("The desktop app is not built yet; use the CLI: int8-studio --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
