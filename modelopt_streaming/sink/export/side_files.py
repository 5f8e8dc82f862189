"""Every non-weight file of the source (tokenizers, templates, generation config, custom model code)."""

from __future__ import annotations

import shutil
from pathlib import Path

from modelopt_streaming.formats.interchange import PROVENANCE_FILE
from modelopt_streaming.sink.writer import MANIFEST_FILE
from modelopt_streaming.source.index import INDEX_FILE

# Written by export from what was written, or describing the source directory alone (when the source is
# one of our outputs): never copied from the source.
GENERATED = {"config.json", "hf_quant_config.json", INDEX_FILE, PROVENANCE_FILE, MANIFEST_FILE}
# Pickled weights are never copied: the output's weights are the safetensors we wrote.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


def side_files(source: Path) -> list[Path]:
    """Relative paths of the files to copy, skipping weights, generated files and VCS/cache folders.

    Symlinked files count as files (a Hugging Face cache snapshot is all symlinks into its blobs): their
    content is copied, never the link.
    """
    out = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix in {".safetensors"} | PICKLE_SUFFIXES or str(rel) in GENERATED:
            continue
        out.append(rel)
    return out


def copy_side_files(source: Path, destination: Path) -> list[str]:
    copied = []
    for rel in side_files(source):
        target = destination / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, target)  # follows the link: the output holds the content
        copied.append(str(rel))
    return copied
