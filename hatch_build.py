"""Hatchling build hook: compile pbcore's optional C codec (pbcore/_speedups.c).

It runs for wheels and for editable installs (``pip install -e .``) and compiles
with the compiler this Python was built with, as sysconfig describes it (``CC``,
``CFLAGS``, ``CCSHARED``, ``LDSHARED``; the ``CC``, ``CFLAGS``, ``CPPFLAGS`` and
``LDFLAGS`` environment variables are honoured as distutils honoured them), in a
subprocess: no setuptools. A wheel gets the built module; an editable install
gets it next to the sources, in ``pbcore/``.

``PBCORE_BUILD_SPEEDUPS``: unset or empty, build if possible and on any failure
(no compiler, no Python headers, a compile error) warn and install the pure-Python
codec; ``0``, do not try; ``1``, a failure fails the install (CI uses this).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("pbcore") / "_speedups.c"
MODULE = "_speedups"


class SpeedupsBuildError(Exception):
    """The extension could not be compiled."""


def _config(name: str) -> str:
    value = sysconfig.get_config_var(name)
    return value if isinstance(value, str) else ""


def _compile(source: Path, target: Path, workdir: Path) -> None:
    """Compile *source* into the extension module *target* (raises SpeedupsBuildError)."""
    if sys.implementation.name != "cpython":
        raise SpeedupsBuildError(f"{sys.implementation.name} is not CPython")
    cc = os.environ.get("CC") or _config("CC")
    ldshared = os.environ.get("LDSHARED") or _config("LDSHARED")
    if not cc or not ldshared:
        raise SpeedupsBuildError("sysconfig names no C compiler for this Python (on Windows, use the pure codec)")
    if shutil.which(shlex.split(cc)[0]) is None:
        raise SpeedupsBuildError(f"no C compiler: {shlex.split(cc)[0]!r} is not on PATH")
    include = sysconfig.get_path("include")
    if not (Path(include) / "Python.h").is_file():
        raise SpeedupsBuildError(f"no Python headers: {include}/Python.h is missing")
    cflags = os.environ.get("CFLAGS", _config("CFLAGS"))
    cppflags = os.environ.get("CPPFLAGS", "")
    ldflags = os.environ.get("LDFLAGS", _config("LDFLAGS"))
    obj = workdir / f"{MODULE}.o"
    compile_cmd = [
        *shlex.split(cc),
        *shlex.split(cflags),
        *shlex.split(cppflags),
        *shlex.split(_config("CCSHARED")),
        "-I",
        include,
        "-c",
        str(source),
        "-o",
        str(obj),
    ]
    link_cmd = [*shlex.split(ldshared), *shlex.split(ldflags), str(obj), "-o", str(target)]
    for command in (compile_cmd, link_cmd):
        try:
            run = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
        except (OSError, subprocess.SubprocessError) as error:
            raise SpeedupsBuildError(f"{command[0]} did not run: {error}") from error
        if run.returncode != 0:
            raise SpeedupsBuildError(f"{shlex.join(command)} failed ({run.returncode}):\n{run.stderr[-3000:]}")


class SpeedupsHook(BuildHookInterface):
    """Builds pbcore._speedups into the wheel (or next to the sources for an editable install)."""

    PLUGIN_NAME = "custom"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._workdirs: list[Path] = []

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        for workdir in self._workdirs:
            shutil.rmtree(workdir, ignore_errors=True)

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        mode = os.environ.get("PBCORE_BUILD_SPEEDUPS", "")
        if mode == "0":
            self.app.display_info("pbcore: PBCORE_BUILD_SPEEDUPS=0, the compiled codec is not built")
            return
        root = Path(self.root)
        suffix = _config("EXT_SUFFIX") or ".so"
        name = f"{MODULE}{suffix}"
        workdir = Path(tempfile.mkdtemp(prefix="pbcore-build-"))
        self._workdirs.append(workdir)
        try:
            built = workdir / name
            _compile(root / SOURCE, built, workdir)
            if version == "editable":
                # The editable install puts the source tree on sys.path: the module goes there.
                shutil.copyfile(built, root / "pbcore" / name)
            else:
                build_data["force_include"][str(built)] = f"pbcore/{name}"
        except (SpeedupsBuildError, OSError) as error:
            if mode == "1":
                raise RuntimeError(
                    f"pbcore: building the compiled codec failed (PBCORE_BUILD_SPEEDUPS=1): {error}"
                ) from error
            self.app.display_warning(f"pbcore: the compiled codec was not built, the pure-Python one is used: {error}")
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        self.app.display_info(f"pbcore: built the compiled codec ({name})")
