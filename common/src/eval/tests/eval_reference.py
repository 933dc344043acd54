"""References for common/src/eval/tests/reference.rs (scikit-learn, scanpy, leidenalg,
igraph and, when installed, scib-metrics), computed live on the inputs and on scfm's results.

usage: eval_reference.py export DATA OUT   write X_pca (float32), bulk_labels and phase codes
                                          of the .h5ad DATA to OUT (x.f32, labels.i64,
                                          batches.i64, shape.json)
       eval_reference.py check DIR         read the inputs and scfm's results from DIR and
                                          write the references to DIR/ref.json and DIR/ref_*

Arrays are raw little-endian files (.f32, .f64, .i64).
"""

import json
import sys
import warnings

import numpy as np

warnings.simplefilter("ignore")


def rd(d, name, dtype):
    return np.fromfile(f"{d}/{name}", dtype=dtype)


def wr(d, name, arr, dtype):
    np.ascontiguousarray(np.asarray(arr), dtype=dtype).tofile(f"{d}/{name}")


def export(data, out):
    import anndata as ad

    a = ad.read_h5ad(data)
    x = np.ascontiguousarray(a.obsm["X_pca"], dtype=np.float32)
    wr(out, "x.f32", x, "<f4")
    wr(out, "labels.i64", a.obs["bulk_labels"].cat.codes.to_numpy(), "<i8")
    wr(out, "batches.i64", a.obs["phase"].cat.codes.to_numpy(), "<i8")
    with open(f"{out}/shape.json", "w") as f:
        json.dump({"n": int(x.shape[0]), "d": int(x.shape[1])}, f)


def csr_from(d, prefix, n):
    from scipy import sparse

    indptr = rd(d, f"{prefix}_indptr.i64", "<i8")
    indices = rd(d, f"{prefix}_indices.i64", "<i8")
    data = rd(d, f"{prefix}_data.f64", "<f8")
    return sparse.csr_matrix((data, indices, indptr), shape=(n, n))


def igraph_of(conn):
    import igraph as ig
    from scipy import sparse

    up = sparse.triu(conn, k=1).tocoo()
    g = ig.Graph(n=conn.shape[0], edges=list(zip(up.row.tolist(), up.col.tolist())))
    g.es["weight"] = up.data.tolist()
    return g


def check(d):
    import scanpy as sc
    import anndata as ad
    from scipy.sparse.csgraph import connected_components
    from sklearn.cluster import KMeans
    from sklearn.metrics import (
        accuracy_score,
        adjusted_rand_score,
        f1_score,
        normalized_mutual_info_score,
        silhouette_samples,
    )
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    spec = json.load(open(f"{d}/spec.json"))
    n, dim, k_nn = spec["n"], spec["d"], spec["knn_k"]
    x32 = rd(d, "x.f32", "<f4").reshape(n, dim)
    x = x32.astype(np.float64)
    y = rd(d, "labels.i64", "<i8")
    b = rd(d, "batches.i64", "<i8")
    ref = {}

    # StratifiedKFold without shuffling: the test fold of every cell.
    folds = np.full(n, -1)
    for f, (_, test) in enumerate(StratifiedKFold(5).split(x, y)):
        folds[test] = f
    wr(d, "ref_folds_plain.i64", folds, "<i8")

    # kNN classifier on scfm's folds (unshuffled and shuffled, cosine; shuffled, euclidean).
    for name, folds_of, metric in (
        ("plain", "plain", "cosine"),
        ("shuf", "shuf", "cosine"),
        ("euclid", "shuf", "euclidean"),
    ):
        fo = rd(d, f"folds_{folds_of}.i64", "<i8")
        pred = np.full(n, -1)
        acc, f1 = [], []
        for f in range(fo.max() + 1):
            tr, te = fo != f, fo == f
            clf = KNeighborsClassifier(n_neighbors=k_nn, metric=metric, algorithm="brute")
            clf = clf.fit(x[tr], y[tr])
            p = clf.predict(x[te])
            pred[te] = p
            acc.append(accuracy_score(y[te], p))
            f1.append(f1_score(y[te], p, average="macro", zero_division=0))
        wr(d, f"ref_pred_{name}.i64", pred, "<i8")
        ref[f"knn_accuracy_{name}"] = float(np.mean(acc))
        ref[f"knn_macro_f1_{name}"] = float(np.mean(f1))
        ref[f"knn_fold_accuracy_{name}"] = [float(v) for v in acc]
        ref[f"knn_fold_macro_f1_{name}"] = [float(v) for v in f1]

    # Exact euclidean neighbours (itself excluded).
    kg = spec["graph_n_neighbors"] - 1
    dist, idx = NearestNeighbors(n_neighbors=kg, algorithm="brute").fit(x).kneighbors()
    wr(d, "ref_knn_idx.i64", idx, "<i8")
    wr(d, "ref_knn_dist.f64", dist, "<f8")

    # UMAP connectivities of scfm's neighbours through scanpy's own function, and the whole
    # of sc.pp.neighbors on the float32 embedding.
    from scanpy.neighbors._connectivity import umap as umap_conn

    my_idx = rd(d, "knn_idx.i64", "<i8").reshape(n, kg)
    my_dist = rd(d, "knn_dist.f64", "<f8").reshape(n, kg)
    idx_self = np.hstack([np.arange(n)[:, None], my_idx])
    dist_self = np.hstack([np.zeros((n, 1)), my_dist])
    c1 = umap_conn(idx_self, dist_self, n_obs=n, n_neighbors=kg + 1).tocsr()
    c1.sort_indices()
    wr(d, "ref_conn_mine_indptr.i64", c1.indptr, "<i8")
    wr(d, "ref_conn_mine_indices.i64", c1.indices, "<i8")
    wr(d, "ref_conn_mine_data.f64", c1.data.astype(np.float64), "<f8")
    adata = ad.AnnData(np.zeros((n, 1), dtype=np.float32))
    adata.obsm["X_emb"] = x32
    sc.pp.neighbors(adata, n_neighbors=kg + 1, use_rep="X_emb")
    c2 = adata.obsp["connectivities"].tocsr()
    c2.sort_indices()
    wr(d, "ref_conn_scanpy_indptr.i64", c2.indptr, "<i8")
    wr(d, "ref_conn_scanpy_indices.i64", c2.indices, "<i8")
    wr(d, "ref_conn_scanpy_data.f64", c2.data.astype(np.float64), "<f8")

    # Silhouettes and the scIB scores restated with scikit-learn.
    for metric in ("euclidean", "cosine"):
        wr(d, f"ref_sil_{metric}.f64", silhouette_samples(x, y, metric=metric), "<f8")
    per_label = []
    for lab in np.unique(y):
        m = y == lab
        nb = len(np.unique(b[m]))
        if nb == 1 or nb == m.sum():
            continue
        per_label.append(np.mean(1 - np.abs(silhouette_samples(x[m], b[m]))))
    ref["asw_batch"] = float(np.mean(per_label))
    mine_conn = csr_from(d, "conn", n)
    for name, conn in (("mine", mine_conn), ("scanpy", c2)):
        res = []
        for lab in np.unique(y):
            m = y == lab
            _, comp = connected_components(conn[m][:, m], connection="strong")
            counts = np.bincount(comp)
            res.append(counts.max() / counts.sum())
        ref[f"graph_connectivity_{name}"] = float(np.mean(res))

    # scib-metrics itself, when installed (float32 jax: compared loosely).
    try:
        import scib_metrics as sm
        from scib_metrics.nearest_neighbors import NeighborsResults

        ref["scib_asw_label"] = float(sm.silhouette_label(x32, y))
        ref["scib_asw_batch"] = float(sm.silhouette_batch(x32, y, b))
        nn = NeighborsResults(indices=idx_self, distances=dist_self)
        ref["scib_graph_connectivity_directed_knn"] = float(sm.graph_connectivity(nn, y))
    except ImportError:
        ref["scib_metrics"] = "not installed"

    # k-means: scikit-learn's on the same data.
    k = len(np.unique(y))
    km = KMeans(n_clusters=k, n_init=10, random_state=0).fit(x)
    my_km = rd(d, "kmeans.i64", "<i8")
    ref["sk_kmeans_inertia"] = float(km.inertia_)
    ref["kmeans_ari_vs_sklearn"] = float(adjusted_rand_score(km.labels_, my_km))
    ref["sk_kmeans_ari"] = float(adjusted_rand_score(y, km.labels_))

    # ARI / NMI of scfm's partitions, recomputed.
    pairs = json.load(open(f"{d}/pairs.json"))
    arrays = {name: rd(d, f"{name}.i64", "<i8") for name in spec["partitions"]}
    ref["ari"] = [float(adjusted_rand_score(arrays[a], arrays[c])) for a, c in pairs]
    ref["nmi"] = [float(normalized_mutual_info_score(arrays[a], arrays[c])) for a, c in pairs]

    # Leiden: scanpy's (leidenalg, the default flavour) on scanpy's graph; modularity of both
    # partitions on scfm's graph by igraph.
    g = igraph_of(mine_conn)
    ref["leiden"] = {}
    for res in spec["resolutions"]:
        sc.tl.leiden(adata, resolution=res, random_state=0, key_added="l", flavor="leidenalg")
        theirs = adata.obs["l"].cat.codes.to_numpy()
        mine = rd(d, f"leiden_{res}.i64", "<i8")
        ref["leiden"][str(res)] = {
            "modularity_scanpy": g.modularity(theirs.tolist(), weights="weight", resolution=res),
            "modularity_mine": g.modularity(mine.tolist(), weights="weight", resolution=res),
            "ari_scanpy": float(adjusted_rand_score(y, theirs)),
            "n_clusters_scanpy": int(theirs.max() + 1),
        }
    # scIB's cluster_optimal_resolution over 0.1..2.0 with scanpy's Leiden.
    best = None
    for i in range(1, 21):
        res = 2 * i / 20
        sc.tl.leiden(adata, resolution=res, random_state=0, key_added="l", flavor="leidenalg")
        p = adata.obs["l"].cat.codes.to_numpy()
        nmi = normalized_mutual_info_score(y, p)
        if best is None or nmi > best[1]:
            best = (res, nmi, adjusted_rand_score(y, p))
    ref["scib_leiden_best"] = {"resolution": best[0], "nmi": float(best[1]), "ari": float(best[2])}

    with open(f"{d}/ref.json", "w") as f:
        json.dump(ref, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "export":
        export(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "check":
        check(sys.argv[2])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
