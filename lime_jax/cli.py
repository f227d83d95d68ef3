"""`lime_jax SUBCOMMAND [key=value ...]`: each subcommand lives in its own module's `main(argv)`."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("lime_jax.train", "train Llama or LIMe from scratch on the general corpus"),
    "corpora": ("lime_jax.corpora", "fetch and build the offline corpora from Debian packages"),
    "perplexity": ("lime_jax.perplexity", "nats/token of SmolLM2 on a text file"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: lime_jax {" + ",".join(COMMANDS) + "} [key=value ...]")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:11s} {doc}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
