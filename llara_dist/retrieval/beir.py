"""BEIR-layout retrieval sets: read them, and build one from fine-tuning JSON lines.

A BEIR folder holds `corpus.jsonl` ({"_id", "title", "text"}), `queries.jsonl`
({"_id", "text"}) and `qrels/<split>.tsv` (header, then `query-id corpus-id score`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from llara_dist.errors import UserError
from llara_dist.textfiles import read_lines

BEIR_FILES = ("corpus.jsonl", "queries.jsonl", "qrels")  # what make-beir writes into its --out


@dataclass
class RetrievalSet:
    corpus: dict[str, str]  # doc id -> text (title prepended when present)
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> grade


def read_records(path: Path, what: str) -> dict[str, str]:
    """id -> text of a corpus.jsonl or queries.jsonl ({"_id", "text", "title"?}), read by the rules of
    encode's JSON input (ids, field types, a title on a line before the text, an id given twice
    refused), so that eval in memory and eval --emb-dir (which encodes these files) see the same
    texts; a file without records is refused."""
    from llara_dist.retrieval.encode import unique_documents

    records = dict(unique_documents(path))
    if not records:
        raise UserError(f"{path}: no {what} (the file is empty or blank)")
    return records


def read_qrels(path: str | Path, corpus=None) -> dict[str, dict[str, int]]:
    """Relevance judgements, query -> document -> grade, in any of the usual layouts:
    BEIR `query-id<TAB>corpus-id<TAB>score` (a header line allowed), and TREC qrels
    `query iteration document grade` (whitespace-separated; MS MARCO's qrels.dev.small.tsv is
    this with tabs). The number of fields on a line tells which. With `corpus` (its ids), a
    document not in it is refused, naming the line."""
    qrels: dict[str, dict[str, int]] = {}
    first = True
    for line_no, line in read_lines(path, "qrels file"):
        parts = line.split("\t") if "\t" in line else line.split()
        if first and not parts[-1].lstrip("-").isdigit():
            first = False
            continue  # a header: the first non-blank line
        first = False
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
    corpus = read_records(folder / "corpus.jsonl", "documents")
    queries = read_records(folder / "queries.jsonl", "queries")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    qrels = read_qrels(qrels_path, corpus)
    unknown = sorted(set(qrels) - set(queries))
    if unknown:
        raise UserError(f"{qrels_path}: query ids not in queries.jsonl: {unknown[:5]}")
    if not any(grade > 0 for docs in qrels.values() for grade in docs.values()):
        # every metric would be a mean over no query: 0.0, which reads as a result
        raise UserError(f"{qrels_path}: no query with a relevant document (a score above 0) in it")
    return RetrievalSet(corpus, queries, qrels)


def _check_out(jsonl: Path, out: Path, overwrite: bool) -> None:
    """Refuse an --out that would overwrite the input, or a BEIR set already there without --overwrite
    (a stale qrels/<other split>.tsv would stay mixed in with the new set)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    source = jsonl.resolve()
    for name in BEIR_FILES:
        target = (out / name).resolve()
        if source == target or target in source.parents:
            raise UserError(f"--out {out}: would overwrite the input {jsonl} (its {name}); write the BEIR "
                            "folder elsewhere")
    present = [name for name in BEIR_FILES if (out / name).exists()]
    if present and not overwrite:
        raise UserError(f"--out {out}: already holds {', '.join(present)}; pass --overwrite to replace "
                        "them, or write elsewhere")


def finetune_to_beir(jsonl: str | Path, out: str | Path, split: str = "test",
                     overwrite: bool = False) -> RetrievalSet:
    """{"query", "pos": [...], "neg": [...]} lines to a BEIR folder.

    Lines are checked as finetune checks them (finetune_data.read_examples), all before anything is
    written. Passages are deduplicated by text; positives get grade 1, hard negatives stay in
    the corpus as distractors. Query ids are `q<line number>`.
    """
    from llara_dist.retrieval.finetune_data import read_examples

    jsonl, out = Path(jsonl), Path(out)
    _check_out(jsonl, out, overwrite)
    examples = read_examples(jsonl, group_size=1)
    doc_ids: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for example in examples:
        qid = f"q{example.line}"
        queries[qid] = example.query
        for passage in example.pos + example.neg:
            doc_ids.setdefault(passage, f"d{len(doc_ids)}")
        qrels[qid] = {doc_ids[p]: 1 for p in example.pos}
    corpus = {i: t for t, i in doc_ids.items()}
    for name in BEIR_FILES:  # --overwrite: the earlier set goes whole, no split of it left behind
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    (out / "qrels").mkdir(parents=True)
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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the corpus.jsonl, queries.jsonl and qrels/ already in --out")


def run(args) -> int:
    data = finetune_to_beir(args.finetune, args.out, args.split, args.overwrite)
    print(json.dumps({"out": args.out, "queries": len(data.queries), "corpus": len(data.corpus),
                      "qrels": sum(len(d) for d in data.qrels.values())}))
    return 0
