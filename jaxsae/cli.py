"""`jaxsae SUBCOMMAND [key=value ...]`: each subcommand lives in its own module's `main(argv)`."""
from __future__ import annotations

import importlib
import sys

from jaxsae import configlib

COMMANDS = {
    "train": ("jaxsae.train", "train a seed ensemble of SAEs on an activation source"),
    "harvest": ("jaxsae.harvest", "run a model (default SmolLM2) over a corpus and write an activation cache"),
    "eval": ("jaxsae.evaluate", "EV, L0, dead fraction, CE delta and loss recovered of saved SAEs"),
    "stability": ("jaxsae.stability", "per-feature stability p_i of a seed ensemble (any number of processes)"),
    "plan": ("jaxsae.plan", "memory, FLOPs and step time of a training step on a mesh, from XLA's accounting"),
    "browse": ("jaxsae.browse", "write a static feature browser (HTML) of a run's seeds over a held-out cache"),
}


def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str] | None) -> int:
    """Run `commands[argv[0]]`'s module `main(argv[1:])` (user errors: one line, exit 2); usage otherwise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(f"usage: {prog} {{" + ",".join(commands) + "} [key=value ...]")
        for name, (_, doc) in commands.items():
            print(f"  {name:11s} {doc}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(commands[argv[0]][0])
    return configlib.run(module.main, argv[1:], prog=f"{prog} {argv[0]}")


def main(argv: list[str] | None = None) -> int:
    return dispatch("jaxsae", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
