"""Step ``cp``: context parallelism through Transformer Engine's attention. With two GPUs or more: CP=2 on two
ranks trains the same losses and gradient norms as CP=1 on one (bf16, rel 2e-2). With one GPU: NCCL cannot put
two ranks on it, so the driver must refuse CP=2 in one line naming the GPU count. With --dry-run (CPU): the driver
must refuse CP in one line naming Transformer Engine.
"""

from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from results import error_line, iterations, md_table, step_args, write_json, write_text  # noqa: E402


def torchrun(nproc, argv):
    from lns_megatron.training.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "lns_megatron.pretrain", *map(str, argv)]
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])))
    out = proc.stdout + proc.stderr
    print(out[-4000:], flush=True)
    return proc.returncode, out


def main():
    a = step_args(__doc__.split("\n\n")[0]).parse_args()
    import torch

    from lns_megatron.schemes.lns import HAVE_TE

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n = 4 if a.dry_run else 10
    common = ["--preset", "tiny", "--hidden-size", "256", "--num-attention-heads", "8", "--ffn-hidden-size", "688",
              "--seq-length", "512", "--max-position-embeddings", "512", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--mock-data", "--vocab-size", "4096", "--train-iters", str(n),
              "--log-interval", "1", "--eval-iters", "0", "--depth-log-interval", "0", "--num-workers", "0",
              "--lr", "1e-3", "--norm-scheme", "lns"]
    if not a.dry_run:
        common += ["--bf16", "--transformer-impl", "transformer_engine"]
    result = dict(status="running", gpus=gpus, have_te=HAVE_TE, runs={})
    if a.dry_run or not HAVE_TE or gpus < 2:
        rc, out = torchrun(2, common + ["--context-parallel-size", "2"])
        line = next((l for l in out.splitlines() if l.startswith("lns-pretrain: error:")), None)
        expected = "Transformer Engine" if a.dry_run or not HAVE_TE else f"this node has {gpus} GPU(s)"
        result["runs"]["CP=2, refused"] = dict(rc=rc, error=line)
        ok = rc != 0 and line is not None and expected in line  # torchrun exits 1 for a failed worker
        result.update(status="ok" if ok else "failed", checked="refusal",
                      reason=f"{gpus} GPU(s), TE {'present' if HAVE_TE else 'missing'}: CP=2 must be refused naming "
                             f"{expected!r}")
    else:
        for name, nproc, flags in (("CP=1", 1, []), ("CP=2", 2, ["--context-parallel-size", "2"])):
            rc, out = torchrun(nproc, common + flags)
            its = iterations(out)
            result["runs"][name] = dict(rc=rc, error=error_line(out) if rc else None,
                                        losses={i: f.get("lm loss") for i, f in its.items()},
                                        grad_norms={i: f.get("grad norm") for i, f in its.items()})
        one, two = result["runs"]["CP=1"], result["runs"]["CP=2"]
        pairs = [(one["losses"][i], two["losses"][i], one["grad_norms"][i], two["grad_norms"][i])
                 for i in one["losses"] if i in two["losses"]]
        loss_diff = max((abs(x - y) / abs(x) for x, y, _, _ in pairs), default=None)
        grad_diff = max((abs(float(g) - float(h)) / abs(float(g)) for _, _, g, h in pairs), default=None)
        ok = one["rc"] == two["rc"] == 0 and len(pairs) == n and loss_diff <= 2e-2 and grad_diff <= 5e-2
        result.update(status="ok" if ok else "failed", checked="CP=2 against CP=1", max_rel_loss_diff=loss_diff,
                      max_rel_grad_norm_diff=grad_diff)
    write_json(a.json, result)
    rows = [[name, r["rc"], r.get("error") or "", len(r.get("losses", {}))] for name, r in result["runs"].items()]
    write_text(a.md, f"### Context parallelism ({result['checked']})\n\n{gpus} GPU(s), TE: {HAVE_TE}. Status: "
               f"{result['status']}. " + (result.get("reason") or f"max relative loss difference "
               f"{result.get('max_rel_loss_diff')}, grad norm {result.get('max_rel_grad_norm_diff')}") + "\n\n"
               + md_table(["run", "exit", "error", "iterations"], rows))
    sys.exit(0 if result["status"] == "ok" else 1)


if __name__ == "__main__":
    main()
