"""The corpus pipeline at scale: lmref's stream (``lmref.data.stream``) vs HF datatrove, one corpus.

A corpus of ``DATA_SCALE_MB`` MB (default 300) with planted exact and near duplicates
(``lmref.data.scale_corpus``: stdlib docstrings and Chinese fortunes) goes through:

1. lmref: one ordered pass (read -> clean -> exact -> near -> filter -> split -> Parquet) with
   its SQLite index, in a child process (its peak RSS is its own);
2. datatrove 0.10 with ``LocalPipelineExecutor`` (1 task, 1 worker each, as lmref): clean
   (lmref's ``clean_text`` in a datatrove step) -> MinHash signatures -> buckets -> clusters ->
   dedup filter + lmref's quality rule (``LambdaFilter``) -> ``ParquetWriter``; every stage in
   its own child process. MinHash dedup finds exact duplicates too, so datatrove's duplicates
   are compared with exact + near planted. Words for its MinHash: ``str.split`` (its English
   tokenizer needs nltk, which the course does not install).

Per step: documents/s, MB/s and peak RSS; duplicates found vs the ground truth.

datatrove comes with the ``bench`` extra (``pip install -e '.[bench]'``); ``DATA_SCALE_PEER=0`` runs
lmref alone without it.

    DATA_SCALE_MB=300 nice python benchmarks/data_scale.py   # results/data_scale-cpu.json
    DATA_SCALE_MB=2000 DATA_SCALE_PEER=0 python benchmarks/data_scale.py
    # lmref alone, PII masking included: results/data_scale-cpu-2000mb.json

Beside datatrove, lmref runs without PII masking (datatrove's pipeline here has none); alone, with
it (its default). The stream enforces ``max_rss_mb=1024``: a run that passed it would fail.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmref.lab.env import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

DATATROVE_STAGE = r"""
import json, resource, sys, time
stage, root = sys.argv[1], sys.argv[2]
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                      MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.filters import LambdaFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter, ParquetWriter
from datatrove.utils.word_tokenizers import WordTokenizer
from lmref.data.clean import FilterConfig, _quality_reason, clean_text

class Split(WordTokenizer):
    def word_tokenize(self, text): return text.split()
    def sent_tokenize(self, text): return text.split("\n")
    def span_tokenize(self, text): raise NotImplementedError

class Clean(PipelineStep):
    name = "lmref clean_text"
    def run(self, data, rank=0, world_size=1):
        for doc in data:
            doc.text, _ = clean_text(doc.text)
            if doc.text:
                yield doc

from datatrove.utils.hashing import HashConfig
# sha1: the installed xxhash refuses str, which datatrove 0.10's xxhash path passes it
cfg = MinhashConfig(hash_config=HashConfig(hash_fc="sha1"))
q = FilterConfig()
stages = {
    "clean": [JsonlReader(f"{root}/in/shards"), Clean(), JsonlWriter(f"{root}/dt/clean")],
    "signatures": [JsonlReader(f"{root}/dt/clean"),
                   MinhashDedupSignature(f"{root}/dt/sigs", config=cfg, language=Split())],
    "buckets": [MinhashDedupBuckets(f"{root}/dt/sigs", f"{root}/dt/buckets", config=cfg)],
    "cluster": [MinhashDedupCluster(f"{root}/dt/buckets", f"{root}/dt/remove", config=cfg)],
    "filter_write": [JsonlReader(f"{root}/dt/clean"),
                     MinhashDedupFilter(f"{root}/dt/remove"),
                     LambdaFilter(lambda d: _quality_reason(d.text, q) is None),
                     ParquetWriter(f"{root}/dt/out")],
}
workers = {"buckets": cfg.num_buckets}
start = time.perf_counter()
LocalPipelineExecutor(stages[stage], tasks=workers.get(stage, 1), workers=1,
                      logging_dir=f"{root}/dt/logs/{stage}", skip_completed=False).run()
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

LMREF_RUN = r"""
import json, sys
from pathlib import Path
from lmref.data.stream import StreamConfig, stream_corpus
root, n_shards, out, mask_pii = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
shards = sorted(Path(root, "in", "shards").glob("*.jsonl"))[: n_shards or None]
r = stream_corpus(shards, f"{root}/{out}", StreamConfig(max_rss_mb=1024, mask_pii=mask_pii))
print(json.dumps(r))
"""
SHARD_MB = 20  # ~6,500 documents of ~3 KB: the RSS growth is measured on 1, 5 and all shards


def child(code: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, cwd=REPO
    )
    if run.returncode:
        raise RuntimeError(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def datatrove_stats(root: Path, stage: str) -> dict:
    """Documents in/out from the executor's stats.json (summed over tasks)."""
    stats = json.loads((root / "dt" / "logs" / stage / "stats.json").read_text())
    return {s["name"]: s.get("stats", {}) for s in stats}


def main() -> None:
    from lmref.data.scale_corpus import ScaleCorpusConfig, write_scale_corpus

    mb = float(os.environ.get("DATA_SCALE_MB", "300"))
    with_peer = os.environ.get("DATA_SCALE_PEER", "1") != "0"
    # Beside datatrove, lmref runs the steps datatrove runs (no PII masking); alone, all of them
    mask_pii = "0" if with_peer else "1"
    load_start = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="data_scale-"))
    try:
        t0 = time.perf_counter()
        config = ScaleCorpusConfig(target_mb=mb, docs_per_shard=SHARD_MB * 1_000_000 // 3_080)
        truth = write_scale_corpus(root / "in", config)
        gen_s = time.perf_counter() - t0
        truth.pop("files")
        # Does the stream's memory grow with the corpus? Its peak RSS growth on a prefix of 1 and
        # of 5 shards, then on all (the run compared with datatrove below)
        growth = []
        for n in (1, 5):
            part = child(LMREF_RUN, str(root), str(n), f"lmref-{n}", mask_pii)
            growth.append({k: part[k] for k in ("mb_in", "rss_at_start_mb", "rss_growth_mb")})
            shutil.rmtree(root / f"lmref-{n}")
        lm = child(LMREF_RUN, str(root), "0", "lmref", mask_pii)
        growth.append({k: lm[k] for k in ("mb_in", "rss_at_start_mb", "rss_growth_mb")})
        lm["rss_growth_by_corpus_mb"] = growth
        shards = lm.pop("shards")
        lm.pop("config")
        # ground truth by source
        planted = {
            json.loads(line)["source"]: json.loads(line)["kind"]
            for line in Path(truth["truth"]).read_text().splitlines()
        }
        found = [json.loads(x) for x in (root / "lmref" / "duplicates.jsonl").open()]
        hits = sum(planted.get(d["source"]) == d["kind"] for d in found)
        lm["vs_truth"] = {"found": len(found), "correct": hits, "planted": len(planted)}
        lm["output_files"] = sum(len(v) for v in shards.values())
        dt: dict = {"steps": {}}
        for stage in ("clean", "signatures", "buckets", "cluster", "filter_write")[: 5 * with_peer]:
            dt["steps"][stage] = child(DATATROVE_STAGE, stage, str(root))
            dt["steps"][stage]["seconds"] = round(dt["steps"][stage]["seconds"], 3)
        total_mb = truth["bytes"] / 1e6
        for step in dt["steps"].values():
            step["mb_per_s_of_corpus"] = round(total_mb / step["seconds"], 3)
            step["docs_per_s_of_corpus"] = round(truth["docs"] / step["seconds"], 1)
        dt["filter_write_stats"] = datatrove_stats(root, "filter_write") if with_peer else {}
        stage4 = [v for k, v in dt["filter_write_stats"].items() if "MinHash stage 4" in k]
        dt["duplicates_removed"] = stage4[0].get("dropped", 0) if stage4 else None
        dt["vs_truth"] = {
            "removed": dt["duplicates_removed"],
            "planted": truth["exact"] + truth["near"],
        }
        dt["seconds"] = round(sum(s["seconds"] for s in dt["steps"].values()), 3)
        dt["peak_rss_mb"] = max((s["peak_rss_mb"] for s in dt["steps"].values()), default=None)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "settings": {
            "corpus_mb": round(truth["bytes"] / 1e6, 1),
            "threshold": 0.8,
            "lmref_masks_pii": mask_pii == "1",
            "lmref_max_rss_mb": 1024,
        },
        "corpus": {**{k: v for k, v in truth.items() if k != "truth"}, "generate_s": gen_s},
        "results": {"lmref_stream": lm, "datatrove": dt if with_peer else "not run"},
        "load_average_1_5_15": {"start": load_start, "end": os.getloadavg()},
        "peak_rss_of_this_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "note": (
            "2 cores; the load average at start and end above says what else ran (an earlier "
            "run of this file shared them with another CPU-heavy job): compare within one run. "
            "lmref: one ordered pass, steps interleaved per document, one peak RSS; datatrove: "
            "one child process per stage, 1 task (buckets: 14 tasks, 1 worker), its default "
            "MinHash (14 buckets x 8 hashes, 5-grams of str.split words) vs lmref's datasketch "
            "LSH at 0.8 (9 bands x 13 rows). datatrove's MinHash drops exact and near alike."
        ),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("data_scale-cpu.json" if with_peer else f"data_scale-cpu-{mb:.0f}mb.json")
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
