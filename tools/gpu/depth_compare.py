"""Step ``depth24``: a short 24-layer comparison, Pre-LN and LNS, each with the plain and with
megatron-core's depth-scaled (std/sqrt(2L)) output-layer init: the 2x2 that tells whether LNS beats the
Pre-LN that users already run. Same data, seed and flags; only the norm scheme and the init differ.

Runs in the order that answers most first (Pre-LN as megatron-core ships it, LNS as the paper advises,
then the other two) and stops starting runs when the time left would not fit one.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from results import (error_line, iterations, md_table, mean_tail, run_driver, step_args,  # noqa: E402
                     validation_losses, write_json, write_text)

ORDER = [("pre", "scaled"), ("lns", "plain"), ("lns", "scaled"), ("pre", "plain")]


def main():
    ap = step_args(__doc__.split("\n\n")[0])
    ap.add_argument("--data-path")
    ap.add_argument("--tokenizer-model")
    ap.add_argument("--impl", default="local", choices=["local", "transformer_engine"])
    ap.add_argument("--train-iters", type=int, default=300)
    a = ap.parse_args()
    deadline = time.time() + a.budget_s
    iters = 3 if a.dry_run else a.train_iters
    if a.dry_run:
        model = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
                 "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "4",
                 "--global-batch-size", "4", "--no-bf16"]
    else:  # 24 layers: deep enough for the curse of depth 
        model = ["--num-layers", "24", "--hidden-size", "512", "--num-attention-heads", "8", "--ffn-hidden-size", "1408",
                 "--seq-length", "512", "--max-position-embeddings", "512", "--micro-batch-size", "32",
                 "--global-batch-size", "32"]
    # The paper's recipe (Adam 0.9/0.999, no weight decay or clipping, cosine to lr/10 after 10% warmup,
    # bf16, eps 1e-6); its batch, length and steps are the ones above.
    common = ["--recipe", "paper"] + model + [
        "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--position-embedding-type", "rope",
        "--untie-embeddings-and-output-weights", "--transformer-impl", a.impl, "--train-iters", str(iters),
        "--seed", "1234", "--log-interval", str(max(1, iters // 30)), "--eval-interval", str(iters),
        "--eval-iters", "1" if a.dry_run else "10", "--depth-log-interval", "0", "--num-workers", "0"]
    if a.data_path:
        common += ["--data-path", a.data_path, "--split", "98,2,0", "--tokenizer-type", "HuggingFaceTokenizer",
                   "--tokenizer-model", a.tokenizer_model]
    else:
        common += ["--mock-data", "--vocab-size", "8192"]
    result = dict(status="running", impl=a.impl, train_iters=iters, data=a.data_path or "mock", runs=[])
    for number, (scheme, init) in enumerate(ORDER):
        row = dict(norm_scheme=scheme, output_init=init)
        result["runs"].append(row)
        walls = [r["wall_s"] for r in result["runs"] if "wall_s" in r]
        if a.dry_run and number >= 2:
            row["status"] = "not run: the dry run walks two of the four"
        elif walls and time.time() + 1.15 * max(walls) + 5 > deadline:
            row["status"] = "not run: out of time"
        else:
            rc, output, wall = run_driver(common + ["--norm-scheme", scheme, "--output-layer-init", init])
            its, valid = iterations(output), validation_losses(output)
            train = [its[i]["lm loss"] for i in sorted(its) if "lm loss" in its[i]]
            row.update(status="ok" if rc == 0 and valid else "failed", wall_s=round(wall, 1),
                       train_loss_last=mean_tail(train, 3), validation_loss=valid.get(iters),
                       ms_per_iteration=its[max(its)].get("elapsed time per iteration (ms)") if its else None)
            if rc or not valid:
                row["error"] = error_line(output)
        write_json(a.json, result)
    done = {(r["norm_scheme"], r["output_init"]): r["validation_loss"] for r in result["runs"] if r["status"] == "ok"}
    if ("pre", "scaled") in done and ("lns", "plain") in done:
        result["lns_plain_minus_pre_scaled"] = done[("lns", "plain")] - done[("pre", "scaled")]
    if done:
        result["best"] = "/".join(min(done, key=done.get))
    result["status"] = "failed" if any(r["status"] == "failed" for r in result["runs"]) else "ok"
    write_json(a.json, result)
    write_text(a.md, f"### 24-layer comparison: norm scheme x output-layer init ({iters} iterations, {a.impl} spec, "
               f"data: {os.path.basename(result['data'])})\n\n" + md_table(
                   ["norm scheme", "output init", "status", "validation loss", "train loss (last logs)", "ms/iteration", "seconds"],
                   [[r["norm_scheme"], r["output_init"], r["status"] + (f": {r['error']}" if r.get("error") else ""),
                     r.get("validation_loss"), r.get("train_loss_last"), r.get("ms_per_iteration"), r.get("wall_s")]
                    for r in result["runs"]]))
    sys.exit(1 if result["status"] == "failed" else 0)


if __name__ == "__main__":
    main()
