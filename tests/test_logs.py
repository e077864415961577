"""Every log line of a run is printed once."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_flower_log_line_is_printed_once_by_the_server_app_process():
    # a fresh process, as the ServerApp's: importing the app pulls in Opacus, whose import calls basicConfig
    code = ("import server.app, clients.app\n"
            "from logging import INFO\nfrom flwr.supercore import log\nlog(INFO, 'fedmm-once-marker')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (out.stdout + out.stderr).count("fedmm-once-marker") == 1, out.stdout + out.stderr


def test_a_fedmm_cli_log_line_is_printed_once_when_a_library_configured_the_root_logger():
    # `fedmm run` and `fedmm pretrain` import Opacus (basicConfig: a root handler) before they log progress
    code = ("import logging, opacus\nfrom fedmm import cli\ncli.main(['strategies'])\n"
            "logging.getLogger('fedmm.pretrain').info('fedmm-cli-once-marker')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (out.stdout + out.stderr).count("fedmm-cli-once-marker") == 1, out.stdout[-1000:] + out.stderr[-2000:]
