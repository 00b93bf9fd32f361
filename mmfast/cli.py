"""The `mmfast` command line."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mmfast", description="Fast balanced multimodal training.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print how the native extension was built (JSON)")
    args = parser.parse_args(argv)
    if args.command == "info":
        import mmfast

        print(json.dumps(mmfast.build_info(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
