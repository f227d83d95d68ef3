"""Orbax checkpoints of a train state plus its data position, shared by the SAE and LIMe trainers.

Damaged checkpoints (truncated or missing files: a full disk, a killed copy) are skipped on restore:
`restore_latest` warns once per damaged step, on stderr, and falls back to the next older one. A damaged
step newer than the one restored is moved aside to `checkpoints/damaged-{step}`: left in place, orbax would
count it as the latest step and silently skip saving that step number again (`should_save` is False for
any step at or below the latest). With no intact checkpoint nothing is moved and restoring is an error.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import sys
import threading
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


@contextlib.contextmanager
def _quiet_orbax():
    """Hold back orbax's error output while a damaged checkpoint may be read; yields a list to set true on success.

    A failed read leaves absl error logs, tensorstore callbacks failing on a closed event loop and
    un-awaited coroutines, each printing pages to stderr; the user gets `restore_latest`'s one line instead.
    What was printed is passed on if the caller marks the read as successful.
    """
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [lg.level for lg in loggers]
    hooks = sys.stderr, sys.unraisablehook, threading.excepthook
    held, ok = io.StringIO(), []
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sys.stderr, sys.unraisablehook, threading.excepthook = held, lambda *_: None, lambda *_: None
    try:
        yield ok
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
            gc.collect()  # failed coroutines report themselves when collected
        sys.stderr, sys.unraisablehook, threading.excepthook = hooks
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if ok:
            sys.stderr.write(held.getvalue())


def manager(out_dir: Path, keep: int) -> ocp.CheckpointManager:
    """The manager of `out_dir/checkpoints`, keeping the newest `keep` steps."""
    with _quiet_orbax() as ok:  # it reads every step's metadata and logs the damaged ones itself
        mgr = ocp.CheckpointManager((Path(out_dir) / "checkpoints").absolute(),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=keep))
        ok.append(True)
    return mgr


def save(mgr: ocp.CheckpointManager, step: int, state, position: dict) -> None:
    """Save `state` and the data position (JSON) as checkpoint `step`."""
    mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(position, step=step))))


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _reason(err: BaseException) -> str:
    """One short line out of an exception: its root cause (orbax wraps tensorstore's), first line, clipped."""
    while err.__cause__ is not None:
        err = err.__cause__
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:240]}{'...' if len(first) > 240 else ''}"


def _set_aside(ckpt_dir: Path, step: int) -> Path:
    """Rename the step folder to `damaged-{step}` (`-2`, `-3`, ... if taken): a name orbax does not read as a step."""
    dest, n = ckpt_dir / f"damaged-{step}", 1
    while dest.exists():
        n += 1
        dest = ckpt_dir / f"damaged-{step}-{n}"
    (ckpt_dir / str(step)).rename(dest)
    return dest


def restore_latest(mgr: ocp.CheckpointManager, abstract_state, shardings, position: dict | None,
                   set_aside: bool = True):
    """(step, state) of the newest checkpoint that reads back whole, placed with `shardings`; None if there is none.

    Each damaged checkpoint gets one warning line; those newer than the restored one are moved aside
    (`set_aside=False`: left in place, for read-only callers). `position` (None: unchecked) must equal the
    saved data position, else an error: resuming on another data stream is a user error, not damage.
    """
    steps = sorted(mgr.all_steps(), reverse=True)
    if not steps:
        return None
    ckpt_dir = Path(mgr.directory)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    damaged, restored = [], None
    for step in steps:
        try:
            with _quiet_orbax() as ok:
                restored = mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
                ok.append(True)
            break
        except Exception as err:  # noqa: BLE001 (any failure to read is damage; orbax raises many kinds)
            damaged.append((step, _reason(err)))
    if restored is None:
        for step, reason in damaged:
            _warn(f"checkpoint {ckpt_dir / str(step)} is damaged ({reason}); left in place")
        raise ValueError(f"no intact checkpoint in {ckpt_dir} (steps {steps} all fail to read); "
                         f"move that folder aside to start the run afresh")
    if position is not None:
        saved = {k: restored.data.get(k) for k in position}
        if saved != position:
            raise ValueError(f"checkpoint {step} in {ckpt_dir} was made on another data stream: "
                             f"{saved} != {position}")
    main = jax.process_index() == 0  # with several processes, one moves folders and speaks for all
    for bad, reason in damaged:
        if set_aside and main:
            _warn(f"checkpoint {ckpt_dir / str(bad)} is damaged ({reason}); moved it to "
                  f"{_set_aside(ckpt_dir, bad)}, resuming from step {step}")
        elif main:
            _warn(f"checkpoint {ckpt_dir / str(bad)} is damaged ({reason}); using step {step}")
    if damaged and set_aside:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxsae.checkpoint: damaged steps set aside")
        mgr.reload()  # forget the steps moved aside, so they are saved again
    return step, restored.state


def trim_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the restored checkpoint) and any cut-off line (a full disk)."""
    if not path.exists():
        return
    kept, broken = [], 0
    for ln in path.read_text().splitlines():
        try:
            if ln and json.loads(ln)["step"] <= step:
                kept.append(ln)
        except (ValueError, KeyError, TypeError):
            broken += 1
    if broken:
        _warn(f"{path}: dropped {broken} unreadable line(s)")
    path.write_text("".join(ln + "\n" for ln in kept))
