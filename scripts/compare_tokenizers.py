"""Token ids of lime_jax's SmolLM2 tokenizer against HF transformers' GGUF tokenizer on held-out documents.

`python scripts/compare_tokenizers.py [docs_per_corpus]` (needs `transformers`); prints one JSON line per corpus.
The two differ exactly where two or more whitespace characters precede a digit (see docs/DATA.md).
"""
import itertools
import json
import os
import re
import sys

import transformers

from lime_jax.corpora import CORPORA, corpus_file
from lime_jax.gguf import find_smollm2_gguf
from lime_jax.tokenizer import load_tokenizer


def main(n_docs: int = 300) -> None:
    path = find_smollm2_gguf()
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok = load_tokenizer()
    for name in CORPORA:
        with open(corpus_file(name, "heldout")) as f:
            docs = [json.loads(line)["text"] for line in itertools.islice(f, n_docs)]
        equal = [tok.encode(d).ids == hf(d, add_special_tokens=False)["input_ids"] for d in docs]
        space_digit = [re.search(r"\s\s\d", d) is not None for d in docs]
        print(json.dumps({"corpus": name, "docs": len(docs), "equal": sum(equal),
                          "without_space_digit": space_digit.count(False),
                          "equal_without_space_digit": sum(e for e, s in zip(equal, space_digit) if not s)}))


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
