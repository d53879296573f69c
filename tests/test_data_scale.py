"""lmref.data.stream on a planted corpus of some MB: bounded memory (measured in a child process,
so the peak is the stream's own), duplicates found against the planted ground truth, Parquet
shards that ``datasets`` reads, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmref.data.stream import StreamConfig, stream_corpus

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
CORPUS_MB = 16
# SQLite's cache (2 MB) + a row group in Arrow + allocator slack. benchmarks/data_scale.py saw the
# growth level off at 21.0-21.4 MB on 94 and 289 MB corpora; here it read 16-21 MB on 16 MB (a cap
# of 20 failed 4 runs in 5 in one environment and none in another): the cap sits above that level.
GROWTH_CAP_MB = 28

RUN = """
import json, sys
from lmref.data.scale_corpus import ScaleCorpusConfig, write_scale_corpus
from lmref.data.stream import StreamConfig, stream_corpus
root, CORPUS_MB = sys.argv[1], float(sys.argv[2])
if len(sys.argv) > 3:  # the first shard alone, in a process of its own (its own peak RSS)
    r = stream_corpus(root + "/in/shards/shard-00000.jsonl", root + "/out-small",
                      StreamConfig(sqlite_cache_mb=2, batch_rows=500, rows_per_shard=2000))
    print(json.dumps(r))
    sys.exit()
truth = write_scale_corpus(root + "/in", ScaleCorpusConfig(target_mb=CORPUS_MB, docs_per_shard=1500))
report = stream_corpus(root + "/in/shards", root + "/out",
                       StreamConfig(sqlite_cache_mb=2, batch_rows=500, rows_per_shard=2000))
print(json.dumps({"truth": truth, "report": report}))
"""


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    runs = []
    for extra in ([], ["small"]):  # the whole corpus (written first), then its first shard
        run = subprocess.run(
            [sys.executable, "-c", RUN, str(root), str(CORPUS_MB), *extra],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        runs.append(json.loads(run.stdout))
    return root, {**runs[0], "small": runs[1]}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_memory_growth_stays_under_its_cap_at_two_sizes(streamed):
    _, result = streamed
    report, small = result["report"], result["small"]
    assert report["mb_in"] > CORPUS_MB * 0.9
    assert small["mb_in"] < report["mb_in"] / 3
    # What the stream adds to RSS beyond its imports and one-off warm-ups: SQLite's page cache
    # (2 MB here), a 1 MB row group as Arrow encodes it, allocator slack; never the corpus
    # (measured 8.6 MB on 4.5 MB, 16-21 on 16 MB; benchmarks/data_scale.py: 13.4 MB on 19 MB,
    # 21.0 on 94, 21.4 on 289: the level it stays at).
    for r in (small, report):
        assert r["rss_growth_mb"] < GROWTH_CAP_MB, r
    assert report["peak_rss_mb"] < 400, report
    assert report["index_bytes_per_doc"] < 2_000


def test_duplicates_found_match_the_planted_ones(streamed):
    root, result = streamed
    truth = {d["source"]: d for d in _lines(Path(result["truth"]["truth"]))}
    found = {d["source"]: d for d in _lines(root / "out" / "duplicates.jsonl")}
    exact = {s for s, d in truth.items() if d["kind"] == "exact"}
    near = {s for s, d in truth.items() if d["kind"] == "near"}
    assert len(exact) > 20 and len(near) > 20
    assert {s for s, d in found.items() if d["kind"] == "exact"} == exact
    assert {s for s, d in found.items() if d["kind"] == "near"} == near
    # each near duplicate is matched to the original it was copied from
    assert all(found[s]["of"] == truth[s]["of"] for s in near)


def test_output_shards_load_with_datasets(streamed):
    from datasets import load_dataset

    root, result = streamed
    report = result["report"]
    assert len(report["shards"]["train"]) >= 2  # rows_per_shard=2000 splits the train split
    train = load_dataset("parquet", data_dir=str(root / "out" / "train"), split="train")
    assert len(train) == report["docs_out"]["train"]
    assert sum(report["docs_out"].values()) == result["truth"]["originals"]
    assert set(train.column_names) == {"text", "source", "language"}


def test_bad_input_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no string field 'text'"):
        stream_corpus(bad, tmp_path / "out", StreamConfig(near_duplicates=False))
    with pytest.raises(FileNotFoundError, match="missing"):
        stream_corpus(tmp_path / "missing", tmp_path / "out")


def test_memory_cap_is_enforced(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one small document about files and paths"}\n')
    with pytest.raises(MemoryError, match="max_rss_mb=1"):
        stream_corpus(tmp_path / "a.jsonl", tmp_path / "out", StreamConfig(max_rss_mb=1))


def test_the_stream_masks_pii_detects_languages_and_drops_contaminated_documents(tmp_path):
    import inspect
    import json as json_module
    import subprocess as subprocess_module
    import textwrap

    from tests.test_data_chinese import ZH, ZH_OTHER

    item = (
        "the quick brown fox answers every question of the held out evaluation set "
        "before it was ever asked of the model"
    )
    english = [inspect.getdoc(f) for f in (json_module.dumps, subprocess_module.run, textwrap.wrap)]
    docs = [
        english[0] + "\nWrite to jane.doe@example.org or call +1 415 555 0100.",
        english[1] + "\n" + item.capitalize() + ".",  # holds the evaluation item
        english[2],
        ZH + ZH_OTHER,
    ]
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    config = StreamConfig(
        val_fraction=0,
        test_fraction=0,
        near_duplicates=False,
        detect_language=True,
        max_rss_mb=None,  # this process holds the suite's models: memory is tested above
    )
    report = stream_corpus(corpus, tmp_path / "out", config, eval_texts=[item])
    assert report["removed"] == {"contaminated": 1}
    assert report["pii"]["EMAIL"] == 1 and report["pii"]["docs_touched"] == 1
    assert report["languages"]["in"] == {"en": 3, "zh": 1}
    assert report["languages"]["out"] == {"en": 2, "zh": 1}
    # each step timed and counted on its own, in the order the documents meet them
    steps = report["steps"]
    assert list(steps) == [
        "read",
        "clean",
        "language",
        "exact",
        "near",
        "filter",
        "pii",
        "decontaminate",
        "write",
    ]
    assert steps["pii"]["docs_in"] == 4 and steps["decontaminate"]["docs_out"] == 3
    assert steps["write"]["docs_in"] == 3 and all(v["seconds"] >= 0 for v in steps.values())
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "out" / "train").to_pylist()
    assert "jane.doe@example.org" not in "".join(r["text"] for r in rows)
    assert item not in "".join(r["text"] for r in rows).lower()
    assert sorted(r["language"] for r in rows) == ["en", "en", "zh"]
