"""Push directories (artifacts, models, checkpoints) to the Hugging Face Hub and pull them back.

The token comes from where huggingface_hub looks for it (the HF_TOKEN environment variable, then
`hf auth login`); this module never takes, prints, logs or writes it, and refuses to upload a file
that contains it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token, snapshot_download

from llava_circuits.artifacts import package_version, atomic_dir, read_artifact

log = logging.getLogger(__name__)

PULL_MARKER = Path(".cache") / "llava_circuits" / "pull.json"  # written by pull(out=...); never pushed
_SKIPPED_DIRS = {".git"}  # at any depth; plus a top-level ".cache" (huggingface_hub and pull metadata)
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def push(
    dir: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> CommitInfo:
    """Upload a directory to a Hub repo as one commit; files that did not change make no commit.

    Files already in the repo but not in the directory are kept. If the directory holds an
    artifact.json, the artifact is validated first.

    Args:
        dir: the directory to upload (an artifact, a model directory, a run directory).
        repo_id: the Hub repo, "user/name"; created if missing.
        private: create the repo as private (ignored if it already exists).
        revision: the branch to commit to (default "main"); created from main if missing.
        commit_message: the commit title (default: says what was uploaded).
    """
    root = Path(dir)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory")
    if revision is not None and _COMMIT_SHA.fullmatch(revision):
        raise ValueError(f"revision={revision!r} is a commit sha; push needs a branch name")
    what = f"{read_artifact(root).kind} artifact" if (root / "artifact.json").is_file() else f"directory {root.name}"
    files = _files_to_push(root)
    if not files:
        raise ValueError(f"{root}: nothing to push (no files)")
    for path in files:
        if path.suffix == ".safetensors":
            _refuse_token_in_header(path)  # tensors are numbers; the JSON header can hold any metadata
        else:
            _refuse_token_in_file(path)

    api = HfApi(library_name="llava-circuits", library_version=package_version())
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path.relative_to(root).as_posix(), str(path)) for path in files]
    info = api.create_commit(
        repo_id, operations, commit_message=commit_message or f"Upload {what}", revision=revision
    )
    log.info("pushed %s to %s@%s: commit %s", root, repo_id, revision or "main", info.oid)
    return info


def pull(repo_id: str, revision: str | None = None, out: Path | None = None) -> Path:
    """Download a Hub repo at one revision and return the directory holding its files.

    Without `out`, the files stay in the Hugging Face cache and the cache's snapshot folder is returned.
    With `out`, `out` ends up holding exactly the repo's files at that revision (a previous pull there
    is replaced; any other non-empty directory is refused).

    Args:
        repo_id: the Hub repo, "user/name".
        revision: branch, tag or commit sha (default "main"); all files come from the one commit it names.
        out: a directory to copy the files into.
    """
    snapshot = Path(
        snapshot_download(
            repo_id, revision=revision, library_name="llava-circuits", library_version=package_version()
        )
    )
    commit = snapshot.name  # snapshot folders are named by commit sha
    log.info("pulled %s@%s (commit %s)", repo_id, revision or "main", commit)
    if out is None:
        return snapshot
    out = Path(out)
    with atomic_dir(out, replaceable=lambda p: (p / PULL_MARKER).is_file()) as tmp:
        for src in sorted(snapshot.rglob("*")):
            if src.is_file():
                dst = tmp / src.relative_to(snapshot)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)  # follows the cache's symlinks to blobs
        marker = {"repo_id": repo_id, "revision": revision or "main", "commit": commit}
        (tmp / PULL_MARKER).parent.mkdir(parents=True)
        (tmp / PULL_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def refuse_token(data: bytes, where: str) -> None:
    """Raise if `data` contains the Hugging Face token in use (the message never shows it)."""
    token = get_token()
    if token and token.encode() in data:
        raise ValueError(f"{where} contains your Hugging Face token; refusing to write or upload it")


def _refuse_token_in_file(path: Path, chunk_size: int = 1 << 24) -> None:
    token = get_token()
    if not token:
        return
    keep, tail = len(token.encode()) - 1, b""  # overlap chunks so a token split across two is still found
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            refuse_token(tail + chunk, str(path))
            tail = (tail + chunk)[-keep:] if keep else b""


def _refuse_token_in_header(path: Path) -> None:
    """The safetensors header (8-byte little-endian length, then JSON, metadata included) must not hold the token."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        refuse_token(f.read(min(size, 1 << 28)), str(path))


def _files_to_push(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIPPED_DIRS and not (here == root and d == ".cache")
        )
        files += [here / name for name in sorted(filenames)]
    return files
