"""Discovery, masks from outside, outside users, MIG and NUMA-aware placement, on recorded
machines (tests/fixtures: nvidia-smi outputs and sysfs trees) through the real CLI."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from conftest import FIXTURES, read_json, wait_for, wait_json

from gpurun.cpulist import parse_cpulist
from gpurun.gpus import parse_mig_list, parse_topo
from gpurun.ledger import Request
from gpurun.placement import pick_gpus, place
from gpurun.topology import read_topology

DGX_UUID = "GPU-8a1c3f6e-000{i}-4d1e-9b7a-00000000000{i}"
NODE0_CPUS = set(range(0, 16)) | set(range(32, 48))
NODE1_CPUS = set(range(16, 32)) | set(range(48, 64))


def dgx_topology():
    buses = ["07", "0f", "47", "4e", "87", "90", "b7", "bd"]
    links = parse_topo((FIXTURES / "dgx8" / "topo.txt").read_text())
    return read_topology(
        str(FIXTURES / "dgx8" / "sys"), {i: f"0000:{b}:00.0" for i, b in enumerate(buses)}, links
    )


def whole_cores(cpus: set[int]) -> bool:
    """On the 8-GPU box, CPU c and c+32 are the two threads of one core."""
    return all((c + 32 if c < 32 else c - 32) in cpus for c in cpus)


def gpus_and_cpus(start: dict) -> tuple[set[int], set[int]]:
    env = start["env"]
    return set(map(int, env["GPURUN_GPUS"].split(","))), set(parse_cpulist(env["GPURUN_CPUS"]))


# Pure placement, on the 8-GPU box's topology.


def test_sysfs_tree_reads_nodes_siblings_and_gpu_nodes():
    topology = dgx_topology()

    assert [topology.gpu_node[g] for g in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert topology.cpu_core[5] == (5, 37)
    assert {c for c, n in topology.cpu_node.items() if n == 1} == NODE1_CPUS
    assert topology.node_distance[(0, 1)] == 21
    assert topology.gpu_links[(0, 1)] < topology.gpu_links[(0, 2)] < topology.gpu_links[(0, 4)]


def test_cross_node_pair_is_never_chosen_while_a_same_node_pair_is_free():
    topology = dgx_topology()

    # Node 0 keeps only GPU 0 free, node 1 keeps 4 and 6 free (not a PIX pair).
    spot = place(
        Request(2, 4, None), tuple(range(8)), tuple(range(64)), {1, 2, 3, 5, 7}, set(), topology
    )

    assert spot is not None
    assert set(spot[0]) == {4, 6}
    assert set(spot[1]) <= NODE1_CPUS


def test_small_jobs_are_packed_so_large_groups_stay_free():
    topology = dgx_topology()

    # Node 0 has one GPU left (3), node 1 all four: a 1-GPU job takes 3, not 4.
    assert pick_gpus([3, 4, 5, 6, 7], 1, topology) == (3,)
    # Within a node, a 2-GPU job takes the PIX pair.
    assert pick_gpus([4, 5, 6, 7], 2, topology) == (4, 5)
    # A single GPU goes where its PCIe partner is already taken: 6,7 stay a pair.
    assert pick_gpus([5, 6, 7], 1, topology) == (5,)


def test_cpus_come_from_the_gpus_node_in_whole_cores_then_the_nearest_node():
    topology = dgx_topology()
    held = set(range(0, 14)) | set(range(32, 46))  # node 0 has cores 14 and 15 left

    gpus, cpus = place(
        Request(1, 6, (0,)), tuple(range(8)), tuple(range(64)), set(), held, topology
    )

    assert gpus == (0,)
    assert {14, 15, 46, 47} <= set(cpus)
    assert set(cpus) - NODE0_CPUS <= NODE1_CPUS and len(set(cpus) & NODE1_CPUS) == 2
    assert whole_cores(set(cpus))


def test_an_odd_count_uses_a_split_core_before_splitting_a_whole_one():
    topology = dgx_topology()
    held = {0}  # core (0, 32) is already split by another job

    _, cpus = place(Request(1, 3, (0,)), tuple(range(8)), tuple(range(64)), set(), held, topology)

    assert set(cpus) == {1, 33, 32}


def test_nvidia_smi_recordings_parse():
    mig = parse_mig_list((FIXTURES / "a100mig" / "list.txt").read_text(), [_gpu0()])
    links = parse_topo((FIXTURES / "ws4" / "topo.txt").read_text())

    assert [(g.id, g.uuid[-4:], g.name.split()[-1]) for g in mig[0]] == [
        (1000, "1111", "3g.20gb"),
        (1001, "2222", "2g.10gb"),
        (1002, "3333", "1g.5gb"),
    ]
    assert len(links) == 12 and len(set(links.values())) == 1


def _gpu0():
    from gpurun.gpus import Gpu

    return Gpu(0, 0, "GPU-x", "0000:07:00.0", "NVIDIA A100-SXM4-40GB", 40960, 0, None)


# The real CLI on recorded machines.


def test_two_2gpu_jobs_stay_within_one_node_each_with_whole_cores(gpurun):
    gpurun.use_machine("dgx8")
    release = gpurun.tmp / "release"

    first = gpurun.start("-g", "2", "--", *gpurun.probe("a", "--wait-for", str(release)))
    a = wait_json(gpurun.tmp / "a.start")
    second = gpurun.start("-g", "2", "--", *gpurun.probe("b", "--wait-for", str(release)))
    b = wait_json(gpurun.tmp / "b.start")
    release.touch()

    assert first.wait(timeout=30) == 0 and second.wait(timeout=30) == 0
    placed = [gpus_and_cpus(a), gpus_and_cpus(b)]
    assert placed[0][0].isdisjoint(placed[1][0]) and placed[0][1].isdisjoint(placed[1][1])
    for gpus, cpus in placed:
        node = NODE0_CPUS if max(gpus) < 4 else NODE1_CPUS
        assert len(gpus) == 2 and len({g // 4 for g in gpus}) == 1
        assert len(cpus) == 16 and cpus <= node and whole_cores(cpus)


def test_cross_node_pair_is_not_given_while_a_same_node_pair_is_free(gpurun):
    gpurun.use_machine("dgx8")
    release = gpurun.tmp / "release"
    holders = []
    for name, ids in (("h1", "1,2,3"), ("h2", "5,7")):
        argv = gpurun.probe(name, "--wait-for", str(release))
        holders.append(gpurun.start("--gpu-ids", ids, "-c", "1", "--", *argv))
        wait_json(gpurun.tmp / f"{name}.start")

    result = gpurun.run("-g", "2", "--no-wait", "--", *gpurun.probe("pair"))
    release.touch()

    assert result.returncode == 0, result.stderr
    gpus, cpus = gpus_and_cpus(read_json(gpurun.tmp / "pair.start"))
    assert gpus == {4, 6}
    assert cpus <= NODE1_CPUS
    assert all(proc.wait(timeout=30) == 0 for proc in holders)


def _recordings(gpurun, machine: str, apps: str = "", query: str | None = None):
    copy = gpurun.tmp / machine
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(FIXTURES / machine, copy, ignore=shutil.ignore_patterns("sys"))
    (copy / "compute-apps.csv").write_text(apps)
    if query is not None:
        (copy / "query-gpu.csv").write_text(query)
    return copy


def test_external_processes_make_a_gpu_unavailable_and_ignore_lifts_it(gpurun):
    apps = "GPU-3f0b9a52-77c1-11ee-a001-000000000002, 4242, 8000, python\n"
    gpurun.use_machine("ws4", recordings=_recordings(gpurun, "ws4", apps))

    busy = gpurun.run("--gpu-ids", "2", "--no-wait", "--", *gpurun.probe("x"))
    others = gpurun.run("-g", "3", "--no-wait", "--", *gpurun.probe("y"))
    status = gpurun.status()

    assert busy.returncode == 75, busy.stderr
    assert others.returncode == 0, others.stderr
    assert gpus_and_cpus(read_json(gpurun.tmp / "y.start"))[0] == {0, 1, 3}
    row = next(g for g in status["gpus"] if g["id"] == 2)
    assert row["state"] == "external" and row["external"]["pid"] == 4242
    assert 2 not in status["gpus_free"]

    gpurun.use_machine("ws4", "external: ignore\n", _recordings(gpurun, "ws4", apps))
    lifted = gpurun.run("--gpu-ids", "2", "--no-wait", "--", *gpurun.probe("z"))

    assert lifted.returncode == 0, lifted.stderr


def test_memory_in_use_above_the_threshold_is_external(gpurun):
    query = (
        (FIXTURES / "ws4" / "query-gpu.csv").read_text().replace(", 24564, 1,", ", 24564, 3000,", 1)
    )
    gpurun.use_machine("ws4", recordings=_recordings(gpurun, "ws4", "", query))

    result = gpurun.run("--gpu-ids", "0", "--no-wait", "--", *gpurun.probe("x"))
    gpurun.use_machine("ws4", "external_memory_mb: 4000\n", _recordings(gpurun, "ws4", "", query))
    allowed = gpurun.run("--gpu-ids", "0", "--no-wait", "--", *gpurun.probe("y"))

    assert result.returncode == 75, result.stderr
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.parametrize("form", ["index", "uuid"])
def test_inherited_mask_limits_to_those_gpus_and_exports_in_its_form(gpurun, form):
    gpurun.use_machine("dgx8")
    names = ["3", "5"] if form == "index" else [DGX_UUID.format(i=3), DGX_UUID.format(i=5)]
    env = dict(gpurun.env, CUDA_VISIBLE_DEVICES=",".join(names))

    one = gpurun.run("-g", "1", "--", *gpurun.probe("one"), env=env)
    both = gpurun.run("-g", "2", "--", *gpurun.probe("both"), env=env)
    three = gpurun.run("-g", "3", "--", "true", env=env)
    outside = gpurun.run("--gpu-ids", "0", "--", "true", env=env)

    assert one.returncode == 0 and both.returncode == 0, one.stderr + both.stderr
    single = read_json(gpurun.tmp / "one.start")["env"]
    assert single["GPURUN_GPUS"] in ("3", "5")
    assert single["CUDA_VISIBLE_DEVICES"] == names[["3", "5"].index(single["GPURUN_GPUS"])]
    pair = read_json(gpurun.tmp / "both.start")["env"]
    assert pair["GPURUN_GPUS"] == "3,5"
    assert pair["CUDA_VISIBLE_DEVICES"] == ",".join(names)
    assert three.returncode == 125 and three.stderr.startswith("gpurun: ")
    assert outside.returncode == 125 and "no GPU 0" in outside.stderr


def test_mask_is_kept_when_another_gpurun_places_the_waiting_job(gpurun):
    gpurun.write_config("gpus: 8\ncpus: auto\nkill_grace: 1\nlock_timeout: 10\n")
    release = gpurun.tmp / "release"
    holder = gpurun.start(
        "--gpu-ids", "3,5", "-c", "0", "--", *gpurun.probe("h", "--wait-for", str(release))
    )
    wait_json(gpurun.tmp / "h.start")
    masked = gpurun.start(
        "-g",
        "1",
        "-c",
        "0",
        "--",
        *gpurun.probe("m"),
        env=dict(gpurun.env, CUDA_VISIBLE_DEVICES="3,5"),
    )
    wait_for(lambda: any(j["state"] == "waiting" for j in gpurun.ps()), what="a waiting job")

    release.touch()

    assert holder.wait(timeout=30) == 0 and masked.wait(timeout=30) == 0
    assert read_json(gpurun.tmp / "m.start")["env"]["GPURUN_GPUS"] in ("3", "5")


def test_empty_inherited_mask_means_no_gpus(gpurun):
    gpurun.use_machine("ws4")

    result = gpurun.run("-g", "1", "--", "true", env=dict(gpurun.env, CUDA_VISIBLE_DEVICES=""))

    assert result.returncode == 125
    assert result.stderr.startswith("gpurun: asked for 1 GPU but this server has 0 GPUs")


def test_visible_devices_uuid_exports_uuids(gpurun):
    gpurun.use_machine("ws4", "visible_devices: uuid\n")

    result = gpurun.run("--gpu-ids", "1", "--", *gpurun.probe("u"))

    assert result.returncode == 0, result.stderr
    env = read_json(gpurun.tmp / "u.start")["env"]
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-3f0b9a52-77c1-11ee-a001-000000000001"
    assert env["GPURUN_GPUS"] == "1"


def test_mig_slices_are_exported_by_uuid_and_one_per_job(gpurun):
    gpurun.use_machine("a100mig")
    release = gpurun.tmp / "release"

    first = gpurun.start("-g", "1", "--", *gpurun.probe("a", "--wait-for", str(release)))
    a = wait_json(gpurun.tmp / "a.start")["env"]
    second = gpurun.run("-g", "1", "--no-wait", "--", *gpurun.probe("b"))
    two = gpurun.run("-g", "2", "--", "true")
    release.touch()

    assert a["CUDA_VISIBLE_DEVICES"] == "MIG-0a1f8e3c-6b2d-5c4e-8f7a-111111111111"
    assert a["GPURUN_GPUS"] == "1000"
    assert second.returncode == 0, second.stderr
    b = read_json(gpurun.tmp / "b.start")["env"]
    assert b["CUDA_VISIBLE_DEVICES"].startswith("MIG-") and b["GPURUN_GPUS"] == "1001"
    assert two.returncode == 125
    assert "only one MIG slice per process" in two.stderr and "Traceback" not in two.stderr
    assert first.wait(timeout=30) == 0


def test_gpus_may_list_uuids_and_unknown_or_twice_listed_ones_are_config_errors(gpurun):
    uuid = DGX_UUID.format(i=6)
    gpurun.use_machine("dgx8")
    gpurun.write_config(f"gpus: [{uuid}, 1]\n")

    listed = gpurun.run("doctor", "--json")
    gpurun.write_config(f"gpus: [{uuid}, 6]\n")
    twice = gpurun.run("-g", "1", "--", "true")
    gpurun.write_config("gpus: [GPU-00000000-dead]\n")
    unknown = gpurun.run("-g", "1", "--", "true")

    assert listed.returncode == 0, listed.stdout
    assert json.loads(listed.stdout)["gpus"] == [1, 6]
    assert twice.returncode == 125 and "key 'gpus'" in twice.stderr and "twice" in twice.stderr
    assert unknown.returncode == 125 and "no GPU 'GPU-00000000-dead'" in unknown.stderr


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("visible_devices: name\n", "visible_devices"),
        ("external: sometimes\n", "external"),
        ("external_memory_mb: -1\n", "external_memory_mb"),
        ("sysfs_root: /no/such/folder\n", "sysfs_root"),
        ("nvidia_smi: 3\n", "nvidia_smi"),
    ],
)
def test_new_keys_are_checked(gpurun, text, key):
    gpurun.write_config("gpus: 2\n" + text)

    result = gpurun.run("ps")

    assert result.returncode == 125
    assert result.stderr.startswith("gpurun: ") and f"key '{key}'" in result.stderr
    assert result.stderr.count("\n") == 1


def test_uuid_export_needs_known_uuids(gpurun):
    gpurun.write_config("gpus: 2\nvisible_devices: uuid\n")

    result = gpurun.run("-g", "1", "--", "true")

    assert result.returncode == 125 and "key 'visible_devices'" in result.stderr


def test_no_driver_means_no_gpus_and_doctor_says_why(gpurun):
    gpurun.use_machine("nodriver")

    doctor = gpurun.run("doctor")
    job = gpurun.run("-g", "1", "--", "true")

    assert doctor.returncode == 0, doctor.stdout
    assert "this host has no GPUs" in doctor.stdout
    assert "couldn't communicate with the NVIDIA driver" in doctor.stdout
    assert job.returncode == 125 and "0 GPUs" in job.stderr


def test_without_nvidia_smi_nvml_is_tried_then_zero_gpus(gpurun):
    env = dict(gpurun.env, PATH="/usr/bin:/bin")
    gpurun.write_config("gpus: auto\n")
    if shutil.which("nvidia-smi", path=env["PATH"]):
        pytest.skip("this host has nvidia-smi")

    doctor = gpurun.run("doctor", "--json", env=env)

    report = json.loads(doctor.stdout)
    assert report["gpus"] == [] or report["discovery"]["source"] == "nvml"
    if report["gpus"] == []:
        assert report["discovery"]["problem"].startswith("NVML: ")
        assert "nvidia-smi: not found on PATH" in report["discovery"]["problem"]


def test_doctor_explains_the_8gpu_tree(gpurun):
    apps = "GPU-8a1c3f6e-0007-4d1e-9b7a-000000000007, 4242, 900, python\n"
    gpurun.use_machine("dgx8", recordings=_recordings(gpurun, "dgx8", apps))

    result = gpurun.run("doctor")

    assert result.returncode == 0, result.stdout
    assert "GPUs: 0,1,2,3,4,5,6,7 (asked nvidia-smi: " in result.stdout
    assert "2 NUMA node(s) (node 0: CPUs 0-15,32-47; node 1: CPUs 16-31,48-63)" in result.stdout
    assert "2 thread(s) per core, GPU links known" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("7 "))
    assert "0000:bd:00.0" in row and " 1 " in row and "external: pid 4242" in row
    assert "busy outside gpurun: GPU 7" in result.stdout


def test_gpurun_inside_a_job_subdivides_its_lease_and_never_waits_behind_it(gpurun):
    gpurun.use_machine("ws4")
    inner = ["--no-wait", "-g", "1", "-c", "2", "--", *gpurun.probe("inner")]

    result = gpurun.run("-g", "4", "-c", "8", "--", gpurun_path(), *inner)

    assert result.returncode == 0, result.stderr
    env = read_json(gpurun.tmp / "inner.start")["env"]
    assert env["GPURUN_GPUS"] in ("0", "1", "2", "3")
    assert env["GPURUN_JOB_ID"] == "1"
    assert len(parse_cpulist(env["GPURUN_CPUS"])) == 2
    assert not list((gpurun.state_dir / "jobs").glob("*.d"))


def test_gpurun_started_by_python_subprocess_inside_a_job_still_subdivides_it(gpurun):
    # subprocess closes the job lock's descriptor; the job's gpurun among the ancestors proves
    # the parent instead, so the inner job does not queue behind its own parent.
    gpurun.use_machine("ws4")
    inner = [gpurun_path(), "--no-wait", "-g", "1", "-c", "1", "--", *gpurun.probe("inner")]
    script = f"import subprocess, sys; sys.exit(subprocess.run({inner!r}).returncode)"

    result = gpurun.run("-g", "4", "-c", "2", "--", sys.executable, "-c", script)

    assert result.returncode == 0, result.stderr
    env = read_json(gpurun.tmp / "inner.start")["env"]
    assert env["GPURUN_GPUS"] in ("0", "1", "2", "3")


def test_inner_gpurun_gets_only_the_parent_lease(gpurun):
    gpurun.use_machine("ws4")
    inner = ["-g", "2", "--", *gpurun.probe("inner")]
    too_many = ["-g", "3", "--", "true"]

    ok = gpurun.run("--gpu-ids", "1,3", "-c", "4", "--", gpurun_path(), *inner)
    refused = gpurun.run("-g", "2", "--", gpurun_path(), *too_many)

    assert ok.returncode == 0, ok.stderr
    env = read_json(gpurun.tmp / "inner.start")["env"]
    assert env["GPURUN_GPUS"] == "1,3" and env["CUDA_VISIBLE_DEVICES"] == "1,3"
    outer_cpus = set(parse_cpulist(env["GPURUN_CPUS"]))
    assert len(outer_cpus) == 4
    assert refused.returncode == 125 and "this server has 2 GPUs" in refused.stderr


def gpurun_path() -> str:
    from conftest import GPURUN

    return GPURUN


def test_status_shows_a_job_using_a_gpu_outside_its_lease_as_a_violation(gpurun):
    recordings = _recordings(gpurun, "ws4")
    gpurun.use_machine("ws4", recordings=recordings)
    release = gpurun.tmp / "release"
    job = gpurun.start("--gpu-ids", "0", "--", *gpurun.probe("a", "--wait-for", str(release)))
    pid = wait_json(gpurun.tmp / "a.start")["pid"]
    (recordings / "compute-apps.csv").write_text(
        f"GPU-3f0b9a52-77c1-11ee-a001-000000000000, {pid}, 900, python\n"
        f"GPU-3f0b9a52-77c1-11ee-a001-000000000001, {pid}, 700, python\n"
    )

    status = gpurun.status()
    detail = gpurun.run("status", "--detail")
    job_id = gpurun.ps()[0]["id"]
    release.touch()

    rows = {row["id"]: row for row in status["gpus"]}
    assert rows[0]["state"] == "held" and rows[0]["violation"] is None
    assert rows[0]["external"] is None
    assert rows[1]["violation"] == {"job": job_id, "user": rows[0]["user"], "pid": pid}
    assert rows[1]["state"] == "external" and 1 not in status["gpus_free"]
    assert f"violation job {job_id} pid {pid}" in detail.stdout
    assert job.wait(timeout=30) == 0


def test_inner_gpurun_takes_its_inventory_from_the_parent_lease_not_the_environment(gpurun):
    gpurun.write_config("gpus: 8\ncpus: auto\nkill_grace: 1\nlock_timeout: 10\n")
    inner = [gpurun_path(), "--no-wait"]

    unmasked = gpurun.run(
        "--gpu-ids", "7", "--", "env", "-u", "CUDA_VISIBLE_DEVICES", *inner, "-g", "2", "true"
    )
    other_mask = gpurun.run(
        "--gpu-ids", "7", "--", "env", "CUDA_VISIBLE_DEVICES=0,1", *inner, "-g", "1", "true"
    )
    no_cpus = gpurun.run("-g", "1", "-c", "0", "--", *inner, "-g", "0", "-c", "1", "true")
    own = gpurun.run(
        "--gpu-ids",
        "7",
        "--",
        "env",
        "-u",
        "CUDA_VISIBLE_DEVICES",
        *inner,
        "-g",
        "1",
        "-c",
        "0",
        "--",
        *gpurun.probe("own"),
    )

    assert unmasked.returncode == 125 and "this server has 1 GPU (7)" in unmasked.stderr
    assert other_mask.returncode == 125 and "0 GPUs" in other_mask.stderr
    assert no_cpus.returncode == 125 and "0 CPUs" in no_cpus.stderr
    assert "Traceback" not in unmasked.stderr + other_mask.stderr + no_cpus.stderr
    assert own.returncode == 0, own.stderr
    assert read_json(gpurun.tmp / "own.start")["env"]["GPURUN_GPUS"] == "7"


def test_job_variables_without_the_job_lock_use_the_shared_ledger(gpurun):
    release = gpurun.tmp / "release"
    holder = gpurun.start("--gpu-ids", "0", "--", *gpurun.probe("h", "--wait-for", str(release)))
    wait_json(gpurun.tmp / "h.start")
    env = dict(gpurun.env, GPURUN_JOB_ID="1", GPURUN_GPUS="0", GPURUN_CPUS="0")
    forged = dict(gpurun.env, GPURUN_JOB_ID="99", GPURUN_GPUS="0", GPURUN_CPUS="0-63")

    same_id = gpurun.run("-g", "4", "--no-wait", "--", "true", env=env)
    unknown = gpurun.run("-g", "4", "--no-wait", "--", "true", env=forged)
    release.touch()

    assert same_id.returncode == 75, same_id.stderr
    assert unknown.returncode == 75, unknown.stderr
    assert same_id.stderr.count("\n") == 1 and unknown.stderr.count("\n") == 1
    assert holder.wait(timeout=30) == 0
    assert not list((gpurun.state_dir / "jobs").glob("*.d"))


@pytest.mark.parametrize("value", ["\u00b2", "\u0661", "1,\u00b2,2"])
def test_mask_reads_only_ascii_digits_and_stops_at_the_first_other_name(gpurun, value):
    gpurun.use_machine("ws4")
    env = dict(gpurun.env, CUDA_VISIBLE_DEVICES=value)

    result = gpurun.run("-g", "1", "--no-wait", "--", *gpurun.probe("m"), env=env)
    status = gpurun.run("status", env=env)

    assert "Traceback" not in result.stderr + status.stderr
    assert status.returncode == 0, status.stderr
    if value.startswith("1,"):
        assert result.returncode == 0, result.stderr
        assert read_json(gpurun.tmp / "m.start")["env"]["GPURUN_GPUS"] == "1"
    else:
        assert result.returncode == 125 and result.stderr.count("\n") == 1


def _alloc(gpurun, *args: str, env: dict | None = None):
    return gpurun.run("alloc", *args, "--json", env=env or gpurun.env)


def test_alloc_is_placed_as_a_launch_is(gpurun):
    apps = "GPU-8a1c3f6e-0007-4d1e-9b7a-000000000007, 4242, 8000, python\n"
    gpurun.use_machine("dgx8", recordings=_recordings(gpurun, "dgx8", apps))
    masked = dict(gpurun.env, CUDA_VISIBLE_DEVICES="5,6")

    everything = _alloc(gpurun, "all", "-g", "8", "-c", "0")
    seven = _alloc(gpurun, "seven", "-g", "7", "-c", "0")
    inside = gpurun.run("-r", "seven", "-g", "1", "-c", "0", "--", *gpurun.probe("r"), env=masked)
    gpurun.run("release", "seven")
    in_mask = _alloc(gpurun, "m", "-g", "1", "-c", "0", env=masked)
    pair = _alloc(gpurun, "pair", "-g", "2", "-c", "4")

    assert everything.returncode == 75 and "GPU 7: pid 4242" in everything.stderr
    assert seven.returncode == 0, seven.stderr
    assert 7 not in json.loads(seven.stdout)["gpus"]
    assert inside.returncode == 0, inside.stderr
    assert read_json(gpurun.tmp / "r.start")["env"]["GPURUN_GPUS"] in ("5", "6")
    assert in_mask.returncode == 0, in_mask.stderr
    assert json.loads(in_mask.stdout)["gpus"][0] in (5, 6)
    assert pair.returncode == 0, pair.stderr
    booked = json.loads(pair.stdout)
    assert len({g // 4 for g in booked["gpus"]}) == 1 and whole_cores(set(booked["cpus"]))


def test_alloc_exports_what_cuda_can_use(gpurun):
    gpurun.use_machine("a100mig")
    mig = _alloc(gpurun, "slice", "-g", "1", "-c", "0")
    gpurun.use_machine("ws4", "visible_devices: uuid\n")
    uuid = _alloc(gpurun, "whole", "-g", "1", "-c", "0")

    assert mig.returncode == 0, mig.stderr
    env = json.loads(mig.stdout)["env"]
    assert env["CUDA_VISIBLE_DEVICES"] == "MIG-0a1f8e3c-6b2d-5c4e-8f7a-111111111111"
    assert env["GPURUN_GPUS"] == "1000"
    assert uuid.returncode == 0, uuid.stderr
    assert json.loads(uuid.stdout)["env"]["CUDA_VISIBLE_DEVICES"].startswith("GPU-3f0b9a52-")


def test_busy_and_capacity_messages_name_the_mask_and_outside_use(gpurun):
    apps = "GPU-3f0b9a52-77c1-11ee-a001-000000000002, 4242, 8000, python\n"
    gpurun.use_machine("ws4", recordings=_recordings(gpurun, "ws4", apps))

    hidden = gpurun.run("-g", "1", "--", "true", env=dict(gpurun.env, CUDA_VISIBLE_DEVICES=""))
    busy = gpurun.run("--gpu-ids", "2", "--no-wait", "--", "true")

    assert hidden.returncode == 125
    assert "$CUDA_VISIBLE_DEVICES hides the other 4 GPUs of 4" in hidden.stderr
    assert busy.returncode == 75
    assert "busy outside gpurun: GPU 2: pid 4242" in busy.stderr


def test_a_later_job_takes_a_gpu_outside_the_mask_of_a_job_waiting_ahead(gpurun):
    gpurun.write_config("gpus: 3\ncpus: auto\nkill_grace: 1\nlock_timeout: 10\n")
    first, second = gpurun.tmp / "first", gpurun.tmp / "second"
    a = gpurun.start("--gpu-ids", "0", "-c", "0", "--", *gpurun.probe("a", "--wait-for", first))
    wait_json(gpurun.tmp / "a.start")
    masked = dict(gpurun.env, CUDA_VISIBLE_DEVICES="0,1")
    m = gpurun.start("-g", "2", "-c", "0", "--", *gpurun.probe("m"), env=masked)
    wait_for(lambda: any(j["state"] == "waiting" for j in gpurun.ps()), what="a waiting job")

    later = gpurun.start("-g", "1", "-c", "0", "--", *gpurun.probe("l", "--wait-for", second))
    placed = wait_json(gpurun.tmp / "l.start")["env"]["GPURUN_GPUS"]
    first.touch()
    started = wait_json(gpurun.tmp / "m.start")["env"]["GPURUN_GPUS"]
    second.touch()

    assert placed == "2"
    assert started == "0,1"
    assert all(proc.wait(timeout=30) == 0 for proc in (a, m, later))


def test_a_later_single_gpu_job_takes_a_slice_while_a_two_gpu_job_waits(gpurun):
    line = "{i}, GPU-5d2e61a4-1c3b-a1b2-9e4f-00000000000{i}, 00000000:0{i}:00.0, NVIDIA A100, "
    query = (FIXTURES / "a100mig" / "query-gpu.csv").read_text() + "".join(
        line.format(i=i) + "40960, 1, Disabled\n" for i in (1, 2)
    )
    gpurun.use_machine("a100mig", recordings=_recordings(gpurun, "a100mig", "", query))
    release = gpurun.tmp / "release"
    a = gpurun.start("--gpu-ids", "1", "-c", "0", "--", *gpurun.probe("a", "--wait-for", release))
    wait_json(gpurun.tmp / "a.start")
    pair = gpurun.start("-g", "2", "-c", "0", "--", *gpurun.probe("pair"))
    wait_for(lambda: any(j["state"] == "waiting" for j in gpurun.ps()), what="a waiting job")

    later = gpurun.run("-g", "1", "-c", "0", "--no-wait", "--", *gpurun.probe("l"))
    release.touch()

    assert later.returncode == 0, later.stderr
    assert int(read_json(gpurun.tmp / "l.start")["env"]["GPURUN_GPUS"]) >= 1000
    assert pair.wait(timeout=30) == 0 and a.wait(timeout=30) == 0
    assert read_json(gpurun.tmp / "pair.start")["env"]["GPURUN_GPUS"] == "1,2"


def test_placement_never_returns_an_id_twice():
    from gpurun.topology import Topology

    # CPU 0 is in two "cores": (0, 2) and (0, 1), as an asymmetric sysfs tree would say.
    overlapping = Topology(
        {0: 0}, {}, dict.fromkeys(range(4), 0), {0: (0, 1), 1: (0, 1), 2: (0, 2), 3: (3,)}, {}
    )

    plain = place(Request(3, 3, None), (0, 0, 1, 2), (5, 5, 6, 7), set(), set())
    exact = place(Request(1, 1, (1,)), (0, 1, 1), (0,), set(), set())
    near = place(Request(1, 4, None), (0,), (0, 1, 2, 3), set(), set(), overlapping)

    assert plain == ((0, 1, 2), (5, 6, 7))
    assert exact == ((1,), (0,))
    assert near is not None and sorted(near[1]) == [0, 1, 2, 3]


def test_duplicates_in_discovery_give_each_gpu_and_cpu_once(gpurun):
    query = (FIXTURES / "ws4" / "query-gpu.csv").read_text()
    twice = query.splitlines(keepends=True)[0] + query
    gpurun.use_machine("ws4", recordings=_recordings(gpurun, "ws4", "", twice))
    tree = gpurun.tmp / "sys"
    shutil.copytree(FIXTURES / "dgx8" / "sys", tree)
    (tree / "devices/system/cpu/cpu16/topology/thread_siblings_list").write_text("0,16\n")

    gpus = gpurun.run("-g", "3", "-c", "0", "--", *gpurun.probe("g"))
    cpus = gpurun.run(
        "-g",
        "0",
        "-c",
        "34",
        "--",
        *gpurun.probe("c"),
        env=dict(gpurun.env, GPURUN_SYSFS_ROOT=str(tree)),
    )

    assert gpus.returncode == 0, gpus.stderr
    assert read_json(gpurun.tmp / "g.start")["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    assert cpus.returncode == 0, cpus.stderr
    held = parse_cpulist(read_json(gpurun.tmp / "c.start")["env"]["GPURUN_CPUS"])
    assert len(held) == len(set(held)) == 34


def _smi_with_apps(gpurun, mode: str) -> None:
    """ws4, but `--query-compute-apps` fails (exit 1) or hangs."""
    wrapper = gpurun.tmp / "smi-wrapper"
    act = "echo 'Unknown Error' ; exit 1" if mode == "fail" else "exec sleep 60"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'case "$2" in --query-compute-apps=*) {act} ;; esac\n'
        f'exec {FIXTURES / "fake-nvidia-smi"} "$@"\n'
    )
    wrapper.chmod(0o755)
    gpurun.use_machine("ws4")
    gpurun.env["GPURUN_NVIDIA_SMI"] = f"{wrapper} {FIXTURES / 'ws4'}"


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_a_failing_process_query_keeps_the_gpus_and_is_reported(gpurun, mode):
    import time

    _smi_with_apps(gpurun, mode)

    began = time.monotonic()
    job = gpurun.run("-g", "1", "--no-wait", "--", "true")
    took = time.monotonic() - began
    doctor = gpurun.run("doctor", "--json")
    gpurun.write_config("gpus: auto\ncpus: auto\nexternal: ignore\n")
    ignored = gpurun.run("-g", "1", "--no-wait", "--", "true")

    assert job.returncode == 75, job.stderr
    assert "busy outside gpurun: GPU 0: unknown" in job.stderr and took < 15
    report = json.loads(doctor.stdout)
    assert report["gpus"] == [0, 1, 2, 3]
    assert any("--query-compute-apps" in problem for problem in report["problems"])
    assert ignored.returncode == 0, ignored.stderr


def test_a_bad_nvidia_smi_variable_is_blamed_on_the_variable(gpurun):
    gpurun.write_config("gpus: auto\n")

    result = gpurun.run("ps", env=dict(gpurun.env, GPURUN_NVIDIA_SMI="'x"))

    assert result.returncode == 125
    assert (
        result.stderr.startswith("gpurun: $GPURUN_NVIDIA_SMI: ") and "'gpus'" not in result.stderr
    )
    assert result.stderr.count("\n") == 1


def test_the_parent_jobs_own_process_is_not_outside_use_for_inner_jobs(gpurun):
    recordings = _recordings(gpurun, "ws4")
    gpurun.use_machine("ws4", recordings=recordings)
    apps = recordings / "compute-apps.csv"
    line = "GPU-3f0b9a52-77c1-11ee-a001-000000000001, $$, 900, python"
    inner = " ".join([gpurun_path(), "-g", "1", "--no-wait", "--", *gpurun.probe("inner")])

    result = gpurun.run("--gpu-ids", "1", "--", "sh", "-c", f'echo "{line}" > {apps}; exec {inner}')

    assert result.returncode == 0, result.stderr
    assert read_json(gpurun.tmp / "inner.start")["env"]["GPURUN_GPUS"] == "1"
