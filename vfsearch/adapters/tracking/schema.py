"""Every name vfsearch writes into MLflow and reads back, defined once.

Tags, the experiment names, artifact folders and metric keys that more than one module uses
(a writer and a reader: `vfsearch.pipelines.tune` tags a trial, `vfsearch.pipelines.export` and
`vfsearch.pipelines.report` read the tag back). The values are what is stored in MLflow: renaming
a constant is free, changing a value orphans every run logged before.

No two constants share a value, except those listed in `SHARED_VALUES` with the reason
(the tests hold this). Plain strings only: importing this module imports nothing.
"""

from __future__ import annotations

# -- where runs go ------------------------------------------------------------------------------

ENV_URI = "MLFLOW_TRACKING_URI"  # MLflow's own variable: the tracking server to talk to
DEFAULT_EXPERIMENT = "vfsearch"  # `vfsearch train`'s runs; the runs table `vfsearch ui` opens
SWEEP_EXPERIMENT = "vfsearch-sweeps"  # every sweep's parent run and its trials (child runs)

# -- run tags MLflow defines --------------------------------------------------------------------

PARENT_RUN_TAG = "mlflow.parentRunId"  # a nested run's parent: a trial's sweep parent run
# experiment-tag prefix of a saved runs-table view (``+ key``; the 3.17 UI's own format, opened
# by ``?viewStateShareKey=<key>``: `vfsearch.adapters.tracking.views.share_view`)
SHARED_VIEW_TAG = "mlflow.sharedViewState."

# -- run tags of a training run (`vfsearch.pipelines.train`) --------------------------------------

RAY_RUN_TAG = "vfsearch.run"  # the run's Ray Train run name: a resumed trial finds its run by it
LAUNCH_TAG = "vfsearch.launch"  # one `run_training` call: replaced workers reuse its run
STORE_TAG = "store"  # the training store's path (also on a sweep's parent run)
GIT_COMMIT_TAG = "git_commit"  # the source's commit (also on a sweep's parent run)
FINGERPRINT_TAG = "dataset_fingerprint"  # the training store's fingerprint, JSON
# ``vfsearch evaluate --split S`` on the run: the threshold it used (``.format(split=S)``)
EVAL_THRESHOLD_TAG = "eval.{split}.threshold"

# -- run tags of a sweep (`vfsearch.pipelines.tune`) ----------------------------------------------

SWEEP_TAG = "vfsearch.sweep"  # the sweep's name: on its parent run, and on a model version
#                               exported from one of its trials (`vfsearch.pipelines.export`)
SWEEP_OF_TRIAL_TAG = SWEEP_TAG + ".trial"  # on a trial's run: the name of its sweep
TRIAL_TAG = "vfsearch.trial_id"  # on a trial's run: its Tune trial id
STATUS_TAG = "vfsearch.status"  # on a trial's run: running, completed, stopped early, failed
SPACE_FILE_TAG = "space_file"  # on the parent: the search-space file the sweep was started with
BEST_PREFIX = "best_"  # on the parent: tag and metric ``best_<sweep metric>``, the best value
BEST_TRIAL_TAG = BEST_PREFIX + "trial"  # on the parent: the best trial's id
BEST_RUN_TAG = BEST_PREFIX + "run_id"  # on the parent: the best trial's run id

# -- tags of a registered model version (`vfsearch.pipelines.export`) -----------------------------

VERSION_RUN_TAG = "vfsearch.run_id"  # the training run it came from: export's idempotence key
# an ensemble's members' run ids, best first, comma-separated (VERSION_RUN_TAG and the
# version's run are the best member's, whose run the LoggedModel is linked to)
MEMBERS_TAG = "vfsearch.members"
MEMBER_VALUES_TAG = "vfsearch.member_values"  # each member's metric, in MEMBERS_TAG's order
TOP_K_TAG = "vfsearch.top_k"  # an ensemble's size
METRIC_TAG = "vfsearch.metric"  # the metric the version was selected by
METRIC_VALUE_TAG = "vfsearch.metric_value"  # its value (an ensemble's own): what a gate compares
METRIC_MODE_TAG = "vfsearch.metric_mode"  # max or min

# -- artifacts ----------------------------------------------------------------------------------

CHECKPOINTS_DIR = "checkpoints"  # a training run's checkpoint files
BEST_CHECKPOINT = "best.pt"  # the best epoch's checkpoint, preferred over any other there
SEARCH_SPACE_DIR = "search_space"  # on a sweep's parent run: its search-space file
IMPORTANCES_DIR = "importances"  # on a sweep's parent run: Optuna's parameter importances
IMPORTANCES_FILE = IMPORTANCES_DIR + "/param_importances.json"  # {param: importance}
VISUALISATIONS_DIR = "visualisations"  # pictures of a model on a case (heatmaps, renders)
BUNDLE_ARTIFACT = "bundle"  # the pyfunc model's artifact key: the export bundle folder
LOGGED_MODEL_NAME = "model"  # name of the exported LoggedModel (``log_model(name=...)``)

# -- metric keys ----------------------------------------------------------------------------------

DEFAULT_METRIC = "val_dice3d"  # fused 3D validation Dice: a sweep's default objective
EPOCH_METRIC = "val_dice"  # per-epoch validation Dice (slice level): ASHA's default metric
THRESHOLD_METRIC = "val_threshold3d"  # the deployment threshold chosen on validation
EPOCH_KEY = "epoch"  # a run's last epoch
CI_LOW_SUFFIX = "_ci_low"  # ``<metric>_ci_low``: lower bound of the metric's bootstrap interval
CI_HIGH_SUFFIX = "_ci_high"  # ``<metric>_ci_high``: its upper bound

# Constants allowed to share a value, with the reason (none today: add one only with a reason).
SHARED_VALUES: dict[str, str] = {}
