"""The install story stays consistent: pins, lock file, conda env, README, Makefile, CI."""

from __future__ import annotations

import re
import tomllib

import yaml
from conftest import REPO

from loramill.software import LIBRARIES, RUNS_ALSO


def pins(lines):
    found = {}
    for line in lines:
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if match:
            found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def project_pins():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pins(pyproject["project"]["dependencies"])


def test_every_runtime_dependency_is_pinned_and_torch_is_2_13():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert len(project_pins()) == len(declared)
    assert project_pins()["torch"] == "2.13.0"


def test_the_libraries_whose_versions_matter_are_pinned():
    # loramill.software's list is the one an adapter's provenance and every key read: each is
    # an exact pin, so two installs from this repository compute the same adapters
    also = {name for names in RUNS_ALSO.values() for name in names}
    assert {*LIBRARIES, *RUNS_ALSO, *also} <= set(project_pins())


def test_lock_file_agrees_with_the_pins():
    locked = pins((REPO / "constraints.txt").read_text().splitlines())
    for name, version in project_pins().items():
        assert locked.get(name) == version, name
    assert not any(name.startswith("nvidia-") for name in locked), "CUDA wheels in the lock"
    assert "torchvision" not in locked


def test_conda_env_mirrors_the_pins():
    env = yaml.safe_load((REPO / "envs" / "loramill.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pins(pip_section) == project_pins()
    assert "python=3.11" in env["dependencies"]


def test_readme_commands_are_the_makefile_targets_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.MULTILINE)
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE)
    assert "snakemake --cores 1 train_all" in makefile


def test_ci_and_makefile_never_install_torch_unpinned():
    makefile = (REPO / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line]
    assert installs and all(
        "torch==2.13.0" in line or "-c constraints.txt" in line for line in installs
    )


def test_makefile_publish_and_lock_targets_resolve():
    import subprocess

    result = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", "publish", "lock"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "-m loramill.publish" in result.stdout
    assert "pip freeze --exclude-editable" in result.stdout
