"""Choosing settings for real UWF eyes without the test eyes (issue 20): cross-validation over the four
shared training eyes (1-4), so that the test eyes (7, 8, 10) are scored once, with settings fixed here.

Each fold fine-tunes the tiny preset from its base (`quickstart`, as compare_cpu.py does) on two training
eyes for the same CPU minutes and translates the other two at native size with each image-guidance scale
and noise seed asked for. The eyes are registered first, as compare_cpu.py registers them; a training
pair whose registration is refused is left out of training (eye 4 on the shared data).

Scored per fold, setting and seed: own-eye retrieval with the real FFAs of every other training eye of the
same phase as candidates (`retrieval(..., distractors=)`: chance 1/4 with four eyes, where the two
translated eyes alone would give 1/2), as the share of outputs whose own eye comes first, the margin over
the best other eye and the excess over the mean of the others (the steadiest: one other eye's quirk moves
the margin, e.g. a dim late angiogram with leakage that every output resembles less), and vessel Dice.

    .venv/bin/python benchmarks/uwf_folds.py --out /tmp/folds --minutes 3 --guidance 3 5 8 --seeds 0 1
    .venv/bin/python benchmarks/uwf_folds.py --out /tmp/folds-r75 --minutes 3 -- stage1.rehearsal=0.75
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, log, machine  # noqa: E402

from ffasynth.data.alignment import aligned_pairs, register_folder  # noqa: E402
from ffasynth.data.io import read_image  # noqa: E402
from ffasynth.data.pairs import load_pairs  # noqa: E402
from ffasynth.data.registration import field_of_view  # noqa: E402
from ffasynth.evaluation.retrieval import retrieval  # noqa: E402
from ffasynth.evaluation.vessels import vessel_mask, vessel_scores  # noqa: E402
from ffasynth.pipeline import FFASynthesisPipeline  # noqa: E402
from ffasynth.pretrain import default_shared  # noqa: E402
from ffasynth.quickstart import quickstart  # noqa: E402

# fold → (training eyes, held-out eyes). Eye 4's registration is refused on the shared data, so it is never
# trained on: the complementary split {3, 4} → {1, 2} would train on one eye; B keeps two, and holds 4 out twice.
FOLDS = {"A": (("1", "2"), ("3", "4")), "B": (("1", "3"), ("2", "4"))}


def key_of(pair) -> str:
    """'3-early' for the registered pair 3-early@early."""
    return pair.target.name.split(".")[0]


def register(shared: Path, out: Path) -> Path:
    """All training eyes registered once (photo warped into each angiogram's frame)."""
    folder = out / "registered"
    if not folder.is_dir():
        register_folder(shared / "uwf-slo-ffa" / "train", folder)
    return folder


def fold_data(registered: Path, out: Path, train: tuple[str, ...], test: tuple[str, ...]) -> Path:
    """OUT/data/{train,test}: links to the registered files of the fold's eyes (refused training pairs left out)."""
    data = out / "data"
    accepted = {pair.target.name for pair in aligned_pairs(registered)}
    for split, eyes in (("train", train), ("test", test)):
        folder = data / split
        folder.mkdir(parents=True, exist_ok=True)
        for pair in load_pairs(registered):
            eye = key_of(pair).split("-")[0]
            if eye not in eyes or (split == "train" and pair.target.name not in accepted):
                continue
            for path in (pair.source, pair.target):
                link = folder / path.name
                if not link.exists():
                    link.symlink_to(path.resolve())
    return data


def score(fakes: dict[str, np.ndarray], reals: dict[str, np.ndarray], phases: dict[str, str]) -> dict:
    translated = {key: reals[key] for key in fakes}
    others = {key: image for key, image in reals.items() if key not in fakes}
    found = retrieval(fakes, translated, phases, distractors=others)
    dice = []
    for key, fake in fakes.items():
        inside = field_of_view(reals[key])
        dice.append(vessel_scores(vessel_mask(reals[key], inside), vessel_mask(fake, inside), inside)["vessel_dice"])
    return {
        "own_eye": found.accuracy,
        "chance": found.chance,
        "margin": found.mean_margin,
        "excess": found.mean_excess,
        "per_image_excess": dict(zip(found.keys, np.round(found.excess, 4).tolist(), strict=True)),
        "vessel_dice": float(np.mean(dice)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=3.0, help="quickstart minutes per fold")
    parser.add_argument("--shared", type=Path, default=default_shared())
    parser.add_argument("--folds", nargs="+", default=list(FOLDS), choices=list(FOLDS))
    parser.add_argument("--guidance", nargs="+", type=float, default=[3.0, 5.0], help="image guidance scales")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="noise seeds per setting")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("overrides", nargs="*", help="config key=value for the fine-tuning")
    args = parser.parse_args()
    registered = register(args.shared, args.out)
    pairs = load_pairs(registered)
    reals = {key_of(pair): read_image(pair.target, channels=1).numpy()[0] for pair in pairs}
    phases = {key_of(pair): pair.phase for pair in pairs}
    rows = []
    for fold in args.folds:
        train, test = FOLDS[fold]
        folder = args.out / f"fold-{fold}"
        data = fold_data(registered, folder, train, test)
        log(f"== fold {fold}: train on eyes {', '.join(train)}, translate eyes {', '.join(test)}")
        quickstart(folder / "run", args.minutes, data, args.seed, None, False, log, args.overrides)
        pipeline = FFASynthesisPipeline.from_pretrained(folder / "run" / "pipeline")
        pipeline.set_progress_bar_config(disable=True)
        held = load_pairs(data / "test")
        for guidance in args.guidance:
            for seed in args.seeds:
                fakes, began = {}, time.perf_counter()
                for pair in held:
                    generator = torch.Generator().manual_seed(seed)
                    output = pipeline(
                        str(pair.source),
                        generator=generator,
                        phase=pair.phase,
                        image_guidance_scale=guidance,
                        output_type="pt",
                    )
                    fakes[key_of(pair)] = output.images[0][0].float().numpy()
                seconds = (time.perf_counter() - began) / len(held)
                row = {"fold": fold, "guidance": guidance, "seed": seed, **score(fakes, reals, phases)}
                rows.append(row | {"s_per_image": round(seconds, 1)})
                log(json.dumps(row))
    log("| fold | guidance | seed | own eye | margin | excess | vessel Dice |")
    for row in rows:
        log(
            f"| {row['fold']} | {row['guidance']:g} | {row['seed']} | {row['own_eye']:.2f} "
            f"(chance {row['chance']:.2f}) | {row['margin']:+.3f} | {row['excess']:+.3f} | {row['vessel_dice']:.3f} |"
        )
    log("mean over folds and seeds:")
    for guidance in args.guidance:
        chosen = [row for row in rows if row["guidance"] == guidance]
        means = {k: float(np.mean([row[k] for row in chosen])) for k in ("own_eye", "margin", "excess", "vessel_dice")}
        log(f"guidance {guidance:g}: " + ", ".join(f"{k} {v:+.3f}" for k, v in means.items()))
    record = {"machine": machine(), "minutes": args.minutes, "overrides": args.overrides, "rows": rows}
    (args.out / "folds.json").write_text(json.dumps(record, indent=1))
    emit(record)


if __name__ == "__main__":
    main()
