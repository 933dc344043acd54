"""Checks behind BENCHMARKS.md's "The per-gene decoder on standardised targets, and the
embedding's length" and "Lighter views and the learning rate" (issue 11), run with ``scfm_torch`` and scikit-learn on an
``scfm export`` folder and a labelled ``.h5ad`` with raw counts:

``decoder EXPORT DATA --label-key KEY --form FORM``
    Trains a fresh model of EXPORT's architecture and vocabulary on the GEPC decoder's loss
    alone (log1p targets over the model's genes, the cells' inference tokens, batch 32,
    AdamW 1e-3 with 50 warm-up steps and a cosine decay, seed 0), then reports the decoder's
    mean squared error on all cells, the participation ratio of the embedding and k-means
    ARI (k = number of labels, mean of 5 runs, each the best of 10 restarts) on the
    L2-normalised embedding. FORM: ``gene_query`` (scGPT's MVC, sigmoid queries),
    ``linear_query`` (the same without the sigmoid) or ``per_gene``.

``recon EXPORT DATA --label-key KEY``
    The trained model's GEPC decoder (log1p targets) against the cells' profiles over the
    model's genes: its mean squared error, that of the genes' means alone, and that of the
    best reconstruction from 1, 5, 10 and 50 principal components.

``norm EXPORT DATA --label-key KEY``
    k-means ARI of the trained model's pooled embedding as it is and L2-normalised, and of
    PCA-50 (scanpy's recipe, with and without ``scale``) as it is and L2-normalised.

``types EXPORT DATA --label-key KEY``
    Per cell type, for a model whose GEPC decoder predicts standardised values
    (``gepc_target: scaled``): the share of the type's variance (the standardised log1p
    profile over the model's genes, standardised over these cells and clipped at +-10, as in
    training; the decoder's own statistics come from its training cells, so run it on the
    cells the model was trained on) that the decoder's reconstruction from the pooled
    embedding explains, against
    that of PCA-50's reconstruction of the same matrix; and, in each of the two embeddings
    (scaled to unit root-mean-square norm), the distance from the type's centroid to the
    nearest other type's centroid and the type's spread (root-mean-square distance to its
    centroid). Where the decoder explains much less than PCA, the embedding has not learned
    the type. Then how k-means (k = number of labels, seed 0) splits the biggest type in
    each embedding and which other types share its clusters; with ``--batch-key`` also
    those clusters against the batches, the genes whose means differ most between batches
    within the biggest type, and, for the four biggest types, the share of their variance
    that lies between batches.

``kmeans EXPORT [EXPORT ...] DATA --label-key KEY [--runs N]``
    k-means ARI (k = number of labels; N runs, default 20, each the best of 10 restarts,
    seeds 0..N-1) of PCA-50 (scanpy's recipe as ``scfm evaluate`` runs it: 2,000 HVG
    seurat_v3 on the counts, normalize_total 1e4, log1p, scale, 50 PCs) and of each
    export's pooled embedding as written, with the runs' mean, standard deviation, standard
    error and range: ``scfm evaluate``'s five runs leave a standard error of about 0.04 on
    a set like Baron pancreas, too coarse to compare a model with PCA on one seed.

    .venv/bin/python scripts/embedding_checks.py norm runs/x/export data/baron_human.h5ad --label-key cell_type1
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import scfm_torch  # noqa: E402
from scfm_torch.inference import collate, tokenize  # noqa: E402

warnings.filterwarnings("ignore")


def kmeans_ari(z: np.ndarray, labels: np.ndarray) -> float:
    k = len(set(labels))
    return float(np.mean([adjusted_rand_score(labels, KMeans(k, n_init=10, random_state=s).fit_predict(z)) for s in range(5)]))


def unit(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def participation_ratio(z: np.ndarray) -> float:
    ev = np.linalg.svd(z - z.mean(0), compute_uv=False) ** 2
    return float(ev.sum() ** 2 / (ev**2).sum())


def pooled(model, tokens) -> torch.Tensor:
    return torch.cat([model.encode(**collate(tokens[a : a + 256]))[1] for a in range(0, len(tokens), 256)])


def log1p_targets(model, adata) -> torch.Tensor:
    """log1p(normalize_total over the model's genes) of the model's genes, as in training."""
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    ids = [v.gene_id for v in model.vocab]
    cols = pd.Index(adata.var_names).get_indexer(ids)
    if (cols < 0).any():
        raise SystemExit(f"{(cols < 0).sum()} of the model's genes are not in the data's var_names")
    xv = x[:, cols].astype(np.float64)
    t = np.log1p(xv / np.maximum(xv.sum(1, keepdims=True), 1e-12) * model.target_sum)
    return torch.tensor(t, dtype=torch.float32)


def decoder_check(args, ref, adata, labels) -> None:
    torch.manual_seed(0)
    tokens, _ = tokenize(ref, adata)
    target = log1p_targets(ref, adata)
    model = type(ref)(ref.cfg, ref.n_genes)
    g, h = ref.n_genes, ref.cfg.hidden
    free = torch.nn.Linear(h, g)
    with torch.no_grad():
        free.weight.normal_(0, 0.02)
        free.bias.copy_(target.mean(0))

    def decode(cell):
        if args.form == "per_gene":
            return free(cell)
        q = model.gepc.gene(model.embed.gene.weight[scfm_torch.model.OFFSET :])
        if args.form == "gene_query":
            q = torch.sigmoid(q)
        return model.gepc.cell(cell) @ q.T + model.gepc.bias

    params = list(model.parameters()) + (list(free.parameters()) if args.form == "per_gene" else [])
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(0)
    for s in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1, (s + 1) / 50) * 0.5 * (1 + np.cos(np.pi * s / args.steps))
        i = rng.choice(len(tokens), 32, replace=False)
        _, cell = model.encode(**collate([tokens[j] for j in i]))
        loss = ((decode(cell) - target[i]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        cell = pooled(model, tokens)
        mse = float(((decode(cell) - target) ** 2).mean())
    z = unit(cell.numpy().astype(np.float64))
    print(f"{args.form}: {args.steps} steps, decoder MSE {mse:.3f}, participation ratio "
          f"{participation_ratio(z):.1f}, k-means ARI {kmeans_ari(z, labels):.3f}")


def recon_check(args, model, adata, labels) -> None:
    if model.gepc is None or model.cfg.gepc_target != "log1p":
        raise SystemExit("the reconstruction check needs a model whose GEPC decoder predicts log1p values")
    model.eval()
    tokens, _ = tokenize(model, adata)
    t = log1p_targets(model, adata).numpy().astype(np.float64)
    with torch.no_grad():
        pred = model.gepc_forward(pooled(model, tokens)).numpy().astype(np.float64)
    s = np.linalg.svd(t - t.mean(0), compute_uv=False) ** 2
    pcs = ", ".join(f"{k} PCs {(s.sum() - s[:k].sum()) / t.size:.3f}" for k in (1, 5, 10, 50))
    print(f"decoder MSE {((pred - t) ** 2).mean():.3f}; the genes' means {t.var(0).mean():.3f}; {pcs}")


def norm_check(args, model, adata, labels) -> None:
    import scanpy as sc

    model.eval()
    tokens, _ = tokenize(model, adata)
    with torch.no_grad():
        c = pooled(model, tokens).numpy().astype(np.float64)
    n = np.linalg.norm(c, axis=1)
    print(f"scfm: norm CV {n.std() / n.mean():.2f}, k-means ARI {kmeans_ari(c, labels):.3f} as written, "
          f"{kmeans_ari(unit(c), labels):.3f} L2-normalised")
    b = adata.copy()
    b.X = b.X.astype(np.float32)
    sc.pp.highly_variable_genes(b, n_top_genes=2000, flavor="seurat_v3")
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    b = b[:, b.var.highly_variable].copy()
    x = b.X.toarray() if hasattr(b.X, "toarray") else np.asarray(b.X)
    scaled = np.clip((x - x.mean(0)) / np.maximum(x.std(0), 1e-8), -10, 10)
    from sklearn.decomposition import PCA

    for name, m in (("PCA-50, scaled", scaled), ("PCA-50, not scaled", x - x.mean(0))):
        z = PCA(50, random_state=0).fit_transform(m)
        print(f"{name}: k-means ARI {kmeans_ari(z, labels):.3f} as is, {kmeans_ari(unit(z), labels):.3f} L2-normalised")


def kmeans_check(args, adata, labels) -> None:
    import scanpy as sc
    from sklearn.decomposition import PCA

    k = len(set(labels))

    def summary(z: np.ndarray) -> str:
        r = np.array([adjusted_rand_score(labels, KMeans(k, n_init=10, random_state=s).fit_predict(z)) for s in range(args.runs)])
        sd = r.std(ddof=1) if len(r) > 1 else 0.0
        return f"{r.mean():.3f} (sd {sd:.3f}, se {sd / np.sqrt(len(r)):.3f}, runs {r.min():.3f}-{r.max():.3f})"

    b = adata.copy()
    b.X = b.X.astype(np.float32)
    sc.pp.highly_variable_genes(b, n_top_genes=min(2000, b.n_vars), flavor="seurat_v3")
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    b = b[:, b.var.highly_variable].copy()
    sc.pp.scale(b)
    z = PCA(50, random_state=0).fit_transform(np.asarray(b.X, dtype=np.float64))
    print(f"k-means ARI, k = {k}, {args.runs} runs each (best of 10 restarts)")
    print(f"PCA-50: {summary(z)}", flush=True)
    for path in args.more:
        model = scfm_torch.load(path)
        model.eval()
        tokens, _ = tokenize(model, adata)
        with torch.no_grad():
            c = pooled(model, tokens).numpy().astype(np.float64)
        print(f"{path}: {summary(c)}", flush=True)


def types_check(args, model, adata, labels) -> None:
    from sklearn.decomposition import PCA

    batches = None
    if args.batch_key:
        if args.batch_key not in adata.obs:
            raise SystemExit(f"{args.data}: no obs column {args.batch_key!r}")
        batches = adata.obs[args.batch_key].astype(str).values

    if model.gepc is None or model.cfg.gepc_target != "scaled":
        raise SystemExit("the types check needs a model whose GEPC decoder predicts standardised values")
    model.eval()
    tokens, _ = tokenize(model, adata)
    t = log1p_targets(model, adata).numpy().astype(np.float64)
    t = np.clip((t - t.mean(0)) / np.maximum(t.std(0), 1e-8), -10, 10)
    with torch.no_grad():
        c = pooled(model, tokens)
        pred = model.gepc_forward(c).numpy().astype(np.float64)
    c = c.numpy().astype(np.float64)
    pca = PCA(50, random_state=0).fit(t)
    z = pca.transform(t)
    rec = pca.inverse_transform(z)

    def geometry(e: np.ndarray) -> dict:
        e = e - e.mean(0)
        e = e / np.sqrt((e**2).sum(1).mean())
        cent = {u: e[labels == u].mean(0) for u in set(labels)}
        return {
            u: (min(np.linalg.norm(cent[u] - cent[v]) for v in cent if v != u),
                np.sqrt(((e[labels == u] - cent[u]) ** 2).sum(1).mean()))
            for u in cent
        }

    gs, gp = geometry(c), geometry(z)
    print("| type | cells | variance explained: decoder / PCA-50 | nearest other type: scfm / PCA | spread: scfm / PCA |")
    print("|---|---:|---:|---:|---:|")
    for u in sorted(set(labels), key=lambda u: -(labels == u).sum()):
        m = labels == u
        var = ((t[m] - t.mean(0)) ** 2).mean()
        ex_s = 1 - ((pred[m] - t[m]) ** 2).mean() / var
        ex_p = 1 - ((rec[m] - t[m]) ** 2).mean() / var
        print(f"| {u} | {m.sum()} | {ex_s:.2f} / {ex_p:.2f} | {gs[u][0]:.2f} / {gp[u][0]:.2f} | {gs[u][1]:.2f} / {gp[u][1]:.2f} |")
    tot = ((t - t.mean(0)) ** 2).mean()
    print(f"all cells: decoder explains {1 - ((pred - t) ** 2).mean() / tot:.3f}, PCA-50 {1 - ((rec - t) ** 2).mean() / tot:.3f}")
    k = len(set(labels))
    big = max(set(labels), key=lambda u: (labels == u).sum())
    for name, e in (("scfm", c), ("PCA-50", z)):
        cl = KMeans(k, n_init=10, random_state=0).fit_predict(e)
        print(f"\n{name}: k-means (k = {k}, seed 0) clusters of the {big} cells and what else each holds")
        for q, n in pd.Series(cl[labels == big]).value_counts().items():
            other = pd.Series(labels[(cl == q) & (labels != big)]).value_counts()
            print(f"  cluster {q}: {n} {big}" + "".join(f", {m} {u}" for u, m in other.items()))
        if args.batch_key:
            m = labels == big
            tab = pd.crosstab(pd.Series(cl[m], name="cluster"), pd.Series(batches[m], name=args.batch_key))
            print(tab.to_string())
    if args.batch_key:
        m = labels == big
        means = pd.DataFrame(t[m], columns=[v.symbol or v.gene_id for v in model.vocab]).groupby(batches[m]).mean()
        spread = (means.max() - means.min()).sort_values(ascending=False)
        print(f"\ngenes whose mean (standardised) differs most between {args.batch_key} groups within {big}: "
              + ", ".join(f"{g} {d:.2f}" for g, d in spread.head(8).items()))
        print(f"\nshare of each type's variance between {args.batch_key} groups: scfm / PCA-50")
        for u in sorted(set(labels), key=lambda u: -(labels == u).sum())[:4]:
            m = labels == u
            print(f"  {u}: {between_share(c[m], batches[m]):.2f} / {between_share(z[m], batches[m]):.2f}")


def between_share(e: np.ndarray, groups: np.ndarray) -> float:
    """The share of the rows' total variance that lies between the groups' means."""
    mu = e.mean(0)
    total = ((e - mu) ** 2).sum()
    between = sum((groups == g).sum() * ((e[groups == g].mean(0) - mu) ** 2).sum() for g in set(groups))
    return float(between / total)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=["decoder", "recon", "norm", "types", "kmeans"])
    p.add_argument("export", help="an `scfm export` folder")
    p.add_argument("more", nargs="*", help="kmeans: more export folders, then DATA last")
    p.add_argument("--runs", type=int, default=20, help="kmeans: k-means runs per embedding")
    p.add_argument("--label-key", required=True)
    p.add_argument("--batch-key", help="types: also the biggest type's k-means clusters against this obs column")
    p.add_argument("--form", choices=["gene_query", "linear_query", "per_gene"], default="per_gene")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if not args.more:
        p.error("DATA is required")
    args.more, args.data = [args.export, *args.more[:-1]], args.more[-1]
    if args.check != "kmeans" and len(args.more) > 1:
        p.error(f"{args.check} takes one EXPORT")
    torch.set_num_threads(args.threads)
    adata = ad.read_h5ad(args.data)
    if args.label_key not in adata.obs:
        raise SystemExit(f"{args.data}: no obs column {args.label_key!r}")
    labels = adata.obs[args.label_key].astype(str).values
    if args.check == "kmeans":
        kmeans_check(args, adata, labels)
        return
    model = scfm_torch.load(args.export)
    if args.check == "decoder":
        if model.gepc is None or model.cfg.gepc_decoder != "gene_query":
            raise SystemExit("the decoder check needs an export with the gene-query GEPC decoder (its layers are reused)")
        decoder_check(args, model, adata, labels)
    elif args.check == "recon":
        recon_check(args, model, adata, labels)
    elif args.check == "types":
        types_check(args, model, adata, labels)
    else:
        norm_check(args, model, adata, labels)


if __name__ == "__main__":
    main()
