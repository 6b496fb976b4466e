"""The command line (``python -m gradstats`` or the ``gradstats`` console script).

- ``python -m gradstats demo [--quick] [--out DIR]``: the model-zoo demo (``gradstats.demo``);
- ``python -m gradstats report LOG.jsonl [--out DIR]``: diagnose a logged run and write a
  Markdown report (with figures when matplotlib is installed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# How usage and error lines name the program: as it was started.
MODULE_PROG = "python -m gradstats"
SCRIPT_PROG = "gradstats"


def main(argv: list[str] | None = None, prog: str = MODULE_PROG) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options
        from .demo import main as demo
        return demo(argv[1:], prog=f"{prog} demo")
    parser = argparse.ArgumentParser(prog=prog,
                                     description="gradstats command line")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="train a small model zoo and diagnose it (see "
                                     f"'{prog} demo --help')")
    report = commands.add_parser("report", help="diagnose a JSONL log and write a report")
    report.add_argument("log", type=Path, help="a JSONL file a GradMonitor wrote")
    report.add_argument("--out", type=Path, default=None,
                        help="folder for report.md and the figures (default: LOG's name "
                             "without .jsonl, beside it, + '-report')")
    report.add_argument("--window", type=int, default=10,
                        help="records per diagnosis window (default: 10)")
    report.add_argument("--no-plots", action="store_true", help="write the Markdown only")
    args = parser.parse_args(argv)

    from .diagnose import diagnose
    from .logs import read_jsonl
    from .report import write_report

    if not args.log.is_file():
        parser.error(f"no such log file: {args.log}")
    out = args.out or args.log.with_name(args.log.stem + "-report")
    try:
        diagnosis = diagnose(read_jsonl(args.log), window=args.window)
    except ValueError as error:  # no records, a bad window
        print(f"gradstats report: {error}", file=sys.stderr)
        return 1
    path = write_report(args.log, out, window=args.window, plots=not args.no_plots,
                        diagnosis=diagnosis)
    print(diagnosis)
    print(f"\nreport: {path}")
    return 0


def console_main() -> None:
    """The ``gradstats`` console script."""
    sys.exit(main(prog=SCRIPT_PROG))


if __name__ == "__main__":
    console_main()
