"""Which labelled images show one eye, for `clinical`'s groups.csv (one eye's images stay in one fold).

A data set of angiograms in class folders names images, not eyes, and often holds several frames or
fields of one eye (`ffa-labelled/02.disease_diagnosis` does). Two images are taken to show one eye when
enough of their keypoints (ORB on a contrast-equalised 256² copy) agree with one similarity transform
(RANSAC, scale 0.5-2), fitted each way: images of different eyes share few (in the shared disease set at
most 9 of 760 within-class pairs; one eye's frames 13-170). Groups
are the connected components of those matches. Joining two images that are not one eye only makes the
folds stricter; missing a pair leaves it to leak, so the bar is set low rather than high and the joined
pairs are listed for a person to look at.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ffasynth.data.io import read_image

SIZE = 256  # images are compared at this square side
MIN_INLIERS = 13  # keypoints that must agree, both ways (unrelated eyes: up to 9 real, 12 phantom)


@dataclass(frozen=True)
class Match:
    first: str
    second: str
    inliers: int


def _features(path: Path, size: int):
    grey = read_image(path, channels=1)[0].numpy()
    levels = cv2.resize((grey * 255).round().astype(np.uint8), (size, size), interpolation=cv2.INTER_AREA)
    levels = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(levels)
    keypoints, descriptors = cv2.ORB_create(nfeatures=500).detectAndCompute(levels, None)
    return np.float32([k.pt for k in keypoints]), descriptors


def agreeing_keypoints(first, second) -> int:
    """Keypoint matches (mutual nearest, Hamming) that one similarity transform of scale 0.5-2 explains
    within 3 px (RANSAC); 0 when there are too few to fit one."""
    (points_a, descriptors_a), (points_b, descriptors_b) = first, second
    if descriptors_a is None or descriptors_b is None or min(len(points_a), len(points_b)) < 8:
        return 0
    matches = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(descriptors_a, descriptors_b)
    if len(matches) < 8:
        return 0
    source = points_a[[m.queryIdx for m in matches]]
    target = points_b[[m.trainIdx for m in matches]]
    cv2.setRNGSeed(0)  # RANSAC's draws: the same answer every run
    transform, inliers = cv2.estimateAffinePartial2D(
        source, target, method=cv2.RANSAC, ransacReprojThreshold=3.0, maxIters=2000, confidence=0.995
    )
    if transform is None or not 0.5 <= float(np.hypot(transform[0, 0], transform[1, 0])) <= 2.0:
        return 0
    return int(inliers.sum())


def same_eye_groups(
    images: dict[str, Path], classes: dict[str, str] | None = None, min_inliers: int = MIN_INLIERS
) -> tuple[dict[str, str], list[Match]]:
    """({id: group} for every image, the matches that joined them). With `classes` (id → label) only
    images of one class are compared (an eye keeps its diagnosis); a group is named by its first id."""
    features = {key: _features(path, SIZE) for key, path in images.items()}
    parent = {key: key for key in images}

    def root(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    matches = []
    for first, second in itertools.combinations(sorted(images), 2):
        if classes is not None and classes[first] != classes[second]:
            continue
        # both ways (each fit matches from one image's keypoints): a chance agreement rarely holds in both
        inliers = min(
            agreeing_keypoints(features[first], features[second]), agreeing_keypoints(features[second], features[first])
        )
        if inliers >= min_inliers:
            matches.append(Match(first, second, inliers))
            low, high = sorted((root(first), root(second)))
            parent[high] = low
    return {key: root(key) for key in images}, matches
