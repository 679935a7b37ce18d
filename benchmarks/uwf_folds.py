"""Choosing settings for real UWF eyes without the test eyes (issue 20): cross-validation over the four
shared training eyes (1-4), so that the test eyes (7, 8, 10) are scored once, with settings fixed here.

Each fold fine-tunes the tiny preset from its base (`quickstart`, as compare_cpu.py does) on two training
eyes for the same CPU minutes and translates the other two at native size with each image-guidance scale
and noise seed asked for. The eyes are registered first by compare_cpu.py's `prepare_data`; a training
pair whose registration is refused is left out of training (eye 4 on the shared data).

Scored per fold, setting and seed: own-eye retrieval with the real FFAs of every other training eye of the
same phase as candidates (`retrieval(..., distractors=)`: chance 1/4 with four eyes, where the two
translated eyes alone would give 1/2), as the share of outputs whose own eye comes first, the margin over
the best other eye and the excess over the mean of the others (the steadiest: one other eye's quirk moves
the margin, e.g. a dim late angiogram with leakage that every output resembles less), the same on the
vessel-scale structure alone (`retrieval.vessel_band_retrieval`: do its vessels lie where this eye's do,
whatever the low-frequency layout), and vessel Dice.

    .venv/bin/python benchmarks/uwf_folds.py --out /tmp/folds --minutes 3 --guidance 3 5 8 --seeds 0 1
    .venv/bin/python benchmarks/uwf_folds.py --out /tmp/folds-r75 --minutes 3 -- stage1.rehearsal=0.75
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, log, machine  # noqa: E402
from compare_cpu import prepare_data  # noqa: E402

from ffasynth.data.io import read_image  # noqa: E402
from ffasynth.data.pair_check import load_pairs  # noqa: E402
from ffasynth.data.registration import field_of_view  # noqa: E402
from ffasynth.evaluation.retrieval import retrieval, vessel_band_retrieval  # noqa: E402
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


def fold_data(shared: Path, out: Path, train: tuple[str, ...], test: tuple[str, ...]) -> Path:
    """The fold's eyes as compare_cpu.py prepares the test eyes' comparison: links to the shipped training
    eyes under OUT/shared/uwf-slo-ffa/{train,test}, registered by `prepare_data` into OUT/data."""
    for split, eyes in (("train", train), ("test", test)):
        folder = out / "shared" / "uwf-slo-ffa" / split
        folder.mkdir(parents=True, exist_ok=True)
        for eye in eyes:
            for path in (shared / "uwf-slo-ffa" / "train").glob(f"{eye}.*"):  # N.bmp, N.1.bmp, N.2.bmp
                link = folder / path.name
                if not link.exists():
                    link.symlink_to(path.resolve())
    return prepare_data(out / "shared", out)


@dataclass
class Eyes:
    """Real angiograms (key → grey), their phases, fields of view and vessel masks, each computed once."""

    reals: dict[str, np.ndarray]
    phases: dict[str, str]
    fovs: dict[str, np.ndarray] = field(init=False)
    vessels: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self):
        self.fovs = {key: field_of_view(real) for key, real in self.reals.items()}
        self.vessels = {key: vessel_mask(real, self.fovs[key]) for key, real in self.reals.items()}

    @classmethod
    def read(cls, data: Path) -> Eyes:
        """Every eye of a fold: the translated ones and the ones trained on."""
        pairs = load_pairs(data / "train") + load_pairs(data / "test")
        return cls(
            {key_of(p): read_image(p.target, channels=1).numpy()[0] for p in pairs}, {key_of(p): p.phase for p in pairs}
        )


def score(fakes: dict[str, np.ndarray], eyes: Eyes) -> dict:
    translated = {key: eyes.reals[key] for key in fakes}
    others = {key: image for key, image in eyes.reals.items() if key not in fakes}
    found = retrieval(fakes, translated, eyes.phases, fovs=eyes.fovs, distractors=others)
    band = vessel_band_retrieval(fakes, translated, eyes.phases, fovs=eyes.fovs, distractors=others)
    dice = []
    for key, fake in fakes.items():
        inside = eyes.fovs[key]
        dice.append(vessel_scores(eyes.vessels[key], vessel_mask(fake, inside), inside)["vessel_dice"])
    return {
        "own_eye": found.accuracy,
        "chance": found.chance,
        "margin": found.mean_margin,
        "excess": found.mean_excess,
        "per_image_excess": dict(zip(found.keys, np.round(found.excess, 4).tolist(), strict=True)),
        "vessel_dice": float(np.mean(dice)),
        # the same on the vessel-scale structure alone (retrieval.vessel_band_retrieval)
        "vessel_band_own_eye": band.accuracy,
        "vessel_band_excess": band.mean_excess,
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
    rows = []
    for fold in args.folds:
        train, test = FOLDS[fold]
        folder = args.out / f"fold-{fold}"
        data = fold_data(args.shared, folder, train, test)
        eyes = Eyes.read(data)
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
                row = {"fold": fold, "guidance": guidance, "seed": seed, **score(fakes, eyes)}
                rows.append(row | {"s_per_image": round(seconds, 1)})
                log(json.dumps(row))
    log("| fold | guidance | seed | own eye | margin | excess | vessel band: own eye (excess) | vessel Dice |")
    for row in rows:
        log(
            f"| {row['fold']} | {row['guidance']:g} | {row['seed']} | {row['own_eye']:.2f} "
            f"(chance {row['chance']:.2f}) | {row['margin']:+.3f} | {row['excess']:+.3f} | "
            f"{row['vessel_band_own_eye']:.2f} ({row['vessel_band_excess']:+.3f}) | {row['vessel_dice']:.3f} |"
        )
    log("mean over folds and seeds:")
    for guidance in args.guidance:
        chosen = [row for row in rows if row["guidance"] == guidance]
        columns = ("own_eye", "margin", "excess", "vessel_band_excess", "vessel_dice")
        means = {k: float(np.mean([row[k] for row in chosen])) for k in columns}
        log(f"guidance {guidance:g}: " + ", ".join(f"{k} {v:+.3f}" for k, v in means.items()))
    record = {"machine": machine(), "minutes": args.minutes, "overrides": args.overrides, "rows": rows}
    (args.out / "folds.json").write_text(json.dumps(record, indent=1))
    emit(record)


if __name__ == "__main__":
    main()
