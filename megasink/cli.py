"""``megasink`` console script: ``megasink train CONFIG.yaml [a.b=value ...]``, ``megasink eval CKPT --tasks ...``."""
from __future__ import annotations

import sys

COMMANDS = {"train": "megasink.train.main", "eval": "megasink.eval.harness"}


USAGE = ("usage: megasink {train,eval} ...\n\n"
         "  train CONFIG.yaml [key=value ...]   train a model (megasink train -h)\n"
         "  eval RUN_OR_CKPT --tasks T1,T2      lm-evaluation-harness tasks (megasink eval -h)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        unknown = f"megasink: unknown command {argv[0]!r} (commands: {', '.join(COMMANDS)})\n" if argv else ""
        print(unknown + USAGE, file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
