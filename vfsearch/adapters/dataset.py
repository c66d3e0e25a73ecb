"""`WindowDataset`: 2.5D windows of vertebra crops from a vfsearch Zarr store (torch).

One item is one window: ``seq_len`` slices along the configured plane centred on slice ``t``
of one vertebra crop, normalised with the store's fingerprint, fitted to ``patch_size`` and
(optionally) augmented; its target is the fracture mask of slice ``t`` (or of every slice).
The index runs over every slice ``t`` of every vertebra of the complete cases of a split.

Reading. Each process keeps an LRU cache (bounded by ``cache_bytes``) of decoded vertebra
crops, stored plane-first so that a window is a contiguous block of slices. A vertebra's Zarr
chunks are thus decompressed once per process and reused for the tens of windows cut from
the same vertebra; this is what makes the compressed store about as fast as a raw memmap.
With ``cache_bytes=0`` (or a crop larger than the cache) only the chunks that hold the
window's slices are read.

Processes. The dataset is picklable and opens the store lazily in each process: pickling
drops the store handle and the cache, and a change of process id (a forked DataLoader
worker) reopens both, so no zarr handle crosses a process boundary (zarr 3 was reported to
deadlock in forked workers after the parent had read an array; ``spawn`` works as well).
It is map-style, so `torch.utils.data.DistributedSampler` shards it; `WindowDataset.sampler`
gives a `WeightedRandomSampler` that oversamples windows with fracture.

Augmentation. The random patch position is always drawn here. The rotation/scaling and
intensity augmentation run either here, per window (``data.augment_device=cpu``), or batched
on the training device (``device``; ``auto`` = device on CUDA and
`vfsearch.core.augment.AUTO_ON_CPU` otherwise): items then carry ``aug_seed`` (the window's
own seed), ``aug_strength`` and ``aug_fill``, and the training loop calls `finish_batch`
once the collated batch is on its device.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler

from vfsearch.adapters.store import Store
from vfsearch.core import windows as W
from vfsearch.core.augment import augment_batch, augment_on_device
from vfsearch.core.config import DataConfig
from vfsearch.core.errors import UserError
from vfsearch.core.sampling import balance_groups, decode, epoch_order, strided_centres

DEFAULT_CACHE_BYTES = 256 * 2**20
AUG_KEYS = ("aug_seed", "aug_strength", "aug_fill")  # an item's deferred augmentation


class WindowDataset(Dataset):
    """Map-style dataset of 2.5D windows.

    Args:
        store: a `Store` or its path.
        split: ``"train"``, ``"val"``, ``"test"`` or None for every complete case.
        data: window settings (``seq_len``, ``plane``, ``patch_size``, ``augment`` strength,
            ``oversample_fracture``, ``target_all_slices``).
        augment: apply a random patch position, affine and intensity augmentation of
            strength ``data.augment`` (0: none); seeded per (``seed``, epoch, index), see
            `set_epoch`. Without it every patch is centred and nothing random happens.
            Where ``data.augment_device`` resolves to the device, only the patch position
            is drawn here and the items carry `AUG_KEYS` for `finish_batch`.
        seed: base seed of the augmentation and of `sampler`.
        cache_bytes: per-process LRU budget for decoded vertebra crops (0: no cache).

    Items: ``{"image": float32 (T, P, P) normalised, "target": float32 (1, P, P) 0/1, or
    (T, P, P) with ``target_all_slices``, "case": str, "vertebra": int, "slice": int}`` with
    T = ``seq_len``, P = ``patch_size``; the in-plane axes keep the canonical order (sagittal:
    (z, y), coronal: (z, x), axial: (y, x)). With augmentation deferred to the device, also
    ``"aug_seed": int`` (>= 0; a function of seed, epoch and draw, index), ``"aug_strength":
    float``, ``"aug_fill": float`` (the normalised value of air).

    Nothing is read in ``__init__``; the index (array shapes only) is built on first use.
    """

    def __init__(
        self,
        store: str | Path | Store,
        split: str | None,
        data: DataConfig,
        *,
        augment: bool = False,
        seed: int = 0,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.split = split
        self.data = data
        self.axis = W.plane_axis(data.plane)
        if data.seq_len < 1 or data.seq_len % 2 == 0:
            raise UserError(f"data.seq_len: must be odd and >= 1, got {data.seq_len}")
        self.augment = bool(augment)
        # resolved once here (the training process): loader processes get the decision
        self.device_augment = augment_on_device(data.augment_device, cuda=torch.cuda.is_available())
        self.seed = int(seed)
        self.epoch = 0
        self.cache_bytes = int(cache_bytes)
        # plain data, built once and pickled along to workers
        self._items: list[tuple[str, int]] | None = None
        self._shapes: list[tuple[int, int, int]] = []
        self._offsets: np.ndarray | None = None  # (n_items + 1,) first index of each vertebra
        self._fingerprint: dict[str, Any] = {}
        self._counts: dict[int, np.ndarray] = {}  # item -> fracture voxels per slice
        self._domains: list[str] | None = None  # item -> its case's domain, read on demand
        # per-process state, dropped on pickling and on a change of process
        self._pid: int | None = None
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_used = 0

    # -- pickling and processes -----------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pid"] = None
        state["_cache"] = OrderedDict()
        state["_cache_used"] = 0
        return state

    def _open(self) -> Store:
        """The store, reopened (and the cache emptied) in each new process."""
        if self._pid != os.getpid():
            self.store = Store(self.store.path, self.store.mode)
            self._cache = OrderedDict()
            self._cache_used = 0
            self._pid = os.getpid()
        return self.store

    # -- index ----------------------------------------------------------------------------
    def _build_index(self) -> None:
        store = self._open()
        items = store.items(self.split)
        if not items:
            which = "any split" if self.split is None else f"split {self.split!r}"
            raise UserError(f"{store.path}: no complete cases in {which}")
        fingerprint = store.fingerprint
        W.normalised_floor(fingerprint)  # fail early on a store without a usable fingerprint
        shapes = []
        for k, (case, vid) in enumerate(items):
            attrs = store.vertebra_attrs(case, vid)
            shape = attrs.get("shape")  # ingest stores it: saves opening the array
            if not (isinstance(shape, list) and len(shape) == 3):
                shape = store.array(case, vid, "image").shape
            shapes.append(tuple(int(s) for s in shape))
            stored = attrs.get("fracture_slices", {})
            counts = np.asarray(stored.get(self.data.plane, []), dtype=np.int64)
            if counts.shape == (shapes[k][self.axis],):  # else: read from the mask when needed
                self._counts[k] = counts
        lengths = [s[self.axis] for s in shapes]
        self._shapes = shapes  # type: ignore[assignment]
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._fingerprint = fingerprint
        self._items = items

    def _ensure_index(self) -> list[tuple[str, int]]:
        if self._items is None:
            self._build_index()
        return self._items  # type: ignore[return-value]

    @property
    def items(self) -> list[tuple[str, int]]:
        """The (case_id, verse_id) of every vertebra, in index order."""
        return self._ensure_index()

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The store's fingerprint (HU percentiles, mean, std) used by `normalise`."""
        self._ensure_index()
        return self._fingerprint

    def __len__(self) -> int:
        self._ensure_index()
        return int(self._offsets[-1])  # type: ignore[index]

    def locate(self, index: int) -> tuple[int, int]:
        """Window ``index`` → (vertebra item number, centre slice t)."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"window {index} outside 0..{n - 1}")
        offsets = cast(np.ndarray, self._offsets)  # built by len(self)
        k = int(np.searchsorted(offsets, index, side="right")) - 1
        return k, int(index - offsets[k])

    def strided(self, stride: int) -> list[int]:
        """The windows centred on every ``stride``-th slice of each vertebra
        (`vfsearch.core.sampling.strided_centres`), in index order; all of them at 1."""
        offsets = self._offsets_array()
        return [
            int(offsets[k] + t)
            for k in range(len(offsets) - 1)
            for t in strided_centres(int(offsets[k + 1] - offsets[k]), stride)
        ]

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws (like `DistributedSampler.set_epoch`).

        DataLoader workers hold copies: call it before creating the epoch's iterator (or use
        ``persistent_workers=False``, the default).
        """
        self.epoch = int(epoch)

    # -- reading --------------------------------------------------------------------------
    def _crop_bytes(self, k: int) -> int:
        return int(np.prod(self._shapes[k])) * 3  # int16 image + uint8 fracture

    def _volumes(self, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Plane-first (image, fracture) of vertebra ``k`` from the LRU cache, or None."""
        store = self._open()
        hit = self._cache.get(k)
        if hit is not None:
            self._cache.move_to_end(k)
            return hit
        size = self._crop_bytes(k)
        if size > self.cache_bytes:
            return None
        case, vid = self.items[k]
        # plane-first and contiguous: every later window is a block of whole slices
        image = np.ascontiguousarray(W.plane_first(store.read(case, vid, "image"), self.axis))
        counts = self._counts.get(k)
        if counts is not None and not counts.any():
            # ingest says this vertebra has no fracture: skip decoding an all-zero mask
            fracture = np.zeros(image.shape, np.uint8)
        else:
            fracture = np.ascontiguousarray(
                W.plane_first(store.read(case, vid, "fracture"), self.axis)
            )
        vols = (image, fracture)
        size = sum(a.nbytes for a in vols)
        while self._cache and self._cache_used + size > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cache_used -= sum(a.nbytes for a in old)
        self._cache[k] = vols
        self._cache_used += size
        return vols

    def _read_window(self, k: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw window of vertebra ``k`` at slice ``t``: HU and fracture, both ``(T, h, w)``.

        The one I/O seam of the dataset (the loader benchmark swaps in other sources).
        """
        seq_len = self.data.seq_len
        vols = self._volumes(k)
        if vols is not None:
            idx = W.window_indices(t, seq_len, vols[0].shape[0])
            return vols[0][idx], vols[1][idx]
        # partial read: only the chunks holding slices lo..hi
        store = self._open()
        case, vid = self.items[k]
        idx = W.window_indices(t, seq_len, self._shapes[k][self.axis])
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        sel = tuple(slice(lo, hi) if a == self.axis else slice(None) for a in range(3))
        image = np.ascontiguousarray(
            W.plane_first(store.array(case, vid, "image")[sel], self.axis)[idx - lo]
        )
        counts = self._counts.get(k)
        if counts is not None and not counts[lo:hi].any():
            return image, np.zeros(image.shape, np.uint8)
        fracture = W.plane_first(store.array(case, vid, "fracture")[sel], self.axis)
        return image, np.ascontiguousarray(fracture[idx - lo])

    def __getitem__(self, index: int) -> dict[str, Any]:
        # a virtual index from `epoch_order` carries its own augmentation key (epoch, draw)
        index, key = decode(int(index), len(self))
        k, t = self.locate(index)
        image, fracture = self._read_window(k, t)
        if not self.data.target_all_slices:
            centre = self.data.seq_len // 2
            fracture = fracture[centre : centre + 1]
        strength = self.data.augment if self.augment else 0.0
        rng = (
            W.item_rng(self.seed, self.epoch if key is None else key, index)
            if strength > 0
            else None
        )
        defer = rng is not None and self.device_augment
        img, tgt = W.make_window(
            image,
            fracture,
            self._fingerprint,
            patch_size=self.data.patch_size,
            rng=rng,
            strength=0.0 if defer else strength,  # deferred: the patch position only
        )
        case, vid = self.items[k]
        item = {"image": img, "target": tgt, "case": case, "vertebra": int(vid), "slice": t}
        if defer:
            assert rng is not None
            item["aug_seed"] = int(rng.integers(2**63 - 1))
            item["aug_strength"] = float(strength)
            item["aug_fill"] = W.normalised_floor(self._fingerprint)
        return item

    def vertebra(self, k: int) -> dict[str, Any]:
        """Vertebra ``k``'s every window at once, as its slices (the windows are assembled
        from them by `vfsearch.core.steps.eval_volume`): ``{"image": float32 (n, P, P)
        normalised, "target": float32 (n, P, P) 0/1, "case": str, "vertebra": int}``, the
        patches centred and nothing augmented, exactly as `__getitem__` cuts the slices of
        the windows ``offsets[k] .. offsets[k + 1] - 1`` without ``augment``."""
        vols = self._volumes(k)  # builds the index
        if vols is not None:
            image, fracture = vols
        else:  # larger than the cache: read whole, keep nothing
            store = self._open()
            case, vid = self.items[k]
            image = W.plane_first(store.read(case, vid, "image"), self.axis)
            fracture = W.plane_first(store.read(case, vid, "fracture"), self.axis)
        # a window's own preparation, over all n slices at once (centred, no augmentation)
        img, tgt = W.make_window(
            image, fracture, self._fingerprint, patch_size=self.data.patch_size
        )
        case, vid = self.items[k]
        return {
            "image": img,
            "target": tgt,
            "case": case,
            "vertebra": int(vid),
        }

    # -- fracture flags and oversampling --------------------------------------------------
    def slice_counts(self, k: int) -> np.ndarray:
        """Fracture voxels per slice (along the plane) of vertebra ``k``: int64 ``(n,)``.

        From the vertebra attribute ``fracture_slices`` when ingest stored it (see
        `vfsearch.core.windows.fracture_slice_counts`; read with the index), else from the
        fracture mask, read once per vertebra and kept (the counts travel with the pickled
        dataset). Where the attribute says a vertebra has no fracture at all, its mask is
        never decoded (zeros are used): a third of the decoding cost saved.
        """
        case, vid = self.items[k]  # builds the index, which reads the stored counts
        if k not in self._counts:
            store = self._open()
            vols = self._cache.get(k)
            self._counts[k] = (
                W.slice_counts(vols[1], 0)
                if vols is not None
                else W.slice_counts(store.read(case, vid, "fracture"), self.axis)
            )
        return self._counts[k]

    def fracture_flags(self) -> np.ndarray:
        """Per window: does its target contain fracture? bool ``(len(self),)``.

        The target is slice t, or the whole window with ``target_all_slices``. Counts are
        taken before patch fitting, so a random crop may still cut a small fracture away.
        """
        return np.concatenate(
            [
                W.window_has_target(
                    self.slice_counts(k), self.data.seq_len, self.data.target_all_slices
                )
                for k in range(len(self.items))
            ]
        )

    def has_fracture(self, index: int) -> bool:
        k, t = self.locate(index)
        flags = W.window_has_target(
            self.slice_counts(k), self.data.seq_len, self.data.target_all_slices
        )
        return bool(flags[t])

    def sample_weights(self, oversample: float | None = None) -> np.ndarray:
        """Sampling weight per window: ``1 + oversample`` with fracture, 1 without; with
        ``data.balance_domains`` rescaled so that every case domain holds the same total
        (`vfsearch.core.sampling.balance_groups`).

        ``oversample`` defaults to ``data.oversample_fracture``; float64 ``(len(self),)``.
        """
        extra = self.data.oversample_fracture if oversample is None else float(oversample)
        if extra < 0:
            raise UserError(f"data.oversample_fracture: must be >= 0, got {extra}")
        weights = 1.0 + extra * self.fracture_flags().astype(np.float64)
        if self.data.balance_domains:
            weights = balance_groups(weights, self.window_domains())
        return weights

    def window_domains(self) -> np.ndarray:
        """The domain of each window's case, as a number per window (``(len(self),)`` int64;
        one number per distinct domain of `items`, in sorted order, "" included)."""
        offsets = self._offsets_array()
        _, codes = np.unique(np.asarray(self._item_domains(), dtype=str), return_inverse=True)
        return np.repeat(codes.astype(np.int64), np.diff(offsets))

    def _item_domains(self) -> list[str]:
        """Each vertebra's case domain ("" = none), read from the case attributes the first
        time domains are balanced (an index without balancing never reads them)."""
        if self._domains is None:
            store = self._open()
            items = self.items
            domain_of = {c: str(store.case_attrs(c).get("domain") or "") for c in dict(items)}
            self._domains = [domain_of[case] for case, _ in items]
        return self._domains

    def _weighted(self, extra: float) -> bool:
        """Whether the draw needs weights: fracture oversampling, or domains to balance."""
        return extra > 0 or (self.data.balance_domains and len(set(self._item_domains())) > 1)

    def sampler(
        self,
        oversample: float | None = None,
        num_samples: int | None = None,
        seed: int | None = None,
        *,
        rank: int = 0,
        num_replicas: int = 1,
    ) -> WeightedRandomSampler:
        """A `WeightedRandomSampler` (with replacement) from `sample_weights`.

        ``seed`` defaults to the dataset's seed, so the sequence of windows is reproducible;
        each later pass over the sampler continues the generator (new windows each epoch).
        Under DDP give every worker its ``rank`` and ``num_replicas`` (instead of a
        `DistributedSampler`): each draws ``num_samples`` (default ``ceil(len / replicas)``)
        windows from its own stream. With Ray's ``prepare_data_loader`` pass
        ``add_dist_sampler=False`` so that this sampler is kept.
        """
        weights = torch.as_tensor(self.sample_weights(oversample), dtype=torch.double)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        base = self.seed if seed is None else int(seed)
        state = np.random.SeedSequence([base, rank]).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state) if num_replicas > 1 else base)
        count = num_samples or -(-len(weights) // num_replicas)
        # torch's stub says Sequence[float]; the sampler takes a tensor (it calls as_tensor)
        return WeightedRandomSampler(
            weights,  # type: ignore[arg-type]
            count,
            replacement=True,
            generator=gen,
        )

    def epoch_order(
        self,
        count: int,
        epoch: int,
        *,
        rank: int = 0,
        world: int = 1,
        open_vertebrae: int = 32,
        oversample: float | None = None,
        seed: int | None = None,
    ) -> list[int]:
        """This rank's windows for ``epoch``: ``count`` drawn over all ranks (weighted by
        `sample_weights` when fracture oversampling is on, else uniformly without
        replacement) in the locality-keeping order of `vfsearch.core.sampling.epoch_order`.

        Pass the list as a DataLoader's ``sampler``. The items are virtual indices carrying
        (epoch, draw): a repeated window is augmented afresh, and persistent loader workers
        need no `set_epoch`.
        """
        extra = self.data.oversample_fracture if oversample is None else float(oversample)
        weights = self.sample_weights(extra) if self._weighted(extra) else None
        order = epoch_order(
            self._offsets_array(),
            int(count),
            seed=self.seed if seed is None else int(seed),
            epoch=int(epoch),
            rank=rank,
            world=world,
            open_vertebrae=open_vertebrae,
            weights=weights,
        )
        return order.tolist()

    def _offsets_array(self) -> np.ndarray:
        self._ensure_index()
        return self._offsets  # type: ignore[return-value]

    def __repr__(self) -> str:
        n = "?" if self._items is None else len(self)
        return (
            f"WindowDataset({self.store.path!r}, split={self.split!r}, "
            f"plane={self.data.plane}, seq_len={self.data.seq_len}, "
            f"patch={self.data.patch_size}, augment={self.augment}"
            f"{' (device)' if self.augment and self.device_augment else ''}, windows={n})"
        )


def finish_batch(batch: Mapping[str, Any], device: torch.device) -> Mapping[str, Any]:
    """A collated batch ready for a step: image and target moved to ``device`` and their
    deferred augmentation (`AUG_KEYS`) applied there in one batched pass
    (`vfsearch.core.augment.augment_batch`); a batch without it is returned as it is."""
    if "aug_seed" not in batch:
        return batch
    image = batch["image"].to(device, non_blocking=True)
    target = batch["target"].to(device, non_blocking=True)
    image, target = augment_batch(
        image, target, batch["aug_seed"], batch["aug_strength"], batch["aug_fill"]
    )
    out = {k: v for k, v in batch.items() if k not in AUG_KEYS}
    out["image"], out["target"] = image, target
    return out


class VertebraStacks(Dataset):
    """The vertebrae ``ks`` (item numbers) of a `WindowDataset`, one item each: its slices
    (`WindowDataset.vertebra`). For ``DataLoader(batch_size=None)``: a validation that
    encodes each slice once reads a rank's share of the split vertebra by vertebra.
    ``stride > 1``: each item also names the slices whose windows are scored (``centres``,
    `vfsearch.core.sampling.strided_centres`)."""

    def __init__(self, windows: WindowDataset, ks: list[int], stride: int = 1) -> None:
        self.windows = windows
        self.ks = list(ks)
        self.stride = int(stride)

    def __len__(self) -> int:
        return len(self.ks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.windows.vertebra(self.ks[i])
        if self.stride > 1:
            item["centres"] = strided_centres(len(item["image"]), self.stride)
        return item


__all__ = [
    "AUG_KEYS",
    "DEFAULT_CACHE_BYTES",
    "EpochSampler",
    "VertebraStacks",
    "WindowDataset",
    "finish_batch",
]


class EpochSampler(Sampler[int]):
    """A DataLoader sampler over `WindowDataset.epoch_order`: call `set_epoch` before each
    epoch (as with `DistributedSampler`); the loader, and its persistent workers, are kept.

    Each rank gets ``ceil(count / world)`` windows per epoch; ranks draw the same epoch and
    keep their own shard.
    """

    def __init__(
        self,
        dataset: WindowDataset,
        count: int,
        *,
        rank: int = 0,
        world: int = 1,
        open_vertebrae: int = 32,
        oversample: float | None = None,
    ) -> None:
        self.dataset, self.count = dataset, int(count)
        self.rank, self.world = int(rank), int(world)
        self.open_vertebrae, self.oversample = int(open_vertebrae), oversample
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(
            self.dataset.epoch_order(
                self.count,
                self.epoch,
                rank=self.rank,
                world=self.world,
                open_vertebrae=self.open_vertebrae,
                oversample=self.oversample,
            )
        )

    def __len__(self) -> int:
        return -(-self.count // self.world)
