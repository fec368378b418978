"""Offline image metric: FID/KID with the random ``small`` extractor vs a trained edit-op CNN (``trained:``).

For op pairs (A, B) of the procedural editor, on disjoint procedural source images (n per set):
same op (A on sources 1 vs A on sources 2), A vs B (A on sources 1 vs B on sources 2) and source vs
edited (sources 1 unedited vs A on sources 2); the ratio A-vs-B / same says how far a different
operation stands above the same operation's sampling noise.  Also the extractor's training time and
held-out accuracy.

    python bench/bench_fid_extractor.py [--n 500] [--size 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from rayweights.evaluation.fid import REPORT_FILE, ensure_trained_extractor, image_metrics, save_images
from rayweights.zoo.editor import concept_by_key, make_images

PAIRS = (("warm", "cool"), ("blur_1", "sharpen"), ("grayscale", "sepia"), ("flip_v", "rot_90"),
         ("contrast_up", "saturate"), ("tint_cyan", "tint_teal"))


def ratio(diff: float, same: float) -> str:
    """diff / |same|: an unbiased KID of two samples of one distribution scatters around 0."""
    return f"{diff / abs(same):.1f}" if same else "inf"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500, help="images per set")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-fid-") as tmp:
        folder = os.path.join(tmp, "extractor")
        t0 = time.perf_counter()
        ensure_trained_extractor(folder, args.size, seed=args.seed)
        total = time.perf_counter() - t0
        with open(os.path.join(folder, REPORT_FILE)) as f:
            rep = json.load(f)
        print(f"trained extractor: {rep['num_classes']} classes (identity + single ops), {rep['n_train']} train / "
              f"{rep['n_holdout']} held-out images of {args.size}x{args.size}, {rep['steps']} steps, "
              f"{args.threads} thread(s): training {rep['seconds']:.1f} s ({total:.1f} s with data and save), "
              f"held-out accuracy {rep['accuracy']:.3f} (chance {rep['chance']:.3f})")
        extractors = ("small", f"trained:{folder}")
        print(f"\nn = {args.n} images per set, {args.size}x{args.size}, sources disjoint from each other and "
              "from the training images\n")
        print("| extractor | A / B | FID same | FID A vs B | FID src vs A | FID ratio | "
              "KID same | KID A vs B | KID src vs A | KID ratio (/ abs same) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        rows = {e: [] for e in extractors}
        for k, (a, b) in enumerate(PAIRS):
            s1 = make_images(args.n, args.size, seed=10_000 + 2 * k)
            s2 = make_images(args.n, args.size, seed=10_001 + 2 * k)
            d = {name: os.path.join(tmp, f"{k}-{name}") for name in ("src1", "a1", "a2", "b2")}
            for name, x in (("src1", s1), ("a1", concept_by_key(a).apply(s1)), ("a2", concept_by_key(a).apply(s2)),
                            ("b2", concept_by_key(b).apply(s2))):
                save_images(x, d[name])
            for e in extractors:
                same = image_metrics(d["a1"], d["a2"], e)
                diff = image_metrics(d["a1"], d["b2"], e)
                src = image_metrics(d["src1"], d["a2"], e)
                assert same["n_a"] == same["n_b"] == args.n
                rows[e].append((same, diff, src))
                label = "small (random)" if e == "small" else "trained"
                print(f"| {label} | {a} / {b} | {same['fid']:.3g} | {diff['fid']:.3g} | {src['fid']:.3g} | "
                      f"{ratio(diff['fid'], same['fid'])} | {same['kid']:.2g} | {diff['kid']:.3g} | "
                      f"{src['kid']:.3g} | {ratio(diff['kid'], same['kid'])} |")
        print()
        for e in extractors:
            r = [d["fid"] / s["fid"] for s, d, _ in rows[e]]
            rk = [d["kid"] > abs(s["kid"]) for s, d, _ in rows[e]]
            print(f"{'small (random)' if e == 'small' else 'trained'}: FID ratio A-vs-B / same: min {min(r):.1f}, "
                  f"median {sorted(r)[len(r) // 2]:.1f}; A-vs-B above same in {sum(x > 1 for x in r)}/{len(r)} "
                  f"pairs (FID), KID A-vs-B above |same| in {sum(rk)}/{len(rk)}")


if __name__ == "__main__":
    main()
