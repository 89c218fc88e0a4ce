"""Fixtures of the operator tests: the full Kubernetes control plane, once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import kubefull
from support.kubefull import FullKube


@pytest.fixture(scope="session")
def full_kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullKube]:
    """etcd, kube-apiserver, controller manager, scheduler and a hollow node per Kubernetes host of
    examples/cluster-cr.yaml (GPUs advertised, labels as the manifest selects them); always stopped,
    so nothing it started outlives the session."""
    folder = tmp_path_factory.mktemp("full-kube")
    try:
        yield kubefull.start(folder, kubefull.nodes_of(kubefull.example_cluster()))
    finally:
        kubefull.stop(folder)
