"""The native stream meter (``stream_meter.c``, an Envoy dynamic module): built on first use.

``tollgate up`` (and the tests, and the loadtest) compile it with the machine's C compiler
into a cache keyed by the source's hash, so a rebuild happens only when the source changes and
a second gateway on the machine reuses the first one's build. No compiler, or a failed build:
:func:`build` returns None and the gateway meters streams with the Lua meter, as before
(``metering.stream_meter: native`` makes that an error instead). ``tollgate render-envoy``
never uses it: a bootstrap rendered for another machine (docker-compose, Kubernetes) cannot
name a file on this one, so it keeps the Lua meter.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("stream_meter.c")
CACHE_ENV = "TOLLGATE_CACHE_DIR"
_FLAGS = ("-O2", "-std=c11", "-D_POSIX_C_SOURCE=200809L", "-shared", "-fPIC", "-Wall")


class BuildError(RuntimeError):
    """The native meter could not be built; the message says why."""


def cache_dir() -> Path:
    """Where builds go: $TOLLGATE_CACHE_DIR, else $XDG_CACHE_HOME/tollgate, else ~/.cache."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tollgate"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def build(directory: Path | None = None) -> Path:
    """The built module (built now if this source has not been yet); BuildError if it cannot be."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    directory = directory or cache_dir()
    target = directory / f"libtollgate_meter-{digest}.so"
    if target.is_file():
        return target
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler (cc, gcc or clang) on PATH")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # built beside the target, then renamed: a gateway starting at the same moment never
        # loads a half-written file
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
        os.close(fd)
    except OSError as exc:
        raise BuildError(f"cannot write to {directory}: {exc}") from exc
    try:
        done = subprocess.run(
            [cc, *_FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise BuildError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        with_tmp = Path(tmp)
        if with_tmp.exists():
            with_tmp.unlink()
    return target


def main() -> int:
    """``python -m extproc.native_meter``: build now and print the module's path."""
    print(build())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
