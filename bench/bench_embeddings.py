"""Embeddings out (issue 23, item 5): an embeddings job against the plain script that
computes the same vectors, and against the predictions job of the same model, one run.

    python bench/bench_embeddings.py [--images 1000] [--rounds 2] [--tensor relu7]

(a) plain: the script a skilled engineer would write to embed a folder: the JPEGs decoded
    on a thread pool (stage 0's decoder) overlapped with AlexNet up to --tensor in one
    onnxruntime session on all cores, batch 32, the vectors kept in one array and saved as
    .npy at the end;
(b) serveless embeddings: `--output embeddings --tensor relu7`, the model up to relu7 as one
    stage at 1769 MB (1 vCPU), concurrency 2, records of images / 2 (as bench_main's b2);
(c) serveless predictions: the same job with the whole model and its top-5 rows.
a, b, c alternate, so drift in the machine's speed hits all alike; ratios are taken within
one run. Then the bytes each job wrote per image and the time of `export --format parquet`
of the embeddings job.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_main import overlapped, serveless_run, session  # noqa: E402
from common import OUT, machine, save, workload  # noqa: E402

from serveless.data.export import export  # noqa: E402
from serveless.model.loading import load_model  # noqa: E402
from serveless.model.partition import truncate  # noqa: E402


def plain_vectors(model_bytes: bytes, tensor: str, files: list[Path], out: Path) -> float:
    """Images/s of the plain script: decode on a thread pool overlapped with the truncated
    model on all cores (bench_main's pipeline); the vectors saved as one .npy."""
    sess = session(model_bytes, os.cpu_count() or 1)
    kept: list[np.ndarray] = []
    t0 = time.perf_counter()
    overlapped(files, lambda x: kept.append(
        sess.run([tensor], {"input": x})[0].reshape(len(x), -1)))
    np.save(out, np.concatenate(kept))
    return len(files) / (time.perf_counter() - t0)


def written_per_image(rows: list[dict], images: int) -> float:
    """Bytes the last stage wrote per image (the vectors and rows, or the rows)."""
    last = max(r["stage"] for r in rows)
    return sum(r["bytes_out"] for r in rows if r["stage"] == last) / images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tensor", default="relu7")
    args = ap.parse_args()
    per_record = max(1, args.images // 2)
    img_dir, rec_dir = workload(args.images, per_record)
    files = sorted(p for p in img_dir.rglob("*.jpg"))
    model = truncate(load_model("alexnet"), args.tensor)
    model_bytes = model.SerializeToString()
    print(f"machine: {machine()}")
    print(f"{args.images} images in records of {per_record}; AlexNet up to {args.tensor}")
    plain_s, emb_s, pred_s = [], [], []
    emb = pred = None
    for r in range(args.rounds):
        plain_s.append(plain_vectors(model_bytes, args.tensor, files, OUT / "plain-vectors.npy"))
        emb = serveless_run(rec_dir, "emb", preset=None, memory="1769", output="embeddings",
                            tensor=args.tensor)
        emb_s.append(emb["images_per_s"])
        pred = serveless_run(rec_dir, "pred", preset=None, memory="1769")
        pred_s.append(pred["images_per_s"])
        print(f"round {r + 1}: plain {plain_s[-1]:.1f} images/s, embeddings job "
              f"{emb_s[-1]:.1f}, predictions job {pred_s[-1]:.1f}")
    assert emb is not None and pred is not None
    ratio_plain = [e / p for e, p in zip(emb_s, plain_s, strict=True)]
    ratio_pred = [e / p for e, p in zip(emb_s, pred_s, strict=True)]
    t0 = time.perf_counter()
    rows = export(emb["store"], "emb", "parquet", str(OUT / "embeddings.parquet"))
    export_s = time.perf_counter() - t0
    result = {
        "machine": machine(), "images": args.images, "tensor": args.tensor,
        "plain_images_per_s": plain_s, "embeddings_images_per_s": emb_s,
        "predictions_images_per_s": pred_s,
        "embeddings_over_plain": ratio_plain, "embeddings_over_predictions": ratio_pred,
        "embeddings_bytes_per_image": written_per_image(emb["rows"], emb["images"]),
        "predictions_bytes_per_image": written_per_image(pred["rows"], pred["images"]),
        "export_parquet_s": export_s, "export_rows": rows,
    }
    print(f"embeddings job / plain script: {', '.join(f'{x:.3f}' for x in ratio_plain)}")
    print(f"embeddings job / predictions job: {', '.join(f'{x:.3f}' for x in ratio_pred)}")
    print(f"written per image by the last stage: embeddings "
          f"{result['embeddings_bytes_per_image']:,.0f} B, predictions "
          f"{result['predictions_bytes_per_image']:,.0f} B")
    print(f"export --format parquet of {rows} vectors: {export_s:.2f} s")
    print(f"wrote {save('bench_embeddings', result)}")


if __name__ == "__main__":
    main()
