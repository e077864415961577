"""Per-round checkpoints and resume: state round trip, refusals, and a killed run resumed to the same result."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

import strategies
from conftest import ONE_ACTOR
from fedmm.deploy.simulation import run_simulation
from fedmm.config import ConfigError, Settings
from fedmm.pretrain import ensure_base_checkpoint
from server.chain import find_wrapper, make_strategy
from server.checkpoint import load_checkpoint, load_rng_state, load_strategy_state, save_checkpoint
from server.history import MetricsHistory
from strategies.compression import CompressedUpdates
from strategies.reply_book import ReplyBook
from strategies.constraints import DualAscentConstraints
from fedmm.protocol import to_numpy, to_record

ROOT = Path(__file__).resolve().parents[1]


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.lora_A.weight": rng.normal(size=(4, 8)).astype(np.float32),
            "a.lora_B.weight": rng.normal(size=(8, 4)).astype(np.float32)}


def _chain(settings: Settings, history: MetricsHistory, num_nodes: int = 5):
    return make_strategy(settings, history, num_nodes)


def test_strategy_state_survives_a_checkpoint(tmp_path):
    """Server-optimizer moments, multipliers, codec logs and the metrics history come back as they were."""
    settings = Settings.from_run_config({"strategy": "fedadam", "constraints": "group-gap", "output-dir": str(tmp_path), "cache-dir": str(tmp_path / "key-cache")})
    history = MetricsHistory()
    chain = _chain(settings, history)
    adam = strategies.innermost(chain)
    adam.current_arrays = to_record(_arrays(0))
    adam.m_t, adam.v_t = _arrays(1), _arrays(2)
    find_wrapper(chain, DualAscentConstraints).multipliers["group-gap"] = 0.375
    find_wrapper(chain, DualAscentConstraints).history[3] = {"constraints/group-gap": 0.1}
    compressed = find_wrapper(chain, CompressedUpdates)
    compressed.stats[3] = {"bytes-uplink": 1234.0}
    find_wrapper(chain, ReplyBook).failures.append({"round": 2, "node": 7, "reason": "timeout"})
    history.record(3, "central/zs-acc", 0.5)
    history.clients.append({"round": 3, "phase": "train", "partition-id": 1})

    save_checkpoint(tmp_path, 3, ArrayRecord(), chain, history.state_dict(), settings)
    saved = load_checkpoint(tmp_path, settings)
    assert saved.server_round == 3

    fresh_history = MetricsHistory()
    fresh = _chain(settings, fresh_history)
    load_strategy_state(fresh, saved.strategy, saved.state_arrays)
    fresh_history.load_state_dict(saved.history)
    fresh_adam = strategies.innermost(fresh)
    for name in ("m_t", "v_t"):
        for key, value in getattr(adam, name).items():
            np.testing.assert_array_equal(getattr(fresh_adam, name)[key], value)
    for key, value in to_numpy(adam.current_arrays).items():
        np.testing.assert_array_equal(to_numpy(fresh_adam.current_arrays)[key], value)
    assert find_wrapper(fresh, DualAscentConstraints).multipliers == {"group-gap": 0.375}
    assert find_wrapper(fresh, DualAscentConstraints).history == {3: {"constraints/group-gap": 0.1}}
    assert find_wrapper(fresh, CompressedUpdates).stats == {3: {"bytes-uplink": 1234.0}}
    assert find_wrapper(fresh, ReplyBook).failures == [{"round": 2, "node": 7, "reason": "timeout"}]
    assert fresh_history.rounds[3]["central/zs-acc"] == 0.5 and fresh_history.clients == history.clients
    # the aggregation hooks still feed the restored history object
    assert fresh_adam.train_metrics_aggr_fn.__self__ is fresh_history


def test_privacy_ledger_and_rng_survive_a_checkpoint(tmp_path):
    settings = Settings.from_run_config({"dp": "central-server", "output-dir": str(tmp_path), "cache-dir": str(tmp_path / "key-cache")})
    chain = _chain(settings, MetricsHistory())
    dp = next(s for s in strategies.wrapper_chain(chain) if hasattr(s, "privacy_spent"))
    for _ in range(3):
        dp.accountant.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=5, population_size=5))
    spent = dp.privacy_spent().epsilon
    torch.manual_seed(11)
    save_checkpoint(tmp_path, 3, ArrayRecord(), chain, MetricsHistory().state_dict(), settings)
    expected = torch.rand(3)

    saved = load_checkpoint(tmp_path, settings)
    fresh = _chain(settings, MetricsHistory())
    load_strategy_state(fresh, saved.strategy, saved.state_arrays)
    fresh_dp = next(s for s in strategies.wrapper_chain(fresh) if hasattr(s, "privacy_spent"))
    assert fresh_dp.privacy_spent().epsilon == pytest.approx(spent) and spent > 0
    torch.manual_seed(0)
    load_rng_state(saved.rng, saved.state_arrays)
    assert torch.equal(torch.rand(3), expected)


def test_a_checkpoint_is_replaced_only_once_the_next_is_complete(tmp_path):
    settings = Settings.from_run_config({"output-dir": str(tmp_path), "cache-dir": str(tmp_path / "key-cache")})
    chain = _chain(settings, MetricsHistory())
    for rnd in (1, 2):
        save_checkpoint(tmp_path, rnd, ArrayRecord(), chain, MetricsHistory().state_dict(), settings)
    assert load_checkpoint(tmp_path, settings).server_round == 2
    assert [p.name for p in (tmp_path / "checkpoint").glob("round-*")] == ["round-00002"]
    # a half-written round-3 folder (killed mid-write) is ignored: latest.json still names round 2
    (tmp_path / "checkpoint" / "round-00003").mkdir()
    assert load_checkpoint(tmp_path, settings).server_round == 2
    assert load_checkpoint(tmp_path / "elsewhere", settings) is None


def test_resume_refuses_a_different_config_naming_the_key(tmp_path):
    settings = Settings.from_run_config({"output-dir": str(tmp_path), "cache-dir": str(tmp_path / "key-cache"), "lr": 0.01})
    save_checkpoint(tmp_path, 2, ArrayRecord(), _chain(settings, MetricsHistory()), MetricsHistory().state_dict(),
                    settings)
    saved = load_checkpoint(tmp_path, settings)
    saved.check_config(Settings.from_run_config({"output-dir": str(tmp_path), "cache-dir": str(tmp_path / "key-cache"), "lr": 0.01, "resume": True,
                                                 "num-server-rounds": 20}))  # more rounds: allowed
    with pytest.raises(ConfigError, match="'lr'"):
        saved.check_config(Settings.from_run_config({"output-dir": str(tmp_path), "cache-dir": str(tmp_path / "key-cache"), "lr": 0.02, "resume": True}))
    with pytest.raises(ConfigError, match="already completed round 2"):
        saved.check_config(Settings.from_run_config({"output-dir": str(tmp_path), "cache-dir": str(tmp_path / "key-cache"), "lr": 0.01, "resume": True,
                                                     "num-server-rounds": 1}))
    with pytest.raises(ConfigError, match="'output-dir'"):
        Settings.from_run_config({"resume": True})
    with pytest.raises(ConfigError, match="ledger"):
        Settings.from_run_config({"resume": True, "output-dir": str(tmp_path), "dp": "dp-sgd"})


def _ctrl_c_after_round(config: dict, out: Path, after: int, log_file: Path) -> tuple[int, int, str]:
    """`fedmm run` in its own process group, SIGINT to the group (what Ctrl-C sends) once round ``after``'s
    checkpoint is written; returns (the checkpoint's round then, the exit code, the command's output) after
    checking that every process it started is gone."""
    from fedmm.config.text import format_run_config

    cmd = [str(Path(sys.executable).parent / "fedmm"), "run", "--clients", "3", "--cpus-per-client", str(ONE_ACTOR),
           "--app", str(ROOT), "--run-config", format_run_config({**config, "output-dir": str(out)})]
    latest = out / "checkpoint" / "latest.json"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=log_file.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (latest.is_file() and json.loads(latest.read_text())["server-round"] >= after):
            assert proc.poll() is None and time.monotonic() < deadline, log_file.read_text()[-3000:]
            time.sleep(0.1)
        started = psutil.Process(proc.pid).children(recursive=True)  # SuperLink, ServerApp, Ray and its agents
        before = json.loads(latest.read_text())["server-round"]
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(started, timeout=15)
    assert not alive, [p.cmdline()[:2] for p in alive]
    return before, code, log_file.read_text()


@pytest.mark.integration
def test_a_killed_run_resumes_to_the_uninterrupted_result(base_settings, tmp_path):
    """Ctrl-C a run after a round; resume: no round lost or repeated, same metrics and adapter as a clean run.

    The clean run also stands for determinism: same seed and config, same metrics, bit for bit.
    """
    ensure_base_checkpoint(base_settings, progress=False)
    # FedAdam: its moments are server state a checkpoint must carry (and the adaptive family's simulation test)
    config = {**base_settings.to_run_config(), "num-server-rounds": 2, "local-steps": 8, "seed": 7,
              "partitioner": "iid", "strategy": "fedadam", "strategy-args": "eta=0.01 tau=0.001"}

    def run(name: str, **extra) -> int:
        return run_simulation(ROOT, {**config, "output-dir": str(tmp_path / name), **extra}, num_supernodes=3,
                              cpus_per_client=ONE_ACTOR, flwr_home=tmp_path / f"flwr-{name}", stream=False,
                              timeout=900)

    assert run("clean") == 0
    home = tmp_path / "flwr-killed"
    # Ctrl-C during round 2: the command stops at once (exit 130), every process it started is gone, no round
    # completes after it, the last checkpoint is valid, and it says how to continue
    before, code, text = _ctrl_c_after_round(config, tmp_path / "killed", 1, tmp_path / "ctrl-c.log")
    assert code == 130, text[-3000:]
    time.sleep(2)  # nothing is left to write another round
    completed = load_checkpoint(tmp_path / "killed", base_settings).server_round
    assert before == completed == 1 and not (tmp_path / "killed" / "metrics.json").exists()
    assert "stopped by SIGINT" in text and "(round 1)" in text and "resume=true" in text

    assert run("killed", resume=True) == 0
    log = (home / "run.log").read_text()
    assert "resuming" in log and "after round 1 of 2" in log
    assert "[ROUND 1/1]" in log and "[ROUND 2/" not in log  # only the lost round ran again
    runs = []
    for name in ("clean", "killed"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        # everything but measurements of the machine (wall times, the server's memory)
        runs.append({r: {k: v for k, v in row.items() if "seconds" not in k and "rss" not in k}
                     for r, row in metrics["rounds"].items()})
        # each round's client rows once: none lost, none repeated
        assert sorted((c["round"], c["phase"], c["partition-id"]) for c in metrics["clients"]) == sorted(
            (r, phase, p) for r in (1, 2) for phase in ("train", "evaluate") for p in range(3))
    assert sorted(runs[0]) == ["0", "1", "2"]
    clean = runs[0]
    assert [clean[r]["train/num-replies"] for r in ("1", "2")] == [3, 3] and clean["2"]["dropped-updates"] == 0
    assert clean["2"]["central/zs-acc"] > clean["0"]["central/zs-acc"], clean  # FedAdam learns
    assert runs[0] == runs[1]
    from safetensors.numpy import load_file

    clean, resumed = (load_file(str(tmp_path / n / "adapter" / "adapter_model.safetensors")) for n in ("clean", "killed"))
    assert clean.keys() == resumed.keys()
    for key in clean:
        np.testing.assert_array_equal(clean[key], resumed[key])


def _resign(folder: Path, settings: Settings) -> None:
    """What only the holder of the checkpoint key can do: sign an edited checkpoint again."""
    from server.signing import sign

    sign(folder, settings)


def test_a_tampered_or_corrupt_checkpoint_is_refused_naming_file_and_field(tmp_path):
    settings = Settings.from_run_config({"dp": "central-server", "output-dir": str(tmp_path), "cache-dir": str(tmp_path / "key-cache")})
    chain = _chain(settings, MetricsHistory())
    save_checkpoint(tmp_path, 2, ArrayRecord(), chain, MetricsHistory().state_dict(), settings)
    saved = load_checkpoint(tmp_path, settings)
    state_file = saved.state_file
    state = json.loads(state_file.read_text())
    dp = next(level for level in state["strategy"] if "noise_multiplier" in level["attrs"])
    dp["attrs"]["noise_multiplier"] = 0.01  # less noise than the run's: a smaller epsilon would be reported
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"signature does not match the checkpoint's files"):
        load_checkpoint(tmp_path, settings)  # whoever edits the folder lacks the key
    _resign(state_file.parent, settings)  # and with it, the field checks still hold the run config
    tampered = load_checkpoint(tmp_path, settings)
    fresh = _chain(settings, MetricsHistory())
    with pytest.raises(ConfigError, match=r"state\.json.*field 'noise_multiplier' = 0\.01, but this run's config gives 1\.0"):
        load_strategy_state(fresh, tampered.strategy, tampered.state_arrays, f"checkpoint {tampered.state_file}")
    fresh_dp = next(s for s in strategies.wrapper_chain(fresh) if hasattr(s, "noise_multiplier"))
    assert fresh_dp.noise_multiplier == 1.0  # nothing was set
    dp["attrs"]["noise_multiplier"] = 1.0
    dp["attrs"]["clipping_norm"] = "1.0"  # the right value, the wrong type
    state_file.write_text(json.dumps(state))
    _resign(state_file.parent, settings)
    with pytest.raises(ConfigError, match="field 'clipping_norm'"):
        load_strategy_state(_chain(settings, MetricsHistory()), load_checkpoint(tmp_path, settings).strategy, {})
    state_file.write_text(state_file.read_text()[:-20])  # truncated
    _resign(state_file.parent, settings)
    with pytest.raises(ConfigError, match=r"checkpoint .*state\.json: unreadable"):
        load_checkpoint(tmp_path, settings)


@pytest.mark.parametrize("dp", ["central-server", "distributed"])
def test_an_emptied_privacy_ledger_is_refused_on_resume(tmp_path, dp):
    """Audit item 8: emptying the distributed ledger's released rounds, or the compositions of Flower's
    accountant, in state.json was accepted on resume and epsilon dropped from 12.3 to 0. Unsigned, the edit
    is refused by the signature; signed again (by someone holding the key), by the ledger's check against
    the releases and epsilon the checkpoint's round recorded."""
    from server.checkpoint import check_ledger

    extra = {"secure-aggregation": True} if dp == "distributed" else {}
    settings = Settings.from_run_config({"dp": dp, "output-dir": str(tmp_path), "cache-dir": str(tmp_path / "key-cache"),
                                         **extra})
    history = MetricsHistory()
    chain = _chain(settings, history)
    ledger = next(s for s in strategies.wrapper_chain(chain) if hasattr(s, "privacy_spent"))
    if dp == "distributed":
        ledger._dim = 1000
        ledger.released = [1, 2, 3]
    else:
        for _ in range(3):
            ledger.accountant.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=5, population_size=5))
    spent = ledger.privacy_spent()
    assert spent.num_releases == 3 and spent.epsilon > 0
    history.record(3, "privacy/epsilon", spent.epsilon)
    history.record(3, "privacy/releases", spent.num_releases)
    folder = save_checkpoint(tmp_path, 3, ArrayRecord(), chain, history.state_dict(), settings)
    state = json.loads((folder / "state.json").read_text())
    level = next(lv for lv in state["strategy"] if ("released" if dp == "distributed" else "accountant") in lv["attrs"])
    if dp == "distributed":
        level["attrs"]["released"] = {"$list": []}
    else:
        level["attrs"]["accountant"]["$state"]["compositions"] = []
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="signature does not match"):
        load_checkpoint(tmp_path, settings)
    _resign(folder, settings)
    saved = load_checkpoint(tmp_path, settings)
    fresh_history = MetricsHistory()
    fresh = _chain(settings, fresh_history)
    load_strategy_state(fresh, saved.strategy, saved.state_arrays)
    fresh_history.load_state_dict(saved.history)
    fresh_ledger = next(s for s in strategies.wrapper_chain(fresh) if hasattr(s, "privacy_spent"))
    if dp == "distributed":
        fresh_ledger._dim = 1000
    assert fresh_ledger.privacy_spent().num_releases == 0  # what the edit did
    with pytest.raises(ConfigError, match=r"state\.json: the privacy ledger holds 0 releases, round 3 recorded 3"):
        check_ledger(fresh_ledger.privacy_spent(), 3, fresh_history.rounds, f"checkpoint {saved.state_file}")
    # more releases than rounds is refused even where the round recorded nothing
    fresh_history.rounds[3].clear()
    with pytest.raises(ConfigError, match="holds 3 releases after 2 rounds"):
        check_ledger(spent, 2, fresh_history.rounds, "checkpoint")
