"""Vertebra label schemes (pure numpy).

vfsearch works in VerSe ids: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 28 T13. The plan's range
T4..L5 is VerSe 11..24. TotalSegmentator v2 counts downwards: L5 = 27, L4 = 28, ..., T1 = 43,
S1 = 26, so T4..L5 is 40..27.
"""

from __future__ import annotations

import numpy as np

from vfsearch.core.errors import BadValue, UserError

SCHEMES = ("verse", "totalsegmentator")
TARGET_IDS: tuple[int, ...] = tuple(range(11, 25))  # T4..L5 in VerSe ids

_NAMES = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{i: f"T{i - 7}" for i in range(8, 20)},
    **{i: f"L{i - 19}" for i in range(20, 26)},
    28: "T13",
}


def name(verse_id: int) -> str:
    """``11 -> "T4"``, ``24 -> "L5"``."""
    return _NAMES.get(int(verse_id), f"#{verse_id}")


def verse_id(name_or_id: str | int) -> int:
    """Parse ``"L1"``, ``"t12"`` or ``"20"`` into a VerSe id."""
    text = str(name_or_id).strip().upper()
    if text.isdigit():
        return int(text)
    for vid, n in _NAMES.items():
        if n == text:
            return vid
    raise UserError(f"unknown vertebra {name_or_id!r} (use VerSe ids or names like T4, L1)")


def totalseg_to_verse(tid: int) -> int | None:
    """TotalSegmentator v2 vertebra id to VerSe id (None for non-vertebra labels)."""
    if 27 <= tid <= 31:  # L5..L1
        return 24 - (tid - 27)
    if 32 <= tid <= 43:  # T12..T1
        return 19 - (tid - 32)
    if 44 <= tid <= 50:  # C7..C1
        return 7 - (tid - 44)
    return None


def to_verse(labels: np.ndarray, scheme: str, *, source: str = "labels") -> np.ndarray:
    """Map a label map to VerSe ids; every non-vertebra label becomes 0.

    Float label maps are rounded to integers first (some tools store labels as float32).
    Only T4..L5 survive (other vertebrae, organs, ribs and sacrum become background).
    Returns uint8 (z, y, x).
    """
    if scheme not in SCHEMES:
        raise BadValue("label_scheme", f"must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    arr = labels
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise UserError(f"{source}: label map contains NaN or infinite values")
        arr = np.rint(arr)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{source}: label map must hold integers, got {arr.dtype}")
    # T4..L5 is one contiguous id range in both schemes, so two comparisons per voxel do it
    # for any dtype (no lookup table sized by the largest id, no int64 copy of the volume).
    if scheme == "verse":
        lo, hi = TARGET_IDS[0], TARGET_IDS[-1]
        return np.where((arr >= lo) & (arr <= hi), arr, 0).astype(np.uint8)
    lo, hi = _TS_L5, _TS_L5 + len(TARGET_IDS) - 1  # 27 (L5) .. 40 (T4)
    keep = (arr >= lo) & (arr <= hi)
    return np.where(keep, TARGET_IDS[-1] + _TS_L5 - np.where(keep, arr, _TS_L5), 0).astype(np.uint8)


_TS_L5 = 27
