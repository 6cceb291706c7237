"""The command line: python -m moe_np {demo, gradcheck, tutorial} ...

    python -m moe_np demo                       a short tour: checks, then training
    python -m moe_np gradcheck [--json] [--seed S] [--filter SUBSTR]
    python -m moe_np tutorial N [--update] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def cmd_gradcheck(args) -> int:
    from moe_np.checks import run_checks
    from moe_np.gradcheck import format_table
    rows = run_checks(seed=args.seed, name_filter=args.filter)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
    else:
        print(format_table(rows))
        failed = sum(not r.passed for r in rows)
        print(f"\n{len(rows)} checks, {failed} failing (pass: rel_error < 1e-7)")
    if not rows:
        print(f"no check matches --filter {args.filter!r}", file=sys.stderr)
        return 2
    return 0 if all(r.passed for r in rows) else 1


def cmd_tutorial(args) -> int:
    if args.quick:
        # small sizes must not overwrite the committed full-size figures
        os.environ["MOE_NP_QUICK"] = "1"
        os.environ.setdefault("MOE_NP_FIGURES", tempfile.mkdtemp(prefix="moe_np_figures_"))
    from moe_np.tutorial import chapter_path, figure_path, run_chapter
    path = chapter_path(args.number)
    where = figure_path("").resolve()
    print(f"# running {path.name}{' (quick sizes)' if args.quick else ''}; figures go to {where}\n")
    run_chapter(path, update=args.update)
    return 0


def cmd_demo(args) -> int:
    from moe_np.demo import run_demo
    return run_demo(quick=args.quick)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_np", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("gradcheck", help="run every registered gradient check")
    p.add_argument("--json", action="store_true", help="print a JSON list of results")
    p.add_argument("--seed", type=int, default=0, help="seed for inputs and upstream gradients")
    p.add_argument("--filter", default=None, help="only checks whose name contains SUBSTR")
    p.set_defaults(run=cmd_gradcheck)

    p = sub.add_parser("tutorial", help="run one chapter and write its figures")
    p.add_argument("number", type=int, help="chapter number, e.g. 1")
    p.add_argument("--update", action="store_true",
                   help="rewrite the chapter's output blocks with what this run printed")
    p.add_argument("--quick", action="store_true", help="small sizes (as in the tests)")
    p.set_defaults(run=cmd_tutorial)

    p = sub.add_parser("demo", help="a short tour: gradient checks, then training")
    p.add_argument("--quick", action="store_true", help="fewer training steps")
    p.set_defaults(run=cmd_demo)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
