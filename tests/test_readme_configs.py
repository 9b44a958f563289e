"""The example configs in the README's lab section pass `doctor` and show in `status`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def lab_configs() -> list[str]:
    text = README.read_text()
    section = text.split("## A lab with several servers", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```yaml\n(.*?)```", section, re.S)


def test_the_readme_has_both_lab_examples():
    assert len(lab_configs()) == 2


@pytest.mark.parametrize("index", [0, 1])
def test_readme_lab_config_passes_doctor_and_shows_in_status(gpurun, index):
    text = lab_configs()[index]
    config = gpurun.tmp / "lab.yaml"
    config.write_text(text)
    env = dict(gpurun.env, GPURUN_CONFIG=str(config), GPURUN_STATE_DIR=str(gpurun.state_dir))

    doctor = gpurun.run("doctor", env=env)
    status = gpurun.run("status", "--json", env=env)

    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "no problems found" in doctor.stdout
    assert status.returncode == 0, status.stderr
    servers = json.loads(status.stdout)["servers"]
    names = [server["name"] for server in servers]
    if index == 0:
        assert names[-2:] == ["lab1", "lab2"]
        assert [s["gpus_total"] for s in servers[-2:]] == [4, 4]
    else:
        assert names[-6:] == ["prod01", "prod02", "prod03", "prod04", "dev1", "dev2"]
        assert [s["gpus_total"] for s in servers[-6:]] == [8, 8, 8, 8, 4, 4]
        assert servers[-1]["address"] == "dev2.lab.example.org"
