"""`Tracker`: every MLflow client call vfsearch makes, each riding out a restarting server.

Outside `vfsearch.adapters.tracking` nothing touches `mlflow.MlflowClient` or `retry`: a call
site that needs another client call gets a `Tracker` method here. mlflow is imported on the
first call (`Tracker.client`), never at import time.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vfsearch.adapters.tracking.schema import ENV_URI, PARENT_RUN_TAG
from vfsearch.core.errors import AUTH, UNREACHABLE, UserError, classify, explain

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Experiment, FileInfo, Metric, Run
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel
    from mlflow.store.entities.paged_list import PagedList

RETRY_ENV = "VFSEARCH_TRACKING_RETRY_S"  # how long a call rides out a missing server
T = TypeVar("T")


def retry(fn: Callable[[], T], *, attempts: int | None = None, delay: float = 1.0) -> T:
    """Call ``fn``, retrying on connection errors (a server being restarted mid-sweep).

    MLflow's HTTP client already retries with backoff inside one call; this outer loop covers
    the window in which the port is closed altogether: it keeps trying for
    ``$VFSEARCH_TRACKING_RETRY_S`` seconds (default 300), or ``attempts`` times if given,
    waiting ``delay`` seconds at first, doubling up to 15 s. An authentication failure or a
    server that never answers ends as a one-line `UserError`.

    For the tracking package only: elsewhere call a `Tracker` method.
    """
    from mlflow.exceptions import MlflowException

    deadline = time.monotonic() + float(os.environ.get(RETRY_ENV, "300"))
    attempt = 0
    while True:
        try:
            return fn()
        except (ConnectionError, OSError, MlflowException) as exc:
            text = str(exc)
            transient = not isinstance(exc, MlflowException) or any(
                s in text
                for s in (
                    "Connection",
                    "connection",
                    "Max retries",
                    "timed out",
                    "Temporary",
                    "503",
                    "502",
                )
            )
            attempt += 1
            wait = min(delay * 2 ** (attempt - 1), 15.0)
            out_of_time = (
                attempt >= attempts if attempts is not None else time.monotonic() + wait > deadline
            )
            if not transient or out_of_time:
                if isinstance(exc, MlflowException) and classify(exc) in (AUTH, UNREACHABLE):
                    # MLflow's message buries the cause in a urllib3 repr or an HTML body
                    env = os.environ.get(ENV_URI, "").strip()
                    raise UserError(
                        f"{f'{ENV_URI} {env}' if env else 'MLflow tracking server'}: {explain(exc)}"
                    ) from exc
                raise
            time.sleep(wait)


class Tracker:
    """Thin, picklable wrapper around `mlflow.MlflowClient` for one tracking URI.

    Talks to explicit run ids only (no global active run), so it is safe in Ray workers and
    in threads. The client is created lazily in each process. Every call goes through `retry`
    (``attempts``: give up after that many tries instead of after ``$VFSEARCH_TRACKING_RETRY_S``
    seconds, for calls whose failure the caller tolerates).
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"])  # type: ignore[misc]

    @property
    def client(self) -> MlflowClient:
        """The process's `mlflow.MlflowClient` (for the tracking package's own modules)."""
        if self._client is None:
            # MLflow's own "Downloading artifacts" bars are noise in our commands' output
            # (which show their own progress); a user's explicit setting wins
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # -- experiments ------------------------------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        """Id of experiment ``name``, created if missing (race-safe)."""
        from mlflow.exceptions import MlflowException

        def get_or_create() -> str:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                return exp.experiment_id
            try:
                return self.client.create_experiment(name)
            except MlflowException:  # created meanwhile by another process?
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
                return exp.experiment_id

        return retry(get_or_create)

    def get_experiment_by_name(
        self, name: str, *, attempts: int | None = None
    ) -> Experiment | None:
        """Experiment ``name`` (deleted ones too), or None when there is none."""
        return retry(lambda: self.client.get_experiment_by_name(name), attempts=attempts)

    def set_experiment_tag(
        self, experiment_id: str, key: str, value: str, *, attempts: int | None = None
    ) -> None:
        retry(lambda: self.client.set_experiment_tag(experiment_id, key, value), attempts=attempts)

    # -- runs -------------------------------------------------------------------------------------

    def start_run(
        self,
        experiment: str,
        run_name: str,
        *,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        """Create a run (nested under ``parent_run_id`` if given); returns its id."""
        exp_id = self.experiment_id(experiment)
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        run = retry(lambda: self.client.create_run(exp_id, run_name=run_name, tags=all_tags))
        return run.info.run_id

    def find_run(self, experiment: str, tag: str, value: str) -> str | None:
        """Newest run of ``experiment`` whose tag ``tag`` equals ``value``, or None."""
        exp = self.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs = self.search_runs(
            [exp.experiment_id],
            f"tags.`{tag}` = '{value}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def get_run(self, run_id: str, *, attempts: int | None = None) -> Run:
        """The run (info, params, metrics, tags); MlflowException when there is none."""
        return retry(lambda: self.client.get_run(run_id), attempts=attempts)

    def search_runs(
        self,
        experiment_ids: Sequence[str],
        filter_string: str = "",
        *,
        max_results: int = 1000,
        order_by: Sequence[str] | None = None,
        page_token: str | None = None,
        attempts: int | None = None,
    ) -> PagedList[Run]:
        """One page of runs (``.token`` names the next one; None: the last)."""
        return retry(
            lambda: self.client.search_runs(
                list(experiment_ids),
                filter_string=filter_string,
                max_results=max_results,
                order_by=list(order_by) if order_by else None,
                page_token=page_token,
            ),
            attempts=attempts,
        )

    def search_all_runs(self, experiment_ids: Sequence[str], filter_string: str = "") -> list[Run]:
        """Every run matching ``filter_string`` (every page)."""
        runs: list[Run] = []
        token = None
        while True:
            page = self.search_runs(experiment_ids, filter_string, page_token=token)
            runs.extend(page)
            token = getattr(page, "token", None)
            if not token:
                return runs

    def resume_run(self, run_id: str) -> None:
        """Mark an interrupted run RUNNING again."""
        retry(lambda: self.client.update_run(run_id, status="RUNNING"))

    def run_params(self, run_id: str) -> dict[str, str]:
        return dict(self.get_run(run_id).data.params)

    def experiment_of(self, run_id: str) -> str:
        return self.get_run(run_id).info.experiment_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """``status``: FINISHED, FAILED or KILLED."""
        retry(lambda: self.client.set_terminated(run_id, status=status))

    # -- params, tags, metrics --------------------------------------------------------------------

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params (values stringified, 100 per request), skipping ones already logged."""
        from mlflow.entities import Param

        have = self.run_params(run_id)
        todo = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(todo), 100):
            chunk = todo[i : i + 100]
            retry(partial(self.client.log_batch, run_id, params=chunk))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified) in one request."""
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            retry(lambda: self.client.log_batch(run_id, tags=items))

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log finite numeric metrics at ``step`` in one request (NaN and inf are dropped)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, int(step))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        for i in range(0, len(items), 1000):
            chunk = items[i : i + 1000]
            retry(partial(self.client.log_batch, run_id, metrics=chunk))

    def log_metric(self, run_id: str, key: str, value: float, step: int = 0) -> None:
        """Log one metric value as it is (NaN included, unlike `log_metrics`)."""
        retry(lambda: self.client.log_metric(run_id, key, float(value), step=step))

    def get_metric_history(
        self, run_id: str, key: str, *, attempts: int | None = None
    ) -> list[Metric]:
        """Every logged value of metric ``key`` (with its step and timestamp)."""
        return retry(lambda: self.client.get_metric_history(run_id, key), attempts=attempts)

    # -- artifacts --------------------------------------------------------------------------------

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file under ``artifact_path``."""
        retry(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def log_artifacts(
        self, run_id: str, folder: str | Path, artifact_path: str | None = None
    ) -> None:
        """Upload every file of ``folder`` under ``artifact_path``."""
        retry(lambda: self.client.log_artifacts(run_id, str(folder), artifact_path))

    def list_artifacts(
        self, run_id: str, path: str | None = None, *, attempts: int | None = None
    ) -> list[FileInfo]:
        """The files and folders directly under ``path`` (``.path``, ``.is_dir``)."""
        return retry(lambda: self.client.list_artifacts(run_id, path), attempts=attempts)

    def download_artifacts(
        self, run_id: str, path: str, dst: str | Path, *, attempts: int | None = None
    ) -> str:
        """Download artifact ``path`` (a file or a folder) into ``dst``; its local path."""
        return retry(
            lambda: self.client.download_artifacts(run_id, path, str(dst)), attempts=attempts
        )

    # -- the model registry -----------------------------------------------------------------------

    def search_model_versions(
        self, filter_string: str, *, attempts: int | None = None
    ) -> list[ModelVersion]:
        """Registered model versions matching ``filter_string`` (``name = 'n'``,
        ``run_id IN ('a', 'b')``...)."""
        return retry(lambda: self.client.search_model_versions(filter_string), attempts=attempts)

    def get_registered_model(self, name: str, *, attempts: int | None = None) -> RegisteredModel:
        return retry(lambda: self.client.get_registered_model(name), attempts=attempts)


__all__ = ["RETRY_ENV", "Tracker", "retry"]
