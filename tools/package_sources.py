#!/usr/bin/env python3
"""More Python source for the demo pair's training data: the ``.py`` files of
installed packages whose licence allows it, checked from their metadata.

A package qualifies when its ``License-Expression`` or ``License`` field, or a
``License ::`` classifier, names one of the permissive licences in
``PERMISSIVE`` (MIT, BSD, Apache-2.0, ISC, PSF) and nothing else
(e.g. not GPL or MPL). Its files go through the same filters and the same
split as the standard library's (tests and generated code left out; a file is
held out when the SHA-256 of ``<package>/<path>`` is 0 modulo 20). Held-out
package files are left out of training and *not* added to the held-out set, so
the held-out perplexity stays comparable across pairs (the stdlib's split).

::

    python tools/package_sources.py                 # the suggested packages: licence, files, bytes
    python tools/package_sources.py click attrs     # these packages
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# Hand-written, general-purpose libraries (not generated protobuf or API-client code,
# data tables such as idna's, or vendored trees); all installed with dsi's dev dependencies.
SUGGESTED = (
    "anyio",
    "attrs",
    "click",
    "filelock",
    "h11",
    "jinja2",
    "jsonschema",
    "markdown-it-py",
    "packaging",
    "pluggy",
    "pyparsing",
    "python-dateutil",
    "rich",
    "typer",
)
PERMISSIVE = re.compile(r"\b(MIT|BSD|Apache|ISC|PSF|Python Software Foundation)\b", re.I)
NOT_PERMISSIVE = re.compile(r"\b(GPL|LGPL|AGPL|MPL|EUPL|SSPL|proprietary)\b", re.I)
SKIP_PARTS = {"tests", "test", "testing", "_vendor", "vendor", "__pycache__"}


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    licence: str
    files: list[Path]  # absolute paths of its .py files (filtered)
    root: Path  # what the files' relative paths start from

    def rel(self, path: Path) -> str:
        return f"{self.name}/{path.relative_to(self.root).as_posix()}"


def licence_of(dist: md.Distribution) -> str:
    """The licence as the metadata states it: the SPDX expression, else the
    ``License`` field's first line, else the classifiers."""
    meta = dist.metadata
    expr = meta.get("License-Expression")
    if expr:
        return expr.strip()
    field = (meta.get("License") or "").strip().splitlines()
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    if classifiers:
        return " / ".join(classifiers)
    return field[0][:80] if field else ""


def permissive(licence: str) -> bool:
    return bool(PERMISSIVE.search(licence)) and not NOT_PERMISSIVE.search(licence)


def package(name: str) -> Package:
    """The installed distribution ``name`` and its usable source files; raises
    ``LookupError`` when it is missing or its licence does not qualify."""
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError as e:
        raise LookupError(f"{name}: not installed") from e
    licence = licence_of(dist)
    if not permissive(licence):
        raise LookupError(f"{name}: licence {licence!r} is not on the permissive list")
    root = Path(str(dist.locate_file("")))
    files = []
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if not str(f).endswith(".py") or SKIP_PARTS & set(parts) or parts[-1].startswith("test_"):
            continue
        if any(p.endswith((".dist-info", ".egg-info")) for p in parts):
            continue
        path = Path(str(dist.locate_file(f)))
        if path.is_file():
            files.append(path)
    return Package(dist.metadata["Name"], dist.version, licence, sorted(files), root)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("packages", nargs="*", help=f"distribution names (default: {', '.join(SUGGESTED)})")
    args = ap.parse_args(argv)
    total = 0
    for name in args.packages or SUGGESTED:
        try:
            pkg = package(name)
        except LookupError as e:
            print(f"skip {e}")
            continue
        size = sum(p.stat().st_size for p in pkg.files)
        total += size
        print(f"{pkg.name:20} {pkg.version:10} {pkg.licence:30} {len(pkg.files):4} files {size / 1e6:6.2f} MB")
    print(f"total {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
