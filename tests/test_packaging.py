"""Packaging: setup.cfg declares ranges (installable next to a user's trainer), constraints.txt
pins the tested versions, and `make setup` installs with those pins."""

import configparser
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers.runs import REPO


def _requirements(value: str) -> list[Requirement]:
    return [Requirement(line) for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def _declared() -> list[Requirement]:
    cfg = _setup_cfg()
    reqs = _requirements(cfg["options"]["install_requires"])
    for extra in cfg["options.extras_require"].values():
        reqs += _requirements(extra)
    return reqs


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert m, f"constraints.txt: not an exact pin: {line!r}"
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def test_install_requires_and_extras_declare_ranges_not_exact_pins():
    for req in _declared():
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"exact pin in setup.cfg: {req}"


def test_every_declared_package_is_pinned_in_constraints_within_its_range():
    pins = _pins()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"pin {name}=={pins[name]} outside {req}"


def test_torch_pin_is_the_cpu_build_version_and_make_setup_uses_the_constraints():
    assert _pins()["torch"] == "2.13.0"
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()
