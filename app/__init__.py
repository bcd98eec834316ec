"""The flashu-batch application: the CLI and what it runs (run, demo, submit, preview, specialize), above the
scheduler and the edge modules of jobs/."""
