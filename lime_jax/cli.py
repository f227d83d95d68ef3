"""`lime_jax SUBCOMMAND [key=value ...]`: each subcommand lives in its own module's `main(argv)`."""
from __future__ import annotations

import sys

from jaxsae.cli import dispatch

COMMANDS = {
    "train": ("lime_jax.train", "train Llama or LIMe from scratch on the general corpus"),
    "corpora": ("lime_jax.corpora", "fetch and build the offline corpora from Debian packages"),
    "perplexity": ("lime_jax.perplexity", "nats/token of SmolLM2 on a text file"),
    "plan": ("lime_jax.plan", "memory, FLOPs and step time of the LM step on a mesh, from XLA's accounting"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("lime_jax", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
