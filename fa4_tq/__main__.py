"""Command line: ``python -m fa4_tq demo [...]`` (see ``python -m fa4_tq demo --help``)."""

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m fa4_tq demo [--seqlen N] [--heads H] [--kv-heads HK] [--head-dim D] [--context C]")
        return 0 if argv else 2
    if argv[0] != "demo":
        print(f"unknown command {argv[0]!r}: the only command is 'demo'", file=sys.stderr)
        return 2
    from .demo import main as demo_main

    return demo_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
