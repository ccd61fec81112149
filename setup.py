"""Build hook: compile the hot modules with mypyc when a C compiler (and Python's headers) and
mypy are there, else install the same modules as pure Python (issue 19, lever 1).

Everything else about the package is in setup.cfg. The modules compiled are
`blockspace.build.COMPILED_MODULES`; BLOCKSPACE_PURE=1 in the environment builds none.
A compiler that is there but fails on mypyc's output fails the install: a silent fallback
would hide a broken build behind a slower one (`blockspace --version` says which one runs).
"""

import ast
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
PURE_ENV = "BLOCKSPACE_PURE"
COMPILED_DIGESTS: dict[str, str] = {}  # module -> SHA-256 of the source handed to mypyc


def say(message: str) -> None:
    print(f"blockspace build: {message}", file=sys.stderr)


def build_constant(name: str) -> object:
    """A constant of blockspace/build.py, read without importing the package."""
    tree = ast.parse((HERE / "blockspace" / "build.py").read_text())
    for node in tree.body:
        if (isinstance(node, ast.AnnAssign | ast.Assign) and node.value is not None
                and name in [t.id for t in getattr(node, "targets", [getattr(node, "target", None)])
                             if isinstance(t, ast.Name)]):
            return ast.literal_eval(node.value)
    raise SystemExit(f"blockspace/build.py has no {name}")


def compiled_modules() -> list[str]:
    names = build_constant("COMPILED_MODULES")
    assert isinstance(names, tuple)
    return [str(name) for name in names]


def compiler_works() -> bool:
    """Can this machine build a Python extension: a C compiler that finds Python.h?"""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as scratch:
        probe = os.path.join(scratch, "probe.c")
        with open(probe, "w") as f:
            f.write("#include <Python.h>\nint probe(void) { return Py_IsInitialized(); }\n")
        try:
            compiler.compile([probe], output_dir=scratch,
                             include_dirs=[sysconfig.get_paths()["include"]])
        # any failure: its errors come from whichever distutils the compiler class is from
        except Exception as error:  # noqa: BLE001
            say(f"no working C compiler ({str(error).splitlines()[0] if str(error) else error})")
            return False
    return True


def metadata_only() -> bool:
    """pip runs this file once per build hook; those that only want metadata need no mypyc
    run (a minute or more of type-checking and code generation)."""
    commands = {arg for arg in sys.argv[1:] if not arg.startswith("-")}
    return bool(commands) and commands <= {"egg_info", "dist_info", "sdist"}


def ext_modules() -> list[object]:
    if metadata_only():
        return []
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        say(f"{PURE_ENV} is set: pure Python")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        say("mypy (mypyc) is not installed: pure Python")
        return []
    if not compiler_works():
        say("pure Python")
        return []
    paths = [str(Path(*name.split("."))) + ".py" for name in compiled_modules()]
    # the sources as mypyc reads them now, not as they may be once the build is done
    COMPILED_DIGESTS.update((name, hashlib.sha256((HERE / path).read_bytes()).hexdigest())
                            for name, path in zip(compiled_modules(), paths, strict=True))
    say(f"compiling {', '.join(paths)} with mypyc")
    # group_name: one shared library named after the package, not after a hash of the paths
    return list(mypycify(paths, opt_level="3", group_name="blockspace"))


class build_ext_with_stamp(build_ext):  # noqa: N801 (setuptools' command naming)
    """build_ext, then the SHA-256 of each compiled source next to the compiled package
    (blockspace/build.py STAMP): how an in-place build knows it has gone stale."""

    def run(self) -> None:
        super().run()
        if not self.extensions:
            return
        name = next(iter(COMPILED_DIGESTS))
        package = Path(self.get_ext_fullpath(name)).parents[len(name.split(".")) - 2]
        package.mkdir(parents=True, exist_ok=True)
        stamp = package / str(build_constant("STAMP"))
        stamp.write_text(json.dumps(COMPILED_DIGESTS, indent=1) + "\n")


setup(ext_modules=ext_modules(), cmdclass={"build_ext": build_ext_with_stamp})
