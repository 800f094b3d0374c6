#!/usr/bin/python3
"""The linear probe protocol, clip against scikit-learn, on the same features in one run.

Synthetic encoder-like features (10 class clusters with a common offset and correlated noise):
train 48,000 + validation 12,000 (the 60,000 of Fashion-MNIST's training set split 80/20, as
clip-eval's --val-proportion 0.2 does) x 512, test 10,000. Both sides run the C sweep of
../shared/golden/MANIFEST.md section F (grid C = 10^(k/8), 7 coarse points then steps 8, 4, 2, 1,
ties to the smaller C: 15 fits) and the refit on train + validation, with the same tolerance
(scikit-learn's default tol, 1e-4, on the mean objective's gradient; max_iter 1000). Runs are
interleaved (clip, scikit-learn, clip, then clip at tol / 100) and the load average is printed
with the times.

  bench/linear_probe_vs_sklearn.py BUILD_DIR [--tol 1e-4] [--rows 60000] [--dim 512]

Needs Debian's python3-sklearn (1.2) and python3-numpy; run it with /usr/bin/python3.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression


def write_features(path, features, labels):
    """The feature cache's format: safetensors with features [N, D] F32 and labels [N] I64."""
    f = np.ascontiguousarray(features, dtype=np.float32)
    l = np.ascontiguousarray(labels, dtype=np.int64)
    header = {"labels": {"dtype": "I64", "shape": [len(l)], "data_offsets": [0, l.nbytes]},
              "features": {"dtype": "F32", "shape": list(f.shape), "data_offsets": [l.nbytes, l.nbytes + f.nbytes]}}
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(h)) + h + l.tobytes() + f.tobytes())


def make_data(rows, test_rows, dim, classes, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.1, (classes, dim))
    offset = rng.normal(0, 0.5, dim)                      # the common offset of encoder features
    mixing = rng.normal(0, 1.5 / np.sqrt(32), (32, dim))  # a few correlated noise directions

    def draw(n):
        y = rng.integers(0, classes, n)
        x = centres[y] + rng.normal(0, 1.0, (n, dim)) + rng.normal(0, 1.0, (n, 32)) @ mixing + offset
        return x.astype(np.float32), y

    x, y = draw(rows)
    xt, yt = draw(test_rows)
    # Stratified 80/20 split of the training rows.
    val = np.zeros(rows, bool)
    for c in range(classes):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val[idx[:round(0.2 * len(idx))]] = True
    return (x[~val], y[~val]), (x[val], y[val]), (xt, yt)


def sklearn_sweep(train, val, test, tol):
    """MANIFEST F's sweep and refit with scikit-learn's LogisticRegression (lbfgs, multinomial)."""
    points = {}

    def evaluate(k):
        model = LogisticRegression(C=10 ** (k / 8), tol=tol, max_iter=1000)
        model.fit(*train)
        points[k] = (float(np.mean(model.predict(val[0]) == val[1])), int(model.n_iter_[0]))

    def best():
        return min(points, key=lambda k: (-points[k][0], k))

    start = time.perf_counter()
    for k in range(-48, 49, 16):
        evaluate(k)
    for step in (8, 4, 2, 1):
        b = best()
        for k in (b - step, b + step):
            if -48 <= k <= 48 and k not in points:
                evaluate(k)
    k = best()
    final = LogisticRegression(C=10 ** (k / 8), tol=tol, max_iter=1000)
    xs, ys = np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]])
    final.fit(xs, ys)
    seconds = time.perf_counter() - start
    w, b = final.coef_.astype(np.float64), final.intercept_.astype(np.float64)
    z = xs.astype(np.float64) @ w.T + b
    z -= z.max(1, keepdims=True)
    ce = -(z[np.arange(len(ys)), ys] - np.log(np.exp(z).sum(1))).sum()
    objective = ce + (w * w).sum() / (2 * 10 ** (k / 8))
    return {"seconds": seconds, "best_k": k, "C": 10 ** (k / 8), "refit_objective": float(objective),
            "refit_iterations": int(final.n_iter_[0]),
            "test_accuracy": float(np.mean(final.predict(test[0]) == test[1])),
            "points": [{"k": k, "val_accuracy": a, "iterations": it} for k, (a, it) in sorted(points.items())]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build_dir")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--test-rows", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    program = os.path.join(args.build_dir, "bench", "clip-bench-linear-probe")
    train, val, test = make_data(args.rows, args.test_rows, args.dim, 10, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        files = [os.path.join(tmp, n + ".safetensors") for n in ("train", "val", "test")]
        for path, (x, y) in zip(files, (train, val, test)):
            write_features(path, x, y)

        def ours(tol):
            out = subprocess.run([program, *files, str(tol)], check=True, capture_output=True, text=True)
            return json.loads(out.stdout)

        print(f"scikit-learn {sklearn.__version__}, numpy {np.__version__}; train {len(train[1])} + val "
              f"{len(val[1])} x {args.dim}, test {len(test[1])}, 10 classes, tol {args.tol}", flush=True)
        results = []
        # clip again at a 100x tighter tolerance: what its default (1e-6) costs.
        for name, run in (("clip", lambda: ours(args.tol)),
                          ("scikit-learn", lambda: sklearn_sweep(train, val, test, args.tol)),
                          ("clip", lambda: ours(args.tol)), ("clip tol/100", lambda: ours(args.tol / 100))):
            load = os.getloadavg()
            r = run()
            results.append((name, r))
            print(f"{name:13s} {r['seconds']:8.2f} s  best k {r['best_k']:3d}  test accuracy {r['test_accuracy']:.4f}  "
                  f"refit objective {r['refit_objective']:.6f} ({r['refit_iterations']} iterations)  "
                  f"load before {load[0]:.2f}", flush=True)
            print("    k/val acc/iterations: " + " ".join(f"{p['k']}:{p['val_accuracy']:.4f}/{p['iterations']}"
                                                        for p in r["points"]), flush=True)
        clip_best = min(r["seconds"] for n, r in results if n == "clip")
        print(f"clip at tol/100: {results[1][1]['seconds'] / results[3][1]['seconds']:.2f}x faster than scikit-learn")
        sk = results[1][1]["seconds"]
        print(f"speed-up (scikit-learn / fastest clip run): {sk / clip_best:.2f}x; load average now "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
