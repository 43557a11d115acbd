"""Landmark schemes: point counts, eye corners and pupils, horizontal-flip index maps, attributes.

WFLW (98 points): contour 0-32 (left to right through the chin), brows 33-41 and 42-50, nose
bridge 51-54 and lower nose 55-59, eyes 60-67 and 68-75, outer lips 76-87, inner lips 88-95,
pupils 96 and 97. Every closed part (brow, eye, lips) runs clockwise in the image starting at
its leftmost point, so mirroring a part reverses its direction around the same start.

300W / iBUG (68 points): contour 0-16, brows 17-21 and 22-26, nose bridge 27-30 and lower nose
31-35, eyes 36-41 and 42-47, outer lips 48-59, inner lips 60-67.
"""

from __future__ import annotations

from dataclasses import dataclass

WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "make-up", "occlusion", "blur")
NORMALIZATIONS = ("inter-ocular", "inter-pupil")


def _pairs_to_map(num_points: int, pairs: list[tuple[int, int]]) -> tuple[int, ...]:
    """A permutation that swaps each pair and leaves the other points in place."""
    mapping = list(range(num_points))
    for a, b in pairs:
        mapping[a], mapping[b] = b, a
    return tuple(mapping)


def _wflw_pairs() -> list[tuple[int, int]]:
    pairs = [(i, 32 - i) for i in range(16)]  # contour: 16 is the chin
    # Brows: upper edge 33..37 (outer->inner) mirrors 46..42; lower edge 38..41 (inner->outer)
    # mirrors 50..47.
    pairs += [(33 + i, 46 - i) for i in range(5)] + [(38 + i, 50 - i) for i in range(4)]
    pairs += [(55, 59), (56, 58)]  # lower nose; 57 is the tip, the bridge 51-54 is central
    # Eyes: corners 60 (outer) <-> 72 (outer), 64 (inner) <-> 68 (inner); upper lids 61..63 <->
    # 71..69; lower lids 65..67 (inner->outer) <-> 75..73.
    pairs += [(60 + i, 72 - i) for i in range(5)] + [(65 + i, 75 - i) for i in range(3)]
    # Outer lips: corners 76 <-> 82, upper 77..78 <-> 81..80 (79 central), lower 83..84 <->
    # 87..86 (85 central). Inner lips: corners 88 <-> 92, 89 <-> 91 (90 central), 93 <-> 95.
    pairs += [(76, 82), (77, 81), (78, 80), (83, 87), (84, 86), (88, 92), (89, 91), (93, 95)]
    pairs += [(96, 97)]  # pupils
    return pairs


def _w300_pairs() -> list[tuple[int, int]]:
    pairs = [(i, 16 - i) for i in range(8)]  # contour: 8 is the chin
    pairs += [(17 + i, 26 - i) for i in range(5)]  # brows
    pairs += [(31, 35), (32, 34)]  # lower nose; 33 is central, bridge 27-30 central
    # Eyes: 36 outer <-> 45 outer, 37,38 <-> 44,43, 39 inner <-> 42 inner, 40,41 <-> 47,46.
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
    pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer lips
    pairs += [(60, 64), (61, 63), (65, 67)]  # inner lips
    return pairs


@dataclass(frozen=True)
class Scheme:
    """A landmark annotation scheme."""

    name: str
    num_points: int
    left_eye_outer: int  # the inter-ocular normalisation uses the two outer eye corners
    right_eye_outer: int
    flip_map: tuple[int, ...]
    # The inter-pupil normalisation uses the mean of each group: WFLW annotates the pupils, 300W
    # has none, so its pupil is the mean of the six points around the eye.
    left_pupil: tuple[int, ...]
    right_pupil: tuple[int, ...]


WFLW = Scheme("wflw", 98, 60, 72, _pairs_to_map(98, _wflw_pairs()), (96,), (97,))
W300 = Scheme(
    "300w", 68, 36, 45, _pairs_to_map(68, _w300_pairs()), tuple(range(36, 42)), tuple(range(42, 48))
)
SCHEMES = {WFLW.num_points: WFLW, W300.num_points: W300}


def scheme_for(num_points: int) -> Scheme:
    """The scheme with ``num_points`` landmarks (98: WFLW, 68: 300W)."""
    if num_points not in SCHEMES:
        raise ValueError(f"num_points: expected one of {sorted(SCHEMES)}, got {num_points}")
    return SCHEMES[num_points]


def normalizing_points(
    scheme: Scheme, normalization: str
) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    """The point groups whose means the ``normalization`` distance joins, left and right, and
    what they are in words: the outer eye corners (``inter-ocular``) or the pupils
    (``inter-pupil``; on 300W each eye's six points)."""
    if normalization == "inter-ocular":
        left, right = (scheme.left_eye_outer,), (scheme.right_eye_outer,)
        return left, right, f"the outer eye corners (points {left[0]} and {right[0]})"
    if normalization == "inter-pupil":
        return scheme.left_pupil, scheme.right_pupil, "the pupils"
    raise ValueError(f"normalization: expected one of {NORMALIZATIONS}, got {normalization!r}")
