"""The stress run: many jobs of random sizes on fake GPUs, with random faults, then the
invariant checker's verdict (tests/invariants.py).

python tests/stress.py [--jobs 300] [--seconds 120] [--gpus 8] [--seed N] [--keep]

Jobs arrive over about `--seconds`; meanwhile gpurun wrappers and job commands get SIGKILL
and SIGTERM at random, and `gpurun gc` and `gpurun kill` run in parallel. This process is a
child subreaper, so the commands of killed wrappers are its children and it knows when every
process of the run is gone; it then runs one `gpurun gc` and checks. It prints what it did
and the verdict, and exits 0 when no invariant was broken. `make stress` runs it; a small run
is part of `make test` (tests/test_stress.py).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from invariants import check
from stress_job import start_time

HERE = Path(__file__).resolve().parent
GPURUN = str(Path(sys.executable).with_name("gpurun"))
JOB = str(HERE / "stress_job.py")
# What one tick of the driver may do besides launching, with its weight.
ACTIONS = {
    "SIGKILL a gpurun": 3,
    "SIGTERM a gpurun": 3,
    "SIGKILL a command": 3,
    "SIGTERM a command": 2,
    "gpurun gc": 3,
    "gpurun kill": 2,
}
# gpurun's exit codes a wrapper may end with in this run; anything else is a fault.
EXPECTED = {0, 1, 3, 75, 130, 137, 143}


class Run:
    """One stress run in a fresh folder."""

    def __init__(self, jobs: int, seconds: float, gpus: int, seed: int) -> None:
        self.jobs = jobs
        self.seconds = seconds
        self.gpus = gpus
        self.rng = random.Random(seed)
        self.seed = seed
        self.root = Path(tempfile.mkdtemp(prefix="gpurun-stress-"))
        self.out = self.root / "out"
        (self.out / "marks").mkdir(parents=True)
        self.state_dir = self.root / "state"
        self.config = self.root / "gpurun.yaml"
        self.config.write_text(
            f"state_dir: {self.state_dir}\ngpus: {gpus}\ncpus: auto\nkill_grace: 0.5\n"
            "lock_timeout: 60\n"
        )
        self.env = dict(os.environ, GPURUN_CONFIG=str(self.config), GPURUN_SERVER="stress")
        self.env.pop("GPURUN_STATE_DIR", None)
        self.env.pop("GPURUN_CRASH_AT", None)
        self.wrappers: dict[int, dict] = {}  # pid -> what was launched
        self.tools: dict[int, dict] = {}  # pid -> gc or kill run
        self.statuses: dict[int, int] = {}
        self.done: Counter[str] = Counter()
        self.codes: Counter[int] = Counter()
        self.faults: list[str] = []

    def spawn(self, argv: list[str], name: str) -> int:
        err = os.open(self.root / f"{name}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            return os.posix_spawn(
                argv[0],
                argv,
                self.env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, err, 2),
                ],
            )
        finally:
            os.close(err)

    def launch(self, n: int) -> None:
        gpus = self.rng.choice([0, 1, 1, 1, 2, 2, 3, 4, 4, self.gpus])
        cpus = self.rng.choice([0, 0, 0, 1])
        sleep = round(self.rng.uniform(0.05, 1.2), 3)
        code = self.rng.choice([0, 0, 0, 1, 3])
        options = ["-g", str(gpus), "-c", str(cpus)]
        if self.rng.random() < 0.1:
            options.append("--no-wait")
        argv = [GPURUN, *options, "--", sys.executable, JOB, str(self.out), str(sleep), str(code)]
        pid = self.spawn(argv, f"wrapper{n}")
        self.wrappers[pid] = {"n": n, "argv": argv, "signal": None}

    def started(self) -> dict[int, dict]:
        """Start records of jobs whose command may still run."""
        found = {}
        for path in self.out.glob("*.start"):
            job = int(path.name.split(".")[0])
            if not (self.out / f"{job}.end").exists():
                found[job] = json.loads(path.read_text())
        return found

    def act(self) -> None:
        action = self.rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        live = [pid for pid in self.wrappers if pid not in self.statuses]
        if action in ("SIGKILL a gpurun", "SIGTERM a gpurun") and live:
            pid = self.rng.choice(live)
            signum = signal.SIGKILL if action.startswith("SIGKILL") else signal.SIGTERM
            self.wrappers[pid]["signal"] = signum
            os.kill(pid, signum)
        elif action in ("SIGKILL a command", "SIGTERM a command"):
            running = self.started()
            if not running:
                return
            job = running[self.rng.choice(sorted(running))]
            signum = signal.SIGKILL if action.startswith("SIGKILL") else signal.SIGTERM
            # The start time makes sure the pid is still that job's command.
            if start_time(job["pid"]) != job["start"]:
                return
            os.kill(job["pid"], signum)
        elif action == "gpurun gc":
            self.tools[self.spawn([GPURUN, "gc"], f"gc{self.done[action]}")] = {"what": "gc"}
        elif action == "gpurun kill":
            running = self.started()
            if not running:
                return
            job = self.rng.choice(sorted(running))
            argv = [GPURUN, "kill", str(job)]
            self.tools[self.spawn(argv, f"kill{self.done[action]}")] = {"what": "kill"}
        else:
            return
        self.done[action] += 1

    def reap(self) -> bool:
        """Collect every child that ended; False once there are none left at all."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            self.statuses[pid] = os.waitstatus_to_exitcode(status)

    def drive(self) -> None:
        began = time.monotonic()
        interval = self.seconds * 0.85 / self.jobs
        launched = 0
        next_launch = began
        next_act = began
        while launched < self.jobs:
            now = time.monotonic()
            if now >= next_launch:
                self.launch(launched)
                launched += 1
                next_launch = now + self.rng.uniform(0, 2 * interval)
            if now >= next_act:
                self.act()
                next_act = now + self.rng.uniform(0, 4 * interval)
            self.reap()
            time.sleep(0.005)
        # Let everything end by itself; a job whose gpurun is blocked waits its turn.
        while self.reap():
            time.sleep(0.02)

    def verdict(self) -> bool:
        gc = subprocess.run([GPURUN, "gc", "--json"], env=self.env, capture_output=True, text=True)
        if gc.returncode != 0:
            self.faults.append(f"the final gc failed: {gc.stderr.strip()}")
        status = json.loads(
            subprocess.run(
                [GPURUN, "status", "--json"], env=self.env, capture_output=True, text=True
            ).stdout
        )["servers"][0]
        ledger = json.loads((self.state_dir / "stress.json").read_text())
        history = [
            json.loads(line)
            for line in (self.state_dir / "stress.history.jsonl").read_text().splitlines()
        ]

        exits = {}
        jobs_of_wrappers = _jobs_by_wrapper(self.out)
        for pid, info in self.wrappers.items():
            code = self.statuses[pid]
            self.codes[code] += 1
            errors = (self.root / f"wrapper{info['n']}.err").read_text()
            self._check_stderr(errors, f"gpurun {info['n']} (exit {code})")
            if code >= 0 and code not in EXPECTED:
                self.faults.append(f"gpurun {info['n']} exited {code}: {errors.strip()[-200:]}")
            job = jobs_of_wrappers.get(pid)
            if job is not None and code >= 0:
                exits[job] = code
        for pid, info in self.tools.items():
            code = self.statuses.get(pid)
            if info["what"] == "gc" and code != 0:
                self.faults.append(f"a gpurun gc exited {code}")
            if info["what"] == "kill" and code not in (0, 125):
                self.faults.append(f"a gpurun kill exited {code}")
        for path in self.root.glob("*.err"):
            if path.name.startswith(("gc", "kill")):
                self._check_stderr(path.read_text(), path.stem)

        total = (status["gpus_total"], status["cpus_total"])
        free = (len(status["gpus_free"]), status["cpus_free"])
        violations, facts = check(self.out, history, ledger, free, total, self.state_dir, exits)
        self.faults.extend(violations)
        self.report(facts, json.loads(gc.stdout or "[]"))
        return not self.faults

    def _check_stderr(self, text: str, who: str) -> None:
        for line in text.splitlines():
            if "Traceback" in line or "internal error" in line:
                self.faults.append(f"{who}: {line.strip()[:200]}")
                return
            if not line.startswith("gpurun: "):
                self.faults.append(f"{who} wrote a line that is not a gpurun message: {line!r}")
                return

    def report(self, facts: dict[str, int], final_gc: list) -> None:
        print(f"stress: {self.jobs} jobs on {self.gpus} fake GPUs, seed {self.seed}, {self.root}")
        print("  did: " + ", ".join(f"{n} x {what}" for what, n in sorted(self.done.items())))
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.codes.items()))
        print(f"  gpurun exit codes (negative: killed by that signal): {codes}")
        print("  facts: " + ", ".join(f"{what} {n}" for what, n in facts.items()))
        print(f"  final gc reaped {len(final_gc)} dead leases")
        if self.faults:
            print(f"  verdict: FAIL, {len(self.faults)} broken invariants or faults:")
            for fault in self.faults[:30]:
                print(f"    {fault}")
        else:
            print("  verdict: PASS (no GPU or CPU held twice, history exact, ledger empty)")


def _jobs_by_wrapper(out: Path) -> dict[int, int]:
    """Which job id each gpurun ran, from its command's parent pid at the start."""
    found = {}
    for path in out.glob("*.start"):
        record = json.loads(path.read_text())
        if "ppid" in record:
            found[record["ppid"]] = record["job"]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the run's folder")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: killed wrappers' commands come here
    run = Run(args.jobs, args.seconds, args.gpus, seed)
    began = time.monotonic()
    try:
        run.drive()
        ok = run.verdict()
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(run.root)], check=False)
    print(f"  took {time.monotonic() - began:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
