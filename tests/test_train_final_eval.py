"""The end-of-training fused 3D validation, shared by a trial's workers, and the cache of the
validation cases' truth (`vfsearch.pipelines.evaluate`). No Ray: ranks are threads whose
``all_sum`` is a barrier that sums their vectors, as an all-reduce would."""

from __future__ import annotations

import os
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from vfsearch.adapters import volumes as io
from vfsearch.adapters.store import Store
from vfsearch.core.config import Config, DataConfig, ModelConfig
from vfsearch.core.inference import LoadedModel
from vfsearch.pipelines import evaluate as ev
from vfsearch.pipelines.evaluate import (
    SWEEP,
    CaseResult,
    VertebraResult,
    case_truth,
    fused_validation_metrics,
    pack_results,
    shard_cases,
    unpack_results,
)

torch.set_num_threads(1)  # 2-core machine shared with other test runs

MARK_HU = 3000
FINGERPRINT = {"p0_5": -1024.0, "p99_5": 3071.0, "mean": 0.0, "std": 1000.0}


class SoftMarks(torch.nn.Module):
    """Test double segmenter: soft, imperfect logits from the centre slice (marked voxels
    high, blurred by a shifted copy of the slice), so the per-threshold counts vary and the
    chosen thresholds are not trivial. Per slice only: batching does not change it."""

    output_kind = "segmentation"

    def __init__(self) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(()))  # a logit offset: weights that matter

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return 3.0 * (x - 2.5) + 2.0 * (torch.roll(x, shifts=2, dims=-1) - 1.0) + self.shift

    def encode(self, slices):
        return slices, [slices]

    def forward_features(self, bottlenecks, skips):
        return {"logits": self._logits(skips[0]), "attention": []}

    def forward(self, window):
        t = window.shape[1] // 2
        return {"logits": self._logits(window[:, t : t + 1]), "attention": []}


def _loaded(module: torch.nn.Module) -> LoadedModel:
    config = Config(
        model=ModelConfig(depth=3), data=DataConfig(seq_len=3, plane="sagittal", patch_size=32)
    )
    return LoadedModel(module.eval(), config, FINGERPRINT, (2.0, 2.0, 2.0), 4.0, source="soft")


@pytest.fixture(scope="module")
def val_store(tmp_path_factory):
    """Five small phantom cases of different sizes, four of them in val, whose CT marks the
    fracture voxels (the truth of every case comes from its source files)."""
    from vfsearch.core.phantom import make_case
    from vfsearch.pipelines.ingest import ingest

    root = tmp_path_factory.mktemp("shardstore")
    lines = ["case_id,ct,vertebrae,fracture,split"]
    for i, split in enumerate(("train", "val", "val", "val", "val")):
        case = make_case(20 + i, small=True, fracture_rate=0.5)
        z = np.flatnonzero(case.fracture.any(axis=(1, 2)))
        mid = int(z.mean()) if len(z) else case.ct.shape[0] // 2
        zs = slice(max(mid - 24 - 6 * i, 0), mid + 24 + 4 * i)  # cases of different sizes
        ct = np.where(case.fracture > 0, MARK_HU, np.minimum(case.ct, 2000)).astype(np.int16)
        arrays = {"ct": ct[zs], "vertebrae": case.vertebrae[zs], "fracture": case.fracture[zs]}
        geom = case.geometry.shifted((zs.start, 0, 0))
        for name, arr in arrays.items():
            io.write_volume(root / f"c{i}" / f"{name}.nii.gz", arr, geom)
        lines.append(f"c{i},c{i}/ct.nii.gz,c{i}/vertebrae.nii.gz,c{i}/fracture.nii.gz,{split}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    path = root / "store.zarr"
    ingest(root / "manifest.csv", path, spacing=(2.0, 2.0, 2.0), margin_mm=4.0)
    assert len(Store(path).case_ids("val")) == 4
    return {"path": path, "root": root}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh, private truth cache (disk folder and process memory) for one test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(ev.ENV_CACHE_DIR, str(folder))
    monkeypatch.setattr(ev, "TRUTH_CACHE", ev.TruthCache())
    return folder / "truth"


# -- which rank fuses which cases ---------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_are_disjoint_cover_every_case_and_balance_the_vertebrae(world):
    sizes = [14, 3, 9, 9, 1, 12, 7, 0, 5]
    shards = shard_cases(sizes, world)
    assert len(shards) == world
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(len(sizes)))  # every case once, none twice
    assert all(s == sorted(s) for s in shards)
    loads = [sum(max(1, sizes[i]) for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(sizes)  # greedy largest-first: within one case
    assert shard_cases(sizes, world) == shards  # every rank computes the same split


def test_more_ranks_than_cases_leaves_some_ranks_idle():
    shards = shard_cases([4, 2], 4)
    assert sorted(i for s in shards for i in s) == [0, 1]
    assert sum(1 for s in shards if not s) == 2


# -- packing case results into one summable vector ----------------------------------------


def _random_results(rng: np.random.Generator, layout, n_t: int) -> list[CaseResult]:
    out = []
    for i, (cid, vids) in enumerate(layout):
        present = [v for v in vids if rng.random() > 0.2]  # some crops map outside the CT
        verts = [
            VertebraResult(
                v,
                float(rng.random()),
                int(rng.integers(0, 10**6)),
                rng.integers(0, 10**9, size=(n_t, 3)),
                float("nan") if rng.random() < 0.5 else float(rng.random() * 10),
            )
            for v in present
        ]
        thresholds = np.round(np.linspace(0.01, 0.99, n_t), 3)
        curve = rng.integers(0, 10**12, size=(n_t, 3))
        out.append(CaseResult(cid, thresholds, verts, curve, TRUTH_SOURCES[i % len(TRUTH_SOURCES)]))
    return out


# the labels a case's truth can carry, as `evaluate._compute_case_truth` builds them (the
# sorted, "+"-joined sources used), not as the packing's own table lists them
TRUTH_SOURCES = tuple("+".join(sorted(used)) for used in ({"files"}, {"crops"}, {"files", "crops"}))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_packed_shards_summed_give_back_every_case_exactly(world):
    rng = np.random.default_rng(0)
    layout = [(f"c{i}", list(range(11, 11 + int(rng.integers(1, 8))))) for i in range(7)]
    n_t = 9
    results = _random_results(rng, layout, n_t)
    shards = shard_cases([len(v) for _, v in layout], world)
    total = sum(
        pack_results({i: results[i] for i in mine}, layout, n_t) for mine in shards
    )  # what the all-reduce computes
    back = unpack_results(total, layout, results[0].thresholds)
    assert [r.case_id for r in back] == [c for c, _ in layout]
    for a, b in zip(results, back, strict=True):
        assert np.array_equal(a.curve, b.curve) and a.source == b.source
        assert np.array_equal(a.thresholds, b.thresholds)
        assert [v.vid for v in a.vertebrae] == [v.vid for v in b.vertebrae]
        for va, vb in zip(a.vertebrae, b.vertebrae, strict=True):
            assert va.score == vb.score and va.gt_voxels == vb.gt_voxels
            assert np.array_equal(va.curve, vb.curve)
            assert (np.isnan(va.hd95) and np.isnan(vb.hd95)) or va.hd95 == vb.hd95


def test_a_case_no_rank_evaluated_is_an_error():
    rng = np.random.default_rng(1)
    layout = [("a", [11, 12]), ("b", [13])]
    results = _random_results(rng, layout, 4)
    vec = pack_results({0: results[0]}, layout, 4)
    with pytest.raises(ValueError, match="case b"):
        unpack_results(vec, layout, results[0].thresholds)
    with pytest.raises(ValueError, match="case a"):  # counted twice: two ranks claimed it
        unpack_results(vec + vec + pack_results({1: results[1]}, layout, 4), layout, [0.5] * 4)


# -- the whole fused validation, one process against several ranks ------------------------


class ThreadRanks:
    """``world`` ranks as threads: ``all_sum`` waits for every rank's vector and returns
    their sum to each (an all-reduce)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.lock = threading.Lock()
        self.parts: list = []
        self.calls = 0

    def all_sum(self, values):
        with self.lock:
            self.parts.append(np.asarray(values, np.float64))
            self.calls += 1
        self.barrier.wait()  # every rank's vector is in
        total = np.sum(self.parts, axis=0)
        if self.barrier.wait() == 0:  # every rank has summed: one of them empties the list
            self.parts.clear()
        self.barrier.wait()
        return torch.from_numpy(total)  # all_summer returns a CPU tensor

    def run(self, fn) -> list:
        out: list = [None] * self.world
        errors: list = []

        def one(rank: int) -> None:
            try:
                out[rank] = fn(rank)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        if errors:
            raise errors[0]
        return out


def _same(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (np.isnan(a[k]) and np.isnan(b[k])) or a[k] == b[k], (k, a[k], b[k])


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_fused_validation_gives_the_unsharded_figures(
    val_store, cache_dir, monkeypatch, world
):
    model = _loaded(SoftMarks())
    whole = fused_validation_metrics(model, val_store["path"])
    assert whole["val_cases"] == 4.0 and 0.0 < whole["val_dice3d"] < 1.0, whole
    assert whole["val_tp3d"] > 0 and whole["val_fp3d"] + whole["val_fn3d"] > 0  # not vacuous

    evaluated: Counter = Counter()
    real = ev.evaluate_case

    def counting(models, store, case_id, thresholds, **kw):
        evaluated[(threading.current_thread().name, case_id)] += 1
        assert len(thresholds) == len(SWEEP)  # the threshold is chosen on every candidate
        return real(models, store, case_id, thresholds, **kw)

    monkeypatch.setattr(ev, "evaluate_case", counting)
    ranks = ThreadRanks(world)
    figures = ranks.run(
        lambda rank: fused_validation_metrics(
            model, val_store["path"], rank=rank, world=world, all_sum=ranks.all_sum
        )
    )
    for f in figures:  # every rank: the figures of the whole split
        _same(whole, f)
    # each case fused exactly once, by one rank; every rank got a share
    assert sorted(c for _, c in evaluated) == Store(val_store["path"]).case_ids("val")
    assert set(evaluated.values()) == {1}
    assert len({t for t, _ in evaluated}) == min(world, 4)
    assert ranks.calls == world  # one collective per rank


def test_a_classifier_is_scored_by_rank_zero_alone(val_store, cache_dir):
    class Classifier(torch.nn.Module):
        output_kind = "classification"

        def __init__(self) -> None:
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(()))

        def forward(self, window):
            peak = window[:, window.shape[1] // 2].amax(dim=(1, 2))
            return {"logits": ((peak - 2.5) * 50.0)[:, None], "attention": []}

    model = _loaded(Classifier())
    assert fused_validation_metrics(model, val_store["path"], rank=1, world=2) == {}
    alone = fused_validation_metrics(model, val_store["path"], rank=0, world=2)
    assert alone == fused_validation_metrics(model, val_store["path"])
    assert "val_vertebra_pr_auc" in alone


# -- the truth cache ------------------------------------------------------------------------


def test_truth_is_computed_once_then_read_from_memory_then_from_disk(
    val_store, cache_dir, monkeypatch
):
    st = Store(val_store["path"])
    cid = st.case_ids("val")[0]
    cache = ev.TRUTH_CACHE
    first = case_truth(st, cid)
    assert cache.misses == 1 and cache.hits == {"memory": 0, "disk": 0}
    assert [p.suffix for p in cache_dir.iterdir()] == [".npz"]

    def never(*_a, **_k):
        raise AssertionError("the truth was computed again")

    monkeypatch.setattr(ev, "_compute_case_truth", never)
    again = case_truth(Store(val_store["path"]), cid)  # another handle on the same store
    assert again is first and cache.hits["memory"] == 1
    cache.clear()  # a new process: only the disk cache is left
    loaded = case_truth(st, cid)
    assert cache.hits["disk"] == 1 and cache.misses == 1
    for name in ("fracture", "labels", "cells"):
        a, b = getattr(first, name), getattr(loaded, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
        assert not b.flags.writeable  # shared by every caller
    assert (loaded.box, loaded.outside, loaded.source, loaded.ct_shape) == (
        first.box,
        first.outside,
        first.source,
        first.ct_shape,
    )
    assert loaded.ct_geometry.to_dict() == first.ct_geometry.to_dict()


def test_a_changed_source_file_is_a_cache_miss(val_store, cache_dir):
    st = Store(val_store["path"])
    cid = st.case_ids("val")[1]
    key = ev.truth_key(st, cid)
    case_truth(st, cid)
    frac = val_store["root"] / cid / "fracture.nii.gz"
    st_before = frac.stat()
    os.utime(frac, ns=(st_before.st_atime_ns, st_before.st_mtime_ns + 10**9))
    try:
        assert ev.truth_key(st, cid) != key
        case_truth(st, cid)
        assert ev.TRUTH_CACHE.misses == 2
    finally:
        os.utime(frac, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    assert ev.truth_key(st, cid) == key


def test_second_fused_validation_reads_no_truth_file(val_store, cache_dir, monkeypatch):
    model = _loaded(SoftMarks())
    first = fused_validation_metrics(model, val_store["path"])
    assert ev.TRUTH_CACHE.misses == 4
    ev.TRUTH_CACHE.clear()  # the next trial in a fresh process: the disk cache answers

    def no_read(*_a, **_k):
        raise AssertionError("a truth file was read again")

    monkeypatch.setattr(io, "read_volume", no_read)
    _same(first, fused_validation_metrics(model, val_store["path"]))
    assert ev.TRUTH_CACHE.hits["disk"] == 4 and ev.TRUTH_CACHE.misses == 4


def test_disk_cache_can_be_turned_off(val_store, tmp_path, monkeypatch):
    monkeypatch.setenv(ev.ENV_CACHE_DIR, "off")
    monkeypatch.setattr(ev, "TRUTH_CACHE", ev.TruthCache())
    assert ev.truth_cache_dir() is None
    st = Store(val_store["path"])
    case_truth(st, st.case_ids("val")[0])
    case_truth(st, st.case_ids("val")[0])
    assert ev.TRUTH_CACHE.misses == 1 and ev.TRUTH_CACHE.hits["memory"] == 1


# -- the worker's part: best weights on every rank, bf16 on CUDA -----------------------------


def test_final_evaluation_scores_the_best_weights(val_store, cache_dir):
    from types import SimpleNamespace

    from vfsearch.pipelines.train.loop import all_summer
    from vfsearch.pipelines.train.worker import _final_evaluation

    best_model = SoftMarks()  # the best epoch's weights: offset 0
    best = {"model": {k: v.clone() for k, v in best_model.state_dict().items()}}
    model = SoftMarks()  # the last epoch's weights differ: every logit far lower
    with torch.no_grad():
        model.shift.fill_(-6.0)
    parts = SimpleNamespace(inner=model, device=torch.device("cpu"), amp_dtype=None)
    config = _loaded(model).config
    last = fused_validation_metrics(model, val_store["path"], config)["val_dice3d"]
    loop = {"store": str(val_store["path"])}
    all_sum = all_summer(torch.device("cpu"), 1)
    out = _final_evaluation(loop, config, parts, best, rank=0, world=1, all_sum=all_sum)
    expected = fused_validation_metrics(best_model, val_store["path"], config)["val_dice3d"]
    assert out["val_dice3d"] == expected != last
    assert out["final_eval_s"] > 0 and out["latency_ms"] > 0 and out["model_params"] == 1.0
    # no best model (rank 0 has none): nothing to evaluate, on every rank
    assert _final_evaluation(loop, config, parts, None, rank=0, world=1, all_sum=all_sum) == {}


def test_inference_autocasts_to_bf16_on_cuda_only():
    import contextlib
    import warnings

    from vfsearch.core.steps import autocast

    assert isinstance(autocast(torch.device("cpu"), torch.bfloat16), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cuda"), None), contextlib.nullcontext)  # amp off
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available" on a CPU machine
        ctx = autocast(torch.device("cuda", 0), torch.bfloat16)
    assert isinstance(ctx, torch.autocast)
    assert ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16


def _broadcast_rank(rank: int, world: int, init: str, out: str) -> None:
    """One process of `test_best_weights_reach_every_rank`."""
    import torch.distributed as dist

    from vfsearch.pipelines.train.loop import all_summer
    from vfsearch.pipelines.train.worker import _best_weights_everywhere

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # every rank starts with other weights
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        best = None
        if rank == 0:
            torch.manual_seed(7)
            ref = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
            ref[1].num_batches_tracked += 5
            best = {"model": ref.state_dict()}
        ok = _best_weights_everywhere(
            model, best, rank=rank, world=world, all_sum=all_summer(torch.device("cpu"), world)
        )
        torch.save({"ok": ok, "state": model.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_best_weights_reach_every_rank(tmp_path):
    """Only rank 0 keeps best.pt: the final evaluation broadcasts its weights (and buffers)
    so that every rank fuses its share of the cases with the same model."""
    import torch.multiprocessing as mp

    world = 3
    mp.spawn(
        _broadcast_rank,
        args=(world, f"file://{tmp_path / 'pg'}", str(tmp_path)),
        nprocs=world,
        join=True,
    )
    torch.manual_seed(7)
    ref = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict()
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["ok"] is True
        for k, v in ref.items():
            expected = v + 5 if k.endswith("num_batches_tracked") else v
            assert torch.equal(got["state"][k], expected), (rank, k)
