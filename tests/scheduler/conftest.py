"""Real local Ray, started once per test session, and a real S3 server process (moto_server)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs"))
from batch_testkit import s3_server, stop_s3_server, tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def s3_endpoint():
    url = s3_server()
    yield url
    stop_s3_server()


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


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.getbasetemp()))
