"""The GPU kit (tools/gpu): split into transfers and joined back with every sha256 checked, a missing or
corrupt piece refused in one line, the torch version check, and the whole of run_checks.sh as a dry run."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_TOOLS = os.path.join(ROOT, "tools", "gpu")
spec = importlib.util.spec_from_file_location("gpu_kit", os.path.join(GPU_TOOLS, "kit.py"))
kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kit)
MIB = 2**20
KIT_TORCH = {"torch": "2.11.0+cu130", "torch_cuda": "13.0"}


def make_kit(tmp_path, versions=KIT_TORCH):
    """Three files, one larger than a part: packed with limits of a few KB instead of tens of MiB."""
    src = tmp_path / "src"
    src.mkdir()
    files = {"megatron_core-0-py3-none-any.whl": ("base", 3000), "transformer_engine_cu13-0-py3-none-any.whl": ("te", 10000),
             "pydantic-0-py3-none-any.whl": ("te", 700)}
    for i, (name, (_, size)) in enumerate(files.items()):
        (src / name).write_bytes(os.urandom(size))
    manifest = kit.pack(str(tmp_path / "kit"), [(role, str(src / name)) for name, (role, _) in files.items()],
                        part_mib=4000 / MIB, transfer_mib=6000 / MIB, versions=dict(versions))
    return src, tmp_path / "kit", manifest


def staged(tmp_path, kit_dir, manifest, skip=()):
    stage = tmp_path / "stage"
    for t in manifest["transfers"]:
        if t["name"] not in skip:
            line = kit.stage(str(kit_dir / t["name"]), str(stage))
            assert line.startswith(f"stage: {t['name']} of {len(manifest['transfers'])}:") and "\n" not in line
    return stage


def test_split_into_transfers_and_joined_back(tmp_path):
    src, kit_dir, manifest = make_kit(tmp_path)
    big = next(f for f in manifest["files"] if f["name"].startswith("transformer_engine_cu13"))
    assert [p["size"] for p in big["pieces"]] == [4000, 4000, 2000]
    last = manifest["transfers"][-1]["name"]
    base = next(f for f in manifest["files"] if f["role"] == "base")
    assert base["pieces"][0]["transfer"] == last  # carried with the command that runs the checks
    for t in manifest["transfers"]:
        on_disk = sum(os.path.getsize(kit_dir / t["name"] / p) for p in t["pieces"])
        assert on_disk == t["size"] <= 6000
        assert json.loads((kit_dir / t["name"] / "manifest.json").read_text())["kit_id"] == manifest["kit_id"]
    # Re-packing the same files reuses the kit as it is.
    stamp = os.path.getmtime(kit_dir / "manifest.json")
    again = kit.pack(str(kit_dir), [(f["role"], str(src / f["name"])) for f in manifest["files"]],
                     4000 / MIB, 6000 / MIB, dict(KIT_TORCH))
    assert again["kit_id"] == manifest["kit_id"] and os.path.getmtime(kit_dir / "manifest.json") == stamp

    stage = staged(tmp_path, kit_dir, manifest)
    _, ready, problems = kit.join(str(stage), str(tmp_path / "wheels"))
    assert problems == [] and sorted(ready) == sorted(f["name"] for f in manifest["files"])
    for name, path in ready.items():
        joined = Path(path).read_bytes()
        assert joined == (src / name).read_bytes()
        assert hashlib.sha256(joined).hexdigest() == next(
            f["sha256"] for f in manifest["files"] if f["name"] == name)


def test_missing_or_corrupt_piece_is_refused_in_one_line(tmp_path):
    _, kit_dir, manifest = make_kit(tmp_path)
    big = next(f for f in manifest["files"] if f["name"].startswith("transformer_engine_cu13"))
    lost = big["pieces"][0]["transfer"]
    stage = staged(tmp_path, kit_dir, manifest, skip=(lost,))
    _, ready, problems = kit.join(str(stage), str(tmp_path / "wheels"))
    assert big["name"] not in ready and any(f["role"] == "base" and f["name"] in ready for f in manifest["files"])
    assert any(f"carry {lost}" in p and big["name"] in p for p in problems)

    kit.stage(str(kit_dir / lost), str(stage))
    piece = stage / big["pieces"][1]["name"]
    data = bytearray(piece.read_bytes())
    data[7] ^= 0xFF
    piece.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, os.path.join(GPU_TOOLS, "kit.py"), "join", "--stage", str(stage),
                           "--into", str(tmp_path / "wheels2")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("kit: error: ") and "Traceback" not in proc.stderr
    assert "corrupt (sha256 mismatch)" in proc.stderr and big["pieces"][1]["name"] in proc.stderr
    assert not (tmp_path / "wheels2" / big["name"]).exists()  # nothing half-joined under the real name

    carried = kit_dir / lost / big["pieces"][0]["name"]
    carried.write_bytes(carried.read_bytes()[:-1] + b"x")
    proc = subprocess.run(["bash", os.path.join(GPU_TOOLS, "stage.sh"), str(kit_dir / lost)], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, LNS_GPU_KIT_STAGE=str(tmp_path / "stage3")))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "sha256 does not match" in proc.stderr


def test_torch_version_check():
    assert kit.torch_mismatch(KIT_TORCH, "2.11.0+cu130", "13.0") is None
    assert kit.torch_mismatch(KIT_TORCH, "2.11.0", "13.2") is None  # same release, same CUDA major
    for torch_version, cuda in (("2.12.0+cu130", "13.0"), ("2.11.0+cu128", "12.8"), ("2.13.0+cpu", None)):
        line = kit.torch_mismatch(KIT_TORCH, torch_version, cuda)
        assert "\n" not in line and torch_version in line and "2.11.0+cu130" in line
        assert "no-TE checks only" in line and "TORCH_VERSION=" in line
    assert "no torch version" in kit.torch_mismatch({}, "2.11.0", "13.0")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """run_checks.sh --dry-run with a (tiny) kit built for the GPU machine's torch carried along."""
    tmp = tmp_path_factory.mktemp("gpu_dry_run")
    make_kit(tmp)
    out = tmp / "out"
    proc = subprocess.run(["bash", os.path.join(GPU_TOOLS, "run_checks.sh"), "--dry-run", str(out),
                           "--carried", str(tmp / "kit")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])))
    summary = json.loads((out / "summary.json").read_text())
    return proc, out, summary


def test_dry_run_walks_every_step(dry_run):
    proc, out, s = dry_run
    steps = {x["name"]: x for x in s["steps"]}
    assert list(steps) == ["kit", "install", "env", "data", "te_tests", "fp8_lns", "bench_te_bf16", "bench_te_fp8",
                           "driver_local", "bench_local", "cp", "recompute", "depth24"]
    assert s["mode"] == "dry-run" and steps["kit"]["status"] == "partial" and steps["env"]["status"] == "ok"
    # The kit was made for torch 2.11.0+cu130: one line says so, and only the no-TE part runs.
    assert len([l for l in proc.stdout.splitlines() if "built for torch 2.11.0+cu130" in l]) == 1
    assert "torch mismatch" in s["te_skipped_because"]
    for name in ("te_tests", "bench_te_bf16", "bench_te_fp8"):
        assert steps[name]["status"] == "skipped" and "CUDA" in steps[name]["reason"]
    for name in ("data", "fp8_lns", "bench_local", "cp", "recompute", "depth24"):
        assert steps[name]["status"] == "ok", (name, steps[name]["reason"])
        assert (out / f"{name}.json").is_file() and (out / f"{name}.md").is_file() and (out / "logs" / f"{name}.log").is_file()
    summary_md = (out / "summary.md").read_text()
    assert all(name in summary_md for name in steps)

    assert steps["data"]["result"]["tokens"] > 10000
    exact = steps["fp8_lns"]["result"]["exactness"][0]
    assert exact["recipe"] == "fp32" and exact["lns_scales_match_layer_numbers"] and exact["logits_bitwise"]
    assert all(r["status"].startswith("unsupported") for r in steps["fp8_lns"]["result"]["loss_runs"][1:])
    bench = steps["bench_local"]["result"]
    assert bench["step_time_ratio"] > 0 and set(bench["schemes"]) == {"pre", "lns"}
    ran = [r for r in steps["depth24"]["result"]["runs"] if r["status"] == "ok"]
    assert [(r["norm_scheme"], r["output_init"]) for r in ran] == [("pre", "scaled"), ("lns", "plain")]
    assert all(r["validation_loss"] > 0 for r in ran)
    assert steps["cp"]["result"]["checked"] == "refusal" and "Transformer Engine" in \
        steps["cp"]["result"]["runs"]["CP=2, refused"]["error"]
    recompute = steps["recompute"]["result"]["settings"]
    assert recompute["full, uniform 1"]["saved_ratio"] < recompute["selective (core_attn)"]["saved_ratio"] < 1


def test_dry_run_driver_resumes(dry_run):
    _, _, s = dry_run
    checks = next(x for x in s["steps"] if x["name"] == "driver_local")["result"]["checks"]
    adam = checks["Adam"]
    assert adam["status"] == "ok" and adam["resume_bitwise"] and adam["compared"] == 3
    dist_opt = checks["distributed optimizer"]
    assert dist_opt["status"] == "ok" and dist_opt["resume_bitwise"], dist_opt
