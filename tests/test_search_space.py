"""Search spaces: every shipped YAML compiles and samples valid configs; bad files fail early."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from vfsearch.adapters.search_space import load_space
from vfsearch.core.errors import UserError

SPACES = sorted((Path(__file__).resolve().parents[1] / "vfsearch" / "search_spaces").glob("*.yaml"))
optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_the_four_spaces_ship():
    assert {p.stem for p in SPACES} >= {"smoke", "default", "gan", "ablation"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_space_samples_valid_configs(path):
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=1))
    for _ in range(15):
        trial = study.ask()
        fixed = space.define_by_run(trial)
        cfg = space.config_for({**fixed, **trial.params})  # validates the combination
        for key, value in trial.params.items():
            assert cfg.flatten()[key] == value
        study.tell(trial, 0.0)


def test_conditional_parameter_only_sampled_when_enabled():
    space = load_space(
        Path(__file__).resolve().parents[1] / "vfsearch" / "search_spaces" / "default.yaml"
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {True: 0, False: 0}
    for _ in range(30):
        trial = study.ask()
        space.define_by_run(trial)
        gan = trial.params["model.gan"]
        seen[gan] += 1
        assert ("loss.adv_weight" in trial.params) == gan
        study.tell(trial, 0.0)
    assert seen[True] and seen[False]


GOOD = "params:\n  train.lr: {type: float, low: 0.001, high: 0.01, log: true}\n"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("epochz: 3\n" + GOOD, "epochz: unknown key"),
        (
            "params:\n  model.nope: {type: int, low: 1, high: 3}\n",
            "params.model.nope: unknown config key",
        ),
        (
            "params:\n  train.lr: {type: float, low: 0.01, high: 0.001}\n",
            "params.train.lr: empty range",
        ),
        (
            "params:\n  model.temporal: {type: categorical, choices: []}\n",
            "params.model.temporal.choices: must be a non-empty list",
        ),
        (
            "params:\n  model.depth: {type: int, low: 3, high: five}\n",
            "params.model.depth.high: must be an integer",
        ),
        (
            "params:\n  model.attention: {type: float, low: 0, high: 1}\n",
            "params.model.attention.type",
        ),
        ("params:\n  model.temporal: {type: categorical, choices: [lstm, 3]}\n", "3 is not a str"),
        (
            "params:\n  loss.adv_weight: {type: float, low: 0.01, high: 0.1}\n",
            "params.loss.adv_weight: only exists when model.gan is True",
        ),
        (
            "params:\n  loss.tversky_alpha: {type: float, low: 0.1, high: 0.5,\n"
            "    when: {loss.extra: focal}}\n"
            "  loss.extra: {type: categorical, choices: [focal, tversky]}\n",
            "params.loss.tversky_alpha.when: loss.extra must be one of",
        ),
        (
            "params:\n  loss.adv_weight: {type: float, low: 0.01, high: 0.1,\n"
            "    when: {model.gan: true}}\n",
            "model.gan is neither sampled nor fixed",
        ),
        ("fixed: {model.depht: 3}\n" + GOOD, "fixed.model.depht: unknown config key"),
        ("fixed: {train.lr: 0.01}\n" + GOOD, "params.train.lr: is both fixed and sampled"),
        ("epochs: 2\nscheduler: {grace_period: 5}\n" + GOOD, "scheduler.grace_period: 5 exceeds"),
        ("params: {}\n", "params: must be a non-empty mapping"),
        (
            "params:\n  train.lr: {type: float, low: 0, high: 0.1, log: true}\n",
            "log scale needs low > 0",
        ),
        (
            "metric: [val_dice3d, model_params]\nmode: max\n" + GOOD,
            "mode: needs one max|min per metric",
        ),
        (
            "metric: [val_dice3d, val_dice3d]\nmode: [max, max]\n" + GOOD,
            "metric: lists a metric twice",
        ),
        ("metric: [val_dice3d, 3]\nmode: [max, min]\n" + GOOD, "metric: must be a metric name"),
        ("metric: [a, b, c, d]\nmode: [max, min, max, min]\n" + GOOD, "list of 1 to 3 names"),
        (
            "metric: [val_dice3d, latency_ms]\nmode: [max, fast]\n" + GOOD,
            "mode: must be max or min",
        ),
        ("startup_trials: -1\n" + GOOD, "startup_trials: must be an integer >= 0"),
        ("startup_trials: 2.5\n" + GOOD, "startup_trials: must be an integer >= 0"),
    ],
)
def test_bad_space_names_file_and_key(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(str(path)) and needle in message and "\n" not in message


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="search space file not found"):
        load_space(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("params: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_space(tmp_path / "x.yaml")


def test_startup_trials_reach_the_space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("startup_trials: 3\n" + GOOD)
    assert load_space(path).startup_trials == 3
    path.write_text(GOOD)
    assert load_space(path).startup_trials == 10  # Optuna's own default


def test_multi_objective_space():
    space = load_space(
        Path(__file__).resolve().parents[1] / "vfsearch" / "search_spaces" / "pareto.yaml"
    )
    assert space.multi_objective
    assert space.objectives == (("val_dice3d", "max"), ("model_params", "min"))
    assert (space.metric, space.mode) == ("val_dice3d", "max")  # the first one ranks


def test_pareto_front():
    from vfsearch.pipelines.tune import pareto_front

    objectives = (("val_dice3d", "max"), ("model_params", "min"))
    rows = [
        {"val_dice3d": 0.8, "model_params": 100},  # best Dice: front
        {"val_dice3d": 0.6, "model_params": 10},  # smallest: front
        {"val_dice3d": 0.7, "model_params": 50},  # a trade-off: front
        {"val_dice3d": 0.6, "model_params": 60},  # dominated by the 0.7/50 one
        {"val_dice3d": 0.8, "model_params": 100},  # a tie with the first: both stay
        {"val_dice3d": None, "model_params": 1},  # stopped early: never on the front
        {"val_dice3d": float("nan"), "model_params": 1},
    ]
    assert pareto_front(rows, objectives) == {0, 1, 2, 4}
    assert pareto_front(rows, (("val_dice3d", "max"),)) == {0, 4}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_first_asha_rung_comes_after_the_gan_stage_starts(path):
    """DESIGN.md: a rung placed before a trial's GAN stage judges it as a plain segmenter."""
    space = load_space(path)
    gan = {p.key: p for p in space.params}
    can_gan = space.fixed.get("model.gan") is True or "model.gan" in gan
    if not can_gan:
        return
    start = gan.get("train.gan_start_epoch")
    latest = start.high if start is not None else space.fixed.get("train.gan_start_epoch", -1)
    if latest == -1:  # the default: half the run
        latest = space.epochs // 2
    assert latest < space.grace_period, (path.name, latest, space.grace_period)
