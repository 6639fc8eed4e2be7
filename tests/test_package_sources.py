"""Extra training sources for the demo pair: only permissively licensed packages."""

from __future__ import annotations

import pytest

from tools.package_sources import package, permissive
from tools.train_demo_models import is_heldout, load_corpus


@pytest.mark.parametrize(
    ("licence", "ok"),
    [
        ("MIT", True),
        ("BSD-3-Clause", True),
        ("Apache-2.0 OR BSD-2-Clause", True),
        ("Python Software Foundation License", True),
        ("ISC License (ISCL)", True),
        ("MPL-2.0 AND MIT", False),  # tqdm: one part is not permissive
        ("GPL-3.0-or-later", False),
        ("LGPLv2+", False),
        ("", False),
        ("Proprietary", False),
    ],
)
def test_permissive_licences_only(licence: str, ok: bool) -> None:
    assert permissive(licence) is ok


def test_an_installed_mit_package_qualifies_without_its_tests() -> None:
    pkg = package("pluggy")  # MIT, installed with pytest
    assert permissive(pkg.licence)
    assert pkg.files and all(p.suffix == ".py" and p.is_file() for p in pkg.files)
    assert all("tests" not in p.parts for p in pkg.files)
    assert all(pkg.rel(p).startswith("pluggy/") for p in pkg.files)


def test_missing_or_non_permissive_packages_are_refused() -> None:
    with pytest.raises(LookupError, match="not installed"):
        package("no-such-distribution-dsi")
    with pytest.raises(LookupError, match="not on the permissive list"):
        package("tqdm")  # MPL-2.0 AND MIT


def test_package_files_join_the_train_split_only() -> None:
    base = load_corpus()
    more = load_corpus(["pluggy"])
    assert more.heldout == base.heldout  # the held-out set stays the stdlib's
    added = more.train[len(base.train) :]
    assert added and all(rel.startswith("pluggy/") and not is_heldout(rel) for rel, _ in added)
    (record,) = more.packages
    assert record["name"] == "pluggy" and record["train_files"] == len(added)
    assert record["train_bytes"] == sum(len(t.encode()) for _, t in added)
