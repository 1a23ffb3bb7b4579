"""The demo's models that the repository carries: the tiny LLaVA base policy and the tiny CLIP of
each demo world, built once by a documented command and checked by SHA-256 when used.

    m3po_core/assets/tiny-llava-{key}/, m3po_core/assets/tiny-clip-{key}/   each with SHA256SUMS

Why carried: both are trained from scratch, and a different floating-point path (another CPU's
vector width or kernels, another thread count) turns the same seed into a different model; the
demo's base then differed from machine to machine (bench/demo_figures.py measures the spread). A
carried model is the same bytes everywhere. Its directory name is the cache key a build would get
(stages.base_models), so it is used exactly when the configuration asks for that model; any other
configuration builds its own, as before.

Rebuilt by `python -m m3po_core.stages.build_carried` (stages/build_carried.py).

Limit: the models are built on the machine that runs the command, so a rebuild elsewhere gives
other bytes (and other demo figures); the checksums say which bytes a figure came from.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from m3po_core.errors import InputError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CHECKSUMS = "SHA256SUMS"
SKIP = {CHECKSUMS, "_COMPLETE"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def carried(rel: str) -> Path | None:
    """The carried copy of the model kept at `_models/{name}` in a store, verified; None if the
    repository carries no such model."""
    directory = ASSETS / Path(rel).name
    if not (directory / CHECKSUMS).is_file():
        return None
    verify(directory)
    return directory


def verify(directory: Path) -> None:
    """Every file SHA256SUMS lists has its checksum, and no file is unlisted; InputError naming the file."""
    listed = {}
    for n, line in enumerate((directory / CHECKSUMS).read_text().splitlines(), start=1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise InputError(f"{directory / CHECKSUMS}, line {n}: not '<sha256>  <file>'")
        listed[name] = digest
    present = {p.name for p in directory.iterdir() if p.name not in SKIP}
    if present != set(listed):
        raise InputError(f"{directory}: files {sorted(present ^ set(listed))} are not those {CHECKSUMS} lists; "
                         "rebuild with `python -m m3po_core.stages.build_carried`")
    for name, digest in listed.items():
        if _sha256(directory / name) != digest:
            raise InputError(f"{directory / name}: SHA-256 differs from {CHECKSUMS} (a damaged or edited file); "
                             "restore it from git or rebuild with `python -m m3po_core.stages.build_carried`")


def write_checksums(directory: Path) -> None:
    names = sorted(p.name for p in directory.iterdir() if p.name not in SKIP)
    (directory / CHECKSUMS).write_text("".join(f"{_sha256(directory / n)}  {n}\n" for n in names))


def carry(source: Path) -> Path:
    """Copy a model directory built in a store into ASSETS, with its checksums."""
    target = ASSETS / source.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*SKIP))
    write_checksums(target)
    return target
