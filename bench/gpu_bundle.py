"""Build what a bare GPU machine lacks to run bench/gpu_check.py: the project's code and the wheels of
the packages it needs that the machine does not have, in one folder (and a .tar.gz) under --max-mib.

    .venv/bin/python bench/gpu_bundle.py --out gpu-bundle          # then, on the GPU machine:
    tar xJf gpu-bundle.tar.xz && sh gpu-bundle/run.sh --out gpu_check.json

The target is described by --python (its CPython version), --platform (its wheel platform tags,
glibc 2.28 or newer on x86_64 by default) and --have (distributions it already has: by default
what the lent H200 has, torch with CUDA, peft, accelerate, pyarrow and what they pull in). The
needed set is the closure of the `m3po` distribution's requirements in this environment (installed
with `pip install -e .`), minus --have and --skip (s3fs: a run on a local directory does not import it); each is fetched at the version installed here (so the
GPU runs the pins the CPU figures were measured with) with `pip download --no-deps` for the
target's tags. transformers is carried although the machine has one: the project's figures are on
5.20.2 (--have transformers uses the machine's instead). The carried demo models are left out
(the check builds its own). The wheels are unpacked here into site/ (wheels are zip files: no pip
is needed there) and the folder is packed with xz: 76 MiB of wheels make ~47 MiB (Python source
compresses about twice as well under xz as under the wheels' zip deflate). `run.sh` runs the
check with PYTHONPATH=site:src.

Limits: the closure follows this environment's resolution (markers evaluated for Linux and
--python); a package with no wheel for the target's tags fails the build, naming it.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# What the lent H200 had (device entry's H200 page and ../shared/gpu's probe): torch 2.11 (CUDA 13),
# transformers 5.17, peft, accelerate, pyarrow and their own requirements.
H200_HAS = ("torch torchvision triton nvidia-* cuda-* peft accelerate pyarrow numpy pandas pillow safetensors "
            "tokenizers huggingface-hub hf-xet fsspec filelock typing-extensions sympy mpmath networkx jinja2 "
            "markupsafe setuptools packaging pyyaml regex tqdm psutil python-dateutil six")
CARRIED_ANYWAY = ("transformers",)
# Not needed by a run on a local directory: s3fs (s3:// roots; with botocore, 16 MiB), imported only
# when a run's root is on S3. (asyncpg is needed although the ephemeral API uses SQLite: Prefect's
# server module imports it; a rehearsal without it failed.)
SKIP = "s3fs"


def closure(root: str, have: set[str], python: str) -> dict[str, str]:
    """name -> installed version of every distribution `root` needs (not its extras), minus `have`;
    a requirement's extras count (`sqlalchemy[asyncio]` needs greenlet), also on a distribution the
    target has (it may lack what only the extra adds)."""
    env = {"python_version": ".".join(python.split(".")[:2]), "python_full_version": python,
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    needed: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    todo: list[tuple[str, str]] = [(root, "")]   # (distribution, "" for its own requirements or an extra's name)
    while todo:
        name, extra = todo.pop()
        if (canonicalize_name(name), extra) in seen:
            continue
        seen.add((canonicalize_name(name), extra))
        for text in md.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
                continue
            if req.marker is None and extra:
                continue  # unconditional requirements came with the distribution itself
            key = canonicalize_name(req.name)
            todo += [(req.name, e) for e in req.extras]
            if key in needed or _has(key, have):
                continue
            try:
                needed[key] = md.version(req.name)
            except md.PackageNotFoundError:
                raise SystemExit(f"gpu_bundle: {name} needs {req.name}, which is not installed here") from None
            todo.append((req.name, ""))
    return needed


def _has(name: str, have: set[str]) -> bool:
    return any(name == h or (h.endswith("*") and name.startswith(h[:-1])) for h in have)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu-bundle")
    p.add_argument("--python", default="3.12.3", help="the target's CPython version (the H200: 3.12.3)")
    p.add_argument("--platform", action="append", default=None,
                   help="wheel platform tags (default: manylinux_2_28_x86_64 and older manylinux x86_64)")
    p.add_argument("--have", default=H200_HAS, help="space-separated distributions the target has (* allowed)")
    p.add_argument("--skip", default=SKIP, help="space-separated distributions left out with what only they need")
    p.add_argument("--max-mib", type=float, default=60.0)
    args = p.parse_args()
    platforms = args.platform or ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                  "manylinux1_x86_64", "any"]
    have = {canonicalize_name(h) if "*" not in h else h for h in args.have.split()} - set(CARRIED_ANYWAY)
    needed = closure("m3po", have | {canonicalize_name(s) for s in args.skip.split()}, args.python)
    out = Path(args.out)
    if out.exists():
        if not (out / "run.sh").is_file():  # never remove a folder this script did not make
            raise SystemExit(f"gpu_bundle: --out {out} exists and is not a bundle (no run.sh): choose another")
        shutil.rmtree(out)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    site = out / "site"
    minor = ".".join(args.python.split(".")[:2])
    abi = "cp" + minor.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
           "--python-version", minor, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none"]
    for tag in platforms:
        cmd += ["--platform", tag]
    print(f"gpu_bundle: {len(needed)} distributions for CPython {args.python}: {' '.join(sorted(needed))}")
    proc = subprocess.run(cmd + [f"{n}=={v}" for n, v in sorted(needed.items())], capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        return 1
    listed = sorted(wheels.glob("*.whl"), key=lambda w: -w.stat().st_size)
    for wheel in listed:
        zipfile.ZipFile(wheel).extractall(site)
    wheel_mib = sum(w.stat().st_size for w in listed) / 2**20
    largest = ", ".join(f"{w.name.split('-')[0]} {w.stat().st_size / 2**20:.1f}" for w in listed[:5])
    shutil.rmtree(wheels)
    src = out / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "assets")
    shutil.copytree(ROOT / "m3po_core", src / "m3po_core", ignore=ignore)
    (src / "m3po_core" / "assets").mkdir()
    shutil.copytree(ROOT / "flows", src / "m3po" / "flows", ignore=ignore)   # as installed: m3po.flows, m3po.tasks
    shutil.copytree(ROOT / "tasks", src / "m3po" / "tasks", ignore=ignore)
    shutil.copytree(ROOT / "configs", src / "configs")
    (src / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "gpu_check.py", src / "bench" / "gpu_check.py")
    (out / "run.sh").write_text(
        "#!/bin/sh\n# The GPU check with the carried packages (site/) and the project (src/), nothing installed.\n"
        "set -e\ncd \"$(dirname \"$0\")\"\n"
        "export PYTHONPATH=\"$PWD/site:$PWD/src\" HF_HUB_OFFLINE=1\n"
        "export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}\n"
        "cd src && exec \"${PYTHON:-python3}\" bench/gpu_check.py --work ../work \"$@\"\n")
    (out / "run.sh").chmod(0o755)
    archive = out.with_suffix(".tar.xz")
    partial = archive.with_name(archive.name + ".partial")   # renamed when whole: no half-written archive
    with tarfile.open(partial, "w:xz") as tar:
        tar.add(out, arcname=out.name)
    partial.replace(archive)
    mib = archive.stat().st_size / 2**20
    print(f"gpu_bundle: {archive} {mib:.1f} MiB ({len(listed)} wheels of {wheel_mib:.1f} MiB; largest: {largest})")
    if mib > args.max_mib:
        print(f"gpu_bundle: over --max-mib {args.max_mib}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
