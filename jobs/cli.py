"""The `flashu-batch` command line."""

import argparse
import sys


def cmd_parity(args) -> int:
    from showo2.parity import run_parity

    results = run_parity(args.golden_dir)
    for result in results:
        print(result.line(), flush=True)
    failed = [r.case for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_demo(args) -> int:
    from jobs.demo import run_demo

    run_demo(args.out, model=args.model)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashu-batch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parity", help="check the model against golden vectors of the official Show-o2 code")
    p.add_argument("golden_dir", help="a golden set folder (cases.json, cases.safetensors, checkpoint/)")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("demo", help="generate a few images and answer a few questions with a small model")
    p.add_argument("--out", default="out", help="output folder (default: ./out)")
    p.add_argument("--model", default=None,
                   help="checkpoint folder or s3:// prefix (default: a small model built into ./out/model)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
