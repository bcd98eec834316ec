"""Show-o2 sources on the Hugging Face Hub -> local files in huggingface_hub's own cache, and the commit of each.

A Hub reference names a model repository, optionally a revision (branch, tag or commit) and, for a single file such as
the VAE, a path inside the repository:

    org/name                                    checkpoint or tokenizer, default branch (main)
    org/name@revision                           ... at a branch, a tag or a 40-hex commit
    hf://org/name[@revision]                    the same, never taken for a local path
    hf://org/name[@revision]/path/in/repo.pth   one file (vae_path); a bare a/b/c.pth is always a local path

A bare `org/name` is a Hub id only when no local path by that name exists (an existing local path wins), and only in
exactly that shape: one '/', no leading './' or '/', names as huggingface_hub's validate_repo_id allows them. A
revision ends at the next '/'; write a '/' inside one as %2F (`org/name@refs%2Fpr%2F1`), as huggingface_hub's own
hf:// file system does.

Everything goes through `snapshot_download`, so HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN (or `hf auth
login`) and revisions behave exactly as in transformers, and its cache and file locks make one download per node.
Only the files Show-o2 reads are fetched. Parsing needs neither huggingface_hub nor torch: job specs use it at the
edge, before any worker starts.
"""

import json
import os
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from flashu_batch.showo2.config import KNOWN_CONFIGS

HF_SCHEME = "hf://"
# A repository name, as huggingface_hub's REPO_ID_REGEX: word characters, '.', '-', starting and ending with a word
# character, at most 96 long ('--', '..' and a '.git' ending are refused separately, as validate_repo_id does).
_NAME = r"\w(?:[\w.-]{0,94}\w)?"
_BARE = re.compile(rf"({_NAME}/{_NAME})(?:@([^/\s@]+))?", re.ASCII)
_COMMIT = re.compile(r"[0-9a-f]{40}")

# The files a tokenizer is read from: the only ones fetched for one; the first two mark a folder as holding one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


class HubError(ValueError):
    """A Hub reference that does not parse, or a model or file that cannot be had from the Hub or its cache."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str  # org/name
    revision: str | None = None  # branch, tag or commit; None: the default branch
    filename: str | None = None  # a file inside the repository (vae_path); None: the repository

    def __str__(self) -> str:
        """The canonical hf:// form (the one settings_json records)."""
        at = f"@{quote(self.revision, safe='')}" if self.revision else ""
        return f"{HF_SCHEME}{self.repo_id}{at}" + (f"/{self.filename}" if self.filename else "")

    def describe(self) -> str:
        what = f"file {self.filename!r} of " if self.filename else ""
        return f"{what}Hub model {self.repo_id!r} (revision {self.revision or 'main'!r})"


# What the official Show-o2 code uses when a checkpoint brings neither: the Wan2.1 VAE file, and the Qwen2.5 instruct
# tokenizer of the LLM's size, told apart by the checkpoint's hidden_size (the presets in showo2/config.py).
DEFAULT_VAE = HubRef("Wan-AI/Wan2.1-T2V-14B", filename="Wan2.1_VAE.pth")
DEFAULT_TOKENIZERS = {KNOWN_CONFIGS[repo]["hidden_size"]: HubRef(repo)  # 1536: 1.5B, 3584: 7B
                      for repo in ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct")}


def parse_ref(value: str, *, file: bool = False) -> HubRef | None:
    """The Hub reference `value` is, or None for a local path (or another URI, such as s3://). file=True: a reference
    to one file, which must be written hf://org/name[@revision]/path. Raises HubError for an hf:// value that does not
    parse."""
    if value.startswith(HF_SCHEME):
        return _parse_hf(value, file)
    if file or os.path.exists(value):
        return None
    match = _BARE.fullmatch(value)
    if match is None or _bad_repo_id(match.group(1)):
        return None
    return HubRef(match.group(1), unquote(match.group(2)) if match.group(2) else None)


def is_hub_id(value: str) -> bool:
    """Whether `value` has the shape of a bare Hub id (`org/name[@revision]`), existing local path or not."""
    match = _BARE.fullmatch(value)
    return match is not None and not _bad_repo_id(match.group(1))


def _bad_repo_id(repo_id: str) -> bool:
    return "--" in repo_id or ".." in repo_id or repo_id.endswith(".git")


def _parse_hf(value: str, file: bool) -> HubRef:
    shape = "hf://org/name[@revision]/path/in/repo" if file else "hf://org/name[@revision]"
    org, _, rest = value[len(HF_SCHEME):].partition("/")
    name_rev, _, path = rest.partition("/")
    match = _BARE.fullmatch(f"{org}/{name_rev}")
    if match is None or _bad_repo_id(match.group(1)):
        raise HubError(f"Got {value!r}; expected {shape}, where org/name is a Hub repository id (letters, digits, "
                       f"'_', '.', '-') and a '/' inside the revision is written %2F.")
    if file and (not path or path.endswith("/") or ".." in path.split("/")):
        raise HubError(f"Got {value!r}; expected {shape}: a file needs its path inside the repository, such as "
                       f"hf://Wan-AI/Wan2.1-T2V-14B/Wan2.1_VAE.pth.")
    if not file and path:
        raise HubError(f"Got {value!r}; expected {shape}: this names a whole repository, not a path inside it "
                       f"(a '/' inside a revision is written %2F: hf://org/name@refs%2Fpr%2F1).")
    return HubRef(match.group(1), unquote(match.group(2)) if match.group(2) else None, path or None)


# ---- downloads: (local path, commit) ---------------------------------------------------------------------------------

def download_checkpoint(ref: HubRef) -> tuple[str, str]:
    """(snapshot folder, commit) of a Show-o2 checkpoint repository: its configs, its weights (one weights file, or a
    shard index and its shards, chosen as showo2/loading.py WEIGHT_FILES orders them: never two formats) and, when it
    has them, its Wan2.1 VAE and tokenizer files."""
    # imported here, not at the top: jobs/spec.py parses references with this module and must not import torch
    from flashu_batch.showo2.loading import VAE_FILE, WEIGHT_FILES

    # 1. The small files, the VAE and the shard indexes; this also pins the revision to one commit
    first = ["config.json", "vae_config.json", VAE_FILE, *TOKENIZER_FILES, *(f"tokenizer/{f}" for f in TOKENIZER_FILES),
             *(name for name in WEIGHT_FILES if name.endswith(".index.json"))]
    folder = _snapshot(ref, "checkpoint", first)
    commit = _commit_of(folder)
    pinned = HubRef(ref.repo_id, commit)
    _require(ref, commit, folder, ["config.json"])

    # 2. The weights, and the LLM / SigLIP configs that config.json points at inside the repository
    weights = _weight_files(pinned, folder, WEIGHT_FILES)
    _snapshot(pinned, "checkpoint", weights + _sub_configs(folder))
    _require(ref, commit, folder, weights)
    return folder, commit


def download_tokenizer(ref: HubRef) -> tuple[str, str]:
    """(snapshot folder, commit) holding a tokenizer repository's tokenizer files (no weights)."""
    folder = _snapshot(ref, "tokenizer", ["config.json", *TOKENIZER_FILES])
    commit = _commit_of(folder)
    _require(ref, commit, folder, list(TOKENIZER_FILES[:2]), any_of=True)
    return folder, commit


def download_file(ref: HubRef) -> tuple[str, str]:
    """(local file, commit) of one file in a repository, with the vae_config.json beside it when there is one
    (showo2/vae.py load_vae reads it from there)."""
    assert ref.filename, f"download_file needs a file reference, got {ref}"
    beside = os.path.join(os.path.dirname(ref.filename), "vae_config.json")
    folder = _snapshot(ref, "file", [ref.filename, beside])
    commit = _commit_of(folder)
    _require(ref, commit, folder, [ref.filename])
    return os.path.join(folder, ref.filename), commit


def _snapshot(ref: HubRef, what: str, allow_patterns: list[str], dry_run: bool = False):
    """snapshot_download, with huggingface_hub's errors turned into one HubError that names the reference and what to
    do (no chained traceback: the message is the whole story)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=allow_patterns, dry_run=dry_run)
    except GatedRepoError:
        problem = (f"is gated: accept its conditions at https://huggingface.co/{ref.repo_id} with your account, then "
                   f"log in on this machine (`hf auth login`, or set HF_TOKEN)")
    except RepositoryNotFoundError:
        problem = ("was not found on the Hub: check the id (a bare org/name is read as a Hub id only when no local "
                   "path by that name exists), or log in (`hf auth login`, or set HF_TOKEN) if it is private")
    except RevisionNotFoundError:
        problem = f"has no revision {ref.revision!r}: check the branch, tag or commit after '@'"
    except LocalEntryNotFoundError:  # not (fully) in the cache, and the Hub off or out of reach
        hub = ("is switched off (HF_HUB_OFFLINE is set): set HF_HUB_OFFLINE=0 on a machine with network access to "
               "download it once" if constants.HF_HUB_OFFLINE else "could not be reached: check the network")
        problem = (f"is not in the local Hub cache ({constants.HF_HUB_CACHE}) and the Hub {hub}, or point HF_HOME at "
                   f"a cache that holds it")
    except HFValidationError as e:
        problem = f"is not a valid Hub reference ({e})"
    except HfHubHTTPError as e:
        problem = f"could not be fetched, the Hub answered: {_first_line(e)}. Try again, or check the id and login"
    message = f"{_WHAT[what]}{ref.describe()} {problem}."
    raise HubError(message[0].upper() + message[1:]) from None


_WHAT = {"checkpoint": "Show-o2 checkpoint: ", "tokenizer": "Tokenizer: ", "file": ""}  # file: describe() says it


def _weight_files(pinned: HubRef, folder: str, weight_files: tuple[str, ...]) -> list[str]:
    """The repository's weights at `pinned` (a commit): the first of `weight_files` it has, and an index's shards."""
    from huggingface_hub.errors import DryRunError

    try:  # the repository's listing, without downloading (one request, or none once huggingface_hub cached it)
        listed = {f.filename for f in _snapshot(pinned, "checkpoint", list(weight_files), dry_run=True)}
    except DryRunError:  # offline or out of reach: the cached snapshot is all there is to load
        listed = {name for name in weight_files if os.path.isfile(os.path.join(folder, name))}
    name = next((n for n in weight_files if n in listed), None)
    if name is None:
        raise HubError(f"Show-o2 checkpoint: {pinned.describe()} has no Show-o2 weights (expected one of "
                       f"{list(weight_files)}); is it a Show-o2 checkpoint repository?")
    if not name.endswith(".index.json"):
        return [name]
    try:
        with open(os.path.join(folder, name)) as f:
            return [name, *sorted(set(json.load(f)["weight_map"].values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise HubError(f"Show-o2 checkpoint: could not read the shard index {name!r} of {pinned.describe()}: "
                       f"{e}") from None


def _sub_configs(folder: str) -> list[str]:
    """The LLM / SigLIP config files config.json names as folders inside the repository (save_showo2 writes llm/
    and siglip/; official releases name hub ids, which showo2/config.py has built in)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return []  # load_showo2 reports the broken config.json
    refs = [raw.get(key) for key in ("llm_model_path", "clip_pretrained_model_path")] if isinstance(raw, dict) else []
    return [f"{r.strip('/')}/config.json" for r in refs
            if isinstance(r, str) and r and r not in KNOWN_CONFIGS and not os.path.isabs(r) and ".." not in r]


def _commit_of(folder: str) -> str:
    commit = os.path.basename(folder)  # snapshot_download returns <cache>/models--org--name/snapshots/<commit>
    assert _COMMIT.fullmatch(commit), f"snapshot_download returned {folder!r}, not a snapshots/<commit> folder"
    return commit


def _require(ref: HubRef, commit: str, folder: str, names: list[str], any_of: bool = False) -> None:
    """Raise HubError unless the snapshot holds `names` (or, any_of, one of them). Offline, snapshot_download returns a
    cached snapshot without checking it holds what was asked for."""
    from huggingface_hub import constants

    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if not missing or (any_of and len(missing) < len(names)):
        return
    offline = " (HF_HUB_OFFLINE is set: set HF_HUB_OFFLINE=0 to download them)" if constants.HF_HUB_OFFLINE else ""
    found = f"none of {names} is there" if any_of else f"{', '.join(missing)} missing"
    raise HubError(f"{ref.describe()} at commit {commit}: {found}. Either the repository lacks "
                   f"{'them' if len(missing) > 1 else 'it'} (check the id and the path), or the local Hub cache "
                   f"({constants.HF_HUB_CACHE}) holds only part of it and the Hub cannot be reached{offline}.")


def check_available(ref: HubRef, what: str) -> None:
    """Raise HubError unless `ref` can be had from the Hub or the local cache, fetching at most a repository's small
    config files (the driver's check before any worker starts; weights are left to the workers). what: "checkpoint",
    "tokenizer" or "file"."""
    from huggingface_hub import constants, try_to_load_from_cache

    from huggingface_hub.errors import DryRunError

    if ref.filename is None:
        marker = "config.json" if what == "checkpoint" else "tokenizer_config.json"
        folder = _snapshot(ref, what, [marker])
        _require(ref, _commit_of(folder), folder, [marker])
        return
    if isinstance(try_to_load_from_cache(ref.repo_id, ref.filename, revision=ref.revision), str):
        return  # cached: the workers load it from there, online or not
    hub = "is switched off (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "could not be reached"
    try:
        listed = None if constants.HF_HUB_OFFLINE else _snapshot(ref, what, [ref.filename], dry_run=True)
    except DryRunError:  # no answer from the Hub
        listed = None
    if listed is None:
        raise HubError(f"{ref.describe()} is not in the local Hub cache ({constants.HF_HUB_CACHE}) and the Hub {hub}: "
                       f"download it once on a machine with network access, point HF_HOME at a cache that holds "
                       f"it, or give a local file instead.")
    if not listed:  # the repository's listing, without downloading the file, has no such file
        raise HubError(f"{ref.describe()}: the repository has no such file; check the path after the revision.")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---- a whole model: checkpoint, VAE and tokenizer --------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    path: str  # a local file or folder
    source: str  # where it came from: the local path as given, or an hf:// reference
    revision: str | None = None  # the commit of the Hub repository it came from; None for a local source


@dataclass(frozen=True)
class ModelSources:
    checkpoint: Source
    vae: Source
    tokenizer: Source | None  # None: neither given, nor in the checkpoint, nor a default for this model size

    def settings(self) -> dict:
        """The sources and their Hub commits, as output rows record them (null revisions: local sources)."""
        tokenizer = self.tokenizer
        return dict(checkpoint_revision=self.checkpoint.revision, vae=self.vae.source, vae_revision=self.vae.revision,
                    tokenizer=tokenizer and tokenizer.source, tokenizer_revision=tokenizer and tokenizer.revision)


def resolve_checkpoint(checkpoint: str) -> Source:
    """A Hub reference -> its snapshot folder; anything else (a local folder) as it is."""
    ref = parse_ref(checkpoint)
    if ref is None:
        return Source(checkpoint, checkpoint)
    folder, commit = download_checkpoint(ref)
    return Source(folder, str(ref), commit)


def resolve_vae(vae_path: str | None, checkpoint: Source) -> Source:
    """The VAE file: vae_path (a local file or hf://org/name[@revision]/file), else the checkpoint's own
    Wan2.1_VAE.pth, else the official one (DEFAULT_VAE)."""
    if vae_path:
        ref = parse_ref(vae_path, file=True)
        if ref is None:
            return Source(vae_path, vae_path)
        path, commit = download_file(ref)
        return Source(path, str(ref), commit)
    own = os.path.join(checkpoint.path, DEFAULT_VAE.filename)
    if os.path.isfile(own):
        return Source(own, _inside(checkpoint, DEFAULT_VAE.filename), checkpoint.revision)
    path, commit = download_file(DEFAULT_VAE)
    return Source(path, str(DEFAULT_VAE), commit)


def resolve_tokenizer(tokenizer_path: str | None, checkpoint: Source) -> Source | None:
    """The tokenizer folder: tokenizer_path (a local folder or a Hub id), else the checkpoint's own (the folder or its
    tokenizer/), else the Qwen2.5 instruct tokenizer of the checkpoint's size; None if none of these applies."""
    if tokenizer_path:
        ref = parse_ref(tokenizer_path)
        if ref is None:
            return Source(tokenizer_path, tokenizer_path)
        folder, commit = download_tokenizer(ref)
        return Source(folder, str(ref), commit)
    for sub in ("", "tokenizer"):
        folder = os.path.join(checkpoint.path, sub) if sub else checkpoint.path
        if any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES[:2]):
            return Source(folder, _inside(checkpoint, sub) if sub else checkpoint.source, checkpoint.revision)
    default = DEFAULT_TOKENIZERS.get(_hidden_size(checkpoint.path))
    if default is None:
        return None
    folder, commit = download_tokenizer(default)
    return Source(folder, str(default), commit)


def resolve_sources(checkpoint: str, vae_path: str | None = None, tokenizer_path: str | None = None) -> ModelSources:
    """Local files for a whole model (see resolve_checkpoint, resolve_vae, resolve_tokenizer)."""
    ckpt = resolve_checkpoint(checkpoint)
    return ModelSources(ckpt, resolve_vae(vae_path, ckpt), resolve_tokenizer(tokenizer_path, ckpt))


def _inside(checkpoint: Source, name: str) -> str:
    """The source of a file inside the checkpoint: a path beside it, or a file of the same Hub reference."""
    return f"{checkpoint.source}/{name}" if checkpoint.revision else os.path.join(checkpoint.source, name)


def _hidden_size(folder: str) -> int | None:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None  # no default: load_showo2 reports the missing or broken config.json
    size = raw.get("hidden_size") if isinstance(raw, dict) else None
    return size if isinstance(size, int) else None
