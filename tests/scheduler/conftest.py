"""Real local Ray, started once per test session (after the S3 server of tests/conftest.py s3_endpoint)."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_session(s3_endpoint, tmp_path_factory):
    """ray.init(num_cpus=4) once; started after the S3 fixture so workers inherit its (fake) credentials, with a
    private model cache for s3:// checkpoints."""
    import ray

    os.environ["FLASHU_CACHE"] = str(tmp_path_factory.mktemp("flashu-cache"))
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
