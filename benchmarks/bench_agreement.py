"""Issue 21's network-free metrics on the trivial method every other must beat, the inverted green
channel (benchmarks/compare_cpu.py's: standardised to the training FFAs' mean and spread):

- the shared UWF test eyes (7, 8, 10; early and late) at native size;
- the demo's held-out phantoms (`make demo`: 48 eyes at 256 px, seed 0, 6 held out), where the
  lesion records give per-lesion recall;

plus the real angiograms against themselves (every score perfect) and the time of one vessel mask
(Frangi, 4 scales) and one region map on a native 853x682 UWF angiogram.

    nice -n 10 .venv/bin/python benchmarks/bench_agreement.py --out /tmp/agreement
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, log, machine  # noqa: E402
from compare_cpu import prepare_data, run_inverted_green  # noqa: E402

from ffasynth.data.io import is_image_file, read_image  # noqa: E402
from ffasynth.data.phantom import write_phantom_dataset  # noqa: E402
from ffasynth.data.registration import field_of_view  # noqa: E402
from ffasynth.evaluation.agreement import AGREEMENT_METRICS  # noqa: E402
from ffasynth.evaluation.metrics import EvalSettings, evaluate  # noqa: E402
from ffasynth.evaluation.outputs import write_evaluation  # noqa: E402
from ffasynth.evaluation.regions import region_masks  # noqa: E402
from ffasynth.evaluation.vessels import vessel_mask  # noqa: E402
from ffasynth.pretrain import default_shared  # noqa: E402

METRICS = (*AGREEMENT_METRICS, "psnr", "ssim", "ms_ssim")


def copies(test: Path, folder: Path) -> Path:
    """The real angiograms, named as generated ones: the ceiling of every score."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in test.glob("*.*.*") if is_image_file(p)):  # N.k.ext: the angiograms
        shutil.copyfile(path.resolve(), folder / f"{path.stem}_ffa{path.suffix}")
    return folder


def timing(path: Path, repeats: int = 3) -> dict:
    image = read_image(path, channels=1)[0].numpy()
    fov = field_of_view(image)
    vessels, regions = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        mask = vessel_mask(image, fov)
        vessels.append(time.perf_counter() - began)
        began = time.perf_counter()
        region_masks(image, fov, mask)
        regions.append(time.perf_counter() - began)
    return {"size": f"{image.shape[1]}x{image.shape[0]}", "vessel_mask_s": min(vessels), "regions_s": min(regions)}


def scores(evaluation) -> dict:
    rows = {}
    for method in evaluation.methods:
        row = {metric: values["mean"] for metric, values in method.summary.items()}
        row.update(method.agreement.get("retrieval", {}))
        if "lesions" in method.agreement:
            row["lesions"] = method.agreement["lesions"]
        row["by_phase"] = method.agreement.get("by_phase", {})
        rows[method.name] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shared", type=Path, default=default_shared())
    args = parser.parse_args()
    if not (args.shared / "uwf-slo-ffa" / "test").is_dir():
        sys.exit(f"no shared UWF pairs at {args.shared}/uwf-slo-ffa (set --shared or FFASYNTH_SHARED_DATA)")
    record = {"machine": machine()}
    data = prepare_data(args.shared, args.out)
    record["timing"] = timing(data / "test" / "7.1.bmp")
    log(f"timing: {record['timing']}")
    settings = EvalSettings(metrics=METRICS)

    green = run_inverted_green(SimpleNamespace(out=args.out / "uwf"), data)["translated"]
    fakes = {"inverted-green": green, "real (copy)": copies(data / "test", args.out / "uwf" / "copy")}
    began = time.perf_counter()
    evaluation = evaluate(data / "test", fakes, settings, source_dir=data / "test")
    record["uwf_evaluate_s"] = time.perf_counter() - began
    write_evaluation(evaluation, args.out / "uwf" / "report")
    record["uwf"] = scores(evaluation)

    phantoms = write_phantom_dataset(args.out / "phantoms" / "data", n=48, size=256, seed=0, test_fraction=0.125)
    green = run_inverted_green(SimpleNamespace(out=args.out / "phantoms"), phantoms)["translated"]
    fakes = {"inverted-green": green, "real (copy)": copies(phantoms / "test", args.out / "phantoms" / "copy")}
    evaluation = evaluate(phantoms / "test", fakes, settings, source_dir=phantoms / "test")
    write_evaluation(evaluation, args.out / "phantoms" / "report")
    record["phantoms"] = scores(evaluation)
    emit(record)


if __name__ == "__main__":
    main()
