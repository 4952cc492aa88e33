"""Build ``dlib_oracle`` (oracle.cpp) against dlib's own source, fetched from PyPI.

Why a script and not CMake: the oracle is a test tool, two translation units compiled with
the system C++ compiler (``dlib/all/source.cpp`` and ``oracle.cpp``), no BLAS, no CUDA, no
GUI, no image libraries — so builds are portable and identical in CI and on a laptop.

* The dlib sdist (``dlib==20.0.1``, the version of the ``dlib-bin`` wheel the package tests
  with) is downloaded with pip into ``.cache/dlib_sdist/`` (git-ignored) when missing and
  checked against its pinned SHA-256.  Nothing fetched is committed.
* The binary lands in ``.cache/dlib_oracle/<key>/dlib_oracle`` where ``key`` hashes the
  sdist, oracle.cpp, the compiler identity and the flags: a rebuild happens only when one
  of them changes.  The two objects compile in parallel; the result is moved into place
  atomically, under a file lock, so concurrent test sessions build once.

Usage: ``python tools/dlib_oracle/build.py`` prints the binary's path (building if needed).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = REPO / ".cache"
SDIST_DIR = CACHE / "dlib_sdist"
BUILD_ROOT = CACHE / "dlib_oracle"

DLIB_VERSION = "20.0.1"
SDIST_NAME = f"dlib-{DLIB_VERSION}.tar.gz"
SDIST_SHA256 = "7cb2a09467de032332c743bc967007f016598c66c9c9ebc54a5b66d3d9e46d54"

CXX = os.environ.get("CXX", "c++")
# Portable optimisation (no -march=native): the oracle's numbers must not depend on the CPU.
CXXFLAGS = ["-std=c++17", "-O2", "-DDLIB_NO_GUI_SUPPORT", "-DDLIB_DISABLE_ASSERTS", "-w"]
LIBS = ["-lpthread"]


class OracleBuildError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(dest: Path) -> None:
    """pip has to prepare the sdist's metadata; without build isolation that is seconds
    (setuptools present), with it pip first installs dlib's build requirements."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "dlib",
            "-d", str(dest), f"dlib=={DLIB_VERSION}"]
    errors = []
    for extra in (["--no-build-isolation"], []):
        r = subprocess.run(base + extra, capture_output=True, text=True)
        if r.returncode == 0 and (dest / SDIST_NAME).is_file():
            return
        errors.append(r.stderr.strip()[-2000:])
    raise OracleBuildError("pip could not download the dlib sdist:\n" + "\n---\n".join(errors))


def sdist_path() -> Path:
    """The verified dlib sdist, downloaded when missing."""
    SDIST_DIR.mkdir(parents=True, exist_ok=True)
    path = SDIST_DIR / SDIST_NAME
    if not path.is_file():
        _pip_download(SDIST_DIR)
    digest = _sha256(path)
    if digest != SDIST_SHA256:
        raise OracleBuildError(f"{path}: SHA-256 {digest}, expected {SDIST_SHA256} (delete it to re-download)")
    return path


def _compiler_id() -> str:
    r = subprocess.run([CXX, "--version"], capture_output=True, text=True)
    if r.returncode != 0:
        raise OracleBuildError(f"no working C++ compiler ({CXX} --version failed): {r.stderr.strip()}")
    return r.stdout.splitlines()[0] if r.stdout else CXX


def _key(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def build_key(sdist: Path, source: str = "oracle.cpp") -> str:
    return _key(SDIST_SHA256, (HERE / source).read_bytes().hex(), _compiler_id(), " ".join(CXXFLAGS + LIBS))


def _dlib_object() -> Path:
    """Where dlib's own object (``dlib/all/source.cpp``, minutes to compile) is kept: it depends
    on the sdist, the compiler and the flags only, so every oracle program and every edit of
    one links the same object."""
    return BUILD_ROOT / f"dlib_all-{_key(SDIST_SHA256, _compiler_id(), ' '.join(CXXFLAGS))}.o"


def _compile(src_root: Path, out: Path, log, source: str = "oracle.cpp") -> None:
    jobs = []
    dlib_obj = _dlib_object()
    objs = [dlib_obj, out.parent / "oracle.o"]
    sources = [(src_root / "dlib" / "all" / "source.cpp", out.parent / "dlib_all.o")] if not dlib_obj.is_file() else []
    for src, obj in sources + [(HERE / source, objs[1])]:
        cmd = [CXX, *CXXFLAGS, "-I", str(src_root), "-c", str(src), "-o", str(obj)]
        jobs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failed = []
    for cmd, p in jobs:
        text, _ = p.communicate()
        if p.returncode != 0:
            failed.append(" ".join(cmd) + "\n" + text[-4000:])
    if failed:
        raise OracleBuildError("compiling the dlib oracle failed:\n" + "\n".join(failed))
    if sources:
        os.replace(sources[0][1], dlib_obj)
    cmd = [CXX, *map(str, objs), "-o", str(out), *LIBS]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise OracleBuildError("linking the dlib oracle failed:\n" + r.stderr[-4000:])


def build(verbose: bool = True, source: str = "oracle.cpp") -> Path:
    """Path of the built oracle (``source``: oracle.cpp, or zoo_oracle.cpp for the other
    shipped networks); builds it (once, under a lock) if needed."""
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    sdist = sdist_path()
    key = build_key(sdist, source)
    target = BUILD_ROOT / key / Path(source).stem
    if target.is_file():
        return target
    BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    with open(BUILD_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():          # another process built it while we waited
            return target
        t0 = time.monotonic()
        log(f"building {source} ({key}) from {sdist.name} ...")
        with tempfile.TemporaryDirectory(dir=BUILD_ROOT, prefix=".build-") as tmp:
            tmp = Path(tmp)
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(f"dlib-{DLIB_VERSION}/dlib/")]
                try:
                    tar.extractall(tmp, members=members, filter="data")
                except TypeError:     # Python without extraction filters (< 3.10.12)
                    tar.extractall(tmp, members=members)
            out = tmp / "bin" / Path(source).stem
            out.parent.mkdir()
            _compile(tmp / f"dlib-{DLIB_VERSION}", out, log, source)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(out, target)
        log(f"built {target} in {time.monotonic() - t0:.0f} s")
    return target


def clean_old_builds(keep: Path) -> None:
    """Remove other builds of the same program (old source versions)."""
    for d in BUILD_ROOT.iterdir():
        if d.is_dir() and not d.name.startswith(".") and d != keep.parent and (d / keep.name).exists():
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    try:
        path = build()
    except OracleBuildError as e:
        print(f"build.py: {e}", file=sys.stderr)
        sys.exit(1)
    clean_old_builds(path)
    print(path)
