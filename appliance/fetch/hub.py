"""Downloads through the Hugging Face CLI (``hf download``), at a pinned revision, into a folder.

The CLI resumes interrupted downloads, skips files already present at the same revision and reads
``HF_TOKEN``/``HF_ENDPOINT`` (a mirror) the way installers already know from AXERA's guides.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from appliance.fetch.catalog import RepoFiles

logger = logging.getLogger(__name__)


class HubError(RuntimeError):
    pass


class HubClient:
    def __init__(self, command: str | None = None) -> None:
        self.command = command or os.environ.get("APPLIANCE_HF_COMMAND") or "hf"

    def executable(self) -> str:
        found = shutil.which(self.command)
        if found is None:
            raise HubError(
                f"the Hugging Face CLI {self.command!r} is not installed; "
                "scripts/fetch_models installs it (pip install 'huggingface_hub>=0.34')"
            )
        return found

    def download(self, source: RepoFiles, files: list[str], dest: Path) -> None:
        """Fetch ``files`` (paths inside the repository) into ``dest``, keeping their paths."""
        dest.mkdir(parents=True, exist_ok=True)
        command = [self.executable(), "download", source.repo, *files,
                   "--revision", source.revision, "--local-dir", str(dest)]
        logger.info("%s@%s: %d files -> %s", source.repo, source.revision[:12], len(files), dest)
        # The CLI's progress bars and errors go straight to the installer's terminal.
        result = subprocess.run(command, check=False, stdout=subprocess.DEVNULL)
        if result.returncode != 0:
            raise HubError(f"hf download {source.repo} at {source.revision[:12]} failed "
                           f"(exit {result.returncode}; its message is above); run again to resume")
        missing = [f for f in files if not (dest / f).is_file()]
        if missing:
            raise HubError(f"hf download {source.repo} finished without {missing[:5]}")
