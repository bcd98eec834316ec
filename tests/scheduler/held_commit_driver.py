"""A job driver whose first write stops between its data file and its commit record, so a test can kill the job in
exactly that window (test_faults.py). It never commits that write: after 600 s it hard-exits.

    python held_commit_driver.py SPEC MARKER
"""

import os
import sys
import time

from flashu_batch.jobs.output import TaskOutput
from flashu_batch.jobs.spec import load_spec
from flashu_batch.scheduler.driver import run_job


class HeldTaskOutput(TaskOutput):  # defined in __main__, so Ray ships it by value to the write tasks
    marker = sys.argv[2]

    def commit(self, rel, table, run_id=""):
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # the first write only
        except FileExistsError:
            return super().commit(rel, table, run_id)
        time.sleep(600)
        os._exit(75)


if __name__ == "__main__":
    run_job(load_spec(sys.argv[1]), quiet=True, output_class=HeldTaskOutput)
