"""Ray Data actors, one class per task: each loads one (FlashU-specialized) Show-o2 once and turns a batch of rows
into a batch of result rows, one out for each in, errors as values (see workers/t2i.py, workers/vqa.py).

Importing this package imports neither torch nor showo2: workers import them in `__init__`, inside the actor.
"""

from flashu_batch.workers.t2i import T2IWorker
from flashu_batch.workers.vqa import VQAWorker

__all__ = ["T2IWorker", "VQAWorker"]
