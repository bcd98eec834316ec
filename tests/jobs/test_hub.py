"""showo2/hub.py and its users: Show-o2 from the Hugging Face Hub, offline, through the real huggingface_hub and a
Hub cache built on disk (batch_testkit.hub_cache) from the shipped tiny-shapes model.

huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported, so every load runs in a fresh Python process
with the environment set, as a worker on a node without network would: `offline(...)` runs a snippet there and returns
what it emits."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from batch_testkit import hub_cache
from flashu_batch.jobs.spec import SpecError, parse_spec
from flashu_batch.showo2.hub import HubError, HubRef, is_hub_id, parse_ref
from flashu_batch.showo2.tiny import CHECKPOINTS

TINY = CHECKPOINTS["tiny-shapes"]
REPO = "test-org/tiny-shapes"
OWN_EXTRAS = ("Wan2.1_VAE.pth", "vae_config.json", "tokenizer.json", "tokenizer_config.json")

PRELUDE = """
import json, os, torch
from flashu_batch.showo2.pipeline import Showo2Pipeline

def emit(**kw):
    print(json.dumps(kw))

def same_pipeline(a, b):
    states = [(a.model.state_dict(), b.model.state_dict()), (a.vae.state_dict(), b.vae.state_dict())]
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in states) and \\
        a.tokenizer.get_vocab() == b.tokenizer.get_vocab()

def error_of(fn):
    try:
        fn()
    except Exception as e:
        return dict(type=type(e).__name__, message=str(e), chained=e.__cause__ is not None or
                    (e.__context__ is not None and not e.__suppress_context__))
    return None
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache holding test-org/tiny-shapes (the shipped model, VAE and tokenizer included), test-org/tiny-bare
    (the same without VAE and tokenizer, as official releases ship), stand-ins for the official VAE and 1.5B tokenizer
    repositories, and a work folder where none of these ids is a local path."""
    root = tmp_path_factory.mktemp("hub")
    bare = root / "tiny-bare"
    shutil.copytree(TINY, bare, ignore=lambda d, names: [n for n in names if n in OWN_EXTRAS])
    wan = root / "wan"
    wan.mkdir()
    for name in ("Wan2.1_VAE.pth", "vae_config.json"):  # the tiny VAE under the official VAE's name
        shutil.copyfile(os.path.join(TINY, name), wan / name)
    qwen = root / "qwen"
    qwen.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(TINY, name), qwen / name)
    hf_home, commit = hub_cache(str(root), REPO, TINY)
    commits = dict(tiny=commit, bare=hub_cache(str(root), "test-org/tiny-bare", str(bare))[1],
                   wan=hub_cache(str(root), "Wan-AI/Wan2.1-T2V-14B", str(wan))[1],
                   qwen=hub_cache(str(root), "Qwen/Qwen2.5-1.5B-Instruct", str(qwen))[1])
    work = root / "work"
    work.mkdir()
    return dict(hf_home=hf_home, commits=commits, bare=str(bare), work=str(work), root=str(root))


def offline(hub: dict, code: str) -> dict:
    """Run `code` (after PRELUDE) in a new Python with HF_HOME=the test cache and HF_HUB_OFFLINE=1; its last `emit`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=hub["hf_home"], HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=hub["work"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- references ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("org/name", HubRef("org/name")),
    ("Qwen/Qwen2.5-1.5B-Instruct@main", HubRef("Qwen/Qwen2.5-1.5B-Instruct", "main")),
    ("org/name@" + "a" * 40, HubRef("org/name", "a" * 40)),
    ("org/name@refs%2Fpr%2F1", HubRef("org/name", "refs/pr/1")),
    ("hf://org/name", HubRef("org/name")),
    ("hf://org/name@v1.0", HubRef("org/name", "v1.0")),
    ("./org/name", None), ("/org/name", None), ("a/b/c", None), ("name", None), ("org--x/name", None),
    ("org/name.git", None), ("org/name@", None), ("s3://bucket/prefix", None),
])
def test_parse_ref(value, expected):
    assert parse_ref(value) == expected


def test_file_references_and_canonical_form():
    ref = parse_ref("hf://Wan-AI/Wan2.1-T2V-14B@refs%2Fpr%2F3/sub/Wan2.1_VAE.pth", file=True)
    assert ref == HubRef("Wan-AI/Wan2.1-T2V-14B", "refs/pr/3", "sub/Wan2.1_VAE.pth")
    assert str(ref) == "hf://Wan-AI/Wan2.1-T2V-14B@refs%2Fpr%2F3/sub/Wan2.1_VAE.pth"
    assert parse_ref(str(ref), file=True) == ref
    assert parse_ref("org/name/Wan2.1_VAE.pth", file=True) is None  # a bare file path is always local
    assert parse_ref("org/name", file=True) is None


@pytest.mark.parametrize("value, file, message", [
    ("hf://org", False, "expected hf://org/name[@revision]"),
    ("hf://org/na me", False, "expected hf://org/name[@revision]"),
    ("hf://org/name/sub", False, "names a whole repository"),
    ("hf://org/name@refs/pr/1", False, "%2F"),
    ("hf://org/name", True, "needs its path inside the repository"),
    ("hf://org/name@v1/", True, "needs its path inside the repository"),
])
def test_bad_hf_references_say_what_is_expected(value, file, message):
    with pytest.raises(HubError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_ref(value, file=file)


def test_an_existing_local_path_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_ref("org/name") == HubRef("org/name")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_ref("org/name") is None and is_hub_id("org/name")
    assert parse_ref("hf://org/name") == HubRef("org/name")  # hf:// is always the Hub


def test_spec_keeps_hub_ids_and_resolves_local_paths(tmp_path):
    def model(**fields) -> dict:
        raw = dict(job_id="j", model=fields,
                   tasks=[dict(kind="t2i", input=dict(uris="p.jsonl", format="jsonl"), output="out")])
        return parse_spec(raw, str(tmp_path)).model.model_dump()

    assert model(checkpoint=REPO)["checkpoint"] == REPO
    assert model(checkpoint=REPO + "@v1.0")["checkpoint"] == REPO + "@v1.0"
    assert model(checkpoint="hf://test-org/tiny-shapes@main")["checkpoint"] == "hf://test-org/tiny-shapes@main"
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert model(checkpoint="models/tiny")["checkpoint"] == str(tmp_path / "models" / "tiny")  # a local path wins
    assert model(checkpoint="ckpt")["checkpoint"] == str(tmp_path / "ckpt")  # not a Hub id: a path, as before
    got = model(checkpoint="c", tokenizer_path="Qwen/Qwen2.5-1.5B-Instruct",
                vae_path="hf://Wan-AI/Wan2.1-T2V-14B/Wan2.1_VAE.pth")
    assert got["tokenizer_path"] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert got["vae_path"] == "hf://Wan-AI/Wan2.1-T2V-14B/Wan2.1_VAE.pth"
    assert model(checkpoint="c", vae_path="vae/Wan2.1_VAE.pth")["vae_path"] == str(tmp_path / "vae" / "Wan2.1_VAE.pth")
    for fields, message in [
        (dict(checkpoint="gs://bucket/model"), "model.checkpoint: got 'gs://bucket/model'; expected a local folder"),
        (dict(checkpoint="hf://org/name/sub"), "model.checkpoint: Got 'hf://org/name/sub'"),
        (dict(checkpoint="c", vae_path="hf://org/name"), "model.vae_path: Got 'hf://org/name'"),
        (dict(checkpoint="c", tokenizer_path="s3://b/tok"), "model.tokenizer_path: got 's3://b/tok'; this must be"),
    ]:
        with pytest.raises(SpecError, match=message.replace("(", r"\(")):
            model(**fields)


# ---- loading, offline, from the cache --------------------------------------------------------------------------------

def test_from_pretrained_from_the_hub_equals_the_folder(hub):
    commit = hub["commits"]["tiny"]
    got = offline(hub, f"""
        folder = Showo2Pipeline.from_pretrained({TINY!r})
        forms = ["{REPO}", "{REPO}@{commit}", "{REPO}@main", "hf://{REPO}", "hf://{REPO}@{commit}"]
        emit(same={{form: same_pipeline(Showo2Pipeline.from_pretrained(form), folder) for form in forms}})
    """)
    assert got["same"] and all(got["same"].values()), got


def test_official_vae_and_tokenizer_are_the_defaults(hub):
    """A checkpoint without VAE or tokenizer gets the official ones (here the stand-ins in the cache); a folder that has
    its own keeps them, and explicit Hub references win over both."""
    c = hub["commits"]
    got = offline(hub, f"""
        from flashu_batch.showo2.hub import Source, resolve_sources, resolve_tokenizer
        folder = Showo2Pipeline.from_pretrained({TINY!r})
        # the default VAE (a stand-in for Wan-AI/Wan2.1-T2V-14B) and a tokenizer from another Hub repository
        defaults = Showo2Pipeline.from_pretrained("test-org/tiny-bare", tokenizer_path="{REPO}")
        explicit = Showo2Pipeline.from_pretrained({hub['bare']!r}, vae_path="hf://{REPO}/Wan2.1_VAE.pth",
                                                  tokenizer_path="hf://{REPO}@{c['tiny']}")
        os.makedirs("qwen-size")
        with open("qwen-size/config.json", "w") as f:
            json.dump(dict(hidden_size=1536), f)
        emit(defaults=same_pipeline(defaults, folder), explicit=same_pipeline(explicit, folder),
             hub_bare=resolve_sources("test-org/tiny-bare", tokenizer_path="{REPO}").settings(),
             local_own=resolve_sources({TINY!r}).settings(),
             qwen=resolve_tokenizer(None, Source("qwen-size", "qwen-size")).__dict__)
    """)
    assert got["defaults"] and got["explicit"]
    assert got["hub_bare"] == dict(checkpoint_revision=c["bare"], vae="hf://Wan-AI/Wan2.1-T2V-14B/Wan2.1_VAE.pth",
                                   vae_revision=c["wan"], tokenizer="hf://" + REPO, tokenizer_revision=c["tiny"])
    assert got["local_own"] == dict(checkpoint_revision=None, vae=os.path.join(TINY, "Wan2.1_VAE.pth"),
                                    vae_revision=None, tokenizer=TINY, tokenizer_revision=None)
    assert got["qwen"]["source"] == "hf://Qwen/Qwen2.5-1.5B-Instruct" and got["qwen"]["revision"] == c["qwen"]


def test_an_id_that_is_not_there_fails_with_what_to_do(hub):
    got = offline(hub, f"""
        from flashu_batch.jobs.fetch import model_folder
        emit(absent=error_of(lambda: Showo2Pipeline.from_pretrained("test-org/absent")),
             commit=error_of(lambda: Showo2Pipeline.from_pretrained("{REPO}@{'0' * 40}")),
             tag=error_of(lambda: model_folder("hf://{REPO}@v9")),
             file=error_of(lambda: Showo2Pipeline.from_pretrained("{REPO}", vae_path="hf://{REPO}/nope.pth")))
    """)
    for case, error in got.items():
        assert error is not None and not error["chained"], (case, error)  # one message, no huggingface traceback
    assert got["absent"]["type"] == "CheckpointError" and got["tag"]["type"] == "HubError"
    message = got["absent"]["message"]
    assert "'test-org/absent' (revision 'main')" in message and "not in the local Hub cache" in message
    assert "HF_HUB_OFFLINE=0" in message and hub["hf_home"] in message, message
    assert f"(revision '{'0' * 40}')" in got["commit"]["message"] and "HF_HUB_OFFLINE" in got["commit"]["message"]
    assert f"'{REPO}' (revision 'v9')" in got["tag"]["message"]
    assert "file 'nope.pth'" in got["file"]["message"] and "nope.pth missing" in got["file"]["message"]


def test_model_folder_and_row_settings_name_the_commit(hub):
    c = hub["commits"]
    got = offline(hub, f"""
        from flashu_batch.jobs.fetch import model_folder
        from flashu_batch.jobs.spec import ModelSpec, StorageSpec
        from flashu_batch.jobs.storage import Storage
        from flashu_batch.workers.common import load_pipeline, settings_json

        def settings(checkpoint, **fields):
            model = ModelSpec(checkpoint=checkpoint, dtype="float32", device="cpu", **fields)
            load_pipeline(model, "t2i", Storage(StorageSpec()), 0)
            return json.loads(settings_json(model, "cpu", None, guidance_scale=1.5))

        emit(folder=model_folder("{REPO}"), pinned=model_folder("hf://{REPO}@{c['tiny']}"),
             hub=settings("{REPO}"), local=settings({TINY!r}),
             bare=settings("test-org/tiny-bare", tokenizer_path="{REPO}"))
    """)
    snapshot = os.path.join(hub["hf_home"], "hub", "models--test-org--tiny-shapes", "snapshots", c["tiny"])
    assert os.path.realpath(got["folder"]) == os.path.realpath(snapshot) == os.path.realpath(got["pinned"])
    assert got["hub"]["checkpoint"] == REPO and got["hub"]["guidance_scale"] == 1.5
    revisions = [got["hub"][k] for k in ("checkpoint_revision", "vae_revision", "tokenizer_revision")]
    assert revisions == [c["tiny"]] * 3  # the VAE and tokenizer came with the checkpoint
    assert got["hub"]["vae"] == f"hf://{REPO}/Wan2.1_VAE.pth" and got["hub"]["tokenizer"] == f"hf://{REPO}"
    assert [got["local"][k] for k in ("checkpoint_revision", "vae_revision", "tokenizer_revision")] == [None] * 3
    assert (got["bare"]["checkpoint_revision"], got["bare"]["vae_revision"], got["bare"]["tokenizer_revision"]) == \
        (c["bare"], c["wan"], c["tiny"])
