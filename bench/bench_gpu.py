"""The GPU baseline, written as a skilled engineer would: AlexNet on one GPU over sample photos.

The paper compared its Lambda pipeline against one GPU (902 s for 100,000 images). This is
today's honest version of that baseline, for a machine with a CUDA GPU and PyTorch (not a
dependency of serveless: run it where torch and torchvision are installed):

- the same AlexNet graph (torchvision's, random weights: time does not depend on them),
  fp16, channels-last, in inference mode, batches of 256 (`--batch`);
- (a) CPU decode: a DataLoader whose worker processes (all cores) run serveless's own
  stage-0 `preprocess()` (libjpeg-turbo fast path, same transform) and hand uint8 pixels
  over, pinned memory, copies overlapped with compute, normalised on the GPU;
- (b) GPU decode: file bytes read on a thread pool, decoded by nvJPEG in batches
  (torchvision.io.decode_jpeg on the GPU), resized (shorter side 256, antialiased) and
  centre-cropped on the GPU, normalised there: no CPU decode at all;
- (c) the model alone on GPU-resident input: the ceiling.

The workload is `--distinct` generated photos (as bench_main's, about 500x375) read
`--passes` times, so 100,000 images need not be generated; after the first pass the
files come from the page cache, as from a fast local disk. Prints images/s and the time
for the images processed; no price is assumed (`--usd-per-hour` to price GPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from serveless.data.images import preprocess
from serveless.data.samples import make_sample_images

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def photos(folder: Path, count: int) -> list[str]:
    if not (folder / ".done").exists():
        make_sample_images(folder, count, seed=0, workers=os.cpu_count())
        (folder / ".done").write_text("ok")
    return sorted(str(p) for p in folder.rglob("*.jpg"))


def model(torch, device):
    import torchvision

    net = torchvision.models.alexnet(weights=None).eval().to(device)
    if device.type == "cuda":
        net = net.half().to(memory_format=torch.channels_last)
    return net


class _Files:
    """A map-style dataset: path -> (3, 224, 224) uint8 pixels from stage 0's code.

    Stage 0's preprocess() with mean 0 and std 1/255 gives the resized, cropped pixels
    before normalisation; they travel to the main process and the GPU as uint8 (a quarter
    of float32's bytes: at thousands of images/s the copies are what limit the loader),
    and are normalised on the GPU.
    """

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with open(self.paths[i], "rb") as f:
            x = preprocess(f.read(), mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)
        return np.rint(x).astype(np.uint8)


def run_cpu_decode(torch, net, device, paths, passes, batch, workers) -> tuple[int, float]:
    from torch.utils.data import DataLoader

    loader = DataLoader(_Files(paths * passes), batch_size=batch, num_workers=workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4,
                        persistent_workers=False)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    mean = torch.tensor(MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device, dtype=dtype).view(1, 3, 1, 1)
    n, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for u8 in loader:
            x = (u8.to(device, non_blocking=True).to(dtype) / 255 - mean) / std
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            y = net(x)
            n += len(u8)
        _ = y.float().cpu()  # waits for the last batch
    return n, time.perf_counter() - t0


def run_gpu_decode(torch, net, device, paths, passes, batch, workers) -> tuple[int, float]:
    import torchvision.transforms.v2.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def read(p: str):
        return torch.from_numpy(np.fromfile(p, dtype=np.uint8))

    order = paths * passes
    chunks = [order[i:i + batch] for i in range(0, len(order), batch)]
    n, t0 = 0, time.perf_counter()
    with ThreadPoolExecutor(workers) as pool, torch.inference_mode():
        pending = pool.map(lambda c: list(map(read, c)), chunks)  # reads run ahead
        for data in pending:
            imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            out = torch.empty((len(imgs), 3, 224, 224), device=device, dtype=torch.uint8)
            for i, img in enumerate(imgs):
                img = F.resize(img, 256, antialias=True)
                out[i] = F.center_crop(img, [224, 224])
            x = ((out.float() / 255 - mean) / std).half()
            y = net(x.contiguous(memory_format=torch.channels_last))
            n += len(out)
        _ = y.float().cpu()
    return n, time.perf_counter() - t0


def run_model_only(torch, net, device, images, batch) -> tuple[int, float]:
    x = torch.randn(batch, 3, 224, 224, device=device)
    if device.type == "cuda":
        x = x.half().contiguous(memory_format=torch.channels_last)
    steps = max(1, images // batch)
    with torch.inference_mode():
        net(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            y = net(x)
        _ = y.float().cpu()
    return steps * batch, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--distinct", type=int, default=10_000, help="photos generated")
    ap.add_argument("--passes", type=int, default=10, help="times each photo is read")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--usd-per-hour", type=float, default=None,
                    help="price of the GPU machine's time, to print $ per 1M images")
    ap.add_argument("--photos", default=str(Path(__file__).resolve().parent / "out"
                                            / "gpu-photos"))
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    try:
        import torch
        import torchvision  # noqa: F401
    except ImportError:
        sys.exit("bench_gpu.py needs torch and torchvision (pip install torch torchvision); "
                 "serveless itself does not")
    device = torch.device(args.device if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    t = time.perf_counter()
    paths = photos(Path(args.photos) / f"n{args.distinct}", args.distinct)
    made_s = time.perf_counter() - t
    net = model(torch, device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor()
    print(f"device: {name}; torch {torch.__version__}; {os.cpu_count()} CPU cores; "
          f"{len(paths)} distinct photos (made in {made_s:.1f} s) x {args.passes} passes; "
          f"batch {args.batch}, fp16 channels-last on the GPU, random weights")
    # one short pass of each, not timed: cuDNN's algorithm search, nvJPEG's init, workers
    warm = paths[: args.batch * 2]
    run_cpu_decode(torch, net, device, warm, 1, args.batch, args.workers)
    if device.type == "cuda":
        run_gpu_decode(torch, net, device, warm, 1, args.batch, args.workers)
    rows = {}
    runs = [("a: CPU decode (stage 0's preprocess, all cores)", run_cpu_decode)]
    if device.type == "cuda":
        runs.append(("b: GPU decode (nvJPEG, resize and crop on the GPU)", run_gpu_decode))
    for label, fn in runs:
        n, s = fn(torch, net, device, paths, args.passes, args.batch, args.workers)
        rows[label] = {"images": n, "seconds": round(s, 3), "images_per_s": round(n / s, 1)}
    n, s = run_model_only(torch, net, device, len(paths) * args.passes, args.batch)
    rows["c: model alone, input on the device"] = {"images": n, "seconds": round(s, 3),
                                                   "images_per_s": round(n / s, 1)}
    print(f"{'':55s} {'images':>8s} {'s':>8s} {'images/s':>10s} {'100k images, s':>15s}"
          + ("  $ per 1M" if args.usd_per_hour else ""))
    for label, r in rows.items():
        per_100k = 1e5 / r["images_per_s"]
        line = (f"{label:55s} {r['images']:8d} {r['seconds']:8.2f} {r['images_per_s']:10.1f} "
                f"{per_100k:15.1f}")
        if args.usd_per_hour:
            r["usd_per_million"] = round(args.usd_per_hour * 1e6 / r["images_per_s"] / 3600, 4)
            line += f"  {r['usd_per_million']:.4f}"
        print(line)
    print("the paper's GPU: 902 s for 100,000 images (Kim & Lee); time here excludes model "
          "load; no price assumed unless --usd-per-hour")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": name, "torch": torch.__version__, "cpu_cores": os.cpu_count(),
            "distinct": len(paths), "passes": args.passes, "batch": args.batch,
            "rows": rows, "numpy": np.__version__}, indent=1))


if __name__ == "__main__":
    main()
