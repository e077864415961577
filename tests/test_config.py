import tomllib
from pathlib import Path

import pytest

from fedmm import model as models
from fedmm.config import SPEC, ConfigError, Settings

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_the_spec():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == {k: v.default for k, v in SPEC.items()}
    assert Settings.from_run_config(app_config) == Settings.from_run_config({})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lora-rank": -1}, "'lora-rank' = -1: must be > 0"),
        ({"dirichlet-alpha": 0.0}, "'dirichlet-alpha' = 0.0: must be > 0"),
        ({"dirichlet-alpha": -2}, "'dirichlet-alpha' = -2.0: must be > 0"),
        ({"lora-rank": "eight"}, "'lora-rank' = 'eight': expected int"),
        ({"partitioner": "random"}, "'partitioner' = 'random': must be one of"),
        ({"test-fraction": 1.0}, "'test-fraction' = 1.0: must be in"),
        ({"lora-rnak": 4}, "unknown run-config key(s): 'lora-rnak' (did you mean 'lora-rank'?)"),
        ({"pretrained": "/no/such/base.safetensors"}, "'pretrained': checkpoint file not found: /no/such"),
        ({"dataset": "/no/such/manifest.csv"}, "'dataset': manifest file not found"),
        ({"model": "ViT-B-33"}, "'model': unknown open_clip model 'ViT-B-33' (did you mean ViT-B-32"),
    ],
)
def test_invalid_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        Settings.from_run_config(overrides)
    assert message in str(err.value)


def test_round_trip_and_coercion():
    s = Settings.from_run_config({"lr": 1, "lora-rank": 4.0})
    assert s.lr == 1.0 and isinstance(s.lr, float) and s.lora_rank == 4
    assert Settings.from_run_config(s.to_run_config()) == s


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'ViT-Nope'"):
        models.create_model("ViT-Nope")


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    net = models.create_model("fedmm-tiny-vit")
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        models.load_checkpoint(net, tmp_path / "base.safetensors")


def test_unknown_strategy_lists_installed():
    import strategies

    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'; installed: .*fedavg"):
        strategies.load("fedsgd")
    assert strategies.load("fedprox").__name__ == "FedProx"
