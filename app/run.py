"""`flashu-batch run`: a validated spec -> the scheduler, with progress lines and a closing summary."""

import sys
import time

from flashu_batch.jobs.spec import JobSpec

PROGRESS_EVERY_S = 2.0


class ProgressPrinter:
    """One line per task at most every PROGRESS_EVERY_S seconds, and always the last one."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.last: dict[str, tuple[float, str]] = {}

    def __call__(self, progress) -> None:
        now, line = time.monotonic(), progress.line()
        when, shown = self.last.get(progress.task, (0.0, ""))
        if line != shown and (progress.finished or now - when >= PROGRESS_EVERY_S):
            self.last[progress.task] = now, line
            print(line, file=self.stream, flush=True)


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
                         f"{first['message']}); see metrics.json")
    return lines


def run_and_report(spec: JobSpec, address: str | None = None, quiet: bool = False, retry_errors: bool = False) -> int:
    from flashu_batch.scheduler.driver import run_job

    results = run_job(spec, address=address, quiet=quiet, on_progress=None if quiet else ProgressPrinter(),
                      retry_errors=retry_errors)
    print("\n".join(summary_lines(spec, results)), flush=True)
    return 0
