"""The Optuna searcher of a sweep (its own module: imported only when a sweep starts, and
importable by name when Tune restores a pickled searcher)."""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch


class FinalMetricOptunaSearch(OptunaSearch):
    """`OptunaSearch` that is told only the final fused metric of each trial.

    Per-epoch results carry ASHA's metric (``val_dice``) but not Optuna's (``val_dice3d``,
    computed once on the trial's best checkpoint), so they are not intermediate values:
    Optuna's pruners never run under Ray anyway. Trials that ASHA stops before the end reach
    Optuna as pruned.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not isinstance(self.metric, list) and self.metric in result:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        # multi-objective: a trial without every objective (stopped by ASHA) is pruned, not
        # a completed trial with missing values (which Optuna would refuse)
        if (
            isinstance(self.metric, list)
            and result
            and any(result.get(m) is None for m in self.metric)
        ):
            result = None
        super().on_trial_complete(trial_id, result, error)
