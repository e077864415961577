import math

import pytest
from flwr.serverapp.strategy import Bulyan, Krum

import strategies
from fedmm import cli
from fedmm.config import Settings
from server.chain import make_strategy
from server.history import MetricsHistory
from strategies.builtin import check_population

BUILTINS = {
    "fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam", "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad", "fedavgm": "FedAvgM", "fedmedian": "FedMedian",
    "fedtrimmedavg": "FedTrimmedAvg", "krum": "Krum", "multikrum": "MultiKrum",
    "bulyan": "Bulyan", "qfedavg": "QFedAvg",
}


def _build(**run_config):
    return strategies.innermost(make_strategy(Settings.from_run_config(run_config), MetricsHistory()))


@pytest.mark.parametrize("name, cls", BUILTINS.items())
def test_every_builtin_is_selectable_by_name(name, cls):
    assert name in strategies.available()
    sgd = {"local-optimizer": "sgd"} if name == "qfedavg" else {}  # its L = 1/lr assumes SGD clients
    strategy = _build(strategy=name, **{"fraction-train": 0.5, "min-nodes": 3}, **sgd)
    assert type(strategy).__name__ == cls
    assert strategy.fraction_train == 0.5 and strategy.min_available_nodes == 3
    assert strategy.arrayrecord_key == "arrays" and strategy.weighted_by_key == "num-examples"


def test_strategy_args_reach_the_constructor_and_managed_values_are_fedmm_s():
    adam = _build(strategy="fedadam", **{"strategy-args": "eta=0.02 beta_1=0.8 tau=1"})
    assert (adam.eta, adam.beta_1, adam.tau) == (0.02, 0.8, 1.0)  # int 1 accepted as float
    assert _build(strategy="fedprox", **{"proximal-mu": 0.3}).proximal_mu == 0.3
    q = _build(strategy="qfedavg", lr=0.004, **{"strategy-args": "q=0.5", "local-optimizer": "sgd"})
    assert q.q == 0.5 and math.isclose(q.client_learning_rate, 0.004) and q.train_loss_key == "train_loss"


@pytest.mark.parametrize(
    "run_config, message",
    [
        ({"strategy": "fedadam", "strategy-args": "eta_g=1"}, "fedadam has no argument 'eta_g'; its arguments: eta=0.1"),
        ({"strategy": "fedadam", "strategy-args": "eta='fast'"}, "'eta' = 'fast' must be float"),
        ({"strategy": "fedtrimmedavg", "strategy-args": "beta=0.5"}, "beta = 0.5 must be in [0, 0.5)"),
        ({"strategy": "fedavgm", "strategy-args": "server_momentum=1.0"}, "server_momentum = 1.0 must be in [0, 1)"),
        ({"strategy": "fedavg", "strategy-args": "fraction_train=0.1"}, "is set by fedmm from its own run-config keys"),
        ({"strategy": "krum", "strategy-args": "num_malicious_nodes=-1"}, "num_malicious_nodes = -1 must be >= 0"),
        ({"strategy": "fedsgd"}, "unknown strategy 'fedsgd'; installed: bulyan"),
        ({"strategy": "qfedavg"}, "'local-optimizer' = 'adamw' with strategy 'QFedAvg'"),
    ],
)
def test_bad_strategy_choices_name_the_key_and_range(run_config, message):
    with pytest.raises(ValueError) as err:
        _build(**run_config)
    assert message in str(err.value)


def test_negative_mu_is_rejected_by_the_settings():
    with pytest.raises(ValueError, match="'proximal-mu' = -0.1: must be >= 0"):
        _build(strategy="fedprox", **{"proximal-mu": -0.1})


def test_robust_rules_refuse_too_few_clients():
    check_population(Krum(num_malicious_nodes=2), 7)  # 2f + 3 = 7: enough
    with pytest.raises(ValueError, match="num_malicious_nodes=2 needs >= 7 clients per round, but 6"):
        check_population(Krum(num_malicious_nodes=2), 6)
    with pytest.raises(ValueError, match="Bulyan with num_malicious_nodes=1 needs >= 7"):
        check_population(Bulyan(num_malicious_nodes=1), 6)


def test_cli_lists_strategies_with_parameters(capsys):
    assert cli.main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name in BUILTINS:
        assert f"{name}: " in out
    assert "beta (float, default 0.2)" in out and "fraction_train" not in out
