"""``scripts/pca_more_cells.py``, the PCA check behind BENCHMARKS.md's "Pretraining on more
cells than are evaluated": it scores PCA fitted on DATA alone and on DATA plus EXTRA, on
DATA's labelled cells, and refuses input that is not counts or shares no gene, naming the
file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "pca_more_cells.py"


def groups(path: Path, n_per: int, genes: list[str], seed: int, labels: bool = True, x=None):
    """Three cell types of `n_per` cells, each with its own ten marker genes, as counts."""
    rng = np.random.default_rng(seed)
    n = 3 * n_per
    y = np.repeat(["a", "b", "c"], n_per)
    rate = np.full((n, len(genes)), 1.0)
    for t in range(3):
        rate[y == "abc"[t], 10 * t : 10 * t + 10] = 12.0
    counts = rng.poisson(rate).astype(np.float32) if x is None else x
    obs = pd.DataFrame({"cell_type": y} if labels else {}, index=[f"{path.stem}{i}" for i in range(n)])
    ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_scores_pca_on_the_labelled_cells_with_and_without_the_extra_ones(tmp_path):
    genes = [f"g{i}" for i in range(40)]
    groups(tmp_path / "data.h5ad", 40, genes, 0)
    # The extra file lacks the last five genes and orders the rest differently.
    extra_genes = genes[:35][::-1]
    groups(tmp_path / "extra.h5ad", 20, genes, 1, labels=False)
    e = ad.read_h5ad(tmp_path / "extra.h5ad")
    e[:, extra_genes].copy().write_h5ad(tmp_path / "extra.h5ad")
    p = run(str(tmp_path / "data.h5ad"), str(tmp_path / "extra.h5ad"), "--label-key", "cell_type", "--runs", "3")
    assert p.returncode == 0, p.stderr
    assert f"{tmp_path / 'extra.h5ad'}: 60 cells, 35 of" in p.stdout, p.stdout
    rows = [line for line in p.stdout.splitlines() if line.startswith("PCA on")]
    assert [r.split()[2] for r in rows] == ["120", "180"], p.stdout
    for r in rows:
        # Three well-separated types: both fits transfer labels almost perfectly.
        assert float(r.split("kNN cosine ")[1].split()[0]) > 0.95, r
        assert float(r.split("k-means ARI ")[1].split()[0]) > 0.9, r


def test_refuses_values_that_are_not_counts_and_files_sharing_no_gene(tmp_path):
    genes = [f"g{i}" for i in range(40)]
    groups(tmp_path / "data.h5ad", 10, genes, 0)
    x = np.random.default_rng(2).poisson(2.0, (30, 40)).astype(np.float32)
    x[3, 4] = 0.5
    groups(tmp_path / "frac.h5ad", 10, genes, 3, labels=False, x=x)
    p = run(str(tmp_path / "data.h5ad"), str(tmp_path / "frac.h5ad"), "--label-key", "cell_type")
    assert p.returncode != 0
    assert f"{tmp_path / 'frac.h5ad'}: X holds 1 values that are not counts" in p.stderr, p.stderr

    groups(tmp_path / "other.h5ad", 10, [f"h{i}" for i in range(40)], 4, labels=False)
    p = run(str(tmp_path / "data.h5ad"), str(tmp_path / "other.h5ad"), "--label-key", "cell_type")
    assert p.returncode != 0
    assert f"{tmp_path / 'other.h5ad'}: none of" in p.stderr, p.stderr

    p = run(str(tmp_path / "data.h5ad"), str(tmp_path / "data.h5ad"), "--label-key", "missing")
    assert p.returncode != 0
    assert "no obs column 'missing'" in p.stderr, p.stderr
