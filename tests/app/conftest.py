"""The application's tests: a real S3 server process (moto_server) and a local Ray per test module (tests/scheduler
keeps one for the whole session; a session one here would outlive these modules and make that one fail to start)."""

import pytest


@pytest.fixture(scope="module")
def ray_module():
    """A local Ray for one module (num_cpus=4), or the one already running (then left running)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield
    if started:
        ray.shutdown()
