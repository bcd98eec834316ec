"""`flashu-batch run`: a validated spec -> the scheduler, with progress lines and a closing summary.

Ctrl-C stops a run within seconds: the local Ray it started is shut down, one line says how many rows this run
committed, and the exit status is 130 (128 + SIGINT, the shell's convention). Committed rows are kept, so running
the same command again resumes the job.

Exit status (docs/operations.md): 0 done; 1 unfinished (rows without a committed result: run again to resume); 2 bad
input (the spec, its inputs, model or outputs, or settings that differ from the ones the job was made with:
jobs/settings.py); 3 the job is already running (another driver holds its lease: jobs/lease.py); 130 interrupted.
"""

import os
import signal
import sys
import threading
import time

from flashu_batch.jobs.spec import JobSpec, parse_spec

PROGRESS_EVERY_S = 2.0
EXIT_UNFINISHED = 1  # rows without a committed result (the other statuses: app/cli.py main)
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class ProgressPrinter:
    """One line per task at most every PROGRESS_EVERY_S seconds, and always the last one (show=False: none). Keeps
    the rows committed so far per task, for the line an interrupted run ends with."""

    def __init__(self, stream=None, show: bool = True):
        self.stream, self.show = stream or sys.stdout, show
        self.last: dict[str, tuple[float, tuple]] = {}
        self.committed: dict[str, int] = {}  # task name -> rows this run committed (in task order)

    def __call__(self, progress) -> None:
        self.committed[progress.task] = progress.done
        now = time.monotonic()
        # The counts, not the line: a final snapshot that differs only in its rows/s is not worth a line
        counts = (progress.done, progress.errors, progress.total)
        when, shown = self.last.get(progress.task, (0.0, None))
        if self.show and counts != shown and (progress.finished or now - when >= PROGRESS_EVERY_S):
            self.last[progress.task] = now, counts
            print(progress.line(), file=self.stream, flush=True)

    def interrupted_line(self) -> str:
        per_task = ", ".join(f"{name}: {rows}" for name, rows in self.committed.items())
        return (f"interrupted: {sum(self.committed.values())} rows committed this run"
                + (f" ({per_task})" if per_task else "") + "; run the same command to resume")


class FirstInterrupt:
    """Ctrl-C raises KeyboardInterrupt once, and `interrupted` stays set: whatever error comes out of the run after
    it (Ray's threads and actors are being torn down under it) is the interrupt's doing, not a failure to report.
    A second Ctrl-C while Ray shuts down exits at once (the local Ray's processes die with their driver). Only the
    main thread receives signals: elsewhere this does nothing."""

    def __init__(self, on_second=None):
        self.interrupted, self.on_second, self.previous = False, on_second, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False

    def _handle(self, signum, frame):
        if self.interrupted:
            if self.on_second:
                self.on_second()
            os._exit(EXIT_INTERRUPTED)
        self.interrupted = True
        raise KeyboardInterrupt


def limit_spec(spec: JobSpec, limit: int) -> JobSpec:
    """The spec of a smoke test over the first `limit` rows of each task (`run --limit`): job id
    `<job_id>-limit<N>`, so its output never mixes with the real job's and it resumes as a job of its own."""
    if limit < 1:
        raise ValueError(f"--limit: got {limit}; expected a positive number of rows per task.")
    return parse_spec({**spec.model_dump(), "job_id": f"{spec.job_id}-limit{limit}"})


def summary_lines(spec: JobSpec, results: dict) -> list[str]:
    lines = [f"job {spec.job_id}: done"]
    for name, r in results.items():
        m = r["metrics"]
        lines.append(f"  {name}: {r['rows']} rows ({r['errors']} errors) in {len(r['files'])} files -> {r['output']}; "
                     f"this run {m['rows_this_run']} rows in {m['seconds']:.1f}s ({m['rows_per_s']:.2f} rows/s), "
                     f"{m['skipped']} done before" + (f", {m['retried_errors']} error rows retried"
                                                      if m["retried_errors"] else ""))
        repeated = m["repeated_ids"]
        if repeated["rows"]:
            first = repeated["examples"][0]
            lines.append(f"    {repeated['rows']} input rows skipped: their id came earlier in the input (first one: "
                         f"{first['message']}); see .flashu/metrics.json")
        changed = m.get("settings_changed")
        if changed:  # --allow-changed-settings
            lines.append("    settings changed by this run (--allow-changed-settings): " + ", ".join(
                f"{c['field']} {c['was']!r} -> {c['now']!r}" for c in changed) + "; see .flashu/metrics.json")
    return lines


def run_and_report(spec: JobSpec, address: str | None = None, quiet: bool = False, retry_errors: bool = False,
                   limit: int | None = None, allow_changed_settings: bool = False) -> int:
    """Run the job with progress lines and a summary -> exit status (0, or EXIT_INTERRUPTED after Ctrl-C). limit:
    only the first `limit` rows of each task (give it the spec from limit_spec). run_job's errors come through:
    JobLeased (another driver runs the job), SettingsChanged (a ValueError), RuntimeError (an unfinished job)."""
    from flashu_batch.scheduler.driver import run_job

    printer = ProgressPrinter(show=not quiet)
    with FirstInterrupt(on_second=lambda: print(printer.interrupted_line(), file=sys.stderr, flush=True)) as guard:
        try:
            results = run_job(spec, address=address, quiet=quiet, on_progress=printer, retry_errors=retry_errors,
                              limit=limit, allow_changed_settings=allow_changed_settings)
        except BaseException:
            if not guard.interrupted:
                raise
            print(printer.interrupted_line(), file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
    print("\n".join(summary_lines(spec, results)), flush=True)
    return 0
