"""Training on Ray Train V2, in three thin levels (Ray's ``train_tune_interop`` shape):

* `driver`: `train` (``vfsearch train``) → `run_training` (one fitted run; a Ray Tune trial
  driver calls this per trial) → `build_trainer` (its `TorchTrainer`);
* `worker`: `train_loop_per_worker`, what each Ray Train worker runs, short, over named
  pieces; rank 0's MLflow run; the progress lines the driver prints;
* `loop`: those pieces, without Ray: set-up, epoch sampling, `train_epoch`, `validate`
  (counts), metrics from the counts, best-model tracking (`TrainState`);
* `checkpoint`: the checkpoint files (`save_checkpoint`, `restore`), plain torch;
* `hooks`: callables at named points of the loop, and the fault-injection drill.

Ray itself is started by `vfsearch.adapters.ray_runtime`; the maths lives in
`vfsearch.core.steps`.
"""

from vfsearch.pipelines.train.driver import TrainSummary, build_trainer, run_training, train

__all__ = ["TrainSummary", "build_trainer", "run_training", "train"]
