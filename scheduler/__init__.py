"""The driver side of a batch job: Ray Data pipelines per task (read -> validate -> skip committed -> worker pool ->
write + commit) and the job runner that finalizes each task's output (see scheduler/pipeline.py, scheduler/driver.py).
"""
