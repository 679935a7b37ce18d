"""The figures behind the UWF phantom style (issue 20): the same statistics measured on real UWF-SLO
pairs and on UWF phantoms, and the pretraining stream's throughput on one core.

  .venv/bin/python benchmarks/phantom_uwf_stats.py [--data ../shared/data/uwf-slo-ffa/train]
      [--eyes 6] [--size 853] [--seconds 10]

Prints one JSON object: "real" and "phantom" (one row per eye), "stream" (items per CPU-second at
256² eyes / 128² crops, and at 512-853² eyes). Per eye: the angiogram's field (Gaussian-smoothed
early FFA > 25 of 255, largest component; statistics inside it eroded 20 px), the photo's R and G
mean/std there and corr(R, G), blue's distinct values, early/late FFA on vessels (white top-hat,
top 10 %) vs the rest, outside-field grey, vessel widths (2·distance on the skeleton − 1, px),
high-pass noise (minus a sigma-1.5 blur). Only train eyes: never point it at the test eyes' folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from skimage.morphology import skeletonize

from ffasynth.data.dataset import StreamBatchSampler
from ffasynth.data.phantom import DISEASES, make_eye
from ffasynth.data.phantom_stream import PhantomStream


def eye_stats(photo: np.ndarray, early: np.ndarray, late: np.ndarray) -> dict:
    """photo (H, W, 3), early/late (H, W), all float in 0-255."""
    field = (cv2.GaussianBlur(early, (0, 0), 8) > 25).astype(np.uint8)
    contours, _ = cv2.findContours(field, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    field = np.zeros_like(field)
    cv2.drawContours(field, [max(contours, key=cv2.contourArea)], -1, 1, -1)
    inner = cv2.erode(field, np.ones((41, 41), np.uint8)).astype(bool)
    field = field.astype(bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (21, 21))
    response = cv2.morphologyEx(early, cv2.MORPH_TOPHAT, kernel)
    vessels = (response > np.percentile(response[inner], 90)) & inner
    vessels = cv2.morphologyEx(vessels.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)).astype(bool)
    distance = cv2.distanceTransform(vessels.astype(np.uint8), cv2.DIST_L2, 5)
    widths = 2 * distance[skeletonize(vessels)] - 1
    red, green = photo[..., 0][inner], photo[..., 1][inner]
    background = inner & ~vessels

    def high_pass(image):
        return float((image - cv2.GaussianBlur(image, (0, 0), 1.5))[inner].std())

    return {
        "field_fraction": round(float(field.mean()), 2),
        "red": [round(float(red.mean())), round(float(red.std()))],
        "green": [round(float(green.mean())), round(float(green.std()))],
        "red_over_green": round(float(red.mean() / green.mean()), 2),
        "corr_red_green": round(float(np.corrcoef(red, green)[0, 1]), 2),
        "blue_values": sorted({int(v) for v in np.unique(photo[..., 2])})[:5],
        "early_vessel_background": [
            round(float(np.median(early[vessels]))),
            round(float(np.median(early[background]))),
        ],
        "late_vessel_background": [round(float(np.median(late[vessels]))), round(float(np.median(late[background])))],
        "outside_field": round(float(np.median(early[~field]))),
        "vessel_width_median_p90_p99": [round(float(np.percentile(widths, q)), 1) for q in (50, 90, 99)],
        "noise_photo_ffa": [round(high_pass(photo[..., 1]), 1), round(high_pass(early), 1)],
    }


def stream_speed(seconds: float, **settings) -> float:
    """Items per CPU-second, read in the training loop's order (StreamBatchSampler, batches of 8)."""
    stream = PhantomStream(**settings)
    batches = iter(StreamBatchSampler(len(stream), 8, 0))
    count, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        for key in next(batches):
            stream[key]
            count += 1
    return round(count / (time.process_time() - start), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/uwf-slo-ffa/train"))
    parser.add_argument("--eyes", type=int, default=6, help="phantom eyes to measure")
    parser.add_argument("--size", type=int, default=853, help="phantom side (853: the shared photos' width)")
    parser.add_argument("--seconds", type=float, default=10.0, help="CPU seconds per stream measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    def read(path):
        return np.asarray(Image.open(path).convert("RGB")).astype(np.float32)

    real = {}
    for photo_path in sorted(args.data.glob("*.bmp")) if args.data.is_dir() else []:
        if photo_path.stem.isdigit():
            early, late = (read(photo_path.with_name(f"{photo_path.stem}.{k}.bmp"))[..., 0] for k in (1, 2))
            real[photo_path.stem] = eye_stats(read(photo_path), early, late)
    phantom = {}
    for seed in range(args.eyes):
        eye = make_eye(args.size, seed, DISEASES[seed % len(DISEASES)], style="uwf")
        phantom[f"{seed}-{eye.label}"] = eye_stats(eye.photo * 255, eye.ffa_early * 255, eye.ffa_late * 255)
    stream = {
        "uwf 256/128": stream_speed(args.seconds, size=256, crop=128, styles={"uwf": 1.0}),
        "standard 256/128": stream_speed(args.seconds, size=256, crop=128, styles={"standard": 1.0}),
        "mixed 256/128": stream_speed(args.seconds, size=256, crop=128),
        "uwf 512-853/128, 64 crops per eye": stream_speed(
            args.seconds, size=(512, 853), crop=128, styles={"uwf": 1.0}, crops_per_eye=64
        ),
    }
    print(json.dumps({"real": real, "phantom": phantom, "stream_items_per_cpu_second": stream}, indent=1))
    print("measured; see the JSON above", file=sys.stderr)


if __name__ == "__main__":
    main()
