"""Files FlowOps reads at run time, shipped inside the package so a wheel works like a checkout.

- `kuberay-crds/`: the KubeRay CRD schemas `flowops cluster validate` checks against;
- `flowops.resources.cluster`: the repository's `cluster/` tree (kustomize base and overlays,
  monitoring rules and dashboards, the runtime image), mapped into the package by pyproject.toml.

Found with `importlib.resources`, never through a path relative to the source checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def cluster_tree() -> Path:
    """The `cluster/` tree: the checkout's folder (editable install) or the wheel's copy."""
    return Path(str(resources.files("flowops.resources.cluster")))


def monitoring_dir() -> Path:
    return cluster_tree() / "monitoring"


def crd_dir() -> Path:
    return Path(str(resources.files("flowops.resources") / "kuberay-crds"))
