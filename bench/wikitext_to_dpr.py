"""Write a corpus (any `llara-dist prep` format) as a DPR psgs_w100.tsv: `id<TAB>text<TAB>title`,
100-word passages with consecutive ids within an article. The corpus `bench-data` is measured on:

    python bench/wikitext_to_dpr.py ../shared/data/wikitext2_valid.txt wikitext psgs_w100.tsv
"""

import sys

from llara_dist.data.formats import Reader


def main(src: str, fmt: str, out: str, words_per_passage: int = 100) -> None:
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        for article in Reader([src], fmt):
            words = article.text.split() if article.chunks is None else " ".join(article.chunks).split()
            for i in range(0, len(words), words_per_passage):
                n += 1
                f.write(f"{n}\t{' '.join(words[i:i + words_per_passage])}\t{article.title}\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
