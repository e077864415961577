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
        ({"server-dataset": "/no/held-out.csv"}, "'server-dataset': manifest file not found: /no/held-out.csv"),
        ({"public-dataset": "/no/public.jsonl"}, "'public-dataset': manifest file not found"),
        ({"classes": "cat,,dog"}, "'classes' = 'cat,,dog': has an empty name"),
        ({"groups": "a,b,a"}, "'groups' = 'a,b,a': names ['a'] more than once"),
        ({"classes": "@classes.txt"}, "names a file: 'fedmm run' and 'fedmm submit' inline it"),
        ({"model": "ViT-B-33"}, "'model': unknown open_clip model 'ViT-B-33' (did you mean ViT-B-32"),
        ({"client-profiles": "phone: rank=2"}, "profile 'phone': unknown setting 'rank=2'"),
        ({"client-profiles": "phone: dropout=1"}, "profile 'phone': dropout = '1' must be a number in [0, 1)"),
        ({"client-profiles": "phone lora-rank=2"}, "expected 'name: key=value ...'"),
        ({"client-profiles": "a: lora-targets=nope"}, "profile 'a' targets nope, not among the run's lora-targets"),
        ({"client-profiles": "a: local-steps=99"}, "profile 'a' sets local-steps=99, more than the run's 'local-steps'"),
        ({"client-profiles": "a: batch-size=999"}, "profile 'a' sets batch-size=999, more than the run's 'batch-size'"),
        ({"partition-profiles": "phone"}, "'partition-profiles': unknown profile(s) phone"),
        ({"codec-downlink": "topk0.1+q8"}, "'codec-downlink' = 'topk0.1+q8': downlink codec 'topk0.1+q8': top-k"),
        ({"client-profiles": "a: lora-rank=2", "lora-ranks": "2,4"}, "'lora-ranks' and 'client-profiles'"),
        ({"client-profiles": "a: time-budget=3", "dp": "dp-sgd"}, "profile 'a' has a time-budget"),
        ({"resume": True}, "'resume' = true needs 'output-dir'"),
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


def test_profiles_fill_unset_keys_from_the_run_and_rank_the_global_adapter():
    s = Settings.from_run_config({"client-profiles": "phone: lora-rank=2 time-budget=1.5; big: lora-rank=16",
                                  "partition-profiles": "phone,phone,big", "local-steps": 7})
    phone, big = s.profile_for(1), s.profile_for(2)
    assert (phone.name, phone.lora_rank, phone.time_budget, phone.local_steps) == ("phone", 2, 1.5, 7)
    assert tuple(phone.lora_targets) == tuple(s.lora_target_list) and big.lora_rank == 16
    assert s.global_rank == 16
    assert s.profile_for(0, node_profile="big").name == "big"  # a SuperNode's node config wins
    with pytest.raises(ConfigError, match="node config 'profile' = 'tablet'"):
        s.profile_for(0, node_profile="tablet")


def test_a_clientapp_does_not_need_the_servers_manifests(tmp_path):
    """A site never opens the server's 'dataset' or 'server-dataset': its settings validate without them."""
    config = {"dataset": "/server/only/manifest.csv", "server-dataset": "/server/held-out.csv", "classes": "a,b"}
    with pytest.raises(ConfigError, match="'dataset': manifest file not found"):
        Settings.from_run_config(config)
    assert Settings.from_run_config(config, server_files=False).class_list == ("a", "b")


def test_the_cli_inlines_a_name_file(tmp_path):
    from fedmm.config.data import inline_name_file

    (tmp_path / "classes.txt").write_text("# the consortium's classes\nnormal\n\npneumonia\n")
    assert inline_name_file(f"@{tmp_path / 'classes.txt'}", "classes") == "normal,pneumonia"
    assert inline_name_file("cat,dog", "classes") == "cat,dog"
    with pytest.raises(ConfigError, match="'classes' = '@/no/file.txt': file not found"):
        inline_name_file("@/no/file.txt", "classes")
