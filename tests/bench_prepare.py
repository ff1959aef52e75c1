#!/usr/bin/env python3
"""Throughput and peak memory of prepare_caseops_data.py (not a pytest test).

    python tests/bench_prepare.py [--workers 2] [--docs ../shared/data/bench_docs_20k.jsonl.xz]
                                  [--sp ../shared/data/caseops_sp8192.model] [--val-docs 2000] [--runs 1] [--growth]

Prints MB/s of input text (the uncompressed JSON lines, and the document text
alone) and the peak RSS of the main process and of the largest worker; with
--runs N it runs N times and also prints the median MB/s.  With
--growth it also runs on the documents repeated twice, to show that the peak
memory does not grow with the corpus (the repeats of val documents are dropped
from train, the rest is processed as usual).  Each run is a fresh subprocess.
"""

import argparse
import json
import lzma
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import prepare_caseops_data as prep
docs, sp, out, val_docs, workers = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
t0 = time.perf_counter()
man = prep.build_dataset(docs, out, sp_model=sp, val_docs=val_docs, workers=workers, quiet=True)
el = time.perf_counter() - t0
ru_self = resource.getrusage(resource.RUSAGE_SELF)
ru_kids = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"elapsed": el, "main_rss_mb": ru_self.ru_maxrss / 1024, "worker_rss_mb": ru_kids.ru_maxrss / 1024,
                  "cpu_s": ru_self.ru_utime + ru_self.ru_stime + ru_kids.ru_utime + ru_kids.ru_stime, "main_cpu_s": ru_self.ru_utime + ru_self.ru_stime,
                  "text_bytes": man["counts"]["val_bytes"] + man["counts"]["train_docs_bytes"],
                  "train_tokens": man["counts"]["train_tokens"], "val_tokens": man["counts"]["val_tokens"]}))
"""


def jsonl_bytes(path: Path) -> int:
    opener = lzma.open if path.suffix == ".xz" else open
    n = 0
    with opener(path, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                return n
            n += len(b)


def run(docs: Path, sp: Path, val_docs: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(docs), str(sp), str(Path(tmp) / "out"),
                            str(val_docs), str(workers)], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        return json.loads(r.stdout.strip().splitlines()[-1])


def report(label: str, res: dict, raw: int) -> None:
    el = res["elapsed"]
    print(f"{label}: {raw / 1e6:.1f} MB of JSON lines ({res['text_bytes'] / 1e6:.1f} MB of text) in {el:.2f} s"
          f" -> {raw / el / 1e6:.2f} MB/s input, {res['text_bytes'] / el / 1e6:.2f} MB/s text;"
          f" peak RSS main {res['main_rss_mb']:.0f} MiB, largest worker {res['worker_rss_mb']:.0f} MiB;"
          f" CPU {res['cpu_s']:.1f} s (main {res['main_cpu_s']:.1f} s); {res['val_tokens'] + res['train_tokens']:,} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=Path, default=SHARED / "bench_docs_20k.jsonl.xz")
    ap.add_argument("--sp", type=Path, default=SHARED / "caseops_sp8192.model")
    ap.add_argument("--val-docs", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1, help="repeat the run; print the median MB/s as well")
    ap.add_argument("--growth", action="store_true", help="also run on the documents repeated twice")
    args = ap.parse_args()
    raw = jsonl_bytes(args.docs)
    rates = []
    for _ in range(max(1, args.runs)):
        res = run(args.docs, args.sp, args.val_docs, args.workers)
        report(f"workers={args.workers}", res, raw)
        rates.append(raw / res["elapsed"] / 1e6)
    if len(rates) > 1:
        print(f"median of {len(rates)} runs: {statistics.median(rates):.2f} MB/s input")
    if args.growth:
        with tempfile.TemporaryDirectory() as tmp:
            opener = lzma.open if args.docs.suffix == ".xz" else open
            doubled = Path(tmp) / "doubled.jsonl"
            with opener(args.docs, "rb") as f, open(doubled, "wb") as g:
                data = f.read()
                g.write(data + data)
            report(f"workers={args.workers}, the documents twice", run(doubled, args.sp, args.val_docs, args.workers),
                   doubled.stat().st_size)

if __name__ == "__main__":
    main()
