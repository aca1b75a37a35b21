#!/usr/bin/env python3
"""The GPU checks in one command (``bash tools/gpu/run_checks.sh OUT``), each step under its own time limit.

    bash tools/gpu/run_checks.sh OUT              # on the GPU machine, after tools/gpu/stage.sh of every transfer
    bash tools/gpu/run_checks.sh --dry-run OUT    # every step at tiny sizes on a CPU (CI)

1. kit: join and verify (sha256) the staged transfers; check torch against the kit's; install the kit
   offline (``pip --no-index --no-deps --target`` a temporary folder, the machine's own packages untouched).
2. env: what the machine and the installed packages are (GPU, torch, CUDA, megatron-core, TE, FP8 recipes).
3. the steps below, each a child process with its own time limit and its own OUT/<step>.json and .md.
Without Transformer Engine (kit incomplete, torch mismatch, TE failing to import) the TE steps are skipped
with the reason and the no-TE steps still run, so a GPU window never comes back empty. OUT/summary.json
and OUT/summary.md gather everything; OUT/logs/<step>.log has each step's output.
Standard library only until the kit is installed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import kit  # noqa: E402
from results import md_table, write_json, write_text  # noqa: E402

PY = sys.executable
LOG_KEEP_BYTES = 2 * 2**20

PROBE = r"""
import json, os, platform, subprocess, sys
out = dict(python=platform.python_version())
import torch
out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
               device_count=torch.cuda.device_count(), memory_gib=round(p.total_memory / 2**30, 1))
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        pass
else:
    out.update(device=f"CPU ({os.cpu_count()} cores)")
if os.environ.get("LNS_GPU_PROBE_TORCH_ONLY"):
    print(json.dumps(out)); sys.exit(0)
try:
    import megatron.core
    out.update(megatron_core=megatron.core.__version__, megatron_core_path=os.path.dirname(megatron.core.__file__))
except Exception as e:
    out["megatron_core_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
try:
    import transformer_engine, transformer_engine.pytorch
    out["transformer_engine"] = getattr(transformer_engine, "__version__", "?")
except Exception as e:
    out["te_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
try:
    import lns_megatron
    from lns_megatron.schemes.lns import HAVE_TE
    out.update(lns_megatron_path=os.path.dirname(lns_megatron.__file__), have_te=HAVE_TE)
except Exception as e:
    out["lns_megatron_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
if out.get("have_te") and torch.cuda.is_available():
    sys.path.insert(0, "tools/gpu")
    from fp8_check import recipe_support
    out["fp8_recipes"] = {r: dict(supported=s, reason=why) for r, (s, why) in recipe_support().items()}
print(json.dumps(out))
"""


class Run:
    """The state of one run_checks invocation: where results go, what the machine has, the time left."""

    def __init__(self, a):
        self.a, self.out, self.dry = a, os.path.abspath(a.out), a.dry_run
        self.start = time.time()
        self.deadline = self.start + (a.budget_s if a.budget_s else (300 if a.dry_run else 450))
        self.tmp = tempfile.mkdtemp(prefix="lns-gpu-run-")  # the installed kit and the data; removed at the end
        if a.stage is None:
            a.stage = os.path.join(self.tmp, "stage") if a.dry_run else kit.default_stage_dir()
        self.site = None
        self.kit = dict(status="not checked")
        self.env = {}
        self.te_reason = None  # why the TE steps are skipped (None: they run)
        self.data = None
        self.steps = []
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)

    def environ(self):
        paths = ([self.site] if self.site else []) + [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1",
                    **({"OMP_NUM_THREADS": "1"} if self.dry else {}))

    def say(self, line):
        print(f"run_checks: {line}", flush=True)

    def left(self):
        return self.deadline - time.time()

    def record(self, name, status, wall=0.0, limit=None, reason=None, result=None, title=None):
        step = dict(name=name, title=title, status=status, wall_s=round(wall, 1), limit_s=limit and round(limit),
                    reason=reason, result=result)
        self.steps.append(step)
        self.say(f"{name}: {status}" + (f" ({reason})" if reason else "") + (f" in {wall:.0f} s" if wall else ""))
        self.write_summary()
        return step

    def child(self, name, cmd, limit):
        """Run cmd with OUT/logs/<name>.log, killing its whole process group at the time limit."""
        log_path = os.path.join(self.out, "logs", f"{name}.log")
        started = time.time()
        with open(log_path, "wb") as log:
            log.write(("+ " + " ".join(map(str, cmd)) + "\n").encode())
            log.flush()
            proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=self.environ(), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, limit))
            except subprocess.TimeoutExpired:
                for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
                    try:
                        os.killpg(proc.pid, sig)
                        proc.wait(timeout=grace)
                        break
                    except (ProcessLookupError, subprocess.TimeoutExpired):
                        continue
                rc = None
        _trim(log_path)
        return rc, time.time() - started, log_path

    def write_summary(self):
        summary = dict(dry_run=self.dry, mode=self.mode(), started=time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.start)),
                       wall_s=round(time.time() - self.start, 1), machine=self.env, kit=self.kit,
                       te_skipped_because=self.te_reason, steps=self.steps)
        write_json(os.path.join(self.out, "summary.json"), summary)
        write_text(os.path.join(self.out, "summary.md"), summary_markdown(summary, self.out))

    def mode(self):
        return "dry-run" if self.dry else ("te" if self.te_reason is None else "no-te")


def _trim(path):
    if os.path.getsize(path) > LOG_KEEP_BYTES:
        with open(path, "rb") as f:
            f.seek(-LOG_KEEP_BYTES, os.SEEK_END)
            tail = f.read()
        with open(path, "wb") as f:
            f.write(b"[... earlier output cut ...]\n" + tail)


def last_line(path):
    try:
        with open(path, errors="replace") as f:
            lines = [l.strip() for l in f if l.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if "error" in line.lower():
            return line[:400]
    return lines[-1][:400] if lines else ""


# ---------------------------------------------------------------- kit, version check, install, env


def kit_phase(run: Run) -> None:
    a = run.a
    carried = sorted(glob.glob(os.path.join(a.carried, "transfer-*")))
    problems = []
    for transfer in carried:  # transfers carried by this very command: stage them too
        try:
            run.say(kit.stage(transfer, a.stage))
        except kit.KitError as e:
            problems.append(str(e))
    if not os.path.isfile(os.path.join(a.stage, kit.MANIFEST)):
        run.kit = dict(status="none", stage=a.stage, problems=problems)
        reason = f"no kit staged in {a.stage}" + ("" if run.dry else "; using this machine's installed packages")
        run.record("kit", "skipped", reason=reason)
        return
    try:
        manifest, ready, join_problems = kit.join(a.stage, os.path.join(a.stage, "wheels"))
    except kit.KitError as e:
        run.kit = dict(status="failed", stage=a.stage, problems=problems + [str(e)])
        run.record("kit", "failed", reason=str(e))
        return
    problems += join_problems
    have, missing = kit.staged_transfers(a.stage, manifest)
    role_ready = {role: all(f["name"] in ready for f in manifest["files"] if f["role"] == role) for role in kit.ROLES}
    run.kit = dict(status="ok" if not problems else "partial", stage=a.stage, kit_id=manifest["kit_id"],
                   versions=manifest["versions"], transfers_staged=have, transfers_missing=missing,
                   base_ready=role_ready["base"], te_ready=role_ready["te"], problems=problems,
                   files=[dict(name=f["name"], role=f["role"], size=f["size"], ready=f["name"] in ready)
                          for f in manifest["files"]])
    for line in problems:
        run.say(line)
    if not role_ready["te"]:
        run.te_reason = f"the kit's Transformer Engine files are incomplete ({problems[0] if problems else 'missing'})"

    probe = subprocess.run([PY, "-c", PROBE], cwd=REPO, env=dict(run.environ(), LNS_GPU_PROBE_TORCH_ONLY="1"),
                           capture_output=True, text=True, timeout=120)
    torch_info = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else {}
    mismatch = kit.torch_mismatch(manifest["versions"], torch_info.get("torch", "none"), torch_info.get("torch_cuda"))
    run.kit["torch_check"] = mismatch or f"ok: torch {torch_info.get('torch')} matches the kit's {manifest['versions'].get('torch')}"
    if mismatch:
        run.say(mismatch)
        if role_ready["te"]:
            run.te_reason = mismatch
    if run.a.no_te and run.te_reason is None:
        run.te_reason = "--no-te given"
    run.record("kit", "ok" if not problems and not mismatch else "partial",
               reason=f"{len(ready)} of {len(manifest['files'])} files verified; "
                      + ("torch mismatch (the line above)" if mismatch else run.kit["torch_check"]))

    if run.dry:
        run.record("install", "skipped", reason="dry run: the kit's wheels are for the GPU machine's Python; "
                                                 "this machine's own packages are used")
        return
    if not role_ready["base"]:
        run.record("install", "failed", reason=f"the kit's base files are incomplete: {problems[0]}")
        return
    wanted = [f for f in manifest["files"] if f["role"] == "base" or (f["role"] == "te" and run.te_reason is None)]
    site = os.path.join(run.tmp, "site")
    os.makedirs(site)
    attempts = [wanted] + ([[f for f in wanted if f["role"] == "base"]] if run.te_reason is None else [])
    for number, attempt in enumerate(attempts):
        cmd = [PY, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--quiet",
               "--disable-pip-version-check", "--target", site] + [ready[f["name"]] for f in attempt]
        limit = min(240, run.left())
        rc, wall, log = run.child("install", cmd, limit)
        if rc == 0:
            run.site = site
            with_te = any(f["role"] == "te" for f in attempt)
            run.record("install", "ok", wall, limit, reason=f"{'megatron-core and Transformer Engine' if with_te else 'megatron-core (no TE)'}"
                                                            f" into {site}")
            return
        shutil.rmtree(site, ignore_errors=True)
        os.makedirs(site)
        if number == 0 and len(attempts) == 2:
            run.te_reason = f"pip could not install the TE wheels: {last_line(log)}"
            run.say(run.te_reason + "; retrying without TE")
    run.record("install", "failed", wall, limit, reason=last_line(log))


def env_phase(run: Run) -> None:
    limit = min(120, run.left())
    started = time.time()
    try:
        probe = subprocess.run([PY, "-c", PROBE], cwd=REPO, env=run.environ(), capture_output=True, text=True, timeout=limit)
        run.env = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 and probe.stdout.strip() else {}
        error = None if run.env else (probe.stderr.strip().splitlines() or ["no output"])[-1]
    except subprocess.TimeoutExpired:
        run.env, error = {}, f"the probe did not finish in {limit:.0f} s"
    write_json(os.path.join(run.out, "env.json"), run.env)
    if error or "megatron_core_error" in run.env or "lns_megatron_error" in run.env:
        reason = error or run.env.get("megatron_core_error") or run.env.get("lns_megatron_error")
        run.record("env", "failed", time.time() - started, limit, reason=reason)
        return
    if run.te_reason is None:
        if not run.env.get("cuda_available"):
            run.te_reason = "needs a CUDA GPU"
        elif not run.env.get("have_te"):
            run.te_reason = f"Transformer Engine does not import: {run.env.get('te_error', 'not installed')}"
    run.record("env", "ok", time.time() - started, limit,
               reason=f"{run.env.get('device')}, torch {run.env.get('torch')}, megatron-core {run.env.get('megatron_core')}, "
                      f"TE {run.env.get('transformer_engine', 'none')}")


# ---------------------------------------------------------------- the steps


def bench_cmd(run, name, *flags):
    return [PY, "benchmarks/bench_norm_scheme.py", *flags, "--json", os.path.join(run.out, f"{name}.json")]


LLAMA_1B_BENCH = ["--preset", "llama-1b", "--ffn-hidden-size", "5504",  # 5461 -> 5504: FP8 GEMMs need multiples of 16
                  "--bf16", "--micro-batch-size", "4", "--global-batch-size", "16", "--seq-length", "1024",
                  "--max-position-embeddings", "1024"]
TINY_BENCH = ["--preset", "tiny", "--micro-batch-size", "4", "--seq-length", "32", "--rounds", "2",
              "--steps-per-round", "2", "--warmup-steps", "1"]


def step_plan(run: Run):
    """(name, title, limit in seconds, command or None, skip reason) in the order they run."""
    te = run.te_reason is None and not run.dry
    no_te_why = "dry run: needs a CUDA GPU and Transformer Engine" if run.dry else run.te_reason
    json_md = lambda name: ["--json", os.path.join(run.out, f"{name}.json"), "--md", os.path.join(run.out, f"{name}.md")]
    dry = ["--dry-run"] if run.dry else []
    data = (["--data-path", run.data["data_path"], "--tokenizer-model", run.data["tokenizer_model"]]
            if run.data else [])
    plan = [
        ("data", "real-text data (the standard library's source) for the loss comparisons", 90 if run.dry else 120,
         [PY, "tools/gpu/make_data.py", *json_md("data"), *dry, "--data-dir", os.path.join(run.tmp, "data"),
          *(["--max-mib", "0.3", "--vocab-size", "512", "--workers", "1"] if run.dry else [])], None),
        ("te_tests", "tests/schemes/test_transformer_engine.py", 150,
         [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/schemes/test_transformer_engine.py",
          "--junitxml", os.path.join(run.out, "te_tests.xml")] if te else None, no_te_why),
        ("fp8_lns", "LNS under TE's fused norm: exactness and loss per FP8 recipe", 90 if run.dry else 150,
         [PY, "tools/gpu/fp8_check.py", *json_md("fp8_lns"), *dry, *data] if te or run.dry else None, no_te_why),
        ("bench_te_bf16", "llama-1b, TE spec, BF16: LNS vs Pre-LN step time, TFLOP/s, MFU", 150,
         bench_cmd(run, "bench_te_bf16", *LLAMA_1B_BENCH, "--transformer-impl", "transformer_engine", "--rounds", "4",
                   "--steps-per-round", "4") if te else None, no_te_why),
        ("bench_te_fp8", "llama-1b, TE spec, FP8 (hybrid, delayed): LNS vs Pre-LN", 150,
         bench_cmd(run, "bench_te_fp8", *LLAMA_1B_BENCH, "--transformer-impl", "transformer_engine", "--fp8-format",
                   "hybrid", "--fp8-recipe", "delayed", "--rounds", "4", "--steps-per-round", "4")
         if te and run.env.get("fp8_recipes", {}).get("delayed", {}).get("supported") else None,
         no_te_why if not te else "FP8 unsupported on this GPU: "
         + str(run.env.get("fp8_recipes", {}).get("delayed", {}).get("reason"))),
        ("driver_local", "the driver: CUDA path, local spec, distributed optimizer, save/resume", 90 if run.dry else 150,
         [PY, "tools/gpu/driver_check.py", *json_md("driver_local"), *dry], None),
        ("bench_local", "LNS vs Pre-LN with the local spec (no TE)", 90 if run.dry else 180,
         bench_cmd(run, "bench_local", *(TINY_BENCH if run.dry else LLAMA_1B_BENCH + ["--rounds", "3", "--steps-per-round", "3"]))
         if not te else None, "TE mode: the local spec is measured when TE is missing (docs/results.md has its H100 figures)"),
        ("cp", "context parallelism: CP=2 against CP=1 on two GPUs, or the one-line refusal", 90 if run.dry else 150,
         [PY, "tools/gpu/cp_check.py", *json_md("cp"), *dry], None),
        ("recompute", "activation recompute: memory and step time against none, equal losses", 90 if run.dry else 150,
         [PY, "benchmarks/bench_recompute.py", *json_md("recompute"),
          *(["--preset", "tiny", "--micro-batch-size", "2", "--seq-length", "64", "--max-position-embeddings", "64",
             "--rounds", "1", "--steps-per-round", "1"] if run.dry else
            ["--preset", "llama-1b", "--bf16", "--micro-batch-size", "2", "--seq-length", "2048",
             "--max-position-embeddings", "2048", "--vocab-size", "32000"]),
          *(["--transformer-impl", "transformer_engine", "--recompute-modules", "core_attn", "layernorm", "mlp"]
            if te else [])], None),
        ("depth24", "24 layers: Pre-LN / LNS x plain / depth-scaled output init", 90 if run.dry else 300,
         [PY, "tools/gpu/depth_compare.py", *json_md("depth24"), *dry, *data,
          "--impl", "transformer_engine" if te else "local"], None),
    ]
    return plan


def run_steps(run: Run) -> None:
    env_ok = run.steps and run.steps[-1]["name"] == "env" and run.steps[-1]["status"] == "ok"
    for index in range(len(step_plan(run))):
        # Planned afresh before each step: the later ones use what the earlier ones made (the data).
        name, title, limit, cmd, skip = step_plan(run)[index]
        if run.a.only and name not in run.a.only:
            continue
        if not env_ok:
            run.record(name, "skipped", reason="megatron-core or lns_megatron does not import (see the env step)", title=title)
            continue
        if cmd is None:
            run.record(name, "skipped", reason=skip, title=title)
            continue
        limit = min(limit, run.left() - 5)
        if limit < 20:
            run.record(name, "skipped", reason="out of time", title=title)
            continue
        if str(cmd[1]).startswith("tools/gpu/"):  # step scripts plan within their limit
            cmd += ["--budget-s", str(int(limit - 10))]
        rc, wall, log = run.child(name, cmd, limit)
        result = read_step_result(run, name)
        if name == "data" and rc == 0 and result:
            run.data = result
        status = "ok" if rc == 0 else ("timeout" if rc is None else "failed")
        reason = None if rc == 0 else (f"stopped at its {limit:.0f} s limit; what it measured so far is kept"
                                       if rc is None else last_line(log))
        if name == "te_tests" and result:
            reason = f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped" + (
                f" ({'; '.join(sorted(set(result['skip_reasons'])))})" if result["skip_reasons"] else "")
        run.record(name, status, wall, limit, reason=reason, result=result, title=title)


def read_step_result(run, name):
    path = os.path.join(run.out, f"{name}.json")
    if name == "te_tests":
        return junit_result(run, os.path.join(run.out, "te_tests.xml"))
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        result = json.load(f)
    if name.startswith("bench_"):
        write_text(os.path.join(run.out, f"{name}.md"), bench_markdown(name, result))
    return result


def junit_result(run, path):
    if not os.path.isfile(path):
        return None
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or "").splitlines()[0][:300] if child.get("message") else ""
        cases.append(dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                          seconds=float(case.get("time", 0)), message=message))
    result = dict(cases=cases, **{k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")},
                  skip_reasons=[c["message"] for c in cases if c["outcome"] == "skipped"])
    write_json(os.path.join(run.out, "te_tests.json"), result)
    write_text(os.path.join(run.out, "te_tests.md"), "### Transformer Engine tests\n\n" + md_table(
        ["test", "outcome", "seconds", "message"], [[c["test"], c["outcome"], c["seconds"], c["message"]] for c in cases]))
    return result


def bench_markdown(name, f):
    head = (f"### {name}: {f['device']} x {f['world_size']} | {f['num_layers']}x{f['hidden_size']} (FFN {f['ffn_hidden_size']})"
            f" | {f['transformer_impl']} | bf16 {f['bf16']} | fp8 {f['fp8_format'] or '-'} {f['fp8_recipe'] or ''}"
            f" | mbs {f['micro_batch_size']} gbs {f['global_batch_size']} seq {f['seq_length']}\n\n")
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "n/a"
    rows = [[s, v["step_ms"], v["tflops_per_gpu"], pct(v["mfu_bf16"]), pct(v["mfu_fp8"]),
             v["peak_memory_gib"]] for s, v in f["schemes"].items()]
    ratios = " ".join(f"{r:.3f}" for r in f["step_time_ratio_per_round"])
    return (head + md_table(["scheme", "step ms (median)", "TFLOP/s/GPU", "MFU (BF16 peak)", "MFU (FP8 peak)",
                             "peak memory GiB"], rows)
            + f"\n\nStep-time ratio LNS/Pre-LN: **{f['step_time_ratio']:.4f}** (per round: {ratios}); "
            f"peak-memory ratio: {f['peak_memory_ratio']}; depth diagnostics {f['depth_diagnostics_ms']:.1f} ms per call.")


def summary_markdown(s, out):
    m = s["machine"]
    lines = [f"# GPU checks ({s['mode']})", "",
             f"{s['started']}, {s['wall_s']} s. Machine: {m.get('device', '?')}"
             + (f" (capability {m.get('capability')}, {m.get('memory_gib')} GiB, driver {m.get('driver', '?')})" if m.get("capability") else "")
             + f"; Python {m.get('python', '?')}, torch {m.get('torch', '?')} (CUDA {m.get('torch_cuda')}),"
             f" megatron-core {m.get('megatron_core', '?')}, Transformer Engine {m.get('transformer_engine', 'none')}.", ""]
    k = s["kit"]
    if k.get("kit_id"):
        lines += [f"Kit {k['kit_id']}: transfers staged {', '.join(k['transfers_staged']) or 'none'}"
                  + (f", missing {', '.join(k['transfers_missing'])}" if k["transfers_missing"] else "")
                  + f"; {k.get('torch_check', '')}.", ""]
    if s["te_skipped_because"]:
        lines += [f"Transformer Engine steps skipped: {s['te_skipped_because']}.", ""]
    lines.append(md_table(["step", "what", "status", "seconds", "limit", "note"],
                          [[x["name"], x["title"] or "", x["status"], x["wall_s"], x["limit_s"], x["reason"] or ""]
                           for x in s["steps"]]))
    for x in s["steps"]:
        path = os.path.join(out, f"{x['name']}.md")
        if os.path.isfile(path):
            with open(path) as f:
                lines += ["", f.read().rstrip()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="run_checks.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="results folder (the GPU tool's $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on a CPU; CUDA/TE steps skip")
    ap.add_argument("--stage", help="where tools/gpu/stage.sh put the transfers (default $LNS_GPU_KIT_STAGE or "
                                    "$TMPDIR/lns-gpu-kit; for a dry run a temporary folder)")
    ap.add_argument("--carried", default=os.path.join(REPO, ".gpu-kit"),
                    help="where transfers carried by this command are (staged first)")
    ap.add_argument("--budget-s", type=float, help="seconds for the whole run (default 450; dry run 300)")
    ap.add_argument("--no-te", action="store_true", help="run the no-TE checks only")
    ap.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (after kit and env)")
    return ap


def main(argv=None) -> int:
    run = Run(build_parser().parse_args(argv))
    run.say(f"{'dry run' if run.dry else 'GPU run'}, results in {run.out}, {run.left():.0f} s budget")
    kit_phase(run)
    env_phase(run)
    run_steps(run)
    run.write_summary()
    shutil.rmtree(run.tmp, ignore_errors=True)
    bad = [s["name"] for s in run.steps if s["status"] in ("failed", "timeout")]
    run.say(f"done in {time.time() - run.start:.0f} s, mode {run.mode()}: "
            + (f"{len(bad)} step(s) failed or timed out: {', '.join(bad)}" if bad else "no step failed")
            + f"; see {os.path.join(run.out, 'summary.md')}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
