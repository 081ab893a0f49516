"""BEIR-layout retrieval sets: read them, and build one from fine-tuning JSON lines.

A BEIR folder holds `corpus.jsonl` ({"_id", "title", "text"}), `queries.jsonl`
({"_id", "text"}) and `qrels/<split>.tsv` (header, then `query-id corpus-id score`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llara_dist.errors import UserError
from llara_dist.textfiles import read_json_lines, read_lines


@dataclass
class RetrievalSet:
    corpus: dict[str, str]  # doc id -> text (title prepended when present)
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> grade


def _jsonl(path: Path, required: tuple[str, ...]):
    for line_no, obj in read_json_lines(path):
        missing = [k for k in required if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise UserError(f"{path}:{line_no}: missing field(s) {', '.join(missing)}")
        yield line_no, obj


def read_qrels(path: str | Path, corpus=None) -> dict[str, dict[str, int]]:
    """Relevance judgements, query -> document -> grade, in any of the usual layouts:
    BEIR `query-id<TAB>corpus-id<TAB>score` (a header line allowed), and TREC qrels
    `query iteration document grade` (whitespace-separated; MS MARCO's qrels.dev.small.tsv is
    this with tabs). The number of fields on a line tells which. With `corpus` (its ids), a
    document not in it is refused, naming the line."""
    qrels: dict[str, dict[str, int]] = {}
    for line_no, line in read_lines(path, "qrels file"):
        parts = line.split("\t") if "\t" in line else line.split()
        if line_no == 1 and not parts[-1].lstrip("-").isdigit():
            continue  # a header
        if len(parts) == 4:
            parts = [parts[0], parts[2], parts[3]]  # TREC: the iteration field is unused
        if len(parts) != 3 or not parts[2].lstrip("-").isdigit():
            raise UserError(f"{path}:{line_no}: expected `query-id<TAB>corpus-id<TAB>score` (BEIR) or "
                            "`query iteration document grade` (TREC qrels)")
        qid, did, grade = parts
        if corpus is not None and did not in corpus:
            raise UserError(f"{path}:{line_no}: corpus id {did!r} is not in corpus.jsonl")
        qrels.setdefault(qid, {})[did] = int(grade)
    return qrels


def load_beir(folder: str | Path, split: str = "test") -> RetrievalSet:
    folder = Path(folder)
    for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (folder / name).is_file():
            raise UserError(f"{folder / name}: missing (a BEIR folder needs corpus.jsonl, "
                                    f"queries.jsonl and qrels/{split}.tsv)")
    corpus = {}
    for _, d in _jsonl(folder / "corpus.jsonl", ("_id", "text")):
        title = (d.get("title") or "").strip()
        corpus[str(d["_id"])] = f"{title}\n{d['text']}" if title else d["text"]
    queries = {str(q["_id"]): q["text"] for _, q in _jsonl(folder / "queries.jsonl", ("_id", "text"))}
    qrels_path = folder / "qrels" / f"{split}.tsv"
    qrels = read_qrels(qrels_path, corpus)
    unknown = sorted(set(qrels) - set(queries))
    if unknown:
        raise UserError(f"{qrels_path}: query ids not in queries.jsonl: {unknown[:5]}")
    return RetrievalSet(corpus, queries, qrels)


def finetune_to_beir(jsonl: str | Path, out: str | Path, split: str = "test") -> RetrievalSet:
    """{"query", "pos": [...], "neg": [...]} lines to a BEIR folder.

    Passages are deduplicated by text; positives get grade 1, hard negatives stay in
    the corpus as distractors.
    """
    out = Path(out)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    doc_ids: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for line_no, row in _jsonl(Path(jsonl), ("query", "pos")):
        qid = f"q{line_no}"
        queries[qid] = row["query"]
        for passage in list(row["pos"]) + list(row.get("neg", [])):
            doc_ids.setdefault(passage, f"d{len(doc_ids)}")
        qrels[qid] = {doc_ids[p]: 1 for p in row["pos"]}
    corpus = {i: t for t, i in doc_ids.items()}
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for did, text in corpus.items():
            f.write(json.dumps({"_id": did, "title": "", "text": text}, ensure_ascii=False) + "\n")
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
    with open(out / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, docs in qrels.items():
            for did, grade in docs.items():
                f.write(f"{qid}\t{did}\t{grade}\n")
    return RetrievalSet(corpus, queries, qrels)


def configure(parser) -> None:
    parser.add_argument("--finetune", required=True, help='JSON lines {"query", "pos": [...], "neg": [...]}')
    parser.add_argument("--out", required=True, help="BEIR folder to write")
    parser.add_argument("--split", default="test")


def run(args) -> int:
    data = finetune_to_beir(args.finetune, args.out, args.split)
    print(json.dumps({"out": args.out, "queries": len(data.queries), "corpus": len(data.corpus),
                      "qrels": sum(len(d) for d in data.qrels.values())}))
    return 0
