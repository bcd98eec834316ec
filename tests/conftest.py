"""Shared fixtures: the golden reference set (tiny-a), writable copies of it, and seeded tiny Show-o2 models."""

import json
import os
import shutil
import sys

import pytest
import torch

# Keep the test session's local Ray on loopback (127.0.0.1) rather than the machine's network address; Ray reads this
# when it is first imported (see scheduler/driver.py init_ray).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# No test reaches the Hugging Face Hub (there is no network here, and a test must not wait on one): Hub references
# resolve from a test's own cache (tests/jobs/batch_testkit.py hub_cache) or fail at once. huggingface_hub reads
# these when first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(__import__("tempfile").mkdtemp(prefix="flashu-test-hf-"), "hf"))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests/jobs/batch_testkit.py (a tiny checkpoint, the S3 server, job specs, workers) is imported by tests of every folder
sys.path.insert(0, os.path.join(REPO, "tests", "jobs"))
from batch_testkit import s3_server, stop_s3_server, tiny_checkpoint  # noqa: E402
# The public golden set (the official code's reference vectors, tiny-a), kept in the repository so every parity test
# runs in a fresh clone. FLASHU_GOLDEN points the tests at another golden folder of the same layout.
GOLDEN = os.environ.get("FLASHU_GOLDEN") or os.path.join(REPO, "tests", "golden", "tiny-a")


@pytest.fixture(scope="session")
def golden_dir() -> str:
    missing = [p for p in ("cases.json", "cases.safetensors", "checkpoint")
               if not os.path.exists(os.path.join(GOLDEN, p))]
    assert not missing, f"golden set {GOLDEN!r} lacks {missing}"  # a failure, never a skip
    return GOLDEN


@pytest.fixture(scope="session")
def golden_meta(golden_dir) -> dict:
    with open(os.path.join(golden_dir, "cases.json")) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def golden_data(golden_dir) -> dict:
    """All golden tensors by full name (`<case>.<tensor>`). Treat as read-only."""
    from safetensors.torch import load_file

    return load_file(os.path.join(golden_dir, "cases.safetensors"))


@pytest.fixture(scope="session")
def golden_specs(golden_meta) -> dict:
    """Tensor spec (role, compare, atol, rtol, ...) by full tensor name."""
    return {name: spec for case in golden_meta["cases"].values() for name, spec in case["tensors"].items()}


def _writable_copy(src: str, dst: str, ignore=None) -> str:
    """copytree that leaves a writable tree (the golden set is read-only and copytree keeps modes)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile, ignore=ignore)
    for root, dirs, files in os.walk(dst):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return dst


@pytest.fixture
def writable_copy():
    """writable_copy(src, dst, ignore=None) -> dst: a copy of a (read-only) folder that tests may modify."""
    return _writable_copy


@pytest.fixture(scope="session")
def make_tiny_model():
    """make_tiny_model(seed=0, **config_overrides) -> a seeded random Showo2 of the "tiny" preset, eval mode."""
    import dataclasses

    from flashu_batch.showo2.config import Showo2Config
    from flashu_batch.showo2.modeling import Showo2

    def make(seed: int = 0, llm_overrides: dict | None = None, **overrides):
        base = Showo2Config.from_name("tiny")
        config = dataclasses.replace(base, llm={**base.llm, **(llm_overrides or {})}, **overrides)
        torch.manual_seed(seed)
        return Showo2(config).eval().requires_grad_(False)

    return make


# Tensor methods that read device data on the host (a sync on an accelerator). nonzero is one too: its output
# shape depends on the data.
HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero")


@pytest.fixture
def count_host_reads(monkeypatch):
    """count_host_reads(fn) -> the number of host reads of tensor data while fn() runs (a CPU stand-in for
    counting GPU->host syncs in a decoding loop)."""
    def count(fn):
        calls = [0]
        with monkeypatch.context() as patch:
            for name in HOST_READS:
                original = getattr(torch.Tensor, name)

                def counted(self, *args, _original=original, **kwargs):
                    calls[0] += 1
                    return _original(self, *args, **kwargs)

                patch.setattr(torch.Tensor, name, counted)
            fn()
        return calls[0]
    return count


@pytest.fixture
def graphs():
    """graphs() -> graphs dynamo has compiled since the test began (its caches are reset first); the compile tests
    count them to show what recompiles and what does not."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield lambda: counters["stats"]["unique_graphs"]
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 server process (moto_server) for the whole session; its fake credentials are in the environment."""
    url = s3_server()
    yield url
    stop_s3_server()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """The tiny-shapes checkpoint folder the job, worker and benchmark tests run (batch_testkit.tiny_checkpoint)."""
    return tiny_checkpoint(str(tmp_path_factory.getbasetemp()))
