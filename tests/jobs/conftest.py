import pytest

from batch_testkit import s3_server, stop_s3_server


@pytest.fixture(scope="session")
def s3_endpoint():
    url = s3_server()
    yield url
    stop_s3_server()
