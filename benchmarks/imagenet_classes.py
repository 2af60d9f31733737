"""Write edgevits' ImageNet-1k class list (package data) from the synset files timm installs, and print a summary.

    python benchmarks/imagenet_classes.py [--out edgevits/checkpoint/imagenet_classes.txt]

timm's ``data/_info/imagenet_synsets.txt`` lists the 1000 synsets in class-index order (the order of the sorted
ImageNet training folders every published checkpoint uses) and ``imagenet_synset_to_lemma.txt`` their WordNet
lemmas. Each line written is ``index<TAB>synset<TAB>name``: the synset's first lemma, or its first two when the first
lemma names another class too (``maillot`` and ``maillot, tank suit``), with the synset added where even that is
shared (``crane`` the bird and ``crane`` the machine). Needs timm (``pip install timm
--no-deps``); run it once when the list has to be regenerated: the file it writes is data, committed with the code.
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path


def _timm_info() -> Path:
    from edgevits.testing import import_timm
    return Path(import_timm().__file__).parent / "data" / "_info"


def class_lines(info: Path) -> list[str]:
    """``index<TAB>synset<TAB>name`` for the 1000 classes, in class-index order."""
    synsets = [s.strip() for s in (info / "imagenet_synsets.txt").read_text().splitlines() if s.strip()]
    lemmas = {}
    for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines():
        synset, _, text = line.partition("\t")
        lemmas[synset] = [w.strip() for w in text.split(",") if w.strip()]
    first = collections.Counter(lemmas[s][0] for s in synsets)
    names = [", ".join(lemmas[s][:2]) if first[lemmas[s][0]] > 1 else lemmas[s][0] for s in synsets]
    still = collections.Counter(names)
    names = [f"{n} ({s})" if still[n] > 1 else n for s, n in zip(synsets, names)]
    return [f"{i}\t{s}\t{n}" for i, (s, n) in enumerate(zip(synsets, names))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "edgevits" / "checkpoint" /
                                             "imagenet_classes.txt"))
    args = parser.parse_args()
    lines = class_lines(_timm_info())
    assert len(lines) == 1000, len(lines)
    Path(args.out).write_text("\n".join(lines) + "\n")
    names = [line.split("\t")[2] for line in lines]
    dup = [n for n, c in collections.Counter(names).items() if c > 1]
    print(f"wrote {len(lines)} classes to {args.out}; first {names[0]!r}, last {names[-1]!r}; "
          f"names still shared by two classes: {dup or 'none'}")


if __name__ == "__main__":
    main()
