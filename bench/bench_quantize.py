"""int8 stages (issue 14, item 3): accuracy on a trained model, and AlexNet's cost per 1M images.

    python bench/bench_quantize.py [--images 3000] [--per-record 1000] [--rounds 2]
                                   [--calibration-images 64]

(a) digits: the trained digits CNN on its whole held-out split (450 JPEGs) as fp32 and as
    int8 jobs (cut at pool1, calibrated on 64 of those images): top-1 accuracy of each job
    from its predictions, and the fidelity figures of the int8 job (on the held-out images
    the calibration did not see). Goal: int8 top-1 within 0.5 points of fp32.
(b) AlexNet, records of --per-record sample photos, the paper preset and the whole model as
    one stage (the best cuts for cost; --alexnet-config): fp32 and int8 jobs on the
    local backend, alternating (fp32, int8, fp32, int8, ...) so drift hits both alike;
    billed ms per image and modeled AWS Lambda cost per 1M images (x86_64 and arm64), the
    ratio int8/fp32, the int8 job's fidelity (random weights: agreement, not accuracy),
    and beside them the floor measured in the same run: the whole model alone in
    onnxruntime at 1 thread, batch 32, fp32 and int8. Goal: int8 <= $0.20 per 1M (x86).
The CPU and its vector/matrix flags are printed with every figure: int8 speed depends on
VNNI/AMX. The cost is modeled (the local backend bills as Lambda would), never measured on AWS.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, at_scale, machine, save, workload  # noqa: E402

from serveless.backends.local import LocalBackend  # noqa: E402
from serveless.cost import LAMBDA_GB_SECOND, MB_PER_VCPU, gb_seconds  # noqa: E402
from serveless.data.predictions import accuracy
from serveless.data.sources import pack
from serveless.driver.prepare import prepare_job
from serveless.driver.scheduler import run_job
from serveless.model.builtins import build_alexnet
from serveless.model.partition import split
from serveless.model.quantize import quantize_stages
from serveless.report.summary import summarize
from serveless.store import Store  # noqa: E402

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in FLAGS if f in have) or "none of " + ",".join(FLAGS)
    except OSError:
        pass
    return "unknown"


def run(store_name: str, job: str, model: str, rec_dir: Path, **kw) -> dict:
    root = OUT / "stores" / store_name
    store = Store(str(root))
    shutil.rmtree(root / job, ignore_errors=True)  # the quantized-stage cache is kept
    t0 = time.perf_counter()
    spec = prepare_job(store, job, model, records=str(rec_dir), **kw)
    prep = time.perf_counter() - t0
    with LocalBackend() as backend:
        t0 = time.perf_counter()
        result = run_job(store, spec, backend, concurrency=2, progress=False)
        wall = time.perf_counter() - t0
    assert result.ok, result.failed_records
    out = {"prepare_s": prep, "wall_s": wall, "images": result.images, "rows": result.rows,
           "quantize": spec.quantize, "accuracy": accuracy(store, job)}
    for arch in ("x86_64", "arm64"):
        s = summarize(result.rows, arch)
        out[f"per_million_{arch}"] = s["per_million"]
    s = summarize(result.rows)
    # billed time per image, expressed at 1 vCPU (1769 MB) whatever the stage sizes
    out["billed_ms_per_image_1769mb"] = (s["gb_s"] / gb_seconds(MB_PER_VCPU, 1.0)
                                         / result.images)
    out["compute_per_million_x86"] = s["compute"] / result.images * 1e6
    # the same job at 1M images, modeled from these calls (C=2 cold calls per stage)
    scaled = at_scale(result.rows, 2)
    for arch in ("x86_64", "arm64"):
        out[f"per_million_1m_{arch}"] = summarize(scaled, arch)["per_million"]
    s1m = summarize(scaled)
    out["billed_ms_per_image_1m"] = s1m["gb_s"] / gb_seconds(MB_PER_VCPU, 1.0) / s1m["images"]
    return out


def digits_part(calibration: int) -> dict:
    from serveless.model.digits import CLASSES, heldout_examples

    img = OUT / "digits-heldout"
    rec = OUT / "digits-heldout-records"
    if not (rec / ".done").exists():
        shutil.rmtree(img, ignore_errors=True)
        for c in range(CLASSES):
            (img / str(c)).mkdir(parents=True, exist_ok=True)
        for i, (data, label) in enumerate(heldout_examples()):
            (img / str(label) / f"d{i:04d}.jpg").write_bytes(data)
        pack(img, Store(str(rec)), "", 150)
        (rec / ".done").write_text("ok")
    fp32 = run("digits", "fp32", "digits", rec, cuts="pool1")
    int8 = run("digits", "int8", "digits", rec, cuts="pool1", quantize="int8",
               calibration_images=calibration)
    a32, a8 = fp32["accuracy"], int8["accuracy"]
    f = int8["quantize"]["fidelity"]
    print(f"digits, {a32['labelled']} held-out images, jobs cut at pool1:")
    print(f"  top-1 accuracy fp32 job {a32['top1']:.2%}, int8 job {a8['top1']:.2%}: "
          f"{(a8['top1'] - a32['top1']) * 100:+.2f} points (goal: within 0.5)")
    print(f"  int8 fidelity on the {f['images']} images calibration did not see: top-1 "
          f"agreement {f['top1_agreement']:.2%}, top-5 overlap {f['top5_overlap']:.2%}, "
          f"accuracy {f['accuracy_top1_quantized']:.2%} (int8) vs {f['accuracy_top1_fp32']:.2%}"
          f" (fp32)")
    return {"fp32_top1": a32["top1"], "int8_top1": a8["top1"], "labelled": a32["labelled"],
            "delta_points": (a8["top1"] - a32["top1"]) * 100, "fidelity": f}


def floor_ms(stages_int8: list, batch: int = 32, reps: int = 3) -> dict:
    """Whole model alone at 1 thread, batch 32: ms per image, fp32 and int8 (chained)."""
    model = build_alexnet()
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    chains = {"fp32": [ort.InferenceSession(model.SerializeToString(), opts)],
              "int8": [ort.InferenceSession(s.SerializeToString(), opts) for s in stages_int8]}
    times: dict[str, list[float]] = {k: [] for k in chains}
    for _ in range(reps):  # alternating
        for name, sessions in chains.items():
            t0 = time.perf_counter()
            h = x
            for s in sessions:
                h = s.run(None, {s.get_inputs()[0].name: h})[0]
            times[name].append((time.perf_counter() - t0) / batch * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


CONFIGS = {"paper": {"preset": "paper"}, "whole": {"cuts": None}}
"""AlexNet configurations (--alexnet-config): the paper's four stages, and the whole model as
one stage (the best cuts for cost: no stage boundaries, two cold starts instead of eight)."""


def alexnet_part(images: int, per_record: int, rounds: int, calibration: int,
                 configs: list[str]) -> dict:
    _, rec_dir = workload(images, per_record)
    out: dict[str, dict] = {}
    runs: dict[str, dict[str, list[dict]]] = {c: {"fp32": [], "int8": []} for c in configs}
    for r in range(rounds):  # alternating: each configuration and precision once per round
        for c in configs:
            kw = CONFIGS[c]
            runs[c]["fp32"].append(run("alexnet", f"fp32-{c}-{r}", "alexnet", rec_dir, **kw))
            runs[c]["int8"].append(run("alexnet", f"int8-{c}-{r}", "alexnet", rec_dir,
                                       quantize="int8", calibration_images=calibration, **kw))
    model = build_alexnet()
    calib = np.random.default_rng(1).standard_normal((8, 3, 224, 224)).astype(np.float32)
    # $ per 1M images for each ms per image at 1 vCPU (1769 MB): compute only
    usd_per_ms = gb_seconds(MB_PER_VCPU, 1.0) * LAMBDA_GB_SECOND["x86_64"] * 1e6
    for c in configs:
        res = runs[c]
        med = {k: {m: statistics.median(x[m] for x in v) for m in
                   ("per_million_x86_64", "per_million_arm64", "billed_ms_per_image_1769mb",
                    "wall_s", "prepare_s", "per_million_1m_x86_64", "per_million_1m_arm64",
                    "billed_ms_per_image_1m")} for k, v in res.items()}
        f = res["int8"][-1]["quantize"]["fidelity"]
        cuts = ["pool1", "pool2", "pool5"] if c == "paper" else []
        floor = floor_ms(quantize_stages(split(model, cuts), calib))
        label = "paper preset" if c == "paper" else "whole model as one stage"
        print(f"AlexNet, {label}, {images} images in records of {per_record}, "
              f"{rounds} alternating rounds (medians):")
        for k in ("fp32", "int8"):
            m = med[k]
            print(f"  {k}: ${m['per_million_x86_64']:.3f} per 1M images x86_64, "
                  f"${m['per_million_arm64']:.3f} arm64; {m['billed_ms_per_image_1769mb']:.2f} "
                  f"billed ms per image (at 1769 MB); job wall {m['wall_s']:.1f} s, prepare "
                  f"{m['prepare_s']:.1f} s")
            print(f"        at 1M images (modeled from these calls, 2 cold calls per stage): "
                  f"${m['per_million_1m_x86_64']:.3f} per 1M x86_64, "
                  f"${m['per_million_1m_arm64']:.3f} arm64; "
                  f"{m['billed_ms_per_image_1m']:.2f} billed ms per image")
        ratio = med["int8"]["per_million_x86_64"] / med["fp32"]["per_million_x86_64"]
        print(f"  int8 / fp32 cost: {ratio:.2f} (goal: int8 <= $0.20 per 1M x86_64; at 1M "
              f"images int8 ${med['int8']['per_million_1m_x86_64']:.3f})")
        print(f"  int8 fidelity on {f['images']} held-out photos: top-1 agreement "
              f"{f['top1_agreement']:.2%}, top-5 overlap {f['top5_overlap']:.2%} (random "
              "weights)")
        chain = "chained int8 stages" if cuts else "one int8 stage"
        print(f"  floor, the model alone at 1 thread, batch 32 ({chain}): fp32 "
              f"{floor['fp32']:.2f} ms/image (${floor['fp32'] * usd_per_ms:.3f} per 1M at 1 "
              f"vCPU), int8 {floor['int8']:.2f} ms/image (${floor['int8'] * usd_per_ms:.3f}); "
              f"int8 speed-up {floor['fp32'] / floor['int8']:.2f}x")
        out[c] = {"medians": med, "ratio_int8_fp32": ratio, "fidelity": f, "floor_ms": floor}
    return out if len(configs) > 1 else out[configs[0]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--per-record", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--skip-alexnet", action="store_true")
    ap.add_argument("--alexnet-config", action="append", choices=sorted(CONFIGS),
                    help="AlexNet configurations to measure (repeatable; default: paper and "
                         "whole)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"CPU flags: {cpu_flags()}")
    out = {"machine": machine(), "cpu_flags": cpu_flags(),
           "digits": digits_part(args.calibration_images)}
    if not args.skip_alexnet:
        out["alexnet"] = alexnet_part(args.images, args.per_record, args.rounds,
                                      args.calibration_images,
                                      args.alexnet_config or ["paper", "whole"])
    print(f"saved {save('bench_quantize', out)}")


if __name__ == "__main__":
    main()
