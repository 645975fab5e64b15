#!/usr/bin/env python3
"""Train the default model's tokenizer and pre-tokenize the corpus.

Byte-level BPE (the ``tokenizers`` library: ByteLevel pre-tokenizer and decoder,
no normaliser), vocabulary 8192, special tokens ``<unk>`` (0), ``<s>`` (1) and
``</s>`` (2). A TemplateProcessing post-processor puts ``<s>`` in front of every
encoded sequence, as Llama and Mixtral tokenizers do.

Writes into ``--out``:
  tokenizer.json, tokenizer_config.json (bos/eos tokens, model_max_length,
  a Mixtral-style chat template);
and into ``--tokens-out``:
  train.npy, heldout.npy  uint16 token streams: for every document
  ``<s> document </s>``, concatenated;
  meta.json               counts and the tokenizer's sha256.

    python3 scripts/train_tokenizer.py --corpus .data/corpus --out .data/tokenizer --tokens-out .data/tok
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIALS = ["<unk>", "<s>", "</s>"]
SEP = "</s>"

# Mixtral's template; a system message is folded into the next user turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% else %}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)


def documents(path: Path):
    text = path.read_text(encoding="utf-8")
    for doc in text.split(SEP):
        if doc.strip():
            yield doc


def build(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path(".data/corpus"))
    ap.add_argument("--out", type=Path, default=Path(".data/tokenizer"))
    ap.add_argument("--tokens-out", type=Path, default=Path(".data/tok"))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="folder with an existing tokenizer.json and tokenizer_config.json (for example the shipped "
                         "src/daop/assets/daop-moe-mini): pre-tokenize with it instead of training a new one")
    ap.add_argument("--model-max-length", type=int, default=1024)
    args = ap.parse_args(argv)

    train_txt = args.corpus / "train.txt"
    held_txt = args.corpus / "heldout.txt"
    for p in (train_txt, held_txt):
        if not p.exists():
            print(f"{p} not found; build the corpus first: python3 scripts/corpus.py --out {args.corpus}", file=sys.stderr)
            return 1

    if args.tokenizer is not None:
        tok = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
        assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2], "special tokens must be ids 0, 1, 2"
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (args.out / name).write_bytes((args.tokenizer / name).read_bytes())
        print(f"using the tokenizer of {args.tokenizer} (vocab={tok.get_vocab_size()})")
    else:
        t0 = time.time()
        tok, trainer = build(args.vocab_size)
        tok.train_from_iterator(documents(train_txt), trainer=trainer)
        assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2], "special tokens must be ids 0, 1, 2"
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A",
            pair="<s> $A <s> $B",
            special_tokens=[("<s>", 1)],
        )
        print(f"trained BPE vocab={tok.get_vocab_size()} in {time.time() - t0:.1f}s")

        args.out.mkdir(parents=True, exist_ok=True)
        tok.save(str(args.out / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": args.model_max_length,
            "padding_side": "left",
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
        (args.out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # Pre-tokenize: <s> doc </s> for every document; the post-processor adds <s>.
    args.tokens_out.mkdir(parents=True, exist_ok=True)
    meta = {
        "vocab_size": tok.get_vocab_size(),
        "bos_id": 1,
        "eos_id": 2,
        "tokenizer_sha256": hashlib.sha256((args.out / "tokenizer.json").read_bytes()).hexdigest(),
    }
    for name, path in (("train", train_txt), ("heldout", held_txt)):
        docs = list(documents(path))
        ids: list[int] = []
        for enc in tok.encode_batch(docs):
            ids.extend(enc.ids)
            ids.append(2)
        arr = np.asarray(ids, dtype=np.uint16)
        np.save(args.tokens_out / f"{name}.npy", arr)
        nbytes = sum(len(d.encode("utf-8")) for d in docs)
        meta[name] = {"documents": len(docs), "tokens": int(arr.size), "bytes": nbytes, "bytes_per_token": nbytes / arr.size}
        print(f"{name}: {len(docs)} docs, {arr.size} tokens, {nbytes / arr.size:.2f} bytes/token")
    (args.tokens_out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
