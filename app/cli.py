"""The `flashu-batch` command line."""

import argparse
import sys

JOBS_API_COMMANDS = ("submit", "status", "logs")  # talk to a cluster's Jobs API: its failures exit 1
EXIT_LEASED = 3  # the job is already running: another driver holds its lease (jobs/lease.py)
ALLOW_CHANGED_HELP = ("run even though settings that change results (model sources, dtype, FlashU artifacts, "
                      "params) differ from the ones the job's output was made with (refused otherwise, exit 2); "
                      "committed rows keep the old settings, .flashu/settings.json takes the new ones and "
                      "metrics.json records the change")


def cmd_parity(args) -> int:
    from flashu_batch.showo2.parity import run_parity

    results = run_parity(args.golden_dir)
    for result in results:
        print(result.line(), flush=True)
    failed = [r.case for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_demo(args) -> int:
    from flashu_batch.app.demo import run_demo
    from flashu_batch.app.quiet import ray_noise_filtered

    with ray_noise_filtered():
        run_demo(args.out, model=args.model)
    return 0


def cmd_preview(args) -> int:
    from flashu_batch.app.preview import write_preview

    shown = write_preview(args.output, args.out, limit=args.limit)
    print(f"{shown} rows -> {args.out}")
    return 0


def cmd_run(args) -> int:
    from flashu_batch.jobs.spec import load_spec

    spec = load_spec(args.spec)  # validated before Ray is imported: a bad spec costs no cluster time
    from flashu_batch.app.run import limit_spec, run_and_report
    from flashu_batch.app.validate import check_job

    if args.limit is not None:
        spec = limit_spec(spec, args.limit)
    # Inputs, model and outputs are checked before Ray starts; each input is opened, not counted (the run reads
    # every row in its pre-pass anyway)
    problems = check_job(spec, count_rows=False, local=not args.address)
    if problems:
        return print_problems("run", problems)
    from flashu_batch.app.quiet import ray_noise_filtered
    from flashu_batch.app.run import EXIT_UNFINISHED

    try:
        with ray_noise_filtered():
            return run_and_report(spec, address=args.address, quiet=args.quiet, retry_errors=args.retry_errors,
                                  limit=args.limit, allow_changed_settings=args.allow_changed_settings)
    except RuntimeError as e:  # an unfinished job (rows without a committed result): re-running resumes it
        print(f"flashu-batch run: {e}", file=sys.stderr)
        return EXIT_UNFINISHED


def cmd_validate(args) -> int:
    from flashu_batch.app.validate import plan_lines, review_job
    from flashu_batch.jobs.spec import load_spec

    spec = load_spec(args.spec)
    review = review_job(spec)
    print("\n".join(plan_lines(spec, review)), flush=True)
    if review.problems:
        return print_problems("validate", review.problems)
    print(f"job {spec.job_id}: ready to run", flush=True)
    return 0


def print_problems(command: str, problems: list[str]) -> int:
    """One stderr line per problem -> exit status 2 (bad input, as for a bad spec)."""
    for problem in problems:
        print(f"flashu-batch {command}: error: {problem}", file=sys.stderr, flush=True)
    return 2


def cmd_schema(args) -> int:
    import json

    from flashu_batch.jobs.spec import JobSpec

    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return 0


def cmd_specialize(args) -> int:
    from flashu_batch.app.specialize import run_report, run_specialize

    if args.report:
        report = run_report(args.checkpoint, args.report, args.tokenizer, args.vae, args.dtype, args.device)
        print(f"top-k FFN neurons shared by generation and understanding: {report['mean_overlap']:.1%} on average "
              f"(two random choices: {report['mean_random_overlap']:.1%}); {args.report}/report.png")
        return 0
    if not args.task or not args.out:
        raise ValueError("specialize needs --task and --out (or --report DIR for the specialization report).")
    result = run_specialize(args.task, args.checkpoint, args.out, args.config, args.calibration_prompts,
                            args.tokenizer, args.dtype, args.device, args.vae)
    print(f"specialized for {args.task} in {result['seconds']}s -> {args.out}")
    return 0


def cmd_plan(args) -> int:
    from flashu_batch.flashu.plan import format_plan, generation_plan
    from flashu_batch.app.specialize import read_config

    print(format_plan(generation_plan(read_config(args.config))))
    return 0


def cmd_submit(args) -> int:
    from flashu_batch.jobs.spec import load_spec
    from flashu_batch.app.submit import EXIT_REFUSED, AlreadySubmitted, local_paths, submit

    spec = load_spec(args.spec)  # validated here: a bad spec never reaches the cluster
    local = local_paths(spec)
    if local:
        print(f"note: {len(local)} location(s) in the spec are local paths (e.g. {local[0]}): every node of the "
              f"cluster must see them at the same path (a shared filesystem); use s3:// otherwise.", file=sys.stderr)
    try:
        submission_id = submit(spec, args.address, resume=args.resume, retry_errors=args.retry_errors,
                               allow_changed_settings=args.allow_changed_settings)
    except AlreadySubmitted as e:
        print(f"flashu-batch submit: refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"submitted job {spec.job_id} as {submission_id}; watch it with `flashu-batch status {spec.job_id}` or "
          f"`flashu-batch logs {spec.job_id} --follow`", flush=True)
    return 0


def cmd_status(args) -> int:
    from flashu_batch.app.submit import connect, status_lines

    print("\n".join(status_lines(connect(args.address), args.job_id)), flush=True)
    return 0


def cmd_logs(args) -> int:
    from flashu_batch.app.submit import connect, print_logs

    final = print_logs(connect(args.address), args.job_id, follow=args.follow)
    if args.follow:  # a script can wait on the job: exit 0 only when it succeeded
        print(f"job {args.job_id}: {final}", file=sys.stderr, flush=True)
        return 0 if final == "SUCCEEDED" else 1
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

    p = sub.add_parser("preview", help="draw a contact sheet (PNG) of a job's committed results")
    p.add_argument("output", help="a task output folder <output>/<job_id>/<task>, or a job's <output>/<job_id>; "
                                  "local or s3://")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--limit", type=int, default=16, help="rows shown per task (default 16)")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("run", help="run a batch job spec (YAML or JSON) on Ray: t2i and/or vqa over a dataset",
                       epilog="exit status: 0 done; 1 unfinished (run again to resume); 2 bad spec, input or changed "
                              "settings; 3 the job is already running (another driver holds its lease); 130 "
                              "interrupted")
    p.add_argument("spec", help="job spec file (see jobs/spec.py and examples/)")
    p.add_argument("--address", help="Ray cluster address (ray://HOST:10001, HOST:6379 or auto); default: start a "
                                     "local Ray on this machine")
    p.add_argument("--quiet", action="store_true", help="no progress lines and no Ray logs; the summary only")
    p.add_argument("--retry-errors", action="store_true",
                   help="also run again the ids that earlier runs committed only as error rows (a timeout, a "
                        "model error, an image the job could not read then); a row that succeeds replaces its "
                        "error row")
    p.add_argument("--limit", type=int, metavar="N",
                   help="a smoke test: only the first N rows of each task, as job <job_id>-limitN (its own output "
                        "folders: the real job's are never touched)")
    p.add_argument("--allow-changed-settings", action="store_true", help=ALLOW_CHANGED_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a job spec, its inputs, model and outputs without starting Ray, and "
                                        "print the plan (exit 2 on problems)")
    p.add_argument("spec", help="job spec file (YAML or JSON)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the job spec's JSON Schema (every field with its description)")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("specialize", help="calibrate a FlashU task specialist once and save it as an artifact")
    p.add_argument("--task", choices=["t2i", "vqa"])
    p.add_argument("--checkpoint", required=True, help="Show-o2 checkpoint folder or s3:// prefix")
    p.add_argument("--out", help="artifact folder to write")
    p.add_argument("--report", metavar="DIR", help="instead: write the parameter-specialization report "
                                                   "(report.json, report.png) comparing both tasks")
    p.add_argument("--config", help="JSON file of FlashU knobs (default: the paper's defaults)")
    p.add_argument("--calibration-prompts", help="t2i: text file, one prompt per line; vqa: JSON lines "
                                                 "{\"image\": path, \"question\": text} (default: built-in)")
    p.add_argument("--vae", help="Wan2.1 VAE file for vqa (default: <checkpoint>/Wan2.1_VAE.pth)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint folder)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_specialize)

    p = sub.add_parser("plan", help="print the per-call FlashU schedule of a config")
    p.add_argument("--task", choices=["t2i"], default="t2i")
    p.add_argument("--config", help="JSON file of FlashU knobs (default: the paper's defaults)")
    p.set_defaults(func=cmd_plan)

    address_help = ("the Ray head's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS); "
                    "a token for token authentication comes from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH")
    p = sub.add_parser("submit", help="submit a job spec to a Ray cluster (Jobs API); the job_id is the submission "
                                      "id, so a second submit is refused (exit 3)")
    p.add_argument("spec", help="job spec file (validated here before anything is sent)")
    p.add_argument("--address", help=address_help)
    p.add_argument("--resume", action="store_true", help="if earlier attempts ended unsuccessfully, submit "
                                                         "<job_id>-attempt-N: committed rows are kept and skipped")
    p.add_argument("--retry-errors", action="store_true",
                   help="once earlier attempts ended (even successfully), submit <job_id>-attempt-N that runs again "
                        "the ids committed only as error rows (`run --retry-errors`)")
    p.add_argument("--allow-changed-settings", action="store_true",
                   help="passed to the cluster's `flashu-batch run`: " + ALLOW_CHANGED_HELP)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="state, message and times of a submitted job's latest attempt")
    p.add_argument("job_id")
    p.add_argument("--address", help=address_help)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="the logs of a submitted job's latest attempt")
    p.add_argument("job_id")
    p.add_argument("--address", help=address_help)
    p.add_argument("--follow", action="store_true", help="stream until the job ends; exit 0 only if it succeeded")
    p.set_defaults(func=cmd_logs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input (specs, configs, checkpoints): one clear line, no traceback
        print(f"flashu-batch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a run's own handling (app/run.py): no traceback either
        print(f"flashu-batch {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from flashu_batch.jobs.lease import JobLeased

        if isinstance(e, JobLeased):  # another driver runs this job (run, demo): found before Ray starts
            print(f"flashu-batch {args.command}: {e}", file=sys.stderr)
            return EXIT_LEASED
        failure = jobs_api_failure(e) if args.command in JOBS_API_COMMANDS else None
        if failure is None:
            raise
        print(f"flashu-batch {args.command}: {failure}", file=sys.stderr)
        return 1


def jobs_api_failure(e: Exception) -> str | None:
    """What to tell the user when `e` is the cluster's failure, not ours (None otherwise): Ray's Jobs API client
    raises RuntimeError for an HTTP error status (its message gives the code and why), and lets requests' errors
    through when the head goes away after `connect`."""
    import requests

    if isinstance(e, RuntimeError):
        return str(e)
    if isinstance(e, requests.RequestException):
        url = getattr(e.request, "url", None) or "the cluster"
        return f"the Ray Jobs API stopped answering ({url}): {e}"
    return None


if __name__ == "__main__":
    sys.exit(main())
