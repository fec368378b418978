"""Cost of the ``concepts`` evaluation's FID/KID: the zoo's trained extractor on 512-image metric sets.

Builds a small concepts zoo from ``jobs/specs/concepts.yaml`` (the shipped architecture and image size; only
``--tasks`` concepts, one member each), then times: training the zoo's extractor on first use (the first
adapter), loading it (a second adapter), the target features of the metric set (once per task), one
``evaluate`` with and without FID/KID, the parts of the image metrics (generator forward, features,
FID + KID), a fine-tuning epoch, and the folder route the metric replaced (PNGs + clean-fid's
``get_folder_features`` + its 100-subset KID).  Prints FID/KID of the exact edit, the concept's member,
the base generator and the identity on the same metric set (the score separating right from wrong).

    python bench/bench_concepts_fid.py [--fid-images 512] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Fixed(torch.nn.Module):
    noise_channels = 1

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, z):
        return self.fn((x + 1) / 2) * 2 - 1


def timed(fn, repeats: int) -> tuple[float, object]:
    out, ts = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fid-images", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tasks", default='["make it black and white", "give it a red tint"]')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from cleanfid import fid as cfid

    from rayweights.config import load_config
    from rayweights.evaluation import make_adapter
    from rayweights.evaluation.fid import image_metrics, save_images
    from rayweights.table import open_zoo
    from rayweights.zoo import ZooSpec, build_zoo
    from rayweights.zoo.editor import concept_by_key

    tmp = tempfile.mkdtemp(prefix="bench-concepts-fid-")
    out = os.path.join(tmp, "zoo")
    spec = load_config(ZooSpec, os.path.join(ROOT, "jobs", "specs", "concepts.yaml"),
                       [f"output={out}", f"tasks={args.tasks}", "held_out=[]", "held_out_every=0"])
    t0 = time.perf_counter()
    res = build_zoo(spec, use_ray=False, progress=False)
    print(f"zoo: {res.done} members of jobs/specs/concepts.yaml (width {spec.arch_options['width']}, "
          f"{spec.concepts.image_size}x{spec.concepts.image_size}), built in {time.perf_counter() - t0:.1f} s; "
          f"{args.threads} torch thread(s)")
    zoo = open_zoo(out)
    cond = zoo.conditions()[0]
    opts = {"fid_images": args.fid_images}
    t0 = time.perf_counter()
    ad = make_adapter("concepts", cond, zoo, opts)
    t_first = time.perf_counter() - t0
    t_second, ad = timed(lambda: make_adapter("concepts", cond, zoo, opts), 1)
    print(f"extractor {ad.feature_extractor}: first adapter (trains + saves it) {t_first:.1f} s, "
          f"second adapter (loads it) {t_second:.2f} s")
    t_ref, _ = timed(lambda: (ad._metric_sets.clear(), ad.metric_set("test")), 1)
    n = args.fid_images
    print(f"metric set: {n} sources + the concept's edit, target features once per task: {t_ref:.3f} s")

    model = ad.build_model(0)
    no_fid = make_adapter("concepts", cond, zoo, {"fid": False})
    t_eval, _ = timed(lambda: ad.evaluate(model), args.repeats)
    t_nofid, _ = timed(lambda: no_fid.evaluate(model), args.repeats)
    t_img, _ = timed(lambda: ad.image_metrics(model), args.repeats)
    src, ref = ad.metric_set("test")
    with torch.no_grad():
        z = torch.randn(len(src), model.noise_channels, *src.shape[2:])
        t_gen, gen = timed(lambda: model.eval()(src, z), args.repeats)
    from rayweights.evaluation.fid import feature_metrics, image_features

    t_feat, feats = timed(lambda: image_features(gen, ad._extractor), args.repeats)
    t_fk, mem = timed(lambda: feature_metrics(feats, ref), args.repeats)
    opt = ad.make_optimizer(model)
    t_epoch, _ = timed(lambda: ad.train_epoch(model, opt, 1, 0), 3)
    print(f"one evaluate(): {t_eval:.3f} s with FID/KID ({n} vs {n} images), {t_nofid:.4f} s without "
          f"(L1/PSNR on the {len(ad.split['test'][0])} validation pairs)")
    print(f"  image metrics {t_img:.3f} s = generator forward {t_gen:.3f} s + features {t_feat:.3f} s + "
          f"FID and KID {t_fk:.3f} s (+ noise, stacking)")
    print(f"one fine-tuning epoch: {t_epoch:.3f} s ({len(ad.split['train'][0])} training pairs); an evaluation "
          f"epoch = train + evaluate: FID/KID add {t_eval - t_nofid:.3f} s")

    # the folder route: PNGs each side and clean-fid's folder features, its 100-subset KID
    d = tempfile.mkdtemp(prefix="bench-fid-folders-")
    tgt = concept_by_key(ad.task.group).apply((src + 1) / 2)

    def folders():
        save_images(gen, os.path.join(d, "g"))
        save_images(tgt, os.path.join(d, "t"))
        return image_metrics(os.path.join(d, "g"), os.path.join(d, "t"), ad._extractor)

    t_fold, fm = timed(folders, 1)
    t_kid100, kid100 = timed(lambda: cfid.kernel_distance(feats, ref), 1)
    print(f"folder route (write {n} + {n} PNGs, clean-fid folder features, FID, KID): {t_fold:.2f} s; "
          f"clean-fid's 100-subset KID alone {t_kid100:.2f} s")
    print(f"same numbers on the same outputs: FID {mem['fid']:.4f} (in memory) vs {fm['fid']:.4f} (folders); "
          f"KID {mem['kid']:.3f} (in memory, 1 subset) vs {fm['kid']:.3f} (folders) vs {kid100:.3f} (100 subsets)")

    rows = zoo.members.to_pylist()
    print(f"\nFID / KID on the metric set of {cond!r} ({n} vs {n} images, {ad.feature_extractor}):")
    print("| model | FID | KID |\n|---|---:|---:|")
    models = [("the exact edit", Fixed(concept_by_key(ad.task.group).apply))]
    for r in rows:
        M = ad.build_model(0)
        sd = zoo.state_dicts(r["member_id"])[-1][1]
        ad.load_layout_state_dict(M, {k: sd[k] for k in ad.layout.param_names})
        models.append((f"member {r['member_id']} ({'this' if r['condition'] == cond else 'another'} concept)", M))
    models += [("base generator (random init)", ad.build_model(0)), ("identity", Fixed(lambda x: x))]
    for name, M in models:
        s = ad.evaluate(M)
        print(f"| {name} | {abs(s['fid']) if abs(s['fid']) < 1e-6 else s['fid']:.1f} | {s['kid']:.1f} |")


if __name__ == "__main__":
    main()
