"""Orbax checkpoints of a train state plus its data position, shared by the SAE and LIMe trainers."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp


def manager(out_dir: Path, keep: int) -> ocp.CheckpointManager:
    """The manager of `out_dir/checkpoints`, keeping the newest `keep` steps."""
    return ocp.CheckpointManager((Path(out_dir) / "checkpoints").absolute(),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=keep))


def save(mgr: ocp.CheckpointManager, step: int, state, position: dict) -> None:
    """Save `state` and the data position (JSON) as checkpoint `step`."""
    mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(position, step=step))))


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state, shardings, position: dict):
    """The state of checkpoint `step`, placed with `shardings`; an error if it was made on another data stream."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    restored = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    saved = {k: restored.data.get(k) for k in position}
    if saved != position:
        raise ValueError(f"checkpoint {step} in {mgr.directory} was made on another data stream: "
                         f"{saved} != {position}")
    return restored.state


def trim_log(path: Path, step: int) -> None:
    """Drop log lines past `step`, written by a run that died after its last checkpoint."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))
