"""dist_vdr.compat: every use of a library internal names the versions it was checked against, the
installed set passes, and a version outside a range is refused with one line naming the fix."""

from __future__ import annotations

import configparser
import importlib
import re
import tokenize
from pathlib import Path

import pytest

from conftest import REPO
from dist_vdr import compat

# Names of library internals: used in dist_vdr/compat.py only (as code; comments may mention them).
INTERNAL_NAMES = {
    "_ddp_replay_context", "_sample_value_str", "_xxhash_int64", "_EXCLUDE_DATASET_COLUMNS", "_row_hashes",
    "_validate_launch_command", "prepare_deepspeed_cmd_env", "prepare_multi_gpu_env",
    "deepspeed_fields_from_accelerate_config", "deepspeed_engine_wrapped", "distributed_type", "_requeue",
    "_no_split_modules", "_fingerprint", "_all_gather_base", "_reduce_scatter_base",
}


def _requirements() -> dict[str, str]:
    """Distribution name (lower case) -> its specifier in setup.cfg (install_requires and extras)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in cfg["options.extras_require"].values():
        lines += extra.splitlines()
    out = {}
    for line in filter(None, (x.strip() for x in lines)):
        name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", line).groups()
        out[name.lower()] = spec
    return out


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version.strip()
    return pins


def test_every_seam_names_its_range_the_tested_version_and_its_user():
    assert len({s.key for s in compat.SEAMS}) == len(compat.SEAMS)
    requirements, pins = _requirements(), _pins()
    for seam in compat.SEAMS:
        assert seam.what and seam.why and seam.used_by, seam.key
        assert compat._release(seam.low) < compat._release(seam.high), seam.key
        assert seam.covers(seam.tested), seam.key
        assert seam.range == f">={seam.low},<{seam.high}"
        # The tested version is the one constraints.txt installs; setup.cfg allows nothing newer.
        assert pins[seam.library] == seam.tested, seam.key
        assert f"<{seam.high}" in requirements[seam.library], (seam.key, requirements[seam.library])
        if not seam.tolerant:  # nor anything older than the range: pip refuses what the run would refuse
            assert f">={seam.low}," in requirements[seam.library], (seam.key, requirements[seam.library])


def test_every_seam_user_exists():
    for seam in compat.SEAMS:
        for user in seam.used_by.split(","):
            module, *attrs = user.strip().split(".")
            obj = importlib.import_module(f"dist_vdr.{module}")
            for attr in attrs:
                if not hasattr(obj, attr):  # a sub-module (data.startup.scan_rows)
                    obj = importlib.import_module(f"{obj.__name__}.{attr}")
                    continue
                obj = getattr(obj, attr)


def test_installed_versions_pass():
    compat.check()
    for seam in compat.SEAMS:
        if compat.installed_version(seam.library) is not None:
            assert compat.problem(seam) is None


@pytest.mark.parametrize("library,version", [("transformers", "5.25.0"), ("transformers", "5.23.2"),
                                             ("sentence-transformers", "6.3.0"), ("accelerate", "1.16.0.dev0"),
                                             ("torch", "2.15.0+cu130"), ("datasets", "5.1.0")])
def test_a_version_outside_a_range_is_refused_in_one_line(monkeypatch, library, version):
    real = compat.installed_version
    monkeypatch.setattr(compat, "installed_version", lambda lib: version if lib == library else real(lib))
    with pytest.raises(compat.UntestedVersion) as err:
        compat.check()
    message = str(err.value)
    seam = next(s for s in compat.SEAMS if s.library == library)
    assert "\n" not in message
    assert message.startswith(f"{library} {version} is installed")
    assert f"{library}{seam.range}" in message and f"tested: {seam.tested}" in message
    assert f"pip install -c constraints.txt '{library}{seam.range}'" in message
    assert isinstance(err.value, ValueError)  # the CLI reports it as one `error:` line, exit 2
    compat.check(libraries=tuple({s.library for s in compat.SEAMS} - {library}))  # the others still pass


def test_a_use_outside_its_range_raises_before_touching_the_library(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda lib: "5.30.0" if lib == "transformers" else "0")
    called = []
    with pytest.raises(compat.UntestedVersion, match=r"transformers 5\.30\.0 is installed.*Trainer\._run_epoch"):
        compat.run_epoch(lambda: called.append(1))
    assert not called
    assert compat.dataset_fingerprint(object()) is None  # tolerant uses never raise


def test_a_missing_library_is_skipped_by_check_and_named_by_its_use(monkeypatch):
    real = compat.installed_version
    monkeypatch.setattr(compat, "installed_version", lambda lib: None if lib == "submitit" else real(lib))
    compat.check()
    with pytest.raises(compat.UntestedVersion, match=r"^submitit is not installed.*pip install -c constraints"):
        compat.requeue(object())


def test_release_numbers():
    assert compat._release("2.14.1+cu130") == (2, 14, 1)
    assert compat._release("6.2") == (6, 2, 0)
    seam = compat.Seam("k", library="x", low="0.19.8", high="0.20", tested="0.19.8", what="w", used_by="u", why="y")
    assert seam.covers("0.19.8") and seam.covers("0.19.12")
    assert not seam.covers("0.19.7") and not seam.covers("0.20.0rc1") and not seam.covers("0.20")


def test_library_internals_are_named_in_compat_only():
    found = []
    for path in sorted((REPO / "dist_vdr").rglob("*.py")):
        if path.name == "compat.py":
            continue
        with open(path, "rb") as f:
            found += [f"{Path(path).relative_to(REPO)}:{tok.start[0]} {tok.string}"
                      for tok in tokenize.tokenize(f.readline)
                      if tok.type == tokenize.NAME and tok.string in INTERNAL_NAMES]
    assert not found, found
