"""flashu-batch: dataset-scale Show-o2 inference (text-to-image and VQA) on Ray, made fast with FlashU.

The public way in for code is `build_processor` (scheduler/processor.py); the `flashu-batch` command line is
`flashu_batch.app.cli`. The subpackages, lowest layer first: `showo2` (the model), `flashu` (accelerations),
`jobs` (the edge: spec, storage, ids, output contract), `workers` (Ray actors), `scheduler` (Ray Data pipelines),
`app` (CLI, run, demo, submit, preview, specialize); `bench` and `train` beside them.
"""

import os as _os

# An installed wheel holds the subpackages inside this folder. A source checkout keeps them at the repository's top
# (showo2/, flashu/, ...), beside this folder: there `flashu_batch.showo2` is found through the repository root, so
# `python -m bench.gpu` runs from a checkout without installing anything.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "showo2")) and _os.path.isfile(
        _os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "showo2")):
    __path__.append(_root)  # noqa: F821 -- the package's own __path__


def __getattr__(name):
    if name == "build_processor":  # imported on first use: `import flashu_batch` stays light (no ray, no torch)
        from flashu_batch.scheduler.processor import build_processor

        return build_processor
    raise AttributeError(f"module 'flashu_batch' has no attribute {name!r}")


__all__ = ["build_processor"]
