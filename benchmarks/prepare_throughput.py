"""Throughput (MB/s of text) and peak memory of `unmask data prepare`, streaming vs the earlier in-memory path.

The streaming path (lazy files, pieces, worker processes, shards written as tokens arrive) runs
on growing prefixes of the corpus (the first files, sorted, up to each size) and on all of it;
the earlier in-memory path (which listed every document in memory first) runs from the source of
``--baseline-commit`` (``git archive``) on the smaller prefixes only. Each run is its own
process; peak RSS is that process's maximum resident set (``ru_maxrss``) and, with workers, the
largest worker's. A corpus of >= 50 MB made on a Debian machine:

    apt-get download python3.11-doc linux-doc-6.1 && dpkg-deb -x python3.11-doc_*.deb py && dpkg-deb -x linux-doc-6.1_*.deb lx
    # then: the .rst.txt sources of py/, the .gz files of lx/ unpacked, Python's own stdlib sources, all as .txt files
    python benchmarks/prepare_throughput.py CORPUS_DIR --out runs/prepare-bench

Writes results.json and results.md to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

NEW = r"""
import json, resource, sys, time
from unmask.data import default_tokenizer, prepare_dataset, read_documents
files, out, workers = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
prepare_dataset(out, default_tokenizer(), read_documents(files, lazy=True), progress=False, workers=workers)
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

# the earlier command's body: every document read into a list, then tokenised in the main process
OLD = r"""
import json, resource, sys, time
from unmask.data import default_tokenizer, prepare_dataset, read_documents
files, out = json.load(open(sys.argv[1])), sys.argv[2]
t = time.perf_counter()
docs = list(read_documents(files))
prepare_dataset(out, default_tokenizer(), docs, None, progress=False)
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "worker_rss_mib": 0}))
"""


def prefix(files: list[Path], mb: float) -> list[Path]:
    chosen, total = [], 0
    for f in files:
        if total >= mb * 1e6:
            break
        chosen.append(f)
        total += f.stat().st_size
    return chosen


def run(code: str, files: list[Path], out: Path, extra: list[str], pythonpath: str | None = None) -> dict:
    import os

    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    listing = out.with_suffix(".files.json")  # too many paths for a command line
    listing.write_text(json.dumps([str(f) for f in files]))
    proc = subprocess.run([sys.executable, "-c", code, str(listing), str(out), *extra],
                          capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"run failed: {proc.stderr[-2000:]}")
    res = json.loads(lines[-1][7:])
    meta = json.loads((out / "meta.json").read_text())
    res["tokens"] = sum(s["num_tokens"] for s in meta["splits"].values())
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, help="Folder of .txt files (read recursively).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="8,16,32", help="MB prefixes for the streaming path (the whole corpus is added).")
    parser.add_argument("--old-sizes", default="8,16", help="MB prefixes for the in-memory path.")
    parser.add_argument("--workers", default="0,2", help="Worker counts for the whole corpus.")
    parser.add_argument("--baseline-commit", default="1afaa86", help="Commit with the in-memory `data prepare`.")
    args = parser.parse_args()
    files = sorted(p for p in args.corpus.rglob("*.txt") if p.is_file())
    total_mb = sum(f.stat().st_size for f in files) / 1e6
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old_src = tmp / "old"
        old_src.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline_commit, "src"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
        plan = [("streaming", float(mb), 0) for mb in args.sizes.split(",")]
        plan += [("streaming", total_mb, int(w)) for w in args.workers.split(",")]
        plan += [("in-memory", float(mb), 0) for mb in args.old_sizes.split(",")]
        for i, (path, mb, workers) in enumerate(plan):
            chosen = prefix(files, mb)
            size = sum(f.stat().st_size for f in chosen) / 1e6
            out = tmp / f"out{i}"
            if path == "streaming":
                res = run(NEW, chosen, out, [str(workers)])
            else:
                res = run(OLD, chosen, out, [], pythonpath=str(old_src / "src"))
            row = {"path": path, "mb": size, "files": len(chosen), "workers": workers, **res, "mb_per_s": size / res["seconds"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps({"corpus_mb": total_mb, "files": len(files), "rows": rows}, indent=2) + "\n")
    md = [f"# `unmask data prepare`: {total_mb:.1f} MB corpus, {len(files)} files", "",
          "| path | MB of text | files | workers | tokens | seconds | MB/s | peak RSS MiB (main) | peak RSS MiB (largest worker) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['path']} | {r['mb']:.1f} | {r['files']} | {r['workers']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['mb_per_s']:.2f} | "
                  f"{r['rss_mib']:,.0f} | {r['worker_rss_mib']:,.0f} |")
    text = "\n".join(md) + "\n"
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
