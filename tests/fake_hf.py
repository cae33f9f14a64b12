#!/usr/bin/env python3
"""A stand-in for the Hugging Face CLI's ``hf download``, serving a hub tree built by a test.

Files come from ``$FAKE_HF_ROOT/<owner>/<name>/<revision>/<path>`` and are hard-linked into
``--local-dir`` (sparse multi-hundred-MB files cost nothing). Every call is appended to
``$FAKE_HF_ROOT/calls.jsonl``. An unknown revision or a missing file fails with the real CLI's
error names and exit status 1.
"""

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "download":
        print(f"fake hf: only 'download' is supported, got {argv[:1]}", file=sys.stderr)
        return 2
    args = argv[1:]
    repo, files, revision, local_dir = args[0], [], "main", None
    i = 1
    while i < len(args):
        if args[i] == "--revision":
            revision, i = args[i + 1], i + 2
        elif args[i] == "--local-dir":
            local_dir, i = Path(args[i + 1]), i + 2
        else:
            files.append(args[i])
            i += 1
    root = Path(os.environ["FAKE_HF_ROOT"])
    with (root / "calls.jsonl").open("a") as log:
        log.write(json.dumps({"repo": repo, "revision": revision, "files": files}) + "\n")
    tree = root / repo / revision
    if not tree.is_dir():
        print(f"huggingface_hub.errors.RevisionNotFoundError: {repo}@{revision}", file=sys.stderr)
        return 1
    if local_dir is None:
        print("fake hf: --local-dir is required here", file=sys.stderr)
        return 2
    for name in files:
        source = tree / name
        if not source.is_file():
            print(f"huggingface_hub.errors.EntryNotFoundError: 404 {repo}/{name}", file=sys.stderr)
            return 1
        target = local_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        os.link(source, target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
