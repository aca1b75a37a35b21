#!/usr/bin/env python3
"""The GPU kit: wheels split into transfers that each fit one carry, joined and verified on the far side.

Standard library only: it runs on the GPU machine before anything is installed there.

    python3 tools/gpu/kit.py pack KIT_DIR --role base:FILE ... --role te:FILE ... [--version NAME=VER ...]
    python3 tools/gpu/kit.py stage KIT_DIR/transfer-2 [--stage DIR]      # on the GPU machine, once per transfer
    python3 tools/gpu/kit.py join [--stage DIR] --into DIR                # reassemble and verify every file
    python3 tools/gpu/kit.py summary KIT_DIR/manifest.json                # the transfers as a Markdown table
    python3 tools/gpu/kit.py fetch PROJECT FILENAME DIR                   # a file as pip's index lists it

A file larger than one part is split into ``NAME.partNN`` pieces. Pieces are packed into ``transfer-1`` ...
``transfer-K`` folders of at most ``--transfer-mib`` each; the ``base`` files (megatron-core and what it
needs: the no-Transformer-Engine checks) always go into the last transfer, the one carried by the command that
runs the checks, so those checks can run even when an earlier transfer was lost. ``manifest.json`` lists
every file and piece with its size, sha256 and transfer; a copy travels in every transfer.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import sys
import tempfile

MIB = 2**20
MANIFEST = "manifest.json"
ROLES = ("base", "te")


def default_stage_dir() -> str:
    """Outside the repository copy, so that it outlives one command while the machine stays warm."""
    return os.environ.get("LNS_GPU_KIT_STAGE") or os.path.join(tempfile.gettempdir(), "lns-gpu-kit")


class KitError(Exception):
    """One line naming the file, the place and the fix."""


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _pieces(path: str, name: str, part_bytes: int, out_dir: str) -> list:
    """Write ``name`` (or its parts) into out_dir; return the pieces as manifest rows."""
    size = os.path.getsize(path)
    if size <= part_bytes:
        target = os.path.join(out_dir, name)
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
        return [dict(name=name, size=size, sha256=sha256(target))]
    rows = []
    with open(path, "rb") as f:
        for index in range(1, (size + part_bytes - 1) // part_bytes + 1):
            piece = f"{name}.part{index:02d}"
            with open(os.path.join(out_dir, piece), "wb") as out:
                out.write(f.read(part_bytes))
            rows.append(dict(name=piece, size=os.path.getsize(os.path.join(out_dir, piece)),
                             sha256=sha256(os.path.join(out_dir, piece))))
    return rows


def _assign_transfers(files: list, transfer_bytes: int) -> int:
    """First fit, largest first, with every base piece in the last transfer; returns the transfer count."""
    bins = [dict(size=0, base=True, pieces=[])]
    for f in files:
        if f["role"] == "base":
            for p in f["pieces"]:
                bins[0]["size"] += p["size"]
                bins[0]["pieces"].append(p)
    if bins[0]["size"] > transfer_bytes:
        raise KitError(f"pack: the base files take {bins[0]['size'] / MIB:.1f} MiB, more than one transfer "
                       f"({transfer_bytes / MIB:.1f} MiB); raise --transfer-mib or carry fewer base files")
    others = sorted((p for f in files if f["role"] != "base" for p in f["pieces"]), key=lambda p: -p["size"])
    for p in others:
        if p["size"] > transfer_bytes:
            raise KitError(f"pack: piece {p['name']} is {p['size'] / MIB:.1f} MiB, more than one transfer; "
                           "use a --part-mib below --transfer-mib")
        room = [b for b in bins if b["size"] + p["size"] <= transfer_bytes]
        target = min(room, key=lambda b: transfer_bytes - b["size"] - p["size"]) if room else None
        if target is None:
            target = dict(size=0, base=False, pieces=[])
            bins.append(target)
        target["size"] += p["size"]
        target["pieces"].append(p)
    ordered = [b for b in bins if not b["base"]] + [bins[0]]
    for number, b in enumerate(ordered, start=1):
        for p in b["pieces"]:
            p["transfer"] = f"transfer-{number}"
    return len(ordered)


def pack(kit_dir: str, files: list, part_mib: float, transfer_mib: float, versions: dict) -> dict:
    """Split ``files`` ([(role, path)]) into transfers under kit_dir; returns the manifest.

    A kit already packed from the same files with the same limits is reused as it is.
    """
    part_bytes, transfer_bytes = int(part_mib * MIB), int(transfer_mib * MIB)
    if part_bytes > transfer_bytes:
        raise KitError(f"pack: --part-mib {part_mib} exceeds --transfer-mib {transfer_mib}; parts must fit a transfer")
    rows = []
    for role, path in files:
        if role not in ROLES:
            raise KitError(f"pack: role {role!r} for {path}; use one of {', '.join(ROLES)}")
        if not os.path.isfile(path):
            raise KitError(f"pack: {path}: no such file; run tools/gpu/prepare_kit.sh to download or build it")
        rows.append(dict(name=os.path.basename(path), role=role, size=os.path.getsize(path), sha256=sha256(path)))
    kit_id = hashlib.sha256(json.dumps([(r["name"], r["sha256"]) for r in rows] + [part_bytes, transfer_bytes])
                            .encode()).hexdigest()[:16]
    manifest_path = os.path.join(kit_dir, MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
        if old.get("kit_id") == kit_id and old.get("versions") == versions and verify_transfers(kit_dir, old) == []:
            return old

    os.makedirs(kit_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".pack-", dir=kit_dir)
    try:
        for row, (_, path) in zip(rows, files):
            row["pieces"] = _pieces(path, row["name"], part_bytes, work)
        count = _assign_transfers(rows, transfer_bytes)
        transfers = []
        for number in range(1, count + 1):
            name = f"transfer-{number}"
            os.makedirs(os.path.join(work, name))
            pieces = [p for r in rows for p in r["pieces"] if p["transfer"] == name]
            for p in pieces:
                os.replace(os.path.join(work, p["name"]), os.path.join(work, name, p["name"]))
            transfers.append(dict(name=name, size=sum(p["size"] for p in pieces), pieces=[p["name"] for p in pieces]))
        manifest = dict(
            format=1, kit_id=kit_id, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            versions=versions, part_limit_bytes=part_bytes, transfer_limit_bytes=transfer_bytes,
            files=rows, transfers=transfers,
        )
        for t in transfers:
            _write_json(os.path.join(work, t["name"], MANIFEST), manifest)
        # Replace the old transfers only once the new ones are complete.
        for entry in os.listdir(kit_dir):
            if entry.startswith("transfer-"):
                shutil.rmtree(os.path.join(kit_dir, entry))
        for t in transfers:
            os.replace(os.path.join(work, t["name"]), os.path.join(kit_dir, t["name"]))
        _write_json(manifest_path, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _piece_rows(manifest: dict):
    for f in manifest["files"]:
        for p in f["pieces"]:
            yield f, p


def verify_transfers(kit_dir: str, manifest: dict) -> list:
    """Problems (one line each) with the packed transfer folders; [] when all pieces are there and intact."""
    problems = []
    for _, p in _piece_rows(manifest):
        path = os.path.join(kit_dir, p["transfer"], p["name"])
        if not os.path.isfile(path) or os.path.getsize(path) != p["size"] or sha256(path) != p["sha256"]:
            problems.append(f"{path}: missing or changed")
    return problems


def _load_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            manifest = json.load(f)
        manifest["files"], manifest["transfers"]
        return manifest
    except FileNotFoundError:
        raise KitError(f"{path}: no manifest; carry a transfer folder written by tools/gpu/prepare_kit.sh") from None
    except (ValueError, KeyError, TypeError) as e:
        raise KitError(f"{path}: not a kit manifest ({e}); re-run tools/gpu/prepare_kit.sh") from None


def stage(transfer_dir: str, stage_dir: str) -> str:
    """Verify one carried transfer folder and copy its pieces to stage_dir; returns a one-line report."""
    transfer_dir = transfer_dir.rstrip("/")
    manifest = _load_manifest(os.path.join(transfer_dir, MANIFEST))
    name = os.path.basename(transfer_dir)
    mine = [p for _, p in _piece_rows(manifest) if p["transfer"] == name]
    if not mine:
        raise KitError(f"stage: {transfer_dir}: the manifest lists no pieces for {name!r}; "
                       "carry the folder under its own name (.gpu-kit/transfer-N)")
    os.makedirs(stage_dir, exist_ok=True)
    staged_manifest = os.path.join(stage_dir, MANIFEST)
    if os.path.isfile(staged_manifest) and _load_manifest(staged_manifest).get("kit_id") != manifest["kit_id"]:
        for entry in os.listdir(stage_dir):  # pieces of another kit: start over
            path = os.path.join(stage_dir, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for p in mine:
        source = os.path.join(transfer_dir, p["name"])
        if not os.path.isfile(source):
            raise KitError(f"stage: {source} is missing; carry {transfer_dir} whole (re-run tools/gpu/prepare_kit.sh "
                           "if it is missing here too)")
        if sha256(source) != p["sha256"]:
            raise KitError(f"stage: {source}: sha256 does not match the manifest; re-run tools/gpu/prepare_kit.sh "
                           f"and carry {name} again")
        tmp = os.path.join(stage_dir, "." + p["name"] + ".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, os.path.join(stage_dir, p["name"]))
    shutil.copyfile(os.path.join(transfer_dir, MANIFEST), staged_manifest)
    have, missing = staged_transfers(stage_dir, manifest)
    return (f"stage: {name} of {len(manifest['transfers'])}: {len(mine)} piece(s), "
            f"{sum(p['size'] for p in mine) / MIB:.1f} MiB, sha256 verified, in {stage_dir}; "
            f"staged: {', '.join(have) or 'none'}" + (f"; still to carry: {', '.join(missing)}" if missing else
                                                     "; complete"))


def staged_transfers(stage_dir: str, manifest: dict):
    """(transfers whose pieces are all in stage_dir, transfers still missing), by size only (cheap)."""
    have, missing = [], []
    for t in manifest["transfers"]:
        rows = [p for _, p in _piece_rows(manifest) if p["transfer"] == t["name"]]
        ok = all(os.path.isfile(os.path.join(stage_dir, p["name"]))
                 and os.path.getsize(os.path.join(stage_dir, p["name"])) == p["size"] for p in rows)
        (have if ok else missing).append(t["name"])
    return have, missing


def join(stage_dir: str, into: str):
    """Reassemble every file whose pieces are staged, verifying sha256 of pieces and of the whole.

    Returns (manifest, {file name: path} of verified files, [one line per file that could not be made]).
    """
    manifest = _load_manifest(os.path.join(stage_dir, MANIFEST))
    os.makedirs(into, exist_ok=True)
    ready, problems = {}, []
    for f in manifest["files"]:
        bad = None
        for p in f["pieces"]:
            path = os.path.join(stage_dir, p["name"])
            if not os.path.isfile(path):
                bad = f"{f['name']}: piece {p['name']} is missing; carry {p['transfer']} (bash tools/gpu/stage.sh .gpu-kit/{p['transfer']})"
            elif os.path.getsize(path) != p["size"] or sha256(path) != p["sha256"]:
                bad = f"{f['name']}: piece {p['name']} is corrupt (sha256 mismatch); carry {p['transfer']} again"
            if bad:
                break
        if bad:
            problems.append(bad)
            continue
        target = os.path.join(into, f["name"])
        if not (os.path.isfile(target) and os.path.getsize(target) == f["size"] and sha256(target) == f["sha256"]):
            tmp = target + ".tmp"
            with open(tmp, "wb") as out:
                for p in f["pieces"]:
                    with open(os.path.join(stage_dir, p["name"]), "rb") as src:
                        shutil.copyfileobj(src, out, MIB)
            if sha256(tmp) != f["sha256"]:
                os.remove(tmp)
                problems.append(f"{f['name']}: joined file fails its sha256; re-run tools/gpu/prepare_kit.sh")
                continue
            os.replace(tmp, target)
        ready[f["name"]] = target
    return manifest, ready, problems


def fetch_from_index(project: str, filename: str, dest_dir: str) -> str:
    """Download ``filename`` as pip's configured index lists it, checking the sha256 the index gives.

    For sources that ``pip download`` cannot take (transformer-engine-torch fails while preparing metadata).
    """
    import re
    import subprocess
    import urllib.parse
    import urllib.request

    target = os.path.join(dest_dir, filename)
    if os.path.isfile(target):
        return target
    index = os.environ.get("PIP_INDEX_URL")
    if not index:
        got = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                             capture_output=True, text=True)
        index = got.stdout.strip() if got.returncode == 0 and got.stdout.strip() else "https://pypi.org/simple"
    page_url = f"{index.rstrip('/')}/{project}/"
    try:
        page = urllib.request.urlopen(page_url, timeout=120).read().decode()
    except OSError as e:
        raise KitError(f"fetch: {page_url}: {e}; check the network or PIP_INDEX_URL") from None
    for href in re.findall(r'href="([^"]+)"', page):
        url = urllib.parse.urljoin(page_url, href.replace("&amp;", "&"))
        if urllib.parse.urlparse(url).path.rsplit("/", 1)[-1] != filename:
            continue
        digest = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(url).fragment)).get("sha256")
        os.makedirs(dest_dir, exist_ok=True)
        tmp = target + ".tmp"
        with urllib.request.urlopen(url.split("#")[0], timeout=600) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, MIB)
        if digest and sha256(tmp) != digest:
            os.remove(tmp)
            raise KitError(f"fetch: {filename} from {page_url} fails the index's sha256; try again")
        os.replace(tmp, target)
        return target
    raise KitError(f"fetch: {page_url} lists no {filename}; check the version in tools/gpu/prepare_kit.sh")


def torch_mismatch(kit_versions: dict, torch_version: str, cuda_version) -> str | None:
    """One line when this machine's torch cannot load the kit's prebuilt TE extension, else None.

    The extension is tied to torch's C++ ABI (its release) and to the CUDA major version of the core wheel.
    """
    want = kit_versions.get("torch")
    if not want:
        return "the kit's manifest records no torch version; re-run tools/gpu/prepare_kit.sh"
    base = lambda v: str(v).split("+")[0]
    want_cuda = kit_versions.get("torch_cuda")
    cuda_major = lambda v: str(v).split(".")[0] if v else None
    if base(torch_version) != base(want) or (want_cuda and cuda_major(cuda_version) != cuda_major(want_cuda)):
        return (f"torch mismatch: the kit's Transformer Engine extension was built for torch {want} (CUDA {want_cuda}), "
                f"this machine has torch {torch_version} (CUDA {cuda_version}); running the no-TE checks only "
                f"(rebuild the kit with TORCH_VERSION={base(torch_version)} in tools/gpu/prepare_kit.sh)")
    return None


def summary_table(manifest: dict) -> str:
    lines = ["| transfer | size | pieces |", "|---|---|---|"]
    for t in manifest["transfers"]:
        lines.append(f"| {t['name']} | {t['size'] / MIB:.1f} MiB | {', '.join(t['pieces'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kit.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("kit_dir")
    p.add_argument("--role", action="append", default=[], metavar="ROLE:FILE", help="base:FILE or te:FILE")
    p.add_argument("--version", action="append", default=[], metavar="NAME=VERSION")
    p.add_argument("--part-mib", type=float, default=59.0)
    p.add_argument("--transfer-mib", type=float, default=62.0)
    p = sub.add_parser("stage")
    p.add_argument("transfer_dir", nargs="+")
    p.add_argument("--stage", default=default_stage_dir())
    p = sub.add_parser("join")
    p.add_argument("--stage", default=default_stage_dir())
    p.add_argument("--into", required=True)
    p = sub.add_parser("fetch")
    p.add_argument("project")
    p.add_argument("filename")
    p.add_argument("dest_dir")
    p = sub.add_parser("summary")
    p.add_argument("manifest")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "pack":
            files = []
            for spec in args.role:
                role, sep, path = spec.partition(":")
                if not sep:
                    raise KitError(f"pack: --role {spec!r}; write ROLE:FILE with ROLE one of {', '.join(ROLES)}")
                files.append((role, path))
            versions = dict(v.split("=", 1) for v in args.version)
            manifest = pack(args.kit_dir, files, args.part_mib, args.transfer_mib, versions)
            print(summary_table(manifest))
        elif args.cmd == "stage":
            for transfer in args.transfer_dir:
                print(stage(transfer, args.stage), flush=True)
        elif args.cmd == "join":
            _, ready, problems = join(args.stage, args.into)
            for name in sorted(ready):
                print(f"join: {name}: sha256 verified")
            if problems:
                print(f"kit: error: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                      file=sys.stderr)
                return 2
        elif args.cmd == "fetch":
            print(fetch_from_index(args.project, args.filename, args.dest_dir))
        else:
            print(summary_table(_load_manifest(args.manifest)))
    except KitError as e:
        print(f"kit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
