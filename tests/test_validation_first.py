"""An invalid run config fails before any client is contacted."""

import pytest
from flwr.app import Context, RecordDict

from fedmm import cli
from fedmm.config import ConfigError


class _NoGrid:
    """A Grid that fails the test if the ServerApp touches it."""

    def __getattr__(self, name):
        raise AssertionError(f"the ServerApp used grid.{name} before validating the run config")


@pytest.mark.parametrize("bad", [{"lora-rank": -4}, {"dirichlet-alpha": 0}, {"strategy": "nope"}, {"lr-rate": 1}])
def test_server_app_validates_before_using_the_grid(bad):
    from server.app import main

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=bad)
    with pytest.raises((ConfigError, ValueError)) as err:
        main(_NoGrid(), context)
    # the message names the offending key itself, before any list of valid keys it may carry
    named = str(err.value).split("; known keys:")[0]
    assert f"'{list(bad)[0]}'" in named, str(err.value)


def test_cli_rejects_bad_config_before_starting_anything(monkeypatch, capsys):
    def no_process(*a, **k):
        raise AssertionError("a process was started")

    import subprocess

    monkeypatch.setattr(subprocess, "Popen", no_process)  # whichever launcher would start it
    monkeypatch.setattr(subprocess, "run", no_process)
    assert cli.main(["run", "--run-config", "lora-rank=-1"]) == 2
    assert "'lora-rank' = -1: must be > 0" in capsys.readouterr().err
    assert cli.main(["run", "--run-config", "strategy='fedsgd'"]) == 2
    assert "unknown strategy 'fedsgd'; installed:" in capsys.readouterr().err


def test_run_config_parsing_matches_flower_syntax():
    parsed = cli.parse_run_config("lora-rank=4 lr=0.01 dataset='/d/m.csv' strategy=\"fedprox\" flag=true")
    assert parsed == {"lora-rank": 4, "lr": 0.01, "dataset": "/d/m.csv", "strategy": "fedprox", "flag": True}
    assert cli.parse_run_config(cli.format_run_config(parsed)) == parsed
    assert cli.parse_run_config("output-dir='/tmp/a b' seed=3") == {"output-dir": "/tmp/a b", "seed": 3}
    with pytest.raises(ConfigError, match="--run-config"):
        cli.parse_run_config("strategy=fed prox")
